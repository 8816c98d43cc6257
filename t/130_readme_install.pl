# Copyright (c) consistency_manager authors

# Protects: the README's install path for a deployment with no superuser in
# the path works as written.  The SQL block of README.md's section "Running
# with no superuser in the path" is run verbatim (only the placeholders for
# host, port and password are replaced) on two clusters: queue-db with
# scram-sha-256 for the reader, portfolio-db with
# consistency_manager.role = 'cm_sync'.  The worker then syncs by itself,
# as cm_sync, and cm_health() has nothing to say about the sync role.

use strict;
use warnings;

use CmTest;
use FindBin;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

# the checkout's README.md (tools/test.sh names its copy in CM_README)
my $readme = $ENV{CM_README} // "$FindBin::RealBin/../README.md";
BAIL_OUT("$readme does not exist") unless -f $readme;
my $text = slurp_file($readme);
my ($section) = $text =~ /^### Running with no superuser in the path\n(.*?)^### /ms
  or BAIL_OUT('README.md has no section "Running with no superuser in the path"');
my ($block) = $section =~ /```sql\n(.*?)```/s
  or BAIL_OUT('that section has no sql block');
my ($queue_sql, $portfolio_sql) = split /^-- portfolio-db, as a superuser\n/m, $block;
ok($queue_sql && $portfolio_sql, "the README's block has a queue-db part and a portfolio-db part");
like($text, qr/`consistency_manager\.role = 'cm_sync'`/, 'and names the setting of the sync role');

my $password = 'reader-secret';
my $queue = cm_node('queue', preload => 0);
$queue->start;
setup_queue_db($queue);
# the README asks pg_hba.conf for a password from the reader
my $hba = $queue->data_dir . '/pg_hba.conf';
my $rules = slurp_file($hba);
open(my $fh, '>', $hba) or die "could not write $hba: $!";
print $fh "host queue reader 127.0.0.1/32 scram-sha-256\n" . $rules;
close $fh;
$queue->reload;

(my $q = $queue_sql) =~ s/'\.\.\.'/'$password'/g;
$queue->safe_psql('queue', $q);

my $node = cm_node('portfolio', preload => 0);
$node->start;
create_portfolio_db($node);
$node->safe_psql('portfolio', 'CREATE ROLE ops');
(my $p = $portfolio_sql) =~ s/'\.\.\.'/'$password'/g;
my $port = $queue->port;
$p =~ s/host 'queue-db\.internal', port '5432'/host '127.0.0.1', port '$port'/;
my ($rc, $out, $err) = $node->psql('portfolio', $p, on_error_stop => 1);
is($rc, 0, "the README's portfolio-db statements run as written") or diag($err);
unlike($err, qr/ERROR/, 'without an error');
like($out, qr/queue_server_investment_queue/, 'cm_attach_queue() attached the queue tables');

# the setting the README names, then a restart with the library preloaded
$node->append_conf('postgresql.conf', "consistency_manager.role = 'cm_sync'");
restart_with_preload($node);
is($node->safe_psql('portfolio', 'SELECT rolsuper FROM pg_roles WHERE rolname = $$cm_sync$$'), 'f',
	'cm_sync is no superuser');

$node->safe_psql('portfolio', 'CREATE TABLE test_initial_portfolios (LIKE user_portfolios)');
create_accounts($node, 10, 'exact');
add_requests($queue, 'readme', 10, 10);
$node->safe_psql('portfolio', 'SELECT cm_wake()');
wait_synced($node, $queue, 'the worker, as cm_sync, through the reader');
is( $node->safe_psql('portfolio',
		q{SELECT usename FROM pg_stat_activity WHERE backend_type = 'consistency_manager'}),
	'cm_sync', 'the worker runs as cm_sync');
is($node->safe_psql('portfolio', 'SELECT healthy FROM cm_health()'), 't', 'cm_health() is healthy');
unlike($node->safe_psql('portfolio', 'SELECT detail FROM cm_health()'), qr/sync role/,
	'and has nothing to say about the sync role');
is( $queue->safe_psql('queue',
		q{SELECT string_agg(DISTINCT usename, ',') FROM pg_stat_activity WHERE application_name = 'postgres_fdw'}),
	'reader', 'queue-db is read as reader');

$node->stop;
$queue->stop;
done_testing();
