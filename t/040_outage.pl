# Copyright (c) consistency_manager authors

# Protects: the worker rides out trouble on its own, and exactly-once holds
# through it.
#  - queue-db (a second node) is down for several polling intervals: the
#    worker stays up (same pid), cm_health() reports queue-db unreachable,
#    cm_stats() counts the errors and keeps the last one, the failure is
#    logged once per state change rather than once per try; when queue-db
#    is back, everything written meanwhile is applied exactly once.
#  - the worker is killed with SIGKILL in the middle of a cycle: the
#    postmaster reinitialises the cluster, the worker comes back by itself,
#    and every request is applied exactly once.

use strict;
use warnings;

use CmTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $ACCOUNTS = 30;

my $queue = cm_node('queue', preload => 0);
$queue->start;
setup_queue_db($queue);

my $node = cm_node('portfolio', preload => 0,
	conf => [
		"consistency_manager.polling_interval = '500ms'",
		"consistency_manager.max_backoff = '2s'",
		# SIGKILL of a child makes the postmaster reinitialise, not exit
		"restart_after_crash = on",
	]);
$node->start;
setup_portfolio_db($node, $queue);
set_tiers($node, 'exact');
create_accounts($node, $ACCOUNTS, 'exact');
restart_with_preload($node);

add_requests($queue, 'before', 100, $ACCOUNTS);
wait_synced($node, $queue, 'before the outage');
my $st = stats($node);
my $pid = $st->{worker_pid};
ok($pid, "the worker runs (pid $pid)");
is($st->{errors}, '0', 'no errors before the outage');
is($node->safe_psql('portfolio', 'SELECT healthy, queue_reachable FROM cm_health()'),
	't|t', 'cm_health(): healthy, queue-db reachable');

############################################################################
# queue-db outage
############################################################################

$queue->stop;
ok( $node->poll_query_until('portfolio', 'SELECT queue_reachable FROM cm_health()', 'f'),
	'queue-db down: cm_health() reports queue_reachable = false');
ok( $node->poll_query_until('portfolio',
		'SELECT errors >= 3 AND last_error IS NOT NULL AND consecutive_failures >= 3 FROM cm_stats()'),
	'queue-db down: cm_stats() counts failed cycles and keeps the last error');
$st = stats($node);
note("during the outage: errors $st->{errors}, last_error: $st->{last_error}");
is($st->{worker_pid}, $pid, 'queue-db down: the worker stays up (same pid in cm_stats())');
is( $node->safe_psql('portfolio',
		"SELECT backend_type FROM pg_stat_activity WHERE pid = $pid"),
	'consistency_manager', 'queue-db down: the same worker is in pg_stat_activity');
ok( $node->poll_query_until('portfolio', 'SELECT worker_state FROM cm_stats()', 'backing off after a failure'),
	"queue-db down: cm_stats().worker_state says it backs off");
my ($healthy, $detail) = split /\|/,
  $node->safe_psql('portfolio', 'SELECT healthy, detail FROM cm_health()'), 2;
is($healthy, 'f', 'queue-db down: cm_health() is not healthy');
like($detail, qr/cycles failed: could not connect to server "queue_server"/, 'queue-db down: cm_health() says why');
ok( $node->safe_psql('portfolio',
		'SELECT count(*) FROM cm.cycle_history WHERE error IS NOT NULL') > 0,
	'queue-db down: failed cycles are recorded in cm.cycle_history');
my $warnings = () = slurp_file($node->logfile) =~ /WARNING:  consistency_manager cycle failed/g;
ok($warnings >= 1 && $warnings < $st->{errors},
	"queue-db down: the failure is logged once per state change ($warnings warnings for $st->{errors} failed cycles)");

$queue->start;
# written after queue-db came back: new requests, late completions, compensations
add_requests($queue, 'after', 100, $ACCOUNTS);
ok(set_status($queue, 'investment_queue', q{status = 'COMPLETED' AND uuid < '6'}, 'CANCELLED') > 0,
	'some completed investments are cancelled (compensations)');
ok(set_status($queue, 'withdrawal_queue', q{status = 'PENDING' AND uuid < '8'}, 'COMPLETED') > 0,
	'some pending withdrawals complete');
ok( $node->poll_query_until('portfolio', 'SELECT queue_reachable FROM cm_health()', 't'),
	'queue-db back: cm_health() reports it reachable');
wait_synced($node, $queue, 'after the outage');
check_oracle($node, $queue, 'after the outage', exact => 1);
ok($node->poll_query_until('portfolio', 'SELECT consecutive_failures = 0 FROM cm_stats()'),
	'queue-db back: cycles succeed again');
is(stats($node)->{worker_pid}, $pid, 'the same worker rode out the outage');
ok( $node->log_contains(qr/consistency_manager cycle succeeded again after \d+ failures/),
	'the recovery is logged');

############################################################################
# SIGKILL of the worker mid-cycle
############################################################################

# an application session holds an account that the next cycle must update
my $blocker = $node->background_psql('portfolio');
$blocker->query_safe(q{BEGIN; SELECT accountid FROM user_portfolios WHERE accountid = 'ACC00003' FOR UPDATE});
add_requests($queue, 'kill', $ACCOUNTS, $ACCOUNTS);    # one completion per account and kind
ok( $node->poll_query_until('portfolio',
		"SELECT wait_event_type FROM pg_stat_activity WHERE pid = $pid", 'Lock'),
	"the worker's cycle waits for the account row");
is($node->safe_psql('portfolio', "SELECT state || ': ' || query FROM pg_stat_activity WHERE pid = $pid"),
	'active: consistency_manager: applying changes',
	'pg_stat_activity shows the phase of the running cycle');
my $snap = portfolio_snapshot($node);

ok(kill('KILL', $pid), "SIGKILL the worker (pid $pid) mid-cycle");
ok( $node->poll_query_until('portfolio',
		"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'consistency_manager' AND pid <> $pid", '1'),
	'the cluster reinitialises and a new worker starts by itself');
close_bg($blocker);
ok($node->log_contains(qr/\(PID $pid\) was terminated by signal 9/), 'the postmaster saw the worker killed');
ok($node->log_contains(qr/all server processes terminated; reinitializing/), 'and reinitialised the cluster');

wait_synced($node, $queue, 'after SIGKILL');
check_oracle($node, $queue, 'after SIGKILL and restart', exact => 1);
isnt(portfolio_snapshot($node), $snap, 'the interrupted work was done again by the new worker');

$node->stop;
$queue->stop;
done_testing();
