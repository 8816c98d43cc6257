# Copyright (c) consistency_manager authors

# Protects: connections to queue-db stay bounded, whatever number of
# foreign servers and of sessions that watch or trigger the cycle.
#  - the worker holds one connection per foreign server;
#  - monitoring functions (cm_health, cm_sources, cm_status, cm_stats) open
#    none, from any number of dashboard sessions;
#  - a manual cm_sync_now() closes the connections it opened when its
#    transaction ends; cm_sync_now(keep_connections => true) keeps them.

use strict;
use warnings;

use CmTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $SERVERS = 30;

my $queue = cm_node('queue', preload => 0, conf => ['max_connections = 100']);
$queue->start;
setup_queue_db($queue);
for my $i (1 .. $SERVERS - 1)
{
	$queue->safe_psql('postgres', "CREATE DATABASE queue$i TEMPLATE queue");
}

my $node = cm_node('portfolio', preload => 0, conf => ["consistency_manager.polling_interval = '1h'"]);
$node->start;
create_portfolio_db($node);
restart_with_preload($node);
setup_portfolio_db($node, $queue);
create_accounts($node, 10, 'market');
my $port = $queue->port;
for my $i (1 .. $SERVERS - 1)
{
	$node->safe_psql('portfolio', qq{
		CREATE SERVER queue_server$i FOREIGN DATA WRAPPER postgres_fdw
			OPTIONS (host '127.0.0.1', port '$port', dbname 'queue$i');
		CREATE USER MAPPING FOR CURRENT_USER SERVER queue_server$i;
		SELECT count(*) FROM cm_attach_queue('queue_server$i');
	});
}
is($node->safe_psql('portfolio', 'SELECT count(*) FROM cm.source'), 2 * $SERVERS,
	"$SERVERS foreign servers, two queue tables each");

# connections to queue-db opened by postgres_fdw (its default application_name)
sub fdw_connections
{
	return $queue->safe_psql('postgres',
		q{SELECT count(*) FROM pg_stat_activity WHERE application_name = 'postgres_fdw'});
}

# the same, once the backends of connections just closed have exited:
# queue-db's backend leaves pg_stat_activity a moment after its client
# hung up, so a count taken at once may still show it
sub fdw_connections_settled
{
	my ($expected) = @_;
	$queue->poll_query_until('postgres',
		q{SELECT count(*) FROM pg_stat_activity WHERE application_name = 'postgres_fdw'},
		$expected);
	return fdw_connections();
}

# the worker: one connection per server
add_requests($queue, 'c', 5, 10);
$node->safe_psql('portfolio', 'SELECT cm_wake()');
wait_synced($node, $queue, 'the worker syncs');
is(fdw_connections(), $SERVERS, "the worker holds one connection per foreign server ($SERVERS)");

# three dashboard sessions calling every monitoring function, and staying open
my @dash;
for (1 .. 3)
{
	my $s = $node->background_psql('portfolio');
	$s->query_safe('SELECT * FROM cm_health()');
	$s->query_safe('SELECT * FROM cm_sources()');
	$s->query_safe('SELECT cm_status()');
	$s->query_safe('SELECT * FROM cm_stats()');
	push @dash, $s;
}
is(fdw_connections(), $SERVERS, 'dashboard sessions open no connection to queue-db');

# a manual cycle in a session that stays open
my $op = $node->background_psql('portfolio');
$op->query_safe('SELECT * FROM cm_sync_now()');
is(fdw_connections_settled($SERVERS), $SERVERS, 'cm_sync_now() closes the connections it opened when its transaction ends');
$op->query_safe('BEGIN; SELECT * FROM cm_sync_now(); SELECT pg_sleep(0)');
is(fdw_connections(), 2 * $SERVERS, 'inside its transaction a manual cycle holds one connection per server');
$op->query_safe('ROLLBACK');
is(fdw_connections_settled($SERVERS), $SERVERS, '... and none after a rollback either');
$op->query_safe('SELECT * FROM cm_sync_now(keep_connections => true)');
is(fdw_connections(), 2 * $SERVERS, 'cm_sync_now(keep_connections => true) keeps them for the session');
close_bg($_) for @dash, $op;

$node->stop;
$queue->stop;
done_testing();
