# Copyright (c) consistency_manager authors

# Protects: the event journal on real clusters.
#
#  (a) one NOTIFY consistency_manager per committed cycle that wrote
#      events, none for an idle cycle, its payload the first and last
#      event_id of the cycle; the journal agrees with the ledger and the
#      accounts (one transaction_created per request, one effect_applied
#      per completion, cm_verify_accounts() empty);
#  (b) a consumer's offset survives a server restart, and a consumer that
#      records what it read in the same transaction as its ack gets every
#      event exactly once, while the worker is killed (SIGKILL) in the
#      middle of a backlog and the cluster restarts;
#  (c) the amount policy against a plain-SQL oracle, then compensation of
#      those completions after the source went back to market_delta.

use strict;
use warnings;

use CmTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $ACCOUNTS = 200;

my $queue = cm_node('queue', preload => 0);
$queue->start;
setup_queue_db($queue);

my $node = cm_node('events', preload => 0,
	conf => [
		"consistency_manager.polling_interval = '1h'",
		"consistency_manager.max_rows_per_cycle = 700",
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

# a consumer that records each event it reads and acknowledges in the same
# transaction: a duplicate delivery fails on the primary key
$node->safe_psql('portfolio', q{
	SELECT cm_consumer_create('tap', true);
	CREATE TABLE consumed (event_id bigint PRIMARY KEY, event_type text, uuid uuid, accountid text);
	CREATE FUNCTION consume(n integer) RETURNS integer LANGUAGE plpgsql AS $$
	DECLARE
		k integer;
		last bigint;
	BEGIN
		INSERT INTO consumed SELECT e.event_id, e.event_type, e.uuid, e.accountid FROM cm_events('tap', n) e;
		GET DIAGNOSTICS k = ROW_COUNT;
		IF k > 0 THEN
			SELECT max(event_id) INTO last FROM consumed;
			PERFORM cm_events_ack('tap', last);
		END IF;
		RETURN k;
	END $$;
});

sub consume_all
{
	my $total = 0;
	while (1)
	{
		my $k = $node->safe_psql('portfolio', 'SELECT consume(500)');
		last if $k == 0;
		$total += $k;
	}
	return $total;
}

# the notifications a listening session has received, as payloads
sub notifications
{
	my ($listener) = @_;
	my $out = $listener->query_safe('SELECT 1');
	return [ $out =~ /Asynchronous notification "consistency_manager" with payload "(.*?)" received from server/g ];
}

sub journal_agrees
{
	my ($label) = @_;
	is( $node->safe_psql('portfolio', q{
			SELECT (SELECT count(*) FROM cm.event WHERE event_type = 'transaction_created')
			     = (SELECT count(*) FROM cm.ledger),
			       (SELECT count(DISTINCT uuid) FROM cm.event WHERE event_type = 'transaction_created')
			     = (SELECT count(*) FROM cm.ledger),
			       (SELECT count(*) FROM cm.event WHERE event_type = 'effect_applied')
			     = (SELECT count(*) FROM cm.ledger WHERE applied)}),
		't|t|t', "$label: one transaction_created per request, one effect_applied per completion");
	is($node->safe_psql('portfolio', 'SELECT count(*) FROM cm_verify_accounts()'), '0',
		"$label: cm_verify_accounts() finds every account equal to its last event");
	return;
}

############################################################################
# (a) one NOTIFY per cycle
############################################################################

my $listener = $node->background_psql('portfolio');
$listener->query_safe('LISTEN consistency_manager');

add_requests($queue, 'a', 300, $ACCOUNTS);
$node->safe_psql('portfolio', 'SELECT cm_sync_now()');
my $got = notifications($listener);
my ($lo, $hi) = split /\|/, $node->safe_psql('portfolio', 'SELECT min(event_id), max(event_id) FROM cm.event');
is_deeply($got, [qq({"first_event_id" : $lo, "last_event_id" : $hi})],
	'(a) one notification for a cycle that wrote events, with its first and last event_id');
ok($hi - $lo + 1 > 600, '(a) for the ' . ($hi - $lo + 1) . ' events of 600 requests');

$node->safe_psql('portfolio', 'SELECT cm_sync_now()');
is_deeply(notifications($listener), [], '(a) none for a cycle with nothing to do');

add_requests($queue, 'a2', 50, $ACCOUNTS);
$node->safe_psql('portfolio', 'SELECT cm_sync_now()');
add_requests($queue, 'a3', 50, $ACCOUNTS);
$node->safe_psql('portfolio', 'SELECT cm_sync_now()');
$got = notifications($listener);
is(scalar @$got, 2, '(a) two cycles, two notifications');
my @ranges = map { [ /(\d+)\D+(\d+)/ ] } @$got;
ok(@ranges == 2 && $ranges[0][0] > $hi && $ranges[0][1] < $ranges[1][0],
	'(a) each names its own range, in commit order') or diag(explain(\@ranges));
close_bg($listener);

check_oracle($node, $queue, '(a) market_delta with the journal on', exact => 1);
journal_agrees('(a)');

############################################################################
# (b) consumer offsets across a restart and a SIGKILL of the worker
############################################################################

is($node->safe_psql('portfolio', 'SELECT consume(100) + consume(100)'), '200', '(b) the consumer reads 200 events');
my $offset = $node->safe_psql('portfolio', 'SELECT max(event_id) FROM consumed');
$node->restart;
is($node->safe_psql('portfolio', q{SELECT acked_id FROM cm_consumers() WHERE name = 'tap'}), $offset,
	'(b) its offset survives a restart');
is($node->safe_psql('portfolio', q{SELECT min(event_id) > } . $offset . q{ FROM cm_events('tap', 10)}), 't',
	'(b) and it reads on after it');

# a backlog the worker syncs in chunks, slowed by an application trigger,
# killed in the middle while the consumer keeps reading
$node->safe_psql('portfolio', q{
	CREATE FUNCTION app_slow() RETURNS trigger LANGUAGE plpgsql AS $$
	BEGIN PERFORM pg_sleep(0.001); RETURN NEW; END $$;
	CREATE TRIGGER app_slow BEFORE INSERT ON portfolio_transactions
		FOR EACH ROW EXECUTE FUNCTION app_slow();
});
my $before = $node->safe_psql('portfolio', 'SELECT count(*) FROM portfolio_transactions');
add_requests($queue, 'killed', 3000, $ACCOUNTS);
$node->safe_psql('portfolio', 'SELECT cm_wake()');
ok($node->poll_query_until('portfolio', "SELECT count(*) > $before + 700 FROM portfolio_transactions"),
	'(b) the backlog has committed its first chunks');
consume_all();
my $pid = $node->safe_psql('portfolio', 'SELECT worker_pid FROM cm_stats()');
my $at_kill = $node->safe_psql('portfolio', 'SELECT count(*) FROM portfolio_transactions');
kill 'KILL', $pid;
ok($at_kill < $before + 6000, "(b) the worker was killed mid-backlog ($at_kill rows synced just before)");
ok( $node->poll_query_until('portfolio',
		"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'consistency_manager' AND pid <> $pid"),
	'(b) after SIGKILL the cluster restarts and the worker comes back');
$node->safe_psql('portfolio', 'SELECT cm_wake()');
ok(wait_until(sub { consume_all(); $node->safe_psql('portfolio', 'SELECT count(*) FROM portfolio_transactions') == $before + 6000 }),
	'(b) the consumer reads on while the worker finishes the backlog');
wait_synced($node, $queue, '(b) the backlog after the kill');
consume_all();
is( $node->safe_psql('portfolio', q{
		SELECT (SELECT count(*) FROM cm.event e WHERE NOT EXISTS (SELECT 1 FROM consumed c WHERE c.event_id = e.event_id)),
		       (SELECT count(*) FROM consumed c WHERE NOT EXISTS (SELECT 1 FROM cm.event e WHERE e.event_id = c.event_id))}),
	'0|0', '(b) the consumer got every event of the journal exactly once, through restart and SIGKILL');
is($node->safe_psql('portfolio', q{SELECT lag_events FROM cm_consumers() WHERE name = 'tap'}), '0',
	'(b) and has no lag left');
check_oracle($node, $queue, '(b) after the kill', exact => 1);
journal_agrees('(b)');

############################################################################
# (c) amount, then compensation after a policy change, against an oracle
############################################################################

# expected: each account's tiers before, plus the tier amounts (rounded to
# the two decimals of portfolio_transactions) of its new COMPLETED
# investments, minus those of its withdrawals, on values and allocations alike
my $ORACLE = q{
	WITH q AS (
		SELECT account_number AS accountid, 1 AS sgn, tier_1, tier_2, tier_3, uuid, status
		  FROM cm_remote.queue_server_investment_queue
		UNION ALL
		SELECT account_number, -1, tier_1, tier_2, tier_3, uuid, status
		  FROM cm_remote.queue_server_withdrawal_queue),
	d AS (
		SELECT q.accountid, sum(q.sgn * round(q.tier_1, 2)) AS d1, sum(q.sgn * round(q.tier_2, 2)) AS d2,
		       sum(q.sgn * round(q.tier_3, 2)) AS d3
		  FROM q WHERE q.status = 'COMPLETED' AND q.uuid::uuid NOT IN (SELECT uuid FROM pre_ledger)
		 GROUP BY q.accountid)
	SELECT count(*) FROM user_portfolios p
	  JOIN pre_portfolios o USING (accountid)
	  LEFT JOIN d USING (accountid)
	 WHERE (p.tier1_value, p.tier2_value, p.tier3_value, p.total_value,
	        p.tier1_allocation, p.tier2_allocation, p.tier3_allocation, p.total_allocation)
	    IS DISTINCT FROM
	       (o.tier1_value + coalesce(d1, 0), o.tier2_value + coalesce(d2, 0), o.tier3_value + coalesce(d3, 0),
	        o.total_value + coalesce(d1 + d2 + d3, 0),
	        o.tier1_allocation + coalesce(d1, 0), o.tier2_allocation + coalesce(d2, 0),
	        o.tier3_allocation + coalesce(d3, 0), o.total_allocation + coalesce(d1 + d2 + d3, 0))
};

$node->safe_psql('portfolio', q{
	DROP TRIGGER app_slow ON portfolio_transactions;
	CREATE TABLE pre_portfolios AS SELECT * FROM user_portfolios;
	CREATE TABLE pre_ledger AS SELECT uuid FROM cm.ledger;
	SELECT cm_set_effect_policy(source_id, 'amount') FROM cm.source;
});
# three completions per account and kind, so that they sum within a cycle
add_requests($queue, 'amount', 3 * $ACCOUNTS, $ACCOUNTS, statuses => [qw(COMPLETED)]);
is( $node->safe_psql('portfolio', 'SELECT completed_applied, dead_lettered FROM cm_sync_now()'),
	(6 * $ACCOUNTS) . '|0', '(c) every completion applies under amount');
is($node->safe_psql('portfolio', $ORACLE), '0', '(c) amount: every account equals before + the sums of its amounts');
is( $node->safe_psql('portfolio', q{
		SELECT count(*) FROM cm.event WHERE event_type = 'effect_applied' AND payload->>'policy' = 'amount'
		   AND (payload->>'effects_in_cycle')::int = 6}),
	6 * $ACCOUNTS, '(c) one effect event per completion, six combined per account');

# back to market_delta; the amount completions of the even accounts are cancelled
$node->safe_psql('portfolio', q{SELECT cm_set_effect_policy(source_id, 'market_delta') FROM cm.source});
my $cancelled = 0;
for my $t (qw(investment_queue withdrawal_queue))
{
	$cancelled += $queue->safe_psql('queue', qq{
		WITH u AS (UPDATE $t SET status = 'CANCELLED'
		            WHERE uuid IN (SELECT md5('amount:$t:' || i)::uuid::text FROM generate_series(0, 599) i)
		              AND right(account_number, 1) IN ('0', '2', '4', '6', '8')
		           RETURNING 1)
		SELECT count(*) FROM u});
}
is( $node->safe_psql('portfolio', 'SELECT compensated, dead_lettered FROM cm_sync_now()'),
	"$cancelled|0", "(c) the $cancelled cancelled completions are compensated");
is($node->safe_psql('portfolio', $ORACLE), '0',
	'(c) compensated by the amounts the ledger recorded, not by the policy of the source now');
is( $node->safe_psql('portfolio', q{
		SELECT count(*) FROM cm.event WHERE event_type = 'effect_compensated' AND payload->>'policy' = 'amount'}),
	$cancelled, '(c) each compensation journalled under the policy it undid');
is($node->safe_psql('portfolio', 'SELECT count(*) FROM cm_verify_accounts()'), '0',
	'(c) cm_verify_accounts() agrees');
$node->safe_psql('portfolio', q{UPDATE user_portfolios SET tier1_value = tier1_value + 0.01,
	total_value = total_value + 0.01 WHERE accountid = 'ACC00003'});
is( $node->safe_psql('portfolio', 'SELECT accountid, column_name FROM cm_verify_accounts() ORDER BY 2'),
	"ACC00003|tier1_value\nACC00003|total_value", '(c) and finds an account edited by hand');

$node->stop;
$queue->stop;
done_testing();
