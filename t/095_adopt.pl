# Copyright (c) consistency_manager authors

# Protects: requests already in portfolio_transactions when the ledger does
# not know them are adopted, never applied a second time.  That is the case
# after DROP EXTENSION / CREATE EXTENSION / cm_attach_queue (the ledger went
# with the extension), and on the day a bank switches from the service this
# extension replaces (that service wrote and applied the rows).
#  - balances are unchanged by the first cycle after the reinstall;
#  - a request the old side left PENDING and queue-db has since COMPLETED is
#    applied, once;
#  - later completions apply once (the oracle holds);
#  - reversing an adopted completion is dead-lettered with a reason (the
#    factors it applied are unknown), never guessed.

use strict;
use warnings;

use CmTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $ACCOUNTS = 40;

my $node = cm_node('adopt', preload => 0, conf => ["consistency_manager.enabled = off"]);
$node->start;
setup_queue_db($node);
create_portfolio_db($node);
restart_with_preload($node);
setup_portfolio_db($node, $node);
set_tiers($node, 'exact');
create_accounts($node, $ACCOUNTS, 'exact');
# one completion in ten, the rest pending or failed: at most a few factors per account
add_requests($node, 'first', 200, $ACCOUNTS,
	statuses => [qw(COMPLETED PENDING FAILED PENDING PROCESSING)]);

$node->safe_psql('portfolio', 'SELECT cm_sync_now()');
check_oracle($node, $node, 'first sync', exact => 1);

my $balances = sub {
	$node->safe_psql('portfolio',
		q{SELECT md5(string_agg(p::text, ',' ORDER BY p.accountid)) FROM user_portfolios p});
};
my $before = $balances->();

# ---------------------------------------------------------------------------
# reinstall: the ledger is gone, portfolio_transactions stays
# ---------------------------------------------------------------------------
my ($rc, $out, $err) = $node->psql('portfolio', q{
	DROP EXTENSION consistency_manager;
	CREATE EXTENSION consistency_manager;
});
is($rc, 0, 'reinstall: DROP and CREATE EXTENSION succeed');
like($err, qr/WARNING:  dropping extension consistency_manager drops its ledger \(400 requests\), dead letters, cycle history and tier values/,
	'DROP EXTENSION warns that the ledger goes with it');
like($err, qr/HINT:  To keep this state, roll back and use ALTER EXTENSION consistency_manager UPDATE/,
	'and says what to do instead');
set_tiers($node, 'exact');
$node->safe_psql('portfolio', q{SELECT cm_attach_queue('queue_server')});
my $r = $node->safe_psql('portfolio',
	'SELECT created, completed_applied, compensated, dead_lettered FROM cm_sync_now()');
is($r, '400|0|0|0', 'after reinstall: every request enters the ledger, none is applied again');
is($balances->(), $before, 'after reinstall: balances unchanged');
is($node->safe_psql('portfolio', 'SELECT adopted FROM cm.cycle_history ORDER BY cycle_id DESC LIMIT 1'),
	'400', 'after reinstall: cm.cycle_history counts the 400 adopted requests');
is( $node->safe_psql('portfolio',
		q{SELECT count(*) FILTER (WHERE applied) || '/' || count(*) FROM cm.ledger}),
	'80/400', 'after reinstall: the ledger marks exactly the completed requests as applied');

# ---------------------------------------------------------------------------
# cutover: the old side wrote rows; some it left PENDING that queue-db has
# completed since; the extension has never seen any of them
# ---------------------------------------------------------------------------
$node->safe_psql('portfolio', q{
	DROP EXTENSION consistency_manager;
	CREATE EXTENSION consistency_manager;
});
set_tiers($node, 'exact');
# while nobody syncs, queue-db completes pending requests of the first 20 accounts
my $n = set_status($node, 'investment_queue',
	q{status = 'PENDING' AND account_number < 'ACC00020' AND queue_id % 3 = 0}, 'COMPLETED');
ok($n > 0, "queue-db completes $n requests the portfolio side still has as PENDING");
$node->safe_psql('portfolio', q{SELECT cm_attach_queue('queue_server')});
$r = $node->safe_psql('portfolio', 'SELECT created, completed_applied, dead_lettered FROM cm_sync_now()');
is($r, "400|$n|0", "cutover: every request adopted; only the $n new completions are applied");
check_oracle($node, $node, 'cutover', exact => 1);

# later changes apply once, as usual
set_status($node, 'withdrawal_queue', q{status = 'PENDING' AND queue_id % 4 = 0}, 'COMPLETED');
add_requests($node, 'later', 40, $ACCOUNTS, statuses => [qw(COMPLETED PENDING)]);
$node->safe_psql('portfolio', 'SELECT cm_sync_now()');
$node->safe_psql('portfolio', 'SELECT cm_sync_now()');
check_oracle($node, $node, 'after the cutover, later changes', exact => 1);

# reversing an adopted completion: its factors are unknown, so it is not guessed
my $adopted = $node->safe_psql('portfolio',
	q{SELECT l.queue_id FROM cm.ledger l WHERE l.applied AND l.factor1 IS NULL AND l.kind = 'INVEST' ORDER BY 1 LIMIT 1});
ok($adopted, "an adopted completion (queue_id $adopted)");
my $snap = $balances->();
set_status($node, 'investment_queue', "queue_id = $adopted", 'FAILED');
$r = $node->safe_psql('portfolio', 'SELECT compensated, dead_lettered FROM cm_sync_now()');
is($r, '0|1', 'its reversal is dead-lettered, not compensated');
like( $node->safe_psql('portfolio', "SELECT reason FROM cm.dead_letter WHERE queue_id = $adopted"),
	qr/cannot compensate: its completion was adopted from an existing .*portfolio_transactions row, so the factors it applied are unknown; correct account ACC\d+ by hand/,
	'the dead letter says why and what to do');
is($balances->(), $snap, 'balances untouched by the reversal');

$node->stop;
done_testing();
