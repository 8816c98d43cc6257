# Copyright (c) consistency_manager authors

# Protects: the cycle lives beside an application that writes the same
# accounts while the cycle runs.
#  (a) the four-statement lost update: an application change committed
#      while a cycle applies a completion to the same account is kept, and
#      the completion's factor applies to the changed value;
#  (b) an application load (pgbench, two accounts per transaction, in random
#      order) during a catch-up of many cycles: every application increment
#      and every cycle effect is present, no cycle fails, no application
#      transaction fails (in a deadlock the cycle is the side that retries);
#  (c) a manual cycle in REPEATABLE READ or SERIALIZABLE fails at once with
#      a short message, not in the middle of the work;
#  (d) user_portfolios.updated_at, when the table has one, is set on the
#      rows a cycle changes.

use strict;
use warnings;

use CmTest;
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $ACCOUNTS = 2000;

my $node = cm_node('beside', preload => 0,
	conf => [ "consistency_manager.enabled = off", "max_connections = 40" ]);
$node->start;
setup_queue_db($node);
create_portfolio_db($node);
restart_with_preload($node);
setup_portfolio_db($node, $node);

# tier 1 unchanged by completions (delta 0), tier 2 values * 1.6 per completed
# investment and allocations * 0.4 per completed withdrawal (exact in cents
# for the starting amounts create_accounts gives), tier 3 unchanged
$node->safe_psql('portfolio', q{
	SELECT cm_set_tier_values(1, 1000000, 1000000);
	SELECT cm_set_tier_values(2, 2000000, 3200000);
	SELECT cm_set_tier_values(3, 500000, 500000);
	CREATE TABLE app_increment (accountid text, amount numeric);
});
# ACC00000..ACC01999 for the load, ACC02000 for the lost-update case
create_accounts($node, $ACCOUNTS + 1, 'exact');
$node->safe_psql('portfolio',
	q{ALTER TABLE user_portfolios ADD COLUMN updated_at timestamptz NOT NULL DEFAULT '2000-01-01'});

# ---------------------------------------------------------------------------
# (a) the four-statement lost update
# ---------------------------------------------------------------------------
$node->safe_psql('queue', q{
	INSERT INTO investment_queue (account_number, tier_1, tier_2, tier_3, uuid, status)
	VALUES ('ACC02000', 1, 2, 3, 'aaaaaaaa-0000-4000-8000-000000000001', 'COMPLETED')});
my $before = query_one($node, 'portfolio',
	q{SELECT tier2_value FROM user_portfolios WHERE accountid = 'ACC02000'});

# the application's transaction changes the account and holds it
my $app = $node->background_psql('portfolio');
$app->query_safe(q{BEGIN; UPDATE user_portfolios SET tier2_value = tier2_value + 100, total_value = total_value + 100 WHERE accountid = 'ACC02000'});

# a cycle that applies a completion to that account
my $cycle = start_async($node, 'portfolio', 'SELECT completed_applied FROM cm_sync_now()');
ok( $node->poll_query_until('portfolio',
		q{SELECT count(*) > 0 FROM pg_stat_activity
		   WHERE query LIKE '%cm_sync_now%' AND wait_event_type = 'Lock'}),
	'(a) the cycle waits for the account the application holds');
$app->query_safe('COMMIT');
my ($ok, $out, $err) = finish_async($cycle);
ok($ok, '(a) the cycle succeeds') or diag($err);
chomp $out;
is($out, '1', '(a) the cycle applied the completion');
close_bg($app);

my $want = query_one($node, 'portfolio', "SELECT round(($before + 100) * 1.6, 2)");
is( query_one($node, 'portfolio', q{SELECT tier2_value FROM user_portfolios WHERE accountid = 'ACC02000'}),
	$want,
	"(a) tier2_value = (value + the application's 100) * 1.6: the application's change is kept");
is( query_one($node, 'portfolio',
		q{SELECT total_value = tier1_value + tier2_value + tier3_value FROM user_portfolios WHERE accountid = 'ACC02000'}),
	't', '(a) total_value is the sum of the tiers');

# ---------------------------------------------------------------------------
# (d) updated_at is set on the changed rows, and only on them
# ---------------------------------------------------------------------------
is( query_one($node, 'portfolio',
		q{SELECT string_agg(accountid, ',') FROM user_portfolios WHERE updated_at > '2000-01-01'}),
	'ACC02000', '(d) updated_at is set on the account the cycle changed, only there');

# ---------------------------------------------------------------------------
# (c) REPEATABLE READ and SERIALIZABLE
# ---------------------------------------------------------------------------
for my $level ('REPEATABLE READ', 'SERIALIZABLE')
{
	my ($rc, $o, $e) = $node->psql('portfolio',
		"BEGIN ISOLATION LEVEL $level; SELECT * FROM cm_sync_now(); COMMIT;");
	like($e, qr/ERROR:  a sync cycle must run in a READ COMMITTED transaction/,
		"(c) $level: refused with a short message");
	unlike($e, qr/WITH cols AS/, "(c) $level: the error carries no statement text");
}

# ---------------------------------------------------------------------------
# (b) an application load during a catch-up
# ---------------------------------------------------------------------------
$node->safe_psql('portfolio', q{
	UPDATE user_portfolios SET updated_at = '2000-01-01';
	DELETE FROM test_initial_portfolios;
	INSERT INTO test_initial_portfolios
	  SELECT accountid, tier1_allocation, tier2_allocation, tier3_allocation, total_allocation,
	         tier1_value, tier2_value, tier3_value, total_value, created_at
	    FROM user_portfolios;
});
# the application: two accounts per transaction, locked in random order,
# each increment of tier 1 recorded in the same transaction
my $script = $node->basedir . '/app.sql';
open my $fh, '>', $script or die $!;
print $fh <<'SQL';
\set a random(0, 1999)
\set b random(0, 1999)
BEGIN;
UPDATE user_portfolios SET tier1_value = tier1_value + 1, total_value = total_value + 1,
       tier1_allocation = tier1_allocation + 1, total_allocation = total_allocation + 1
 WHERE accountid = 'ACC' || lpad(:a::text, 5, '0');
INSERT INTO app_increment VALUES ('ACC' || lpad(:a::text, 5, '0'), 1);
UPDATE user_portfolios SET tier1_value = tier1_value + 1, total_value = total_value + 1,
       tier1_allocation = tier1_allocation + 1, total_allocation = total_allocation + 1
 WHERE accountid = 'ACC' || lpad(:b::text, 5, '0');
INSERT INTO app_increment VALUES ('ACC' || lpad(:b::text, 5, '0'), 1);
COMMIT;
SQL
close $fh;

# one client: two clients could deadlock with each other, and this test is
# about the cycle.  It runs for the whole catch-up.
# (output to files: nothing reads pipes while the test runs cycles)
my ($pgb_outfile, $pgb_errfile) = ($node->basedir . '/pgbench.out', $node->basedir . '/pgbench.err');
my $pgbench = IPC::Run::start(
	[ 'pgbench', '-n', '-c', '1', '-T', '15', '-f', $script, $node->connstr('portfolio') ],
	'>', $pgb_outfile, '2>', $pgb_errfile);

# the queue fills in ten chunks while the application runs, a cycle after
# each: 5 requests per account and table, a third completed, so at most 5
# factors of 1.6 or 0.4 per account (exact in cents)
my ($cycles, $failed) = (0, 0);
my $sync = sub {
	my ($rc, $o, $e) = $node->psql('portfolio', 'SELECT rows_read FROM cm_sync_now()');
	$cycles++;
	if ($rc != 0)
	{
		$failed++;
		diag("cycle failed: $e");
	}
};
for my $chunk (0 .. 9)
{
	my ($lo, $hi) = ($chunk * 1000, $chunk * 1000 + 999);
	$node->safe_psql('queue', qq{
		INSERT INTO investment_queue (account_number, tier_1, tier_2, tier_3, uuid, status)
		SELECT 'ACC' || lpad((i % 2000)::text, 5, '0'), 1, 2, 3,
		       md5('load:inv:' || i)::uuid::text,
		       (ARRAY['COMPLETED', 'PENDING', 'FAILED'])[i / 2000 % 3 + 1]
		  FROM generate_series($lo, $hi) i;
		INSERT INTO withdrawal_queue (account_number, tier_1, tier_2, tier_3, uuid, status)
		SELECT 'ACC' || lpad((i % 2000)::text, 5, '0'), 1, 2, 3,
		       md5('load:wd:' || i)::uuid::text,
		       (ARRAY['PENDING', 'COMPLETED', 'CANCELLED'])[i / 2000 % 3 + 1]
		  FROM generate_series($lo, $hi) i;
	});
	$sync->();
}
$sync->();
$pgbench->finish;
my $pgbench_rc = $?;
my ($pgb_out, $pgb_err) = (slurp_file($pgb_outfile), slurp_file($pgb_errfile));
is($failed, 0, "(b) no cycle failed ($cycles cycles during the application load)");
is($pgbench_rc, 0, '(b) pgbench succeeded') or diag($pgb_err);
like($pgb_out, qr/number of failed transactions: 0 /, '(b) no application transaction failed')
  or diag($pgb_out);
my ($napp) = $pgb_out =~ /number of transactions actually processed: (\d+)/;
ok($napp && $napp > 50, "(b) the application ran throughout ($napp transactions)");
wait_synced($node, $node, '(b)');

# every application increment: tier 1 (delta 0) = start + increments
is( query_one($node, 'portfolio', q{
	SELECT count(*) FROM user_portfolios p
	  JOIN test_initial_portfolios i USING (accountid)
	  LEFT JOIN (SELECT accountid, sum(amount) AS inc FROM app_increment GROUP BY 1) a USING (accountid)
	 WHERE p.tier1_value <> i.tier1_value + coalesce(a.inc, 0)
	    OR p.tier1_allocation <> i.tier1_allocation + coalesce(a.inc, 0)}),
	'0', '(b) every application increment is present on every account');

# every cycle effect: tier 2 value * 1.6^completed investments, allocation * 0.4^completed withdrawals
my $counts = $node->safe_psql('queue', q{
	SELECT string_agg(format('(%L,%s,%s)', a, ci, cw), ',') FROM (
	  SELECT a, sum(ci) AS ci, sum(cw) AS cw FROM (
	    SELECT account_number AS a, (status = 'COMPLETED')::int AS ci, 0 AS cw FROM investment_queue
	    UNION ALL
	    SELECT account_number, 0, (status = 'COMPLETED')::int FROM withdrawal_queue) q
	   WHERE a <> 'ACC02000' GROUP BY a) s});
is( query_one($node, 'portfolio', qq{
	SELECT coalesce(string_agg(format('%s: value2 %s alloc2 %s (start %s %s, %s/%s completions)', p.accountid,
	                p.tier2_value, p.tier2_allocation, i.tier2_value, i.tier2_allocation, k.ci, k.cw), '; '), '')
	  FROM user_portfolios p
	  JOIN test_initial_portfolios i USING (accountid)
	  JOIN (VALUES $counts) AS k(accountid, ci, cw) USING (accountid)
	 WHERE p.tier2_value <> i.tier2_value * 1.6 ^ k.ci
	    OR p.tier2_allocation <> i.tier2_allocation * 0.4 ^ k.cw
	    OR p.tier3_value <> i.tier3_value OR p.tier3_allocation <> i.tier3_allocation
	    OR p.total_value <> p.tier1_value + p.tier2_value + p.tier3_value
	    OR p.total_allocation <> p.tier1_allocation + p.tier2_allocation + p.tier3_allocation}),
	'', '(b) every completion applied exactly once on top of the application\'s changes');
is( query_one($node, 'portfolio',
		q{SELECT count(*) FROM cm.ledger WHERE applied IS DISTINCT FROM (status = 'COMPLETED')}),
	'0', '(b) the ledger is applied exactly for the completed requests');

$node->stop;
done_testing();
