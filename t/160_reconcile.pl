# Copyright (c) consistency_manager authors

# Protects: the worker's periodic reconciliation.  With
# consistency_manager.reconcile_interval set, the worker runs cm_reconcile()
# after its cycles (never holding the cycle lock); a run that finds
# differences is logged as a WARNING and reported by cm_health() until
# cm_repair() fixes them through the cycle, after which every row and
# account equals the queue's oracle.  Without the setting it never runs one.

use strict;
use warnings;

use CmTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $ACCOUNTS = 10;

my $queue = cm_node('queue', preload => 0);
$queue->start;
setup_queue_db($queue);

my $node = cm_node('portfolio', preload => 0,
	conf => [ "consistency_manager.polling_interval = '200ms'" ]);
$node->start;
setup_portfolio_db($node, $queue);
create_accounts($node, $ACCOUNTS, 'exact');
restart_with_preload($node);

add_requests($queue, 'r1', 20, $ACCOUNTS);
wait_synced($node, $queue, 'first batch');
is($node->safe_psql('portfolio', 'SELECT count(*) FROM cm.reconciliation_run'),
	'0', 'reconcile_interval = 0 (the default): the worker runs no reconciliation');

# on: a run without differences
$node->safe_psql('portfolio', q{ALTER SYSTEM SET consistency_manager.reconcile_interval = '1s'});
$node->reload;
ok( $node->poll_query_until('portfolio',
		q{SELECT count(*) > 0 FROM cm.reconciliation_run WHERE differences = 0 AND finished_at IS NOT NULL}),
	'the worker runs a reconciliation');
is($node->safe_psql('portfolio',
		'SELECT rows_compared || \' \' || rows_fetched FROM cm_last_reconciliation()'),
	'40 0', 'it compared the 40 requests and fetched no row');

# a transaction deleted and one edited in user-portfolio-db
my ($gone, $edited) = split /\|/, $node->safe_psql('portfolio',
	q{SELECT (SELECT id FROM portfolio_transactions ORDER BY id LIMIT 1) || '|' ||
	         (SELECT id FROM portfolio_transactions ORDER BY id OFFSET 1 LIMIT 1)});
$node->safe_psql('portfolio', qq{
	DELETE FROM portfolio_transactions WHERE id = '$gone';
	UPDATE portfolio_transactions
	   SET status = CASE status WHEN 'CANCELLED' THEN 'FAILED' ELSE 'CANCELLED' END,
	       updated_at = now() + interval '1 s'
	 WHERE id = '$edited';
});
ok( $node->poll_query_until('portfolio',
		q{SELECT differences = 2 FROM cm_last_reconciliation()}),
	'the next periodic run finds both differences');
my $run = $node->safe_psql('portfolio', 'SELECT run_id FROM cm_last_reconciliation()');
is($node->safe_psql('portfolio',
		"SELECT string_agg(kind || ': ' || diagnosis, '; ' ORDER BY kind) FROM cm.reconciliation_item WHERE run_id = $run"),
	"missing: deleted from user-portfolio-db after it was synced; "
	  . "status: edited in user-portfolio-db after it was synced (portfolio updated_at later than the ledger's synced_at)",
	'each with its diagnosis');
like($node->safe_psql('portfolio', 'SELECT detail FROM cm_health()'),
	qr/reconciliation run \d+ \(.*\) found 2 unrepaired difference\(s\)/,
	'cm_health() reports them');
ok(wait_until(sub { slurp_file($node->logfile) =~ /WARNING:  consistency_manager reconciliation run \d+: 2 differences/ }),
	'the worker logs the run as a WARNING');

# the worker never repairs; the operator does, through the cycle
$node->safe_psql('portfolio', q{ALTER SYSTEM SET consistency_manager.reconcile_interval = 0});
$node->reload;
is($node->safe_psql('portfolio', "SELECT cm_repair(run_id) FROM cm_last_reconciliation()"),
	'2', 'cm_repair() repairs both');
check_oracle($node, $queue, 'after the repair');
is($node->safe_psql('portfolio', 'SELECT differences FROM cm_reconcile()'), '0',
	'a new run finds no difference');
unlike($node->safe_psql('portfolio', 'SELECT detail FROM cm_health()'),
	qr/unrepaired difference/, 'and cm_health() no longer reports one');

$node->stop;
$queue->stop;
done_testing();
