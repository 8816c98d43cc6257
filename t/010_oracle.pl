# Copyright (c) consistency_manager authors

# Protects: one sync cycle, reading queue-db through postgres_fdw over TCP,
# makes portfolio-db exactly what a plain SQL oracle computes from the queue:
# every portfolio_transactions row (id, account, type, signed rounded tier
# changes, total, mapped status, timestamps) and every user_portfolios row
# (tier values compounded by (1 + delta)^k for k completed investments,
# allocations by (1 - delta)^k for k completed withdrawals, each tier
# rounded once per cycle, totals the sums of the rounded tiers).

use strict;
use warnings;

use CmTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $ACCOUNTS = 50;
my $PER_TABLE = 1000;

my $node = cm_node('oracle', preload => 0,
	conf => [
		"consistency_manager.enabled = off",
		# several keyset pages per source
		"consistency_manager.batch_size = 300",
	]);
$node->start;
setup_queue_db($node);
create_portfolio_db($node);
restart_with_preload($node);
setup_portfolio_db($node, $node);
set_tiers($node, 'market');
create_accounts($node, $ACCOUNTS, 'market');
add_requests($node, 'oracle', $PER_TABLE, $ACCOUNTS);

is( $node->safe_psql('queue',
		q{SELECT string_agg(status || '=' || n, ',' ORDER BY status) FROM
		   (SELECT status, count(*) n FROM (SELECT status FROM investment_queue UNION ALL
		                                    SELECT status FROM withdrawal_queue) q GROUP BY 1) s}),
	'CANCELLED=200,COMPLETED=600,FAILED=400,PENDING=400,PROCESSING=400',
	'queue-db holds 2000 requests with every status');
is($node->safe_psql('portfolio', 'SELECT string_agg(delta::text, \',\' ORDER BY tier) FROM cm_tier_deltas()'),
	'0.05,-0.02,0.03', 'non-zero tier deltas');

# postgres_fdw really goes over TCP to the queue database
like(
	$node->safe_psql('portfolio',
		q{SELECT array_to_string(srvoptions, ',') FROM pg_foreign_server WHERE srvname = 'queue_server'}),
	qr/host=127\.0\.0\.1/,
	'queue_server connects over TCP');

my $r = $node->safe_psql('portfolio',
	'SELECT sources, rows_read, created, updated, completed_applied, compensated, dead_lettered FROM cm_sync_now()');
is($r, '2|2000|2000|0|600|0|0',
	'one cm_sync_now() reads and creates all 2000 requests and applies the 600 completions');
is($node->safe_psql('portfolio', 'SELECT cycles, worker_state FROM cm_stats()'),
	'1|disabled',
	'the worker is idle (consistency_manager.enabled = off): the cycle above is the only one');

check_oracle($node, $node, 'after one cycle');

# a second cycle re-reads the same rows (look-back window) and changes nothing
my $before = portfolio_snapshot($node);
$r = $node->safe_psql('portfolio',
	'SELECT created, updated, completed_applied, compensated, dead_lettered FROM cm_sync_now()');
is($r, '0|0|0|0|0', 'a second cycle over the same rows has no effect');
is(portfolio_snapshot($node), $before, 'portfolio-db is unchanged by the second cycle');

$node->stop;
done_testing();
