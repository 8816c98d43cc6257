# Copyright (c) consistency_manager authors

# Protects: the library loads through shared_preload_libraries with a
# running server, CREATE EXTENSION ... CASCADE installs it (pulling in
# postgres_fdw), the tier math is callable from SQL, and DROP EXTENSION
# takes everything it created with it (schemas cm and cm_remote, the
# foreign tables cm_attach_queue() imported) without disturbing the server.

use strict;
use warnings;

use CmTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

# the databases exist before the worker's first start; the extension does not
my $node = cm_node('install', preload => 0,
	conf => [ "consistency_manager.polling_interval = '500ms'" ]);
$node->start;
setup_queue_db($node);
create_portfolio_db($node);
restart_with_preload($node);

is($node->safe_psql('postgres', 'SHOW shared_preload_libraries'),
	'consistency_manager', 'server starts with consistency_manager preloaded');
ok( $node->poll_query_until(
		'postgres',
		q{SELECT datname || ' ' || query FROM pg_stat_activity WHERE backend_type = 'consistency_manager'},
		'portfolio consistency_manager: waiting for CREATE EXTENSION'),
	'the background worker runs in database portfolio and waits for CREATE EXTENSION');

my $attached = setup_portfolio_db($node, $node);
is( $node->safe_psql('portfolio',
		q{SELECT string_agg(extname, ',' ORDER BY extname) FROM pg_extension WHERE extname IN ('consistency_manager', 'postgres_fdw')}),
	'consistency_manager,postgres_fdw',
	'CREATE EXTENSION consistency_manager CASCADE installs it and postgres_fdw');
is( $attached,
	"1|cm_remote.queue_server_investment_queue|investment\n2|cm_remote.queue_server_withdrawal_queue|withdrawal",
	'cm_attach_queue registers both split-layout queue tables');

is($node->safe_psql('portfolio', 'SELECT cm_tier_delta(1000000, 1050000)'),
	'0.05', 'cm_tier_delta(1000000, 1050000) = 0.05');
is($node->safe_psql('portfolio', 'SELECT cm_tier_delta(1000000, 1050000) = 0.05'),
	't', 'cm_tier_delta(1000000, 1050000) compares equal to 0.05');

# a cycle works end to end on the freshly installed extension
$node->safe_psql('portfolio', q{INSERT INTO user_portfolios (accountid) VALUES ('ACC00000')});
$node->safe_psql('queue',
	q{INSERT INTO investment_queue (account_number, tier_1, tier_2, tier_3, uuid, status)
	  VALUES ('ACC00000', 1, 2, 3, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'PENDING')});
ok($node->poll_query_until('portfolio',
		q{SELECT count(*) FROM portfolio_transactions WHERE id = 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'}, '1'),
	'the worker syncs a request in the new installation');

$node->safe_psql('portfolio', 'DROP EXTENSION consistency_manager');
is( $node->safe_psql('portfolio',
		q{SELECT count(*) FROM pg_namespace WHERE nspname IN ('cm', 'cm_remote')}),
	'0', 'DROP EXTENSION removes schemas cm and cm_remote');
is( $node->safe_psql('portfolio',
		q{SELECT count(*) FROM pg_foreign_table}),
	'0', 'DROP EXTENSION removes the imported foreign tables');
is( $node->safe_psql('portfolio',
		q{SELECT count(*) FROM pg_proc WHERE proname LIKE 'cm\_%'}),
	'0', 'DROP EXTENSION removes the cm_* functions');
is( $node->safe_psql('portfolio',
		q{SELECT count(*) FROM pg_extension WHERE extname = 'postgres_fdw'}),
	'1', 'postgres_fdw stays (the foreign server depends on it)');
is($node->safe_psql('portfolio', 'SELECT count(*) FROM portfolio_transactions'),
	'1', 'the application tables and their data stay');
is($node->safe_psql('postgres', 'SELECT 1'), '1', 'server still runs after DROP EXTENSION');

# and it can be created again
$node->safe_psql('portfolio', 'CREATE EXTENSION consistency_manager');
is($node->safe_psql('portfolio', q{SELECT count(*) FROM cm.source}),
	'0', 'CREATE EXTENSION after DROP starts from an empty state');

$node->stop;
done_testing();
