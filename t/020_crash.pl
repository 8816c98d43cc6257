# Copyright (c) consistency_manager authors

# Protects: exactly-once through crashes.  A cycle interrupted at any point
# leaves nothing behind (the watermark, the ledger and every effect commit
# together), and the next cycle applies every request exactly once.
#
#  (a) the backend running cm_sync_now() is terminated after the cycle has
#      processed the first source and while it reads the second one;
#  (b) the server stops in immediate mode (a crash: recovery follows) while
#      the cycle is in the middle of its processing statement, with new
#      requests, late completions and compensations pending.
#
# Both interruptions are placed deterministically: a lock held by another
# session makes the cycle wait at the chosen point, and the test sees it
# waiting in pg_stat_activity before it strikes.

use strict;
use warnings;

use CmTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $ACCOUNTS = 500;
my $CYCLE_SQL = 'SELECT * FROM cm_sync_now()';

my $node = cm_node('crash', preload => 0,
	conf => [
		"consistency_manager.enabled = off",
		# many keyset pages per source
		"consistency_manager.batch_size = 2500",
	]);
$node->start;
setup_queue_db($node);
create_portfolio_db($node);
restart_with_preload($node);
setup_portfolio_db($node, $node);
set_tiers($node, 'exact');
create_accounts($node, $ACCOUNTS, 'exact');

# 50000 requests, one completion in ten
add_requests($node, 'a', 25000, $ACCOUNTS,
	statuses => [qw(COMPLETED PENDING FAILED PROCESSING CANCELLED PENDING PROCESSING FAILED PENDING PROCESSING)]);

# pid of the session running the cycle, once it is active and waiting on a lock
sub cycle_waiting_pid
{
	my $pid;
	my $ok = $node->poll_query_until('portfolio',
		"SELECT count(*) = 1 FROM pg_stat_activity WHERE query = '$CYCLE_SQL' AND state = 'active'");
	$pid = $node->safe_psql('portfolio',
		"SELECT pid FROM pg_stat_activity WHERE query = '$CYCLE_SQL' AND state = 'active'") if $ok;
	return $pid;
}

############################################################################
# (a) terminate the backend mid-cycle
############################################################################

my $snap0 = portfolio_snapshot($node);
my $heap0 = $node->safe_psql('portfolio', q{SELECT pg_relation_size('portfolio_transactions')});

# withdrawal_queue (source 2) is locked in queue-db: the cycle reads source 1,
# then its remote read of source 2 waits (every source is read before
# anything is written)
my $locker = $node->background_psql('queue');
$locker->query_safe('BEGIN; LOCK TABLE withdrawal_queue IN ACCESS EXCLUSIVE MODE');
my $cycle = start_async($node, 'portfolio', $CYCLE_SQL);

ok( $node->poll_query_until(
		'queue',
		q{SELECT count(*) > 0 FROM pg_stat_activity
		   WHERE datname = 'queue' AND wait_event_type = 'Lock' AND query LIKE '%withdrawal_queue%'}),
	'(a) the cycle reads source 2 and waits for its lock in queue-db');
my $pid = cycle_waiting_pid();
ok($pid, '(a) the cycle is active in portfolio-db');
ok( $node->safe_psql('portfolio', q{SELECT pg_relation_size('cm.stage')}) > 0,
	'(a) the cycle has already staged source 1 (uncommitted)');
is( $node->safe_psql('portfolio', q{SELECT pg_relation_size('portfolio_transactions')}), $heap0,
	'(a) and has written nothing to portfolio_transactions while queue-db keeps it waiting');

is($node->safe_psql('portfolio', "SELECT pg_terminate_backend($pid)"), 't', '(a) terminate the cycle');
my ($ok, $out, $err) = finish_async($cycle);
ok(!$ok, '(a) the terminated cm_sync_now() does not succeed');
like($err, qr/terminating connection due to administrator command/, '(a) it was terminated')
  or diag("stdout: $out");
$locker->query_safe('ROLLBACK');
close_bg($locker);

is(portfolio_snapshot($node), $snap0,
	'(a) nothing of the terminated cycle remains: transactions, portfolios, ledger and watermarks as before');
is($node->safe_psql('portfolio', 'SELECT (SELECT count(*) FROM cm.batch) + (SELECT count(*) FROM cm.stage)'),
	'0', '(a) cm.batch and cm.stage are empty');

is( $node->safe_psql('portfolio',
		'SELECT sources, rows_read, created, updated, completed_applied, compensated, dead_lettered FROM cm_sync_now()'),
	'2|50000|50000|0|5000|0|0',
	'(a) the next cycle reads and applies all 50000 requests once');
check_oracle($node, $node, '(a) after terminate and retry', exact => 1);

############################################################################
# (b) immediate shutdown (crash) mid-cycle
############################################################################

# late completions and compensations of requests synced in (a) ...
my $comp = 0;
my $late = 0;
$comp += set_status($node, 'investment_queue', q{status = 'COMPLETED' AND uuid < '4'}, 'CANCELLED');
$comp += set_status($node, 'withdrawal_queue', q{status = 'COMPLETED' AND uuid < '4'}, 'FAILED');
$late += set_status($node, 'investment_queue', q{status = 'PENDING' AND uuid < '3'}, 'COMPLETED');
$late += set_status($node, 'withdrawal_queue', q{status = 'PROCESSING' AND uuid < '3'}, 'COMPLETED');
my $other = set_status($node, 'investment_queue', q{status = 'PROCESSING' AND uuid < '3'}, 'FAILED');
# ... and new requests (one new completion per account and kind)
add_requests($node, 'b', 5 * $ACCOUNTS, $ACCOUNTS,
	statuses => [qw(COMPLETED PENDING FAILED PROCESSING CANCELLED)]);
ok($comp > 0 && $late > 0 && $other > 0,
	"(b) queue-db has $comp compensations, $late late completions, $other other status changes pending");

my $snap1 = portfolio_snapshot($node);

# an application session holds an account that the cycle must update
my $blocker = $node->background_psql('portfolio');
$blocker->query_safe(q{BEGIN; SELECT accountid FROM user_portfolios WHERE accountid = 'ACC00007' FOR UPDATE});
$cycle = start_async($node, 'portfolio', $CYCLE_SQL);
ok( $node->poll_query_until('portfolio',
		"SELECT wait_event_type FROM pg_stat_activity WHERE query = '$CYCLE_SQL' AND state = 'active'", 'Lock'),
	'(b) the cycle is in its processing statement, waiting for the account row');

$node->stop('immediate');
($ok, $out, $err) = finish_async($cycle);
ok(!$ok, '(b) the cm_sync_now() caught by the crash does not succeed');
close_bg($blocker);
$node->start;

is(portfolio_snapshot($node), $snap1,
	'(b) after crash recovery nothing of the interrupted cycle remains');
is($node->safe_psql('portfolio', 'SELECT count(*) FROM cm.batch'), '0', '(b) cm.batch is empty after recovery');

is( $node->safe_psql('portfolio',
		'SELECT created, updated, completed_applied, compensated, dead_lettered FROM cm_sync_now()'),
	sprintf('%d|%d|%d|%d|0', 10 * $ACCOUNTS, $comp + $late + $other, 2 * $ACCOUNTS + $late, $comp),
	'(b) the next cycle creates the new requests and applies every change once');
check_oracle($node, $node, '(b) after crash recovery and retry', exact => 1);

# and once more: nothing left to do
my $snap2 = portfolio_snapshot($node);
is( $node->safe_psql('portfolio',
		'SELECT created, updated, completed_applied, compensated, dead_lettered FROM cm_sync_now()'),
	'0|0|0|0|0', 'a further cycle has nothing to do');
is(portfolio_snapshot($node), $snap2, 'and changes nothing');

$node->stop;
done_testing();
