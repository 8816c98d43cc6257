# Copyright (c) consistency_manager authors

# Protects: consistency_manager.database may name a database that does not
# exist yet, and the worker copes without a restart.
#  - the server starts with consistency_manager.database = 'portfolio' and
#    no such database: the launcher (backend_type 'consistency_manager
#    launcher', connected to no database) says so in exactly one LOG line
#    and waits; no FATAL error, no worker restarted over and over;
#    cm_stats() and cm_health() (from another database) say what it waits
#    for;
#  - once the database, the extension and a source exist, the sync worker
#    starts by itself and syncs, exactly once;
#  - a sync worker that is terminated is started again by the launcher;
#  - DROP DATABASE ... WITH (FORCE) ends the sync worker, the launcher
#    waits again (one more LOG line); stopped by cm_worker_stop() meanwhile,
#    it starts no worker when the database is created anew, and syncs it
#    after cm_worker_start();
#  - consistency_manager.role likewise: missing, then NOLOGIN, each said
#    once in the log, and the sync worker starts as that role once it may
#    log in.

use strict;
use warnings;

use CmTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $ACCOUNTS = 10;
my $WAITING = qr/LOG:  consistency_manager is waiting for database "portfolio" to exist$/;

my $node = cm_node('missing',
	conf => [
		"consistency_manager.polling_interval = '500ms'",
		"consistency_manager.max_backoff = '2s'",
	]);
$node->start;

# log lines that mention the database, and FATAL lines
sub log_lines
{
	my ($re) = @_;
	return grep { $_ =~ $re } split /\n/, slurp_file($node->logfile);
}

sub sync_worker_count
{
	return $node->safe_psql('postgres',
		q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'consistency_manager'});
}

############################################################################
# the database does not exist
############################################################################

ok( $node->poll_query_until(
		'postgres',
		q{SELECT datname IS NULL AND query = 'consistency_manager launcher: waiting for database "portfolio"'
		    FROM pg_stat_activity WHERE backend_type = 'consistency_manager launcher'}),
	'the launcher runs, in no database, and pg_stat_activity shows it waiting for database portfolio');

# twenty turns of the launcher (polling_interval 500ms) and two restart
# intervals of a static worker (5 s)
usleep(10_000_000);

my @waiting = log_lines(qr/portfolio/);
is(scalar(@waiting), 1, 'after 10 s the log has one line about the missing database')
  or diag(join("\n", @waiting));
like($waiting[0] // '', $WAITING, 'it is a LOG line saying the worker waits for the database');
ok($node->log_contains(qr/HINT:  Create the database \(the worker starts by itself\), or set consistency_manager.database/),
	'with a hint to create the database or fix the setting');
my @fatal = log_lines(qr/FATAL|exited with exit code/);
is(scalar(@fatal), 0, 'no FATAL error and no worker exit in the log') or diag(join("\n", @fatal));
is(sync_worker_count(), '0', 'no sync worker runs');

$node->safe_psql('postgres', 'CREATE EXTENSION consistency_manager CASCADE');
is( $node->safe_psql('postgres', 'SELECT worker_pid IS NULL, worker_state FROM cm_stats()'),
	't|waiting for database "portfolio"',
	'cm_stats() in another database: no worker pid, worker_state says what it waits for');
my ($running, $detail) = split /\|/,
  $node->safe_psql('postgres', 'SELECT worker_running, detail FROM cm_health()'), 2;
is($running, 'f', 'cm_health(): the worker is not running');
like($detail, qr/worker not running \(waiting for database "portfolio"\)/, 'cm_health() says why');
is($node->safe_psql('postgres', 'SELECT cm_wake()'), 'f', 'cm_wake() says false: no sync worker runs');

############################################################################
# the database appears
############################################################################

setup_queue_db($node);
setup_portfolio_db($node, $node);
set_tiers($node, 'exact');
create_accounts($node, $ACCOUNTS, 'exact');
add_requests($node, 'created', 50, $ACCOUNTS);
wait_synced($node, $node, 'database created after the server started');
check_oracle($node, $node, 'database created after the server started', exact => 1);

my $pid = $node->safe_psql('portfolio', 'SELECT worker_pid FROM cm_stats()');
ok($pid, "cm_stats() reports the sync worker ($pid)");
is( $node->safe_psql('portfolio',
		"SELECT backend_type || '|' || application_name || '|' || datname FROM pg_stat_activity WHERE pid = $pid"),
	'consistency_manager|consistency_manager|portfolio',
	'the sync worker is in pg_stat_activity as consistency_manager, in database portfolio');
is(scalar(log_lines($WAITING)), 1, 'the wait was logged once in all');
ok($node->log_contains(qr/LOG:  consistency_manager is starting the sync worker in database "portfolio"/),
	'the log says when the sync worker starts after the wait');
@fatal = log_lines(qr/FATAL/);
is(scalar(@fatal), 0, 'still no FATAL error in the log') or diag(join("\n", @fatal));

############################################################################
# a terminated sync worker is started again
############################################################################

is($node->safe_psql('postgres', "SELECT pg_terminate_backend($pid)"), 't', 'terminate the sync worker');
ok( $node->poll_query_until('portfolio',
		"SELECT worker_pid IS NOT NULL AND worker_pid <> $pid FROM cm_stats()"),
	'the launcher starts a new sync worker');
ok( $node->log_contains(
		qr/LOG:  consistency_manager sync worker exited unexpectedly; the launcher starts a new one in 2000 ms/),
	'after the back-off it logs (5 s, capped by max_backoff = 2s)');
add_requests($node, 'restarted', 10, $ACCOUNTS);
wait_synced($node, $node, 'after the sync worker was terminated');

############################################################################
# the database is dropped, and created again
############################################################################

$node->safe_psql('postgres', 'DROP DATABASE portfolio WITH (FORCE)');
ok( $node->poll_query_until('postgres', 'SELECT worker_state FROM cm_stats()',
		'waiting for database "portfolio"'),
	'after DROP DATABASE the launcher waits for the database again');
is(sync_worker_count(), '0', 'and no sync worker runs');
ok( wait_until(sub { scalar(log_lines($WAITING)) == 2 }, 30),
	'the new wait is logged once more');
usleep(3_000_000);
is(scalar(log_lines($WAITING)), 2, 'and only once');

# stopped while it waits, it stays stopped when the database appears
is($node->safe_psql('postgres', 'SELECT cm_worker_stop()'), 't', 'cm_worker_stop() while the launcher waits');
ok( $node->poll_query_until('postgres', 'SELECT worker_state FROM cm_stats()', 'stopped by cm_worker_stop()'),
	'cm_stats() says the worker is stopped');
$node->safe_psql('postgres', 'DROP DATABASE queue');
setup_queue_db($node);
setup_portfolio_db($node, $node);
set_tiers($node, 'exact');
create_accounts($node, $ACCOUNTS, 'exact');
add_requests($node, 'again', 20, $ACCOUNTS);
usleep(2_000_000);    # four turns of the launcher
is(sync_worker_count(), '0', 'stopped: no sync worker starts when the database is created again');
is($node->safe_psql('portfolio', 'SELECT count(*) FROM portfolio_transactions'),
	'0', 'stopped: nothing is synced');
is($node->safe_psql('portfolio', 'SELECT cm_worker_start()'), 't', 'cm_worker_start()');
wait_synced($node, $node, 'database created again, after cm_worker_start()');
check_oracle($node, $node, 'database created again', exact => 1);

# the only FATAL errors are the two terminations asked for above
@fatal = log_lines(qr/FATAL/);
is(scalar(grep { !/terminating background worker "consistency_manager" due to administrator command/ } @fatal),
	0, 'no other FATAL error in the log')
  or diag(join("\n", @fatal));

$node->stop;

############################################################################
# the role does not exist, then may not log in
############################################################################

my $rnode = cm_node('missing_role', preload => 0,
	conf => [
		"shared_preload_libraries = 'consistency_manager'",
		"consistency_manager.database = 'postgres'",
		"consistency_manager.role = 'cm_sync'",
		"consistency_manager.polling_interval = '500ms'",
	]);
$rnode->start;
ok($rnode->poll_query_until('postgres',
		q{SELECT query FROM pg_stat_activity WHERE backend_type = 'consistency_manager launcher'},
		'consistency_manager launcher: waiting for role "cm_sync"'),
	'role missing: the launcher waits for it');
$rnode->safe_psql('postgres', 'CREATE ROLE cm_sync NOLOGIN');
ok($rnode->poll_query_until('postgres',
		q{SELECT query FROM pg_stat_activity WHERE backend_type = 'consistency_manager launcher'},
		'consistency_manager launcher: waiting for role "cm_sync" to have LOGIN'),
	'role without LOGIN: the launcher waits for it to be allowed to log in');
$rnode->safe_psql('postgres', 'ALTER ROLE cm_sync LOGIN');
ok($rnode->poll_query_until('postgres',
		q{SELECT usename || '|' || datname FROM pg_stat_activity WHERE backend_type = 'consistency_manager'},
		'cm_sync|postgres'),
	'with LOGIN the sync worker starts, as cm_sync, in database postgres');
my @role_log = grep { /LOG:  consistency_manager is waiting for role/ } split /\n/, slurp_file($rnode->logfile);
is(scalar(@role_log), 2, 'each wait was logged once') or diag(join("\n", @role_log));
my @role_fatal = grep { /FATAL/ } split /\n/, slurp_file($rnode->logfile);
is(scalar(@role_fatal), 0, 'no FATAL error while the role was missing or could not log in')
  or diag(join("\n", @role_fatal));
$rnode->stop;

done_testing();
