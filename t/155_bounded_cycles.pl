# Copyright (c) consistency_manager authors

# Protects: consistency_manager.max_rows_per_cycle.  A backlog larger than
# the limit is synced in several committed cycles, one after the other
# (the worker does not wait for its polling interval, here 1 hour, while a
# source is behind); a chunk boundary inside a run of equal updated_at
# values skips nothing; a worker killed between chunks loses nothing and
# applies nothing twice.

use strict;
use warnings;

use CmTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $ACCOUNTS = 1000;
my $LIMIT = 700;

my $queue = cm_node('queue', preload => 0);
$queue->start;
setup_queue_db($queue);

my $node = cm_node('portfolio', preload => 0,
	conf => [
		"consistency_manager.polling_interval = '1h'",
		"consistency_manager.max_rows_per_cycle = $LIMIT",
		"consistency_manager.batch_size = 300",
		"restart_after_crash = on",
	]);
$node->start;
setup_portfolio_db($node, $queue);
set_tiers($node, 'exact');
create_accounts($node, $ACCOUNTS, 'exact');
restart_with_preload($node);
ok($node->poll_query_until('portfolio', q{SELECT worker_state = 'idle' FROM cm_stats()}),
	'the worker waits for its next turn, an hour away');

# 2 x 3000 rows, each table written in one transaction: one updated_at per table
add_requests($queue, 'backlog', 3000, $ACCOUNTS);
my $before = $node->safe_psql('portfolio', 'SELECT coalesce(max(cycle_id), 0) FROM cm.cycle_history');
$node->safe_psql('portfolio', 'SELECT cm_wake()');
wait_synced($node, $queue, 'a 6000-row backlog with max_rows_per_cycle = 700, after one cm_wake()');
check_oracle($node, $queue, 'bounded cycles', exact => 1);
my ($cycles, $largest) = split /\|/, $node->safe_psql('portfolio',
	"SELECT count(*), max(created) FROM cm.cycle_history WHERE cycle_id > $before");
ok($cycles >= 5, "the backlog took $cycles committed cycles (at most $LIMIT rows per source each), one after the other");
ok($largest <= 2 * $LIMIT, "none staged more than $LIMIT rows per source ($largest rows created in the largest)");

# a kill between chunks: an application trigger slows each insert a little,
# so that the backlog takes several seconds of chunks
$node->safe_psql('portfolio', q{
	CREATE FUNCTION app_slow() RETURNS trigger LANGUAGE plpgsql AS $$
	BEGIN PERFORM pg_sleep(0.001); RETURN NEW; END $$;
	CREATE TRIGGER app_slow BEFORE INSERT ON portfolio_transactions
		FOR EACH ROW EXECUTE FUNCTION app_slow();
});
add_requests($queue, 'killed', 3000, $ACCOUNTS);
$node->safe_psql('portfolio', 'SELECT cm_wake()');
ok($node->poll_query_until('portfolio', 'SELECT count(*) > 6000 + 700 FROM portfolio_transactions'),
	'the second backlog has committed its first chunks');
my $pid = $node->safe_psql('portfolio', 'SELECT worker_pid FROM cm_stats()');
my $at_kill = $node->safe_psql('portfolio', 'SELECT count(*) FROM portfolio_transactions');
kill 'KILL', $pid;
ok($at_kill < 12000, "the worker was killed between chunks ($at_kill of 12000 rows synced just before)");
ok( $node->poll_query_until('portfolio',
		"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'consistency_manager' AND pid <> $pid"),
	'after SIGKILL the cluster restarts and the worker comes back');
$node->safe_psql('portfolio', 'SELECT cm_wake()');
wait_synced($node, $queue, 'the second backlog after the kill');
check_oracle($node, $queue, 'bounded cycles and a kill between them', exact => 1);

$node->stop;
$queue->stop;
done_testing();
