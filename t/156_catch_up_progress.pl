# Copyright (c) consistency_manager authors

# Protects: catching up a backlog in bounded cycles by hand, and watching it.
#  - cm_sync_now(keep_connections) runs one bounded cycle and says a source
#    is still behind; cm_sync_now(keep_connections, until_caught_up => true)
#    runs cycles until none is, in the caller's transaction;
#  - CALL cm_catch_up() commits after every bounded cycle and says where it
#    stands in a NOTICE; max_cycles stops it early;
#  - cm_sources().rows_behind counts the rows past the read position on
#    queue-db when a cycle stops at the limit, less the rows read since, and
#    is 0 once caught up;
#  - cm_progress() shows the running cycle (its backend, step and rows read
#    so far), and pg_stat_activity.query the worker's step.

use strict;
use warnings;

use CmTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $ACCOUNTS = 200;
my $LIMIT = 500;

my $queue = cm_node('queue', preload => 0);
$queue->start;
setup_queue_db($queue);

my $node = cm_node('portfolio', preload => 0,
	conf => [
		"consistency_manager.polling_interval = '1h'",
		"consistency_manager.max_rows_per_cycle = $LIMIT",
		"consistency_manager.batch_size = 200",
	]);
$node->start;
setup_portfolio_db($node, $queue);
set_tiers($node, 'exact');
create_accounts($node, $ACCOUNTS, 'exact');
restart_with_preload($node);
ok($node->poll_query_until('portfolio', q{SELECT worker_state = 'idle' FROM cm_stats()}),
	'the worker waits for its next turn, an hour away');

sub behind
{
	return $node->safe_psql('portfolio',
		q{SELECT string_agg(coalesce(rows_behind::text, 'NULL'), ',' ORDER BY source_id) FROM cm_sources()});
}

# ---------------------------------------------------------------- one bounded cycle
add_requests($queue, 'first', 3000, $ACCOUNTS);
is( $node->safe_psql('portfolio',
		'SELECT rows_read, cycles, behind FROM cm_sync_now(false)'),
	'1000|1|t', 'cm_sync_now(false): one cycle, 500 rows per source, and a source is behind');
is(behind(), '2500,2500',
	'cm_sources().rows_behind: the rows past the read position, counted on queue-db');
like( $node->safe_psql('portfolio', 'SELECT eta FROM cm_sources() WHERE source_id = 1'),
	qr/^\d\d:\d\d:\d\d$/, 'cm_sources().eta: the time they take at the last cycle\'s rate');
$node->safe_psql('portfolio', 'SELECT cm_sync_now(false)');
is(behind(), '2000,2000', 'the next cycle subtracts what it read, without counting again');

# ---------------------------------------------------------------- until caught up
is( $node->safe_psql('portfolio', 'SELECT rows_read, cycles, behind FROM cm_sync_now(false, until_caught_up => true)'),
	'4000|4|f', 'until_caught_up => true: four more cycles in one call, and nothing behind');
is(behind(), '0,0', 'rows_behind is 0 once a read gets to the end');
check_oracle($node, $queue, 'caught up by cm_sync_now(false, true)', exact => 1);

# ---------------------------------------------------------------- CALL cm_catch_up()
add_requests($queue, 'second', 1200, $ACCOUNTS);
my $before = $node->safe_psql('portfolio', 'SELECT coalesce(max(cycle_id), 0) FROM cm.cycle_history');
my ($rc, $out, $err) = $node->psql('portfolio', 'CALL cm_catch_up(max_cycles => 2)');
is($rc, 0, 'CALL cm_catch_up(max_cycles => 2) succeeds');
my @notices = $err =~ /NOTICE:\s+(cycle \d+: [^\n]*)/g;
is(scalar @notices, 2, 'max_cycles => 2 ran two cycles, a NOTICE after each');
like($notices[1] // '', qr/^cycle 2: 1000 rows read \(2000 in all, \d+ rows\/s\), about 400 rows behind$/,
	'the NOTICE gives the rows read, the rate and the rows still behind');
is($node->safe_psql('portfolio', "SELECT count(*) FROM cm.cycle_history WHERE cycle_id > $before"),
	'2', 'each cycle was committed on its own (two rows of cm.cycle_history)');
($rc, $out, $err) = $node->psql('portfolio', 'CALL cm_catch_up()');
@notices = $err =~ /NOTICE:\s+(cycle \d+: [^\n]*)/g;
is(scalar @notices, 1, 'CALL cm_catch_up() ran until caught up');
like($notices[-1] // '', qr/caught up$/, 'its last NOTICE says the sources are caught up');
check_oracle($node, $queue, 'caught up by CALL cm_catch_up()', exact => 1);
($rc, $out, $err) = $node->psql('portfolio', 'CALL cm_catch_up(max_cycles => 0)');
like($err, qr/max_cycles must be at least 1, not 0/, 'max_cycles => 0 is refused');
($rc, $out, $err) = $node->psql('portfolio', 'BEGIN; CALL cm_catch_up(); COMMIT;');
like($err, qr/invalid transaction termination/, 'CALL cm_catch_up() cannot run inside a transaction block');

# ---------------------------------------------------------------- progress of a running cycle
my $last = $node->safe_psql('portfolio', 'SELECT rows_read FROM cm_sync_now(false)');
is( $node->safe_psql('portfolio', 'SELECT running, pid IS NULL, rows_read FROM cm_progress()'),
	"f|t|$last", 'cm_progress() without a running cycle: the rows the last one read');

# an application session holds one account the next cycle changes (the
# lock an UPDATE takes): the worker's cycle waits in its accounts step,
# where it can be watched
add_requests($queue, 'third', 300, $ACCOUNTS);
my $app = $node->background_psql('portfolio');
$app->query_safe("BEGIN; SELECT 1 FROM user_portfolios WHERE accountid = 'ACC00001' FOR NO KEY UPDATE");
$node->safe_psql('portfolio', 'SELECT cm_wake()');
my $worker = $node->safe_psql('portfolio', 'SELECT worker_pid FROM cm_stats()');
ok( $node->poll_query_until('portfolio',
		"SELECT query = 'consistency_manager: locking accounts' FROM pg_stat_activity WHERE pid = $worker"),
	'pg_stat_activity.query shows the worker\'s step (locking accounts)');
my ($running, $pid, $phase, $read, $rate) = split /\|/, $node->safe_psql('portfolio',
	'SELECT running, pid, phase, rows_read, rows_per_second > 0 FROM cm_progress()');
is("$running|$pid|$phase|$rate", "t|$worker|consistency_manager: locking accounts|t",
	'cm_progress(): the running cycle, its backend, its step and its rate');
ok($read >= 600, "cm_progress().rows_read: the rows it read so far ($read, the 600 new ones among them)");
$app->query_safe('COMMIT');
$app->quit;
wait_synced($node, $queue, 'the cycle that waited for the account');
is( $node->safe_psql('portfolio', 'SELECT rows_read FROM cm.cycle_history ORDER BY cycle_id DESC LIMIT 1'),
	$read, 'the cycle read nothing after its reads were done: cm_progress() had the whole count');
is( $node->safe_psql('portfolio', 'SELECT running, rows_read, rows_behind FROM cm_progress()'),
	"f|$read|0", 'after it: no running cycle, the last one\'s rows, nothing behind');
check_oracle($node, $queue, 'after the watched cycle', exact => 1);

$node->stop;
$queue->stop;
done_testing();
