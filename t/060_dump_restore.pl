# Copyright (c) consistency_manager authors

# Protects backup and restore of the portfolio database with pg_dump -Fc and
# pg_restore, following the README's procedure ("Backup and restore"):
#  - pg_restore into a fresh database on a server with the library reports
#    no error (the seeded cm.tier_value and cm.status_map rows no longer
#    collide with the dumped ones);
#  - custom tier values (deltas 0.1, 0.15, 0), a custom status mapping,
#    dead letters, a week of cycle history, the tier value history, the
#    sources with their watermarks, the ledger and the identity sequences
#    come back as they were;
#  - the foreign tables (extension members, not dumped) come back with
#    cm_attach_queue(), which keeps every source's id and watermark; until
#    then a cycle fails and applies nothing;
#  - the next cycles apply nothing twice and lose nothing (the oracle),
#    including a reversal of a completion applied before the dump;
#    cm_set_tier_values() and the cycle history go on without duplicate
#    keys; the worker takes over once enabled.

use strict;
use warnings;

use CmTest;
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $ACCOUNTS = 10;

# Starting amounts of 80,000.00 times 1..4: with the deltas 0.1, 0.15 and
# 0 every factor (1.1, 1.15, 0.9, 0.85) and its inverse keeps them whole
# cents through four completions of a kind per account, so the oracle is
# exact however the completions are spread over cycles.
sub add_accounts
{
	my ($node, $first, $count) = @_;
	my $last = $first + $count - 1;
	$node->safe_psql(
		'portfolio', qq{
		INSERT INTO user_portfolios (accountid, tier1_allocation, tier2_allocation, tier3_allocation,
		                             total_allocation, tier1_value, tier2_value, tier3_value, total_value)
		SELECT id, a, 2 * a, a, 4 * a, a, a, 3 * a, 5 * a
		  FROM (SELECT 'ACC' || lpad(i::text, 5, '0') AS id, (i % 4 + 1) * 80000.00 AS a
		          FROM generate_series($first, $last) i) s;
		INSERT INTO test_initial_portfolios
		SELECT * FROM user_portfolios WHERE accountid BETWEEN 'ACC' || lpad('$first', 5, '0')
		                                                  AND 'ACC' || lpad('$last', 5, '0');
	});
	return;
}

# every row of a table, as one digest (row count and md5)
sub digest
{
	my ($node, $table) = @_;
	return $node->safe_psql('portfolio',
		"SELECT count(*) || ':' || md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM $table t");
}

my @STATE = qw(cm.tier_value cm.tier_value_history cm.status_map cm.source cm.ledger cm.dead_letter
  cm.cycle_history);
my @SEQUENCES = map { "cm.$_" } qw(tier_value_history_change_id_seq source_source_id_seq cycle_history_cycle_id_seq);

############################################################################
# the original database
############################################################################

my $orig = cm_node('original', preload => 0);
$orig->start;
setup_queue_db($orig);
my $attached = setup_portfolio_db($orig, $orig);
$orig->safe_psql(
	'portfolio', q{
	SELECT cm_set_tier_values(1, 1000000, 1100000);
	SELECT cm_set_tier_values(2, 2000000, 2300000);
	SELECT cm_set_tier_values(3, 500000, 500000);
	INSERT INTO cm.status_map VALUES ('ON_HOLD', 'ON_HOLD');
	-- a week of cycle history
	INSERT INTO cm.cycle_history (started_at, finished_at, duration_ms, trigger, sources, rows_read, created)
	SELECT now() - i * interval '1 hour', now() - i * interval '1 hour' + interval '2 ms', 2, 'worker', 2, i, i
	  FROM generate_series(1, 160) i;
});
is($orig->safe_psql('portfolio', q{SELECT string_agg(delta::text, ',' ORDER BY tier) FROM cm_tier_deltas()}),
	'0.1,0.15,0', 'custom tier values: deltas 0.1, 0.15, 0');
add_accounts($orig, 0, $ACCOUNTS);
add_requests($orig, 'before', 20, $ACCOUNTS);
set_status($orig, 'investment_queue',
	q{queue_id = (SELECT min(queue_id) FROM investment_queue WHERE status = 'PENDING')}, 'ON_HOLD');
# a request for an account that does not exist yet: a dead letter
$orig->safe_psql('queue',
	q{INSERT INTO investment_queue (account_number, tier_1, tier_2, tier_3, uuid, status)
	  VALUES ('ACC00010', 1.5, 2.5, 3.5, md5('before:orphan')::uuid::text, 'COMPLETED')});
is( $orig->safe_psql('portfolio',
		'SELECT sources, created, completed_applied, dead_lettered FROM cm_sync_now()'),
	'2|40|20|1', 'a cycle creates 40 transactions, applies 20 completions and dead-letters one request');
is($orig->safe_psql('portfolio', q{SELECT status FROM portfolio_transactions WHERE status = 'ON_HOLD'}),
	'ON_HOLD', 'the custom status mapping is in use');

my %before = map { $_ => digest($orig, $_) } @STATE;
my %seq_before = map { $_ => $orig->safe_psql('portfolio', "SELECT last_value || '/' || is_called FROM $_") }
  @SEQUENCES;
my $snapshot = portfolio_snapshot($orig);

############################################################################
# pg_dump -Fc, pg_restore into a fresh database on another server
############################################################################

my $dump = "$PostgreSQL::Test::Utils::tmp_check/portfolio.dump";
my ($out, $err) = ('', '');
ok(IPC::Run::run([ 'pg_dump', '-Fc', '-f', $dump, '-d', $orig->connstr('portfolio') ], '>', \$out, '2>', \$err),
	'pg_dump -Fc of the portfolio database succeeds')
  or diag($err);

# the README's procedure: the library loaded, the worker off while restoring
my $node = cm_node('restored', preload => 0, conf => [ 'consistency_manager.enabled = off' ]);
$node->start;
$node->safe_psql('postgres', 'CREATE DATABASE portfolio');
restart_with_preload($node);

($out, $err) = ('', '');
my $restored = IPC::Run::run([ 'pg_restore', '-d', $node->connstr('portfolio'), $dump ], '>', \$out, '2>', \$err);
ok($restored, 'pg_restore exits with status 0');
is($err, '', 'pg_restore reports nothing on stderr (no "COPY failed", no error ignored)');

for my $t (@STATE)
{
	is(digest($node, $t), $before{$t}, "$t is restored as it was ($before{$t} rows:md5)");
}
for my $s (@SEQUENCES)
{
	is($node->safe_psql('portfolio', "SELECT last_value || '/' || is_called FROM $s"),
		$seq_before{$s}, "sequence $s is restored at its position ($seq_before{$s})");
}
is($node->safe_psql('portfolio', q{SELECT string_agg(delta::text, ',' ORDER BY tier) FROM cm_tier_deltas()}),
	'0.1,0.15,0', 'the restored deltas are the custom ones');
is(portfolio_snapshot($node), $snapshot, 'transactions, portfolios, ledger and watermarks are restored as they were');

############################################################################
# the foreign tables: not in the dump; cm_attach_queue() brings them back
############################################################################

is( $node->safe_psql('portfolio',
		q{SELECT count(*) FROM cm.source WHERE to_regclass(format('%I.%I', table_schema, table_name)) IS NULL}),
	'2', 'the sources are restored without their foreign tables (extension members are not dumped)');
is( $node->safe_psql('portfolio',
		q{SELECT count(*) FROM pg_foreign_server s JOIN pg_user_mappings m ON m.srvid = s.oid WHERE s.srvname = 'queue_server'}),
	'1', 'the foreign server and its user mapping are restored');
my ($ret, $stdout, $stderr) = $node->psql('portfolio', "\\set VERBOSITY verbose\nSELECT * FROM cm_sync_now()");
like($stderr, qr/ERROR:  42P01: foreign table cm_remote\.queue_server_investment_queue of source 1 does not exist/,
	'until then a cycle fails (SQLSTATE 42P01), naming the missing foreign table');
like($stderr, qr/HINT:  Run cm_attach_queue\(\) again/, 'and says to run cm_attach_queue()');
is(portfolio_snapshot($node), $snapshot, 'and applies nothing');

is( $node->safe_psql(
		'portfolio', q{
		SELECT a.source_id, a.foreign_table, a.layout
		  FROM (SELECT DISTINCT server_name, remote_schema FROM cm.source) s,
		       cm_attach_queue(s.server_name, s.remote_schema) a
		 ORDER BY 1}),
	$attached, 'the README\'s cm_attach_queue() statement re-creates the foreign tables under the same source ids');
is(digest($node, 'cm.source'), $before{'cm.source'}, 'cm.source is unchanged by it (ids, watermarks, enabled)');
is( $node->safe_psql('portfolio',
		q{SELECT count(*) FROM pg_depend d JOIN pg_class c ON c.oid = d.objid
		   WHERE d.classid = 'pg_class'::regclass AND d.deptype = 'e' AND c.relkind = 'f'
		     AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'consistency_manager')}),
	'3', 'the foreign tables are extension members again (the two queue tables and queue-db\'s pg_stat_activity)');

############################################################################
# the next cycles: nothing twice, nothing lost
############################################################################

is( $node->safe_psql('portfolio',
		'SELECT created, updated, completed_applied, compensated FROM cm_sync_now()'),
	'0|0|0|0', 'the first cycle after the restore re-reads the look-back window and applies nothing');
is(portfolio_snapshot($node), $snapshot, 'transactions, portfolios, ledger and watermarks are unchanged');
is($node->safe_psql('portfolio', 'SELECT count(*) FROM cm.dead_letter'), '1', 'the dead letter is still there');

# changes in queue-db since the dump: new requests, completions, a status
# only the custom mapping knows, the reversal of a completion applied
# before the dump; and the dead letter's account now exists
add_requests($orig, 'after', 10, $ACCOUNTS);
set_status($orig, 'withdrawal_queue',
	q{queue_id IN (SELECT queue_id FROM withdrawal_queue WHERE status = 'PENDING' ORDER BY queue_id LIMIT 4)},
	'COMPLETED');
set_status($orig, 'withdrawal_queue',
	q{queue_id IN (SELECT queue_id FROM withdrawal_queue WHERE status = 'PENDING' ORDER BY queue_id LIMIT 1)},
	'ON_HOLD');
my $reversed = $orig->safe_psql('queue',
	q{SELECT uuid FROM investment_queue WHERE status = 'COMPLETED' ORDER BY queue_id LIMIT 1});
set_status($orig, 'investment_queue', "uuid = '$reversed'", 'CANCELLED');
add_accounts($node, 10, 1);

my $history_max = $node->safe_psql('portfolio', 'SELECT max(cycle_id) FROM cm.cycle_history');
my $r = $node->safe_psql('portfolio',
	'SELECT created, completed_applied, compensated, dead_lettered FROM cm_sync_now()');
is($r, '21|25|1|0',
	'the next cycle creates the 20 new requests and the dead-lettered one, applies 25 completions (20 new, 4 pending ones, the dead letter) and compensates the reversal'
);
check_oracle($node, $orig, 'after the restore', exact => 1);
is($node->safe_psql('portfolio', "SELECT status || '|' || applied FROM cm.ledger WHERE uuid = '$reversed'"),
	'CANCELLED|false', 'the completion applied before the dump is compensated after the restore');
is( $node->safe_psql('portfolio',
		"SELECT count(*) || '|' || min(cycle_id) FROM cm.cycle_history WHERE cycle_id > $history_max"),
	'1|' . ($history_max + 1), 'the cycle history goes on after the restored ids');

# cm_set_tier_values() and its history
my $change_max = $node->safe_psql('portfolio', 'SELECT max(change_id) FROM cm.tier_value_history');
$node->safe_psql('portfolio', 'SELECT cm_set_tier_values(3, 400000, 400000)');
is( $node->safe_psql('portfolio',
		"SELECT change_id || '|' || tier || '|' || new_pool_value FROM cm.tier_value_history WHERE change_id > $change_max"),
	($change_max + 1) . '|3|400000', 'cm_set_tier_values() works and its history goes on after the restored ids');
is($node->safe_psql('portfolio', q{SELECT string_agg(delta::text, ',' ORDER BY tier) FROM cm_tier_deltas()}),
	'0.1,0.15,0', 'the deltas are still the custom ones');

# the worker takes over once enabled
$node->safe_psql('portfolio', 'ALTER SYSTEM SET consistency_manager.enabled = on');
$node->safe_psql('portfolio', 'SELECT pg_reload_conf()');
ok($node->poll_query_until('portfolio', q{SELECT worker_state <> 'disabled' FROM cm_stats()}),
	'the worker is enabled');
add_requests($orig, 'worker', 2, $ACCOUNTS);
$node->safe_psql('portfolio', 'SELECT cm_wake()');
wait_synced($node, $orig, 'the worker after the restore');
check_oracle($node, $orig, 'the worker after the restore', exact => 1);
is(stats($node)->{errors}, '1', 'no cycle of the worker failed (the one error counted is the manual cycle before the re-attach)');

$node->stop;
$orig->stop;
done_testing();
