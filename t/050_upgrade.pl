# Copyright (c) consistency_manager authors

# Protects the upgrade from the released 1.0 to 1.1, done as a DBA does it:
#  - a server runs the 1.0 release (library preloaded, worker syncing) and
#    holds its state: ledger, a dead letter, cycle history, custom tier
#    values and their history;
#  - the package is upgraded (the new library and extension files replace
#    the old ones, the server restarts): the worker refuses to run cycles
#    against schema 1.0, says why in cm_stats().last_error, the log and
#    cm.cycle_history, keeps running (no crash loop) and applies nothing,
#    and cm_sync_now() fails with SQLSTATE 55000;
#  - ALTER EXTENSION consistency_manager UPDATE, then cm_wake(): the worker
#    resumes at once; the state of 1.0 is all there, and the queue changes
#    made before and after the update (new requests, completions, the
#    reversal of an earlier completion, the dead letter's cause fixed) are
#    applied exactly once (the oracle);
#  - cm_status() reports extension and library version 1.1.

use strict;
use warnings;

use CmTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $ACCOUNTS = 20;
my $REFUSAL = 'consistency_manager schema version 1.0 does not match the loaded library (version 1.1)';

needs_release('1.0', 'the upgrade from the released 1.0');
my $install = release_install_path('1.0');
my $node = cm_node('upgrade', preload => 0, install_path => $install,
	conf => [ "consistency_manager.polling_interval = '200ms'" ]);
$node->start;
setup_queue_db($node);
setup_portfolio_db($node, $node, version => '1.0');
set_tiers($node, 'exact');
create_accounts($node, $ACCOUNTS, 'exact');
restart_with_preload($node);

is($node->safe_psql('portfolio', q{SELECT extversion FROM pg_extension WHERE extname = 'consistency_manager'}),
	'1.0', 'the extension is installed at version 1.0');
is($node->safe_psql('portfolio', q{SELECT count(*) FROM pg_proc WHERE proname = 'library_version'}),
	'0', 'the server runs the 1.0 release (it has no cm.library_version())');

############################################################################
# state of 1.0: ledger, a dead letter, history, custom tier values
############################################################################

add_requests($node, 'v10', 50, $ACCOUNTS);
# a request for an account that does not exist yet: a dead letter
$node->safe_psql('queue',
	q{INSERT INTO investment_queue (account_number, tier_1, tier_2, tier_3, uuid, status)
	  VALUES ('ACC00020', 1.5, 2.5, 3.5, md5('v10:orphan')::uuid::text, 'COMPLETED')});
ok( $node->poll_query_until('portfolio',
		q{SELECT (SELECT count(*) FROM portfolio_transactions) || '/' || (SELECT count(*) FROM cm.dead_letter)},
		'100/1'),
	'the 1.0 worker syncs 100 requests and dead-letters the one for a missing account');
is( $node->safe_psql('portfolio',
		q{SELECT count(*) > 0 AND bool_and(trigger = 'worker') FROM cm.cycle_history}),
	't', 'the 1.0 worker recorded its cycles in cm.cycle_history');
is($node->safe_psql('portfolio', q{SELECT string_agg(delta::text, ',' ORDER BY tier) FROM cm_tier_deltas()}),
	'0.6,-0.6,0.6', 'custom tier values are set (deltas 0.6, -0.6, 0.6)');

# what must outlive the upgrade, taken once the 1.0 worker is idle (every
# cycle touches the dead letters' attempts and the sources' last_synced_at)
$node->safe_psql('portfolio', 'ALTER SYSTEM SET consistency_manager.enabled = off');
$node->safe_psql('portfolio', 'SELECT pg_reload_conf()');
ok($node->poll_query_until('portfolio', 'SELECT worker_state FROM cm_stats()', 'disabled'),
	'the 1.0 worker is disabled for the snapshot');
$node->safe_psql(
	'portfolio', q{
	CREATE TABLE test_before_ledger AS SELECT * FROM cm.ledger;
	CREATE TABLE test_before_dead_letter AS SELECT * FROM cm.dead_letter;
	CREATE TABLE test_before_cycle_history AS SELECT * FROM cm.cycle_history;
	CREATE TABLE test_before_tier_value AS SELECT * FROM cm.tier_value;
	CREATE TABLE test_before_tier_value_history AS SELECT * FROM cm.tier_value_history;
	CREATE TABLE test_before_source AS SELECT * FROM cm.source;
});
my $n_ledger = $node->safe_psql('portfolio', 'SELECT count(*) FROM test_before_ledger');
my $n_completed = $node->safe_psql('portfolio', 'SELECT count(*) FROM test_before_ledger WHERE applied');
cmp_ok($n_completed, '>', 0, "the ledger holds applied completions ($n_completed of $n_ledger entries)");

############################################################################
# the package upgrade: new library and scripts, schema still 1.0
############################################################################

# enabled again from the next start on
$node->safe_psql('portfolio', 'ALTER SYSTEM RESET consistency_manager.enabled');
$node->stop;
upgrade_package($install);
my $log_offset = -s $node->logfile;
$node->start;

ok($node->poll_query_until('portfolio', "SELECT starts_with(last_error, '$REFUSAL') FROM cm_stats()"),
	"after the package upgrade cm_stats().last_error says: $REFUSAL");
my $pid = stats($node)->{worker_pid};
ok($pid, "the worker runs ($pid)");

# queue changes while the worker refuses: new requests, completions, and
# the reversal of a completion that 1.0 applied
add_requests($node, 'refused', 10, $ACCOUNTS);
my $completed = set_status($node, 'investment_queue',
	q{queue_id IN (SELECT queue_id FROM investment_queue WHERE status = 'PENDING' ORDER BY queue_id LIMIT 3)},
	'COMPLETED');
is($completed, '3', 'three pending investments complete in queue-db');
my $reversed_uuid = $node->safe_psql('queue',
	q{SELECT uuid FROM withdrawal_queue WHERE status = 'COMPLETED' ORDER BY queue_id LIMIT 1});
is(set_status($node, 'withdrawal_queue', "uuid = '$reversed_uuid'", 'CANCELLED'),
	'1', 'a withdrawal completed (and applied) under 1.0 is cancelled in queue-db');
my $snapshot = portfolio_snapshot($node);

ok($node->poll_query_until('portfolio', 'SELECT consecutive_failures >= 3 FROM cm_stats()'),
	'the worker keeps trying (three failed cycles and more)');
my $st = stats($node);
is($st->{worker_pid}, $pid, 'it is the same worker process throughout (no crash, no restart)');
like($st->{last_error}, qr/^\Q$REFUSAL\E \(SQLSTATE 55000\) DETAIL: .* HINT: Run ALTER EXTENSION consistency_manager UPDATE in this database/,
	'each of its cycles fails with the version mismatch; cm_stats() keeps its DETAIL, HINT and SQLSTATE');
is(portfolio_snapshot($node), $snapshot, 'nothing was applied against schema 1.0');
is($node->safe_psql('portfolio', 'SELECT count(*) FROM pg_stat_activity WHERE backend_type = \'consistency_manager\''),
	'1', 'one worker in pg_stat_activity');

my $log = slurp_file($node->logfile, $log_offset);
my @warnings = ($log =~ /WARNING:  consistency_manager cycle failed: \Q$REFUSAL\E/g);
is(scalar @warnings, 1, 'the log has the refusal, once (it is logged when the error changes)');
like($log, qr/WARNING:  consistency_manager cycle failed: \Q$REFUSAL\E\n(?:.*\n){0,4}.*HINT:  Run ALTER EXTENSION consistency_manager UPDATE/,
	'with the hint to run ALTER EXTENSION ... UPDATE');
unlike($log, qr/(terminated by signal|exited with exit code|server process .* was terminated)/,
	'no process crashed or exited with an error');
ok( $node->poll_query_until('portfolio',
		"SELECT count(*) >= 2 FROM cm.cycle_history WHERE starts_with(error, '$REFUSAL')"),
	'cm.cycle_history records the failed cycles with the refusal');

my ($ret, $out, $err) = $node->psql('portfolio', "\\set VERBOSITY verbose\nSELECT * FROM cm_sync_now()");
isnt($ret, 0, 'cm_sync_now() fails against schema 1.0');
like($err, qr/ERROR:  55000: \Q$REFUSAL\E/, 'with SQLSTATE 55000 (object_not_in_prerequisite_state) and the refusal');
is(portfolio_snapshot($node), $snapshot, 'and applies nothing');

############################################################################
# ALTER EXTENSION ... UPDATE: the worker resumes on cm_wake()
############################################################################

# The update and the comparison with what 1.0 wrote run in one transaction:
# the worker, backing off, cannot run a cycle in between.
my @tables = qw(ledger dead_letter cycle_history tier_value tier_value_history source);
my $compare = join(
	"\nUNION ALL\n",
	map {
		# columns 1.1 may add are left out of the comparison
		qq{SELECT '$_', (SELECT count(*) FROM test_before_$_),
		          (SELECT count(*) FROM (SELECT * FROM test_before_$_ EXCEPT ALL
		                                 SELECT (jsonb_populate_record(NULL::test_before_$_, to_jsonb(c))).*
		                                   FROM cm.$_ c) missing)::text}
	} @tables);
my @after = split /\n/, $node->safe_psql(
	'portfolio', qq{
	BEGIN;
	ALTER EXTENSION consistency_manager UPDATE;
	SELECT 'version', 0, extversion::text FROM pg_extension WHERE extname = 'consistency_manager'
	UNION ALL
	SELECT * FROM ($compare) c;
	COMMIT;});
is(shift @after, 'version|0|1.1', 'ALTER EXTENSION consistency_manager UPDATE brings the schema to 1.1');
for my $t (@tables)
{
	my ($name, $rows, $missing) = split /\|/, shift(@after) // '';
	ok($name eq $t && $rows > 0 && $missing == 0,
		"cm.$t after the update holds every row 1.0 wrote, unchanged")
	  or diag("cm.$t: $rows rows before, $missing missing or changed");
}

# the foreign tables 1.0 attached get 1.1's options (a reconciliation's
# checksums run on queue-db while the local ones are computed)
is( $node->safe_psql(
		'portfolio', q{
	SELECT string_agg(format('%s:%s', s.table_name,
	                         (SELECT string_agg(o, ',' ORDER BY o) FROM unnest(t.ftoptions) o
	                           WHERE o LIKE ANY (ARRAY['async_capable=%', 'fetch_size=%', 'updatable=%']))), ' ' ORDER BY s.source_id)
	  FROM cm.source s JOIN pg_foreign_table t ON t.ftrelid = format('%I.%I', s.table_schema, s.table_name)::regclass}),
	'queue_server_investment_queue:async_capable=true,fetch_size=10000,updatable=false '
	  . 'queue_server_withdrawal_queue:async_capable=true,fetch_size=10000,updatable=false',
	'the foreign tables attached by 1.0 are made async_capable by the update, their other options kept');

# the dead letter's cause is fixed: its account now exists
$node->safe_psql(
	'portfolio', q{
	INSERT INTO user_portfolios (accountid, tier1_allocation, tier2_allocation, tier3_allocation,
	                             total_allocation, tier1_value, tier2_value, tier3_value, total_value)
	VALUES ('ACC00020', 305175781.25, 610351562.50, 915527343.75, 1831054687.50,
	        305175781.25, 610351562.50, 915527343.75, 1831054687.50);
	INSERT INTO test_initial_portfolios SELECT * FROM user_portfolios WHERE accountid = 'ACC00020';
});

is($node->safe_psql('portfolio', 'SELECT cm_wake()'), 't', 'cm_wake() reaches the worker');
wait_synced($node, $node, 'after the update');
ok($node->poll_query_until('portfolio', 'SELECT consecutive_failures = 0 AND last_cycle_end > last_error_at FROM cm_stats()'),
	'the worker runs cycles successfully again');
is(stats($node)->{worker_pid}, $pid, 'it is still the same worker process');
like(slurp_file($node->logfile, $log_offset), qr/consistency_manager cycle succeeded again after \d+ failures/,
	'the log says the cycles succeed again');

# new changes after the update: requests, completions, another reversal
add_requests($node, 'v11', 10, $ACCOUNTS);
set_status($node, 'withdrawal_queue',
	q{queue_id IN (SELECT queue_id FROM withdrawal_queue WHERE status = 'PROCESSING' ORDER BY queue_id LIMIT 2)},
	'COMPLETED');
my $reversed2 = $node->safe_psql('queue',
	q{SELECT uuid FROM investment_queue WHERE status = 'COMPLETED' ORDER BY queue_id LIMIT 1});
set_status($node, 'investment_queue', "uuid = '$reversed2'", 'FAILED');
$node->safe_psql('portfolio', 'SELECT cm_wake()');
wait_synced($node, $node, 'changes made after the update');
check_oracle($node, $node, 'after the upgrade', exact => 1);

is( $node->safe_psql('portfolio',
		"SELECT status || '|' || applied FROM cm.ledger WHERE uuid IN ('$reversed_uuid', '$reversed2') ORDER BY status"),
	"CANCELLED|false\nFAILED|false",
	'both reversed completions (one applied by 1.0, one by 1.1) are compensated in the ledger');
is( $node->safe_psql('portfolio',
		q{SELECT count(*) FROM test_before_cycle_history b JOIN cm.cycle_history h USING (cycle_id)
		   WHERE to_jsonb(b) = to_jsonb(h) - 'adopted' - 'lock_retries'}),
	$node->safe_psql('portfolio', 'SELECT count(*) FROM test_before_cycle_history'),
	"1.0's cycle history is still there after the new cycles");
is( $node->safe_psql('portfolio',
		q{SELECT count(*) > 0 FROM cm.cycle_history WHERE error IS NULL
		   AND cycle_id > (SELECT max(cycle_id) FROM test_before_cycle_history)}),
	't', 'the new cycles are recorded after the old ones');
is($node->safe_psql('portfolio', 'SELECT count(*) FROM cm.dead_letter'), '0',
	'the dead letter of 1.0 was applied once its account existed');

is( $node->safe_psql('portfolio',
		q{SELECT (cm_status()->>'extension_version') || '|' || (cm_status()->>'library_version')}),
	'1.1|1.1', 'cm_status() reports extension_version 1.1 and library_version 1.1');
is(stats($node)->{worker_pid}, $pid, 'one worker process from the package upgrade to the end');

$node->stop;
done_testing();
