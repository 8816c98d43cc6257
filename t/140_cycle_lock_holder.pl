# Copyright (c) consistency_manager authors

# Protects: a session that keeps the cycle lock (a cm_sync_now() in a
# transaction left open) makes the worker skip every turn; that is never
# silent.  cm_cycle_lock() names the holder and says since when the worker
# has skipped its turns; cm_stats().skipped_turns counts them; past
# max(30 s, 10 * polling_interval) cm_health() is not healthy and its
# detail names the pid and how long; once the transaction ends the worker
# syncs again and cm_health() is healthy again.

use strict;
use warnings;

use CmTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $ACCOUNTS = 5;

my $node = cm_node('lockholder', preload => 0,
	conf => [ "consistency_manager.polling_interval = '100ms'" ]);
$node->start;
setup_queue_db($node);
setup_portfolio_db($node, $node);
create_accounts($node, $ACCOUNTS, 'market');
restart_with_preload($node);

add_requests($node, 'before', 5, $ACCOUNTS);
wait_synced($node, $node, 'before the lock is taken');
is($node->safe_psql('portfolio', 'SELECT healthy FROM cm_health()'), 't', 'healthy at first');
# (the worker holds the lock for each of its cycles, briefly)
ok( $node->poll_query_until('portfolio',
		q{SELECT held || ' ' || coalesce(holder_pid::text, 'NULL') || ' ' || coalesce(worker_skipping_since::text, 'NULL') FROM cm_cycle_lock()},
		'false NULL NULL'),
	'cm_cycle_lock(): nobody holds the cycle lock between cycles, the worker skips nothing');

############################################################################
# a manual cycle in a transaction that stays open
############################################################################

my $holder = $node->background_psql('portfolio');
my $pid = $holder->query_safe('SELECT pg_backend_pid()');
$holder->query_safe('BEGIN');
$holder->query_safe('SELECT cm_sync_now()');
my $skipped = stats($node)->{skipped_turns};
add_requests($node, 'during', 2, $ACCOUNTS);

ok($node->poll_query_until('portfolio', "SELECT skipped_turns >= $skipped + 5 FROM cm_stats()"),
	'the worker skips its turns (cm_stats().skipped_turns grows)');
is( $node->safe_psql('portfolio',
		q{SELECT held || ' ' || holder_pid || ' ' || holder_state || ' ' || (worker_skipping_since IS NOT NULL)
		    FROM cm_cycle_lock()}),
	"true $pid idle in transaction true",
	'cm_cycle_lock() names the session holding the cycle lock and says the worker is skipping its turns');

ok( $node->poll_query_until('portfolio', 'SELECT NOT healthy FROM cm_health()'),
	'past the threshold cm_health() is not healthy');
my $detail = $node->safe_psql('portfolio', 'SELECT detail FROM cm_health()');
like(
	$detail,
	qr/^the worker has skipped its turns for (\d+) s: the cycle lock is held by pid $pid \(idle in transaction, transaction open for (\d+) s\)/,
	'its detail names the pid holding the cycle lock, its state and for how long');
$detail =~ /skipped its turns for (\d+) s.*transaction open for (\d+) s/;
cmp_ok($1, '>=', 30, 'it warns only after the worker skipped its turns for 30 s (10 polling intervals are less)');
cmp_ok($2, '>=', $1, 'the transaction has been open at least as long');
is($node->safe_psql('portfolio', 'SELECT worker_running AND queue_reachable FROM cm_health()'),
	't', 'the worker still runs and queue-db is reachable');

############################################################################
# the transaction ends
############################################################################

$holder->query_safe('COMMIT');
close_bg($holder);
wait_synced($node, $node, 'once the lock is free');
ok($node->poll_query_until('portfolio', 'SELECT healthy FROM cm_health()'),
	'after COMMIT cm_health() is healthy again');
ok( $node->poll_query_until('portfolio',
		q{SELECT held || ' ' || coalesce(worker_skipping_since::text, 'NULL') FROM cm_cycle_lock()},
		'false NULL'),
	'cm_cycle_lock(): the lock is free between cycles and the worker takes its turns');

$node->stop;
done_testing();
