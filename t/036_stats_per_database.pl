# Copyright (c) consistency_manager authors

# Protects: cm_stats() counts the cycles of the database it is called in.
#  - manual cycles in a staging database do not move the counters of the
#    worker's database, and the other way round;
#  - a failing manual cycle is counted (errors, consecutive_failures,
#    last_error) in its own database only, and a successful one elsewhere
#    does not end another database's failure streak;
#  - the worker's turns (cycles, skipped turns) count in its database only;
#  - worker_pid and worker_state are the sync worker's in every database;
#  - with every slot taken (consistency_manager.max_databases = 2) a third
#    database's cycle runs, warns that it is not counted, and cm_stats()
#    there has NULL counters; the slot of a dropped database is reused.

use strict;
use warnings;

use CmTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $ACCOUNTS = 5;
my $fixtures = $ENV{CM_FIXTURES};

my $node = cm_node('stats',
	conf => [
		"consistency_manager.polling_interval = '500ms'",
		"consistency_manager.enabled = off",
		"consistency_manager.max_databases = 2",
	]);
$node->start;
setup_queue_db($node);
setup_portfolio_db($node, $node);
set_tiers($node, 'exact');
create_accounts($node, $ACCOUNTS, 'exact');

# another database with the extension, its own application tables and the
# same queue: a staging copy
sub create_copy
{
	my ($db, $attach) = @_;
	my $user = $node->safe_psql('postgres', 'SELECT current_user');
	my $port = $node->port;
	$node->safe_psql('postgres', "CREATE DATABASE $db");
	$node->safe_psql($db, slurp_file("$fixtures/portfolio_db.sql"));
	$node->safe_psql(
		$db, qq{
		CREATE EXTENSION consistency_manager CASCADE;
		CREATE SERVER queue_server FOREIGN DATA WRAPPER postgres_fdw
			OPTIONS (host '127.0.0.1', port '$port', dbname 'queue');
		CREATE USER MAPPING FOR "$user" SERVER queue_server OPTIONS (user '$user');
		INSERT INTO user_portfolios (accountid)
		SELECT 'ACC' || lpad(i::text, 5, '0') FROM generate_series(0, $ACCOUNTS - 1) i;
	});
	$node->safe_psql($db, q{SELECT count(*) FROM cm_attach_queue('queue_server')}) if $attach;
	return;
}
create_copy('staging', 1);

# cm_stats() of a database, as "name=value" pairs
my @COLS = qw(cycles created completed_applied errors consecutive_failures skipped_turns);
sub counters
{
	my ($db) = @_;
	my $row = $node->safe_psql($db,
		'SELECT ' . join(" || ' ' || ", map { "'$_=' || coalesce(${_}::text, 'NULL')" } @COLS) . ' FROM cm_stats()');
	return $row;
}
sub counters_are
{
	my ($db, $expected, $name) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my %e = (cycles => 0, created => 0, completed_applied => 0, errors => 0,
		consecutive_failures => 0, skipped_turns => 0, %$expected);
	return is(counters($db), join(' ', map { "$_=$e{$_}" } @COLS), "$db: $name");
}
sub set_port
{
	my ($db, $port) = @_;
	$node->safe_psql($db, "ALTER SERVER queue_server OPTIONS (SET port '$port')");
	return;
}

ok($node->poll_query_until('portfolio', 'SELECT worker_state FROM cm_stats()', 'disabled'),
	'the sync worker runs, disabled (consistency_manager.enabled = off)');
my $worker_pid = $node->safe_psql('postgres',
	q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'consistency_manager' AND datname = 'portfolio'});
ok($worker_pid, "the sync worker runs in database portfolio ($worker_pid)");

############################################################################
# manual cycles count where they ran
############################################################################

# 10 requests per queue table, 5 of them completed (statuses by account)
add_requests($node, 'first', 10, $ACCOUNTS);
counters_are('portfolio', {}, 'nothing counted before any cycle');
counters_are('staging', {}, 'nothing counted before any cycle');

$node->safe_psql('portfolio', 'SELECT cm_sync_now()') for 1 .. 2;
counters_are('portfolio', { cycles => 2, created => 20, completed_applied => 10 },
	'two manual cycles counted');
counters_are('staging', {}, 'cycles in portfolio do not show in staging');

$node->safe_psql('staging', 'SELECT cm_sync_now()') for 1 .. 3;
counters_are('staging', { cycles => 3, created => 20, completed_applied => 10 },
	'three manual cycles counted');
counters_are('portfolio', { cycles => 2, created => 20, completed_applied => 10 },
	'cycles in staging do not move the counters of the worker\'s database');

############################################################################
# failures count where they happened
############################################################################

set_port('staging', 1);    # nothing listens there
my ($rc, $out, $err) = (0, '', '');
$rc = $node->psql('staging', 'SELECT cm_sync_now()', stdout => \$out, stderr => \$err);
isnt($rc, 0, 'staging: a manual cycle fails when queue-db cannot be reached');
counters_are('staging', { cycles => 3, created => 20, completed_applied => 10, errors => 1, consecutive_failures => 1 },
	'the failed manual cycle is counted');
like($node->safe_psql('staging', 'SELECT last_error FROM cm_stats()'),
	qr/could not connect|connection to server/, 'staging: last_error is the connection failure');
counters_are('portfolio', { cycles => 2, created => 20, completed_applied => 10 },
	'the failure in staging does not show in portfolio');
is($node->safe_psql('portfolio', 'SELECT last_error IS NULL AND last_error_at IS NULL FROM cm_stats()'),
	't', 'portfolio: no last_error');

set_port('portfolio', 1);
for (1 .. 2)
{
	$rc = $node->psql('portfolio', 'SELECT cm_sync_now()', stdout => \$out, stderr => \$err);
	isnt($rc, 0, 'portfolio: a manual cycle fails when queue-db cannot be reached');
}
counters_are('portfolio', { cycles => 2, created => 20, completed_applied => 10, errors => 2, consecutive_failures => 2 },
	'two failed cycles in a row');
set_port('staging', $node->port);
$node->safe_psql('staging', 'SELECT cm_sync_now()');
counters_are('staging', { cycles => 4, created => 20, completed_applied => 10, errors => 1 },
	'a successful cycle ends the failure streak');
counters_are('portfolio', { cycles => 2, created => 20, completed_applied => 10, errors => 2, consecutive_failures => 2 },
	'a successful cycle in staging does not end portfolio\'s failure streak');
like($node->safe_psql('staging', 'SELECT last_error FROM cm_stats()'),
	qr/could not connect|connection to server/, 'staging keeps its own last error');

############################################################################
# the worker's turns count in its database; its pid and state show in all
############################################################################

set_port('portfolio', $node->port);
$node->safe_psql('portfolio', 'ALTER SYSTEM SET consistency_manager.enabled = on');
$node->safe_psql('portfolio', 'SELECT pg_reload_conf()');
ok($node->poll_query_until('portfolio', 'SELECT cycles >= 5 AND consecutive_failures = 0 FROM cm_stats()'),
	'portfolio: the worker cycles');
my $holder = $node->background_psql('portfolio');
$holder->query_safe('BEGIN; SELECT pg_advisory_xact_lock(17229, 1)');
ok($node->poll_query_until('portfolio', 'SELECT skipped_turns >= 2 FROM cm_stats()'),
	'portfolio: the worker skips its turns while the cycle lock is held');
$holder->query_safe('COMMIT');
close_bg($holder);
counters_are('staging', { cycles => 4, created => 20, completed_applied => 10, errors => 1 },
	'the worker\'s cycles and skipped turns do not show in staging');
for my $db ('portfolio', 'staging')
{
	is($node->safe_psql($db, 'SELECT worker_pid FROM cm_stats()'), $worker_pid,
		"$db: worker_pid is the sync worker's");
}
ok($node->poll_query_until('staging', 'SELECT worker_state FROM cm_stats()', 'idle'),
	'staging: worker_state is the sync worker\'s');

############################################################################
# every slot taken
############################################################################

create_copy('extra', 0);
$rc = $node->psql('extra', 'SELECT sources FROM cm_sync_now()', stdout => \$out, stderr => \$err);
is($rc, 0, 'extra: a cycle runs with every statistics slot taken');
is($out, '0', 'extra: the cycle ran (no source)');
like($err, qr/WARNING:  consistency_manager does not count the cycles of database "extra"/,
	'extra: it warns that the cycle is not counted');
like($err, qr/All 2 statistics slots \(consistency_manager.max_databases\) are taken/,
	'extra: the warning says why');
like($err, qr/HINT:  Raise consistency_manager.max_databases/, 'extra: and what to do');
is( $node->safe_psql('extra',
		q{SELECT cycles IS NULL AND errors IS NULL AND last_cycle_end IS NULL AND worker_pid IS NOT NULL FROM cm_stats()}),
	't', 'extra: cm_stats() has NULL counters (not kept) and the worker\'s pid');

$node->safe_psql('postgres', 'DROP DATABASE staging');
$rc = $node->psql('extra', 'SELECT sources FROM cm_sync_now()', stdout => \$out, stderr => \$err);
is($rc, 0, 'extra: a cycle after staging was dropped');
unlike($err, qr/WARNING/, 'extra: no warning: the slot of the dropped database is reused');
counters_are('extra', { cycles => 1 }, 'its cycle is counted');
ok($node->safe_psql('portfolio', 'SELECT cycles >= 5 AND created = 20 FROM cm_stats()') eq 't',
	'portfolio keeps its counters');

$node->stop;
done_testing();
