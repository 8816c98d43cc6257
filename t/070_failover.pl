# Copyright (c) consistency_manager authors

# Protects failover to a streaming standby:
#  - on a hot standby with the library preloaded the worker does not run
#    (no consistency_manager backend, cm_stats() shows no worker, cm_wake()
#    reaches nobody, a manual cycle is refused), while the watermark, the
#    ledger and every effect arrive through replication;
#  - the primary is stopped with mode 'immediate' in the middle of a busy
#    cycle (thousands of requests staged and applied, not yet committed,
#    their WAL already replayed by the standby);
#  - once the standby is promoted its worker starts on its own, reads from
#    the replicated read position (the first cycle reads exactly the queue
#    rows after it, or after the replicated horizon), and every request the replicated
#    ledger does not hold is applied once: cm_stats() on the new primary
#    counts exactly the creations, completions and compensations the queue
#    and that ledger imply, and the plain-SQL oracle agrees row by row;
#  - the new primary keeps syncing what queue-db receives afterwards.
# queue-db runs on a node of its own; the standby's postgres_fdw server
# still points at it (its host and port do not change with the failover).

use strict;
use warnings;

use CmTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

# 200 accounts keep every account below 15 completions of a kind, so the
# "exact" tier values need no rounding (see t/CmTest.pm)
my $ACCOUNTS = 200;

my $queue = cm_node('queue', preload => 0);
$queue->start;
setup_queue_db($queue);

my $primary = cm_node('primary', preload => 0, allows_streaming => 1,
	conf => [
		# cycles run when the test wakes the worker, and once at its start
		"consistency_manager.polling_interval = '1h'",
		"consistency_manager.max_backoff = '2s'",
		# every cycle reads from its watermark, not before it: the first
		# cycle after the promotion shows where it started
		"consistency_manager.lookback_window = 0",
	]);
$primary->start;
my %layout = map { (split /\|/)[ 0, 2 ] } split /\n/, setup_portfolio_db($primary, $queue);
set_tiers($primary, 'exact');
create_accounts($primary, $ACCOUNTS, 'exact');
restart_with_preload($primary);

ok( $primary->poll_query_until('portfolio',
		q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'consistency_manager'}, '1'),
	'the worker runs on the primary');

# wake the worker and wait until portfolio_transactions matches the queue
sub sync_primary
{
	my ($node, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	is($node->safe_psql('portfolio', 'SELECT cm_wake()'), 't', "$what: cm_wake() reaches the worker");
	wait_synced($node, $queue, $what);
	return;
}

add_requests($queue, 'before', 500, $ACCOUNTS);
sync_primary($primary, 'before the standby exists');

############################################################################
# the standby: library preloaded, no worker
############################################################################

$primary->backup('base');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'base', has_streaming => 1);
$standby->start;
$primary->wait_for_catchup($standby);

is($standby->safe_psql('portfolio', 'SELECT pg_is_in_recovery()'), 't', 'the standby is in recovery');
is($standby->safe_psql('portfolio', 'SHOW shared_preload_libraries'),
	'consistency_manager', 'the standby preloads consistency_manager (its configuration came with the backup)');

# the standby state, and that nothing on it runs a cycle
sub standby_is_passive
{
	my ($what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	is( $standby->safe_psql('portfolio',
			q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'consistency_manager'}),
		'0', "$what: no consistency_manager backend on the standby");
	is( $standby->safe_psql('portfolio',
			q{SELECT coalesce(worker_pid::text, 'none') || '|' || worker_state || '|' || cycles FROM cm_stats()}),
		'none|not started|0', "$what: cm_stats() on the standby shows no worker and no cycle");
	is($standby->safe_psql('portfolio', 'SELECT worker_running, queue_reachable FROM cm_health()'),
		'f|t', "$what: cm_health() on the standby says the worker does not run, and reaches queue-db");
	is($standby->safe_psql('portfolio', 'SELECT cm_wake()'), 'f', "$what: cm_wake() on the standby reaches no worker");
	return;
}

standby_is_passive('after the base backup');
is(portfolio_snapshot($standby), portfolio_snapshot($primary),
	'the standby holds the primary\'s transactions, accounts, ledger and watermarks');

my $snap = portfolio_snapshot($standby);
my ($ret, $out, $err) = $standby->psql('portfolio', "\\set VERBOSITY verbose\nSELECT * FROM cm_sync_now()");
isnt($ret, 0, 'cm_sync_now() on the standby fails');
like($err, qr/ERROR:  25006: a sync cycle cannot run on a standby/,
	'with SQLSTATE 25006 and a message that says why')
  or diag($err);
is(portfolio_snapshot($standby), $snap, 'and changes nothing');

############################################################################
# cycles committed on the primary reach the standby through streaming
############################################################################

add_requests($queue, 'streamed', 500, $ACCOUNTS);
ok(set_status($queue, 'investment_queue', q{status = 'COMPLETED' AND uuid < '4'}, 'CANCELLED') > 0,
	'some completed investments are cancelled');
ok(set_status($queue, 'withdrawal_queue', q{status = 'PENDING' AND uuid < '6'}, 'COMPLETED') > 0,
	'some pending withdrawals complete');
sync_primary($primary, 'streamed round');
$primary->wait_for_catchup($standby);
is(portfolio_snapshot($standby), portfolio_snapshot($primary),
	'streamed round: the standby replays the committed cycles');
standby_is_passive('after the streamed round');

############################################################################
# the primary stops in the middle of a busy cycle
############################################################################

# An application session holds a transaction the round completes: the
# cycle reads the whole backlog, locks its accounts, and has written part of
# its changes when it waits for that row.
my $held = $queue->safe_psql('queue',
	q{SELECT uuid FROM withdrawal_queue WHERE status = 'PENDING' AND uuid < '8' ORDER BY uuid DESC LIMIT 1});
my $blocker = $primary->background_psql('portfolio');
$blocker->query_safe(qq{BEGIN; SELECT id FROM portfolio_transactions WHERE id = '$held' FOR UPDATE});

add_requests($queue, 'busy', 1500, $ACCOUNTS);
my $n;
ok(($n = set_status($queue, 'investment_queue', q{status = 'COMPLETED' AND uuid < '6'}, 'CANCELLED')) > 0,
	"busy round: $n completed investments are cancelled");
ok(($n = set_status($queue, 'withdrawal_queue', q{status = 'COMPLETED' AND uuid < '3'}, 'FAILED')) > 0,
	"busy round: $n completed withdrawals fail");
ok(($n = set_status($queue, 'withdrawal_queue', q{status = 'PENDING' AND uuid < '8'}, 'COMPLETED')) > 0,
	"busy round: $n pending withdrawals complete");
ok(($n = set_status($queue, 'investment_queue', q{status = 'PROCESSING' AND uuid < '8'}, 'COMPLETED')) > 0,
	"busy round: $n investments in processing complete");

my $committed = portfolio_snapshot($primary);
my $watermarks = $primary->safe_psql('portfolio',
	q{SELECT string_agg(source_id || '=' || watermark, ',' ORDER BY source_id) FROM cm.source});
my $lsn_before = $primary->lsn('insert');
my $pid = stats($primary)->{worker_pid};
is($primary->safe_psql('portfolio', 'SELECT cm_wake()'), 't', 'busy round: the worker is woken');
ok( $primary->poll_query_until('portfolio',
		"SELECT state || '|' || wait_event_type || '|' || query FROM pg_stat_activity WHERE pid = $pid",
		'active|Lock|consistency_manager: applying changes'),
	"busy round: the worker's cycle is applying changes (pg_stat_activity), waiting for the transaction row");
$primary->wait_for_catchup($standby);
my $shipped = $standby->safe_psql('portfolio',
	"SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '$lsn_before')");
note("WAL replayed by the standby since the wake: $shipped bytes");
ok($shipped > 256 * 1024,
	'busy round: the standby replayed the WAL of the uncommitted cycle (more than 256 kB since the wake)');

$primary->stop('immediate');
close_bg($blocker);

############################################################################
# before the promotion: the standby holds the last committed state
############################################################################

is(portfolio_snapshot($standby), $committed,
	'the standby holds the state the primary had committed, none of the interrupted cycle');
is( $standby->safe_psql('portfolio',
		q{SELECT string_agg(source_id || '=' || watermark, ',' ORDER BY source_id) FROM cm.source}),
	$watermarks, "the standby's watermarks are the primary's last committed ones ($watermarks)");
standby_is_passive('with the primary gone');
ok(!$standby->log_contains(qr/consistency_manager worker started/),
	'the standby never started a worker');

# What the new primary must do, from the replicated ledger and the queue.
my %ledger;
for ($standby->safe_psql('portfolio',
	q{SELECT uuid || '|' || status || '|' || extract(epoch FROM updated_at) || '|' || applied::int FROM cm.ledger}) =~ /^.+$/mg)
{
	my ($uuid, $status, $updated, $applied) = split /\|/;
	$ledger{$uuid} = [ $status, $updated, $applied == 1 ];
}
my %expect = (created => 0, updated => 0, completed_applied => 0, compensated => 0);
for ($queue->safe_psql('queue',
	q{SELECT uuid || '|' || status || '|' || extract(epoch FROM updated_at) FROM investment_queue
	  UNION ALL
	  SELECT uuid || '|' || status || '|' || extract(epoch FROM updated_at) FROM withdrawal_queue}) =~ /^.+$/mg)
{
	my ($uuid, $status, $updated) = split /\|/;
	my $l = $ledger{$uuid};
	my $completed = $status eq 'COMPLETED';
	if (!$l)
	{
		$expect{created}++;
		$expect{completed_applied}++ if $completed;
		next;
	}
	next if $l->[0] eq $status && $l->[1] eq $updated;
	$expect{updated}++;
	$expect{completed_applied}++ if $completed && !$l->[2];
	$expect{compensated}++ if !$completed && $l->[2];
}
note(join(', ', map { "$_ $expect{$_}" } sort keys %expect) . ' expected after the promotion');
ok($expect{created} >= 3000 && $expect{compensated} > 0 && $expect{completed_applied} > 0,
	'the backlog left for the new primary holds thousands of new requests, completions and reversals');

# the first cycle after the promotion reads every queue row after its
# source's replicated read position (the keyset (watermark, watermark_id)),
# or from the replicated read horizon when that is older (lookback_window =
# 0), and nothing before
my $expect_read = 0;
for ($standby->safe_psql('portfolio',
	q{SELECT source_id || '|' || layout || '|' ||
	         CASE WHEN read_horizon IS NOT NULL AND read_horizon <= watermark
	              THEN format('updated_at >= %L', read_horizon)
	              ELSE format('(updated_at, queue_id) > (%L::timestamptz, %s)', watermark,
	                          coalesce(watermark_id, -9223372036854775808)) END
	    FROM cm.source ORDER BY source_id}) =~ /^.+$/mg)
{
	my ($source_id, $layout, $cond) = split /\|/, $_, 3;
	$expect_read += $queue->safe_psql('queue', "SELECT count(*) FROM ${layout}_queue WHERE $cond");
}
my $last_cycle = $standby->safe_psql('portfolio', 'SELECT coalesce(max(cycle_id), 0) FROM cm.cycle_history');

############################################################################
# promotion: the worker starts by itself and resumes
############################################################################

$standby->promote;
is($standby->safe_psql('portfolio', 'SELECT pg_is_in_recovery()'), 'f', 'the standby is promoted');
ok( $standby->poll_query_until('portfolio',
		q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'consistency_manager'}, '1'),
	'after the promotion the worker starts on its own');
ok($standby->log_contains(qr/consistency_manager worker started in database "portfolio"/),
	'the new primary logs the worker start');
wait_synced($standby, $queue, 'after the promotion');
check_oracle($standby, $queue, 'after the failover', exact => 1);

my $st = $standby->safe_psql('portfolio',
	q{SELECT created || '|' || updated || '|' || completed_applied || '|' || compensated
	         || '|' || dead_lettered || '|' || errors FROM cm_stats()});
is($st, join('|', @expect{qw(created updated completed_applied compensated)}, 0, 0),
	'cm_stats() on the new primary: exactly the creations, updates, completions and compensations '
	  . 'the replicated ledger left to do (created|updated|completed_applied|compensated|dead_lettered|errors)');
is( $standby->safe_psql('portfolio',
		"SELECT rows_read FROM cm.cycle_history WHERE cycle_id > $last_cycle AND error IS NULL ORDER BY cycle_id LIMIT 1"),
	$expect_read,
	"the first cycle after the promotion reads from the replicated read positions: the $expect_read queue rows after them");

############################################################################
# the new primary goes on syncing
############################################################################

add_requests($queue, 'after', 250, $ACCOUNTS);
ok(set_status($queue, 'withdrawal_queue', q{status = 'COMPLETED' AND uuid < '5'}, 'CANCELLED') > 0,
	'after the failover: some completed withdrawals are cancelled');
sync_primary($standby, 'after the failover, new requests');
check_oracle($standby, $queue, 'after the failover, new requests', exact => 1);
is(stats($standby)->{errors}, '0', 'no cycle failed on the new primary');

$standby->stop;
$queue->stop;
done_testing();
