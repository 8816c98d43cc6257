# Copyright (c) consistency_manager authors

# Protects the background worker (docs/ARCHITECTURE.md, section 6):
#  - it starts with the server and syncs what is written to queue-db with
#    no manual call;
#  - it shows in pg_stat_activity as backend_type and application_name
#    consistency_manager;
#  - SIGHUP applies a new consistency_manager.polling_interval;
#  - consistency_manager.enabled = off stops its cycles, on resumes them;
#  - cm_wake() runs a cycle now; cm_worker_stop() stops it for good and
#    cm_worker_start() brings it back;
#  - a request updated by a queue-db transaction that stays open for
#    several polling intervals (so the watermark passes its updated_at) is
#    still synced once it commits;
# and every request is applied exactly once throughout.

use strict;
use warnings;

use CmTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $ACCOUNTS = 20;

my $node = cm_node('worker', preload => 0,
	conf => [ "consistency_manager.polling_interval = '500ms'" ]);
$node->start;
setup_queue_db($node);
setup_portfolio_db($node, $node);
set_tiers($node, 'exact');
create_accounts($node, $ACCOUNTS, 'exact');
restart_with_preload($node);

sub cycles { return stats($node)->{cycles}; }

sub reload_with
{
	my ($setting) = @_;
	$node->safe_psql('portfolio', "ALTER SYSTEM SET $setting");
	$node->safe_psql('portfolio', 'SELECT pg_reload_conf()');
	return;
}

# the number of cycles once it stops moving for $quiet seconds (the worker
# finished what it was doing when the configuration changed)
sub settled_cycles
{
	my ($quiet) = @_;
	my $settled;
	wait_until(
		sub {
			my $c1 = cycles();
			usleep($quiet * 1_000_000);
			my $c2 = cycles();
			$settled = $c2 if $c1 == $c2;
			return $c1 == $c2;
		},
		60);
	return $settled;
}

############################################################################
# starts with the server, syncs on its own
############################################################################

ok( $node->poll_query_until('portfolio',
		q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'consistency_manager'}, '1'),
	'the worker starts with the server');

add_requests($node, 'start', 100, $ACCOUNTS);
wait_synced($node, $node, 'requests written after start-up');
is( $node->safe_psql('portfolio',
		q{SELECT count(*) > 0 AND count(*) FILTER (WHERE trigger <> 'worker') = 0 FROM cm.cycle_history}),
	't', 'only the worker ran cycles (cm.cycle_history)');
check_oracle($node, $node, 'worker sync', exact => 1);

# The worker's writes reach the cumulative statistics while it keeps running
# (a background worker flushes them itself): without them autovacuum would
# never vacuum or analyze the tables the worker writes (the journal keeps
# growing under retention, the planner keeps empty-table estimates).
my $written = $node->safe_psql('portfolio', 'SELECT count(*) FROM portfolio_transactions');
ok( $node->poll_query_until('portfolio',
		"SELECT n_tup_ins >= $written FROM pg_stat_user_tables WHERE relid = 'portfolio_transactions'::regclass"),
	"the worker's inserts show in pg_stat_user_tables while it runs ($written rows)");
ok( $node->poll_query_until('portfolio',
		q{SELECT n_tup_ins > 0 FROM pg_stat_all_tables WHERE relid = 'cm.ledger'::regclass}),
	"and those into cm.ledger");

############################################################################
# pg_stat_activity
############################################################################

my $pid = stats($node)->{worker_pid};
ok($pid, "cm_stats() reports the worker's pid ($pid)");
is( $node->safe_psql('portfolio',
		"SELECT backend_type || '|' || application_name || '|' || datname FROM pg_stat_activity WHERE pid = $pid"),
	'consistency_manager|consistency_manager|portfolio',
	'pg_stat_activity shows the worker with backend_type and application_name consistency_manager, in database portfolio');

############################################################################
# SIGHUP: polling_interval
############################################################################

reload_with(q{consistency_manager.polling_interval = '1h'});
is($node->safe_psql('portfolio', 'SHOW consistency_manager.polling_interval'),
	'1h', 'a new session sees polling_interval = 1h after pg_reload_conf()');
my $c = settled_cycles(1.5);
ok(defined $c, 'after the reload the worker stops cycling every 500ms (its next turn is an hour away)');

# cm_wake() runs a cycle now
add_requests($node, 'wake', 2, $ACCOUNTS);
is(cycles(), $c, 'no cycle ran since (the interval is one hour)');
is($node->safe_psql('portfolio', 'SELECT cm_wake()'), 't', 'cm_wake() reaches the worker');
wait_synced($node, $node, 'cm_wake()');
ok(cycles() > $c, 'cm_wake() made the worker run a cycle');

reload_with(q{consistency_manager.polling_interval = '200ms'});
is($node->safe_psql('portfolio', 'SHOW consistency_manager.polling_interval'),
	'200ms', 'a new session sees polling_interval = 200ms');
$c = cycles();
# 15 s is 75 turns of 200ms; the bound keeps the suite short when it fails
ok(wait_until(sub { cycles() >= $c + 3 }, 15),
	'with polling_interval back to 200ms cycles continue without cm_wake()')
  or do
{
	diag('cm_stats().cycles went from ' . $c . ' to ' . cycles()
		  . ' in 15 s after the reload: the worker still waits out the old interval (1h)');
	# wake it so that the checks below still run
	$node->safe_psql('portfolio', 'SELECT cm_wake()');
};
add_requests($node, 'fast', 2, $ACCOUNTS);
wait_synced($node, $node, 'polling_interval = 200ms');

############################################################################
# enabled = off / on
############################################################################

reload_with('consistency_manager.enabled = off');
ok( $node->poll_query_until('portfolio', 'SELECT worker_state FROM cm_stats()', 'disabled'),
	"enabled = off: cm_stats().worker_state is 'disabled'");
like($node->safe_psql('portfolio', "SELECT query FROM pg_stat_activity WHERE pid = $pid"),
	qr/disabled/, 'pg_stat_activity says the worker is disabled');
$c = cycles();
my $ntx = $node->safe_psql('portfolio', 'SELECT count(*) FROM portfolio_transactions');
add_requests($node, 'off', 2, $ACCOUNTS);
usleep(1_000_000);    # five polling intervals
is(cycles(), $c, 'enabled = off: cm_stats().cycles stops increasing');
is($node->safe_psql('portfolio', 'SELECT count(*) FROM portfolio_transactions'),
	$ntx, 'enabled = off: new requests are not synced');
is(stats($node)->{worker_pid}, $pid, 'the disabled worker stays connected');

$node->safe_psql('portfolio', 'ALTER SYSTEM RESET consistency_manager.enabled');
$node->safe_psql('portfolio', 'SELECT pg_reload_conf()');
wait_synced($node, $node, 'enabled = on again');
ok(cycles() > $c, 'enabled = on: cycles resume');

############################################################################
# the cycle lock: the worker skips its turn, a manual cycle waits
############################################################################

my $holder = $node->background_psql('portfolio');
$holder->query_safe('BEGIN; SELECT pg_advisory_xact_lock(17229, 1)');
my $skipped = stats($node)->{skipped_turns};
$c = cycles();
$ntx = $node->safe_psql('portfolio', 'SELECT count(*) FROM portfolio_transactions');
add_requests($node, 'locked', 2, $ACCOUNTS);
ok( $node->poll_query_until('portfolio', "SELECT skipped_turns >= $skipped + 3 FROM cm_stats()"),
	'while a session holds the cycle lock the worker skips its turns (cm_stats().skipped_turns)');
is(cycles(), $c, 'and runs no cycle');
is($node->safe_psql('portfolio', 'SELECT count(*) FROM portfolio_transactions'),
	$ntx, 'so nothing is synced meanwhile');
my $manual = start_async($node, 'portfolio', 'SELECT created FROM cm_sync_now()');
ok( $node->poll_query_until('portfolio',
		q{SELECT wait_event_type || ':' || wait_event FROM pg_stat_activity WHERE query = 'SELECT created FROM cm_sync_now()'},
		'Lock:advisory'),
	'a manual cm_sync_now() waits for the cycle lock');
$holder->query_safe('COMMIT');
close_bg($holder);
my ($mok, $mout, $merr) = finish_async($manual);
ok($mok, 'the manual cycle runs once the lock is free') or diag($merr);
wait_synced($node, $node, 'after the cycle lock is released');

############################################################################
# cm_worker_stop() / cm_worker_start()
############################################################################

is($node->safe_psql('portfolio', 'SELECT cm_worker_stop()'), 't', 'cm_worker_stop() stops the running worker');
ok( $node->poll_query_until('portfolio', q{SELECT worker_pid IS NULL FROM cm_stats()}),
	'cm_worker_stop(): cm_stats().worker_pid becomes NULL');
ok( $node->poll_query_until('portfolio',
		q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'consistency_manager'}, '0'),
	'cm_worker_stop(): the worker leaves pg_stat_activity');
is($node->safe_psql('portfolio', 'SELECT cm_wake()'), 'f', 'cm_wake() says false when no worker runs');
is($node->safe_psql('portfolio', 'SELECT cm_worker_stop()'), 'f', 'cm_worker_stop() says false when no worker runs');
add_requests($node, 'stopped', 2, $ACCOUNTS);
# the static worker's restart time is 5 s: it must not come back by itself
usleep(6_000_000);
is( $node->safe_psql('portfolio',
		q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'consistency_manager'}),
	'0', 'the stopped worker is not restarted by the postmaster');

is($node->safe_psql('portfolio', 'SELECT cm_worker_start()'), 't', 'cm_worker_start() starts a worker');
ok( $node->poll_query_until('portfolio',
		"SELECT worker_pid IS NOT NULL AND worker_pid <> $pid FROM cm_stats()"),
	'cm_stats() reports the new worker');
my $pid2 = stats($node)->{worker_pid};
ok( $node->poll_query_until('portfolio',
		"SELECT backend_type || '|' || application_name FROM pg_stat_activity WHERE pid = $pid2",
		'consistency_manager|consistency_manager'),
	"the new worker ($pid2) is in pg_stat_activity");
wait_synced($node, $node, 'after cm_worker_start()');
is($node->safe_psql('portfolio', 'SELECT cm_worker_start()'), 'f', 'cm_worker_start() says false when one already runs');

############################################################################
# a queue-db transaction open for several polling intervals
############################################################################

my $uuid = $node->safe_psql('queue',
	q{SELECT uuid FROM investment_queue WHERE status = 'PENDING' ORDER BY queue_id LIMIT 1});
is($node->safe_psql('portfolio', "SELECT status FROM portfolio_transactions WHERE id = '$uuid'"),
	'PENDING', 'the request is synced as PENDING');

my $slow = $node->background_psql('queue');
$slow->query_safe('BEGIN');
$slow->query_safe("UPDATE investment_queue SET status = 'COMPLETED' WHERE uuid = '$uuid'");
my $t0 = $slow->query_safe('SELECT now()');    # the updated_at it stamped
$c = cycles();
for my $round (1 .. 3)
{
	add_requests($node, "meanwhile$round", 2, $ACCOUNTS, first_account => 2 * $round);
	wait_synced($node, $node, "committed requests, round $round, while a transaction stays open");
}
ok( $node->poll_query_until('portfolio',
		"SELECT bool_and(watermark > '$t0') FROM cm.source"),
	"every source's watermark passed the open transaction's updated_at ($t0)");
ok( $node->poll_query_until('portfolio', "SELECT cycles >= $c + 3 FROM cm_stats()"),
	'at least three cycles ran while it stayed open');
is($node->safe_psql('portfolio', "SELECT status FROM portfolio_transactions WHERE id = '$uuid'"),
	'PENDING', 'its uncommitted change is not synced');
$slow->query_safe('COMMIT');
close_bg($slow);
ok( $node->poll_query_until('portfolio', "SELECT status FROM portfolio_transactions WHERE id = '$uuid'",
		'COMPLETED'),
	'after COMMIT the late change is synced (look-back window)');
wait_synced($node, $node, 'after the late commit');
check_oracle($node, $node, 'end of worker test', exact => 1);

is(stats($node)->{errors}, '0', 'no cycle failed');
$node->stop;
done_testing();
