# Copyright (c) consistency_manager authors

# Protects least privilege (docs/ARCHITECTURE.md, 4.9): the cycle
# writes the application's tables with the rights of a non-superuser sync
# role, from the worker and from cm_sync_now() alike.
#  - app_owner, an ordinary role, owns the portfolio tables and has a
#    trigger on portfolio_transactions that tries ALTER ROLE app_owner
#    SUPERUSER and records who ran it.  Synced by a superuser's
#    cm_sync_now() and by the worker (which connects as the bootstrap
#    superuser when consistency_manager.role is empty), the trigger runs as
#    the sync role and app_owner stays an ordinary role; the rows are synced
#    exactly once.
#  - queue-db is read as queue_reader, a role that may only SELECT the
#    queue tables, through the sync role's user mapping (with a password,
#    as postgres_fdw requires of a non-superuser).
#  - consistency_manager.role = cm_sync, a role granted nothing: the worker
#    stays up (no restart loop), says what is missing once in the log and in
#    cm_health(), backs off, and syncs by itself once cm_grant_sync_role()
#    has run.
#  - a lock timeout in the cycle's local phase is retried as the sync role
#    and leaves the caller as it was.
#  - EXECUTE on cm_attach_queue() is not enough to attach a server: the
#    caller needs USAGE on it (42501).  A member of pg_monitor reads
#    cm_health() but cannot run cm_sync_now() (42501).
#  - a consistency_manager.role without LOGIN: the worker cannot connect
#    (PostgreSQL 15 checks LOGIN for background workers too), cm_health()
#    and cm_check_sync_role() say so, and the worker comes back by itself
#    once the role may log in.

use strict;
use warnings;

use CmTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $ACCOUNTS = 20;
my $PASSWORD = 'reader-secret';

my $node = cm_node('privilege', preload => 0,
	conf => [
		"consistency_manager.polling_interval = '500ms'",
		"consistency_manager.max_backoff = '2s'",
	]);
$node->start;
setup_queue_db($node);
create_portfolio_db($node);
my $port = $node->port;

# the log written since a mark, to count what one phase logged
sub log_since
{
	my ($offset) = @_;
	my $log = slurp_file($node->logfile);
	return substr($log, $offset);
}

# the SQLSTATE and message of a statement run as some role ('ok' when none)
$node->safe_psql(
	'portfolio', q{
	CREATE FUNCTION public.outcome(sql text) RETURNS text LANGUAGE plpgsql AS $$
	BEGIN
	    EXECUTE sql;
	    RETURN 'ok';
	EXCEPTION WHEN OTHERS THEN
	    RETURN SQLSTATE || ': ' || SQLERRM;
	END
	$$;
	GRANT EXECUTE ON FUNCTION public.outcome(text) TO PUBLIC;
});

############################################################################
# queue-db: a reader that may SELECT the queue tables and nothing else,
# logging in with a password over TCP
############################################################################

$node->safe_psql('postgres', qq{CREATE ROLE queue_reader LOGIN PASSWORD '$PASSWORD'});
$node->safe_psql('queue', 'GRANT SELECT ON investment_queue, withdrawal_queue TO queue_reader');
my $hba = $node->data_dir . '/pg_hba.conf';
my $rules = slurp_file($hba);
open(my $fh, '>', $hba) or die "could not write $hba: $!";
print $fh "host queue queue_reader 127.0.0.1/32 scram-sha-256\n" . $rules;
close $fh;
$node->reload;

############################################################################
# portfolio-db: the application's tables belong to app_owner, whose trigger
# tries to make app_owner a superuser
############################################################################

$node->safe_psql(
	'portfolio', qq{
	CREATE ROLE app_owner NOLOGIN;
	ALTER TABLE user_portfolios OWNER TO app_owner;
	ALTER TABLE portfolio_transactions OWNER TO app_owner;

	CREATE TABLE trigger_log (
	    logged_at timestamptz NOT NULL DEFAULT clock_timestamp(),
	    who       name NOT NULL,
	    app       text,
	    id        uuid,
	    outcome   text NOT NULL
	);
	ALTER TABLE trigger_log OWNER TO app_owner;
	GRANT INSERT ON trigger_log TO PUBLIC;

	CREATE FUNCTION escalate() RETURNS trigger LANGUAGE plpgsql AS \$\$
	BEGIN
	    BEGIN
	        ALTER ROLE app_owner SUPERUSER;
	        INSERT INTO public.trigger_log (who, app, id, outcome)
	        VALUES (current_user, current_setting('application_name'), NEW.id, 'became superuser');
	    EXCEPTION WHEN insufficient_privilege THEN
	        INSERT INTO public.trigger_log (who, app, id, outcome)
	        VALUES (current_user, current_setting('application_name'), NEW.id, SQLSTATE || ' ' || SQLERRM);
	    END;
	    RETURN NEW;
	END
	\$\$;
	ALTER FUNCTION escalate() OWNER TO app_owner;
	CREATE TRIGGER escalate BEFORE INSERT OR UPDATE ON portfolio_transactions
	    FOR EACH ROW EXECUTE FUNCTION escalate();

	CREATE EXTENSION consistency_manager CASCADE;
	CREATE SERVER queue_server FOREIGN DATA WRAPPER postgres_fdw
	    OPTIONS (host '127.0.0.1', port '$port', dbname 'queue');
	-- the extension's owner imports the definitions, the sync role reads:
	-- both as queue_reader
	CREATE USER MAPPING FOR postgres SERVER queue_server
	    OPTIONS (user 'queue_reader', password '$PASSWORD');
	CREATE USER MAPPING FOR app_owner SERVER queue_server
	    OPTIONS (user 'queue_reader', password '$PASSWORD');
	CREATE TABLE test_initial_portfolios (LIKE user_portfolios);
});
is($node->safe_psql('portfolio', q{SELECT count(*) FROM cm_attach_queue('queue_server')}),
	'2', 'the queue is attached, its definitions read as queue_reader');
set_tiers($node, 'exact');
create_accounts($node, $ACCOUNTS, 'exact');

is($node->safe_psql('portfolio', 'SELECT cm.sync_role()'),
	'app_owner', 'without consistency_manager.role the sync role is the owner of user_portfolios');

# the trigger's record: who ran it, how often each way
sub trigger_summary
{
	my ($where) = @_;
	return $node->safe_psql('portfolio',
		"SELECT coalesce(string_agg(who || ' ' || outcome || ' x' || n, '; ' ORDER BY who, outcome), 'none')"
		  . " FROM (SELECT who, outcome, count(*) AS n FROM trigger_log WHERE $where GROUP BY 1, 2) t");
}
my $DENIED = '42501 must be superuser to alter superuser roles or change superuser attribute';

sub superusers
{
	return $node->safe_psql('portfolio',
		q{SELECT string_agg(rolname || '=' || rolsuper, ',' ORDER BY rolname) FROM pg_roles
		   WHERE rolname IN ('app_owner', 'cm_sync', 'queue_reader')});
}

############################################################################
# a superuser's cm_sync_now(): the cycle runs as app_owner
############################################################################

my ($rc, $out, $err) = $node->psql('portfolio', 'SELECT cm_sync_now()');
like($err, qr/ERROR:  sync role "app_owner" lacks USAGE on schema cm and \d+ other privileges the sync cycle needs/,
	'before any grant the cycle refuses to start and names the first missing privilege');
like($err, qr/HINT:  Run SELECT cm_grant_sync_role\('app_owner'\) as a superuser/,
	'and says what to run');

my $granted = $node->safe_psql('portfolio', q{SELECT count(*) FROM cm_grant_sync_role('app_owner')});
ok($granted > 0, "cm_grant_sync_role('app_owner') ran $granted GRANTs");
is( $node->safe_psql('portfolio',
		q{SELECT coalesce(string_agg(object_type || ' ' || object || ' ' || privilege || ': ' || coalesce(detail, ''), '; '), 'none')
		    FROM cm_check_sync_role('app_owner') WHERE missing IS DISTINCT FROM false}),
	'none',
	'cm_check_sync_role finds nothing missing, SELECT in queue-db as queue_reader included');

add_requests($node, 'manual', 40, $ACCOUNTS);
is($node->safe_psql('portfolio', 'SELECT created FROM cm_sync_now()'),
	'80', "a superuser's cm_sync_now() creates the 80 requests");
is(trigger_summary("app <> 'consistency_manager'"), "app_owner $DENIED x80",
	"cm_sync_now(): the application's trigger ran as app_owner, whose ALTER ROLE ... SUPERUSER was refused");
is(superusers(), 'app_owner=false,queue_reader=false', 'app_owner is still no superuser');

############################################################################
# the worker, connected as the bootstrap superuser: the cycle runs as
# app_owner too
############################################################################

restart_with_preload($node);
add_requests($node, 'worker', 40, $ACCOUNTS);
wait_synced($node, $node, 'the worker, sync role app_owner');
is( $node->safe_psql('portfolio',
		q{SELECT usename FROM pg_stat_activity WHERE backend_type = 'consistency_manager'}),
	'postgres', 'the worker is connected as the bootstrap superuser (consistency_manager.role is empty)');
is(trigger_summary("app = 'consistency_manager'"), "app_owner $DENIED x80",
	"worker: the application's trigger ran as app_owner, whose ALTER ROLE ... SUPERUSER was refused");
is(superusers(), 'app_owner=false,queue_reader=false', 'app_owner is still no superuser');
check_oracle($node, $node, 'sync role app_owner', exact => 1);

############################################################################
# consistency_manager.role = cm_sync, granted nothing: no restart loop, the
# missing privileges said once, recovery once granted
############################################################################

$node->safe_psql(
	'portfolio', qq{
	CREATE ROLE cm_sync LOGIN;
	CREATE USER MAPPING FOR cm_sync SERVER queue_server
	    OPTIONS (user 'queue_reader', password '$PASSWORD');
	ALTER SYSTEM SET consistency_manager.role = 'cm_sync';
});
my $offset = -s $node->logfile;
$node->restart;
ok( $node->poll_query_until('portfolio',
		q{SELECT usename FROM pg_stat_activity WHERE backend_type = 'consistency_manager'}, 'cm_sync'),
	'the worker connects as cm_sync');
my $pid = stats($node)->{worker_pid};
ok( $node->poll_query_until('portfolio', 'SELECT consecutive_failures >= 1 FROM cm_stats()'),
	"cm_sync's cycles fail");

# 15 s: 7 back-off periods of at most 2 s
usleep(15_000_000);
my $st = stats($node);
is($st->{worker_pid}, $pid, 'after 15 s the same worker runs (no restart loop)');
ok($st->{consecutive_failures} >= 3, "it retried ($st->{consecutive_failures} failed cycles)");
like($st->{last_error}, qr/^sync role "cm_sync" lacks USAGE on schema cm and \d+ other privileges the sync cycle needs \(SQLSTATE 42501\) DETAIL: Missing: USAGE on schema cm, /,
	'cm_stats().last_error names the first missing privilege');
# from the start of the new worker on (the restart's shutdown logs FATALs)
my $log = log_since($offset) =~ s/\A.*?(?=^[^\n]*consistency_manager worker started)//msr;
my @started = $log =~ /consistency_manager worker started/g;
is(scalar @started, 1, 'the worker started once');
my @reports = $log =~ /WARNING:  sync role "cm_sync" lacks USAGE on schema cm and \d+ other privileges the sync cycle needs\n[^\n]*DETAIL:  Missing: USAGE on schema cm, [^\n]*\n[^\n]*HINT:  Run SELECT cm_grant_sync_role\('cm_sync'\) as a superuser/g;
is(scalar @reports, 1, 'the log says once what is missing, with the hint to run cm_grant_sync_role');
my @failed = $log =~ /WARNING:  consistency_manager cycle failed: sync role "cm_sync" lacks/g;
is(scalar @failed, 1, 'and logs the failed cycle once');
unlike($log, qr/ERROR:|FATAL:/, 'and logs no ERROR or FATAL');
my ($healthy, $detail) = split /\|/, $node->safe_psql('portfolio', 'SELECT healthy, detail FROM cm_health()'), 2;
is($healthy, 'f', 'cm_health() is not healthy');
like($detail, qr/sync role cm_sync lacks \d+ privileges the sync cycle needs \(USAGE on schema cm, USAGE on schema cm_remote, SELECT on table cm\.source, .*\): run SELECT cm_grant_sync_role\('cm_sync'\)/,
	'cm_health() names what cm_sync lacks and what to run');
is( $node->safe_psql('portfolio',
		q{SELECT string_agg(privilege || '=' || missing, ',' ORDER BY privilege) FROM cm_check_sync_role('cm_sync')
		   WHERE object_type IN ('role', 'database')}),
	'CONNECT=false,LOGIN=false,NOSUPERUSER=false',
	'cm_check_sync_role: cm_sync may log in and connect, and is no superuser');

add_requests($node, 'granted', 40, $ACCOUNTS);
my $n = $node->safe_psql('portfolio', q{SELECT count(*) FROM cm_grant_sync_role('cm_sync')});
ok($n > 0, "cm_grant_sync_role('cm_sync') ran $n GRANTs");
$node->safe_psql('portfolio', 'SELECT cm_wake()');
wait_synced($node, $node, 'after cm_grant_sync_role, the worker by itself');
is(stats($node)->{worker_pid}, $pid, 'the same worker, never restarted');
ok($node->log_contains(qr/consistency_manager cycle succeeded again after \d+ failures/),
	'the log says the cycle succeeds again');
is(trigger_summary("who <> 'app_owner'"), "cm_sync $DENIED x80",
	"worker as cm_sync: the application's trigger ran as cm_sync, whose ALTER ROLE was refused");
is($node->safe_psql('portfolio', 'SELECT healthy, detail FROM cm_health()'), 't|ok',
	'cm_health() is healthy again');

add_requests($node, 'manual2', 10, $ACCOUNTS);
$node->safe_psql('portfolio', 'SELECT cm_sync_now()');
wait_synced($node, $node, "a superuser's cm_sync_now() with consistency_manager.role = cm_sync");
is(trigger_summary("who <> 'app_owner'"), "cm_sync $DENIED x100",
	"cm_sync_now(): the trigger ran as cm_sync too");
is(superusers(), 'app_owner=false,cm_sync=false,queue_reader=false', 'nobody became a superuser');

############################################################################
# the retry of the local phase runs as the sync role
############################################################################

$node->safe_psql('portfolio', 'ALTER SYSTEM SET consistency_manager.enabled = off');
$node->safe_psql('portfolio', 'SELECT pg_reload_conf()');
ok($node->poll_query_until('portfolio', 'SELECT worker_state FROM cm_stats()', 'disabled'),
	'the worker is disabled for the retry case');
my $blocker = $node->background_psql('portfolio');
$blocker->query_safe(q{BEGIN; SELECT accountid FROM user_portfolios WHERE accountid = 'ACC00001' FOR UPDATE});
$node->safe_psql('queue',
	q{INSERT INTO investment_queue (account_number, tier_1, tier_2, tier_3, uuid, status)
	  VALUES ('ACC00001', 1, 2, 3, 'b0000000-0000-4000-8000-000000000001', 'COMPLETED')});
$offset = -s $node->logfile;
my $cycle = start_async($node, 'portfolio',
	q{SET lock_timeout = '1s'; SELECT completed_applied FROM cm_sync_now(); SELECT current_user, current_setting('search_path')});
ok(wait_until(sub { log_since($offset) =~ /consistency_manager cycle retries its local phase/ }, 60),
	'the cycle times out on the account the application holds, and retries');
$blocker->query_safe('COMMIT');
close_bg($blocker);
my ($ok, $cout, $cerr) = finish_async($cycle);
chomp $cout;
ok($ok, 'the retried cycle succeeds') or diag($cerr);
is($cout, "1\npostgres|\"\$user\", public",
	'it applied the completion, and the caller is postgres with its own search_path again');
is( $node->safe_psql('portfolio',
		q{SELECT string_agg(who || ' ' || outcome, '; ') FROM trigger_log WHERE id = 'b0000000-0000-4000-8000-000000000001'}),
	"cm_sync $DENIED",
	'the retried attempt ran the trigger as cm_sync');
$node->safe_psql('portfolio', 'ALTER SYSTEM RESET consistency_manager.enabled');
$node->safe_psql('portfolio', 'SELECT pg_reload_conf()');
wait_synced($node, $node, 'the worker enabled again');
check_oracle($node, $node, 'sync role cm_sync', exact => 1);

############################################################################
# who may call what
############################################################################

$node->safe_psql(
	'portfolio', qq{
	CREATE ROLE ops LOGIN;
	GRANT EXECUTE ON FUNCTION cm_attach_queue(name, text) TO ops;
	CREATE ROLE monitor LOGIN IN ROLE pg_monitor;
	-- a server of ops' own making: a queue they control
	CREATE SERVER rogue_server FOREIGN DATA WRAPPER postgres_fdw
	    OPTIONS (host '127.0.0.1', port '$port', dbname 'postgres');
	CREATE USER MAPPING FOR PUBLIC SERVER rogue_server OPTIONS (user 'queue_reader', password '$PASSWORD');
});
is( $node->safe_psql('portfolio', q{SELECT outcome($$SELECT * FROM cm_attach_queue('rogue_server')$$)},
		extra_params => [ '-U', 'ops' ]),
	'42501: permission denied for foreign server rogue_server',
	'EXECUTE on cm_attach_queue() without USAGE on the server: 42501');
is( $node->safe_psql('portfolio', q{SELECT outcome($$SELECT * FROM cm_attach_queue('queue_server')$$)},
		extra_params => [ '-U', 'ops' ]),
	'42501: permission denied for foreign server queue_server',
	'not even the server already attached');
is($node->safe_psql('portfolio', q{SELECT count(*) FROM cm.source WHERE server_name = 'rogue_server'}),
	'0', 'nothing was attached');

is( $node->safe_psql('portfolio', q{SELECT healthy FROM cm_health()},
		extra_params => [ '-U', 'monitor' ]),
	't', 'a member of pg_monitor reads cm_health()');
is( $node->safe_psql('portfolio', q{SELECT outcome('SELECT cm_sync_now()')},
		extra_params => [ '-U', 'monitor' ]),
	'42501: permission denied for function cm_sync_now',
	'a member of pg_monitor cannot run cm_sync_now(): 42501');

############################################################################
# consistency_manager.role without LOGIN
############################################################################

$node->safe_psql('portfolio', 'ALTER ROLE cm_sync NOLOGIN');
is( $node->safe_psql('portfolio',
		q{SELECT missing || ' ' || detail FROM cm_check_sync_role('cm_sync') WHERE privilege = 'LOGIN'}),
	'true the background worker connects as consistency_manager.role: ALTER ROLE cm_sync LOGIN',
	'cm_check_sync_role: cm_sync lacks LOGIN');
like($node->safe_psql('portfolio', 'SELECT detail FROM cm_health()'),
	qr/role cm_sync \(consistency_manager\.role\) cannot log in, so the worker cannot connect: ALTER ROLE cm_sync LOGIN/,
	'cm_health() says the worker cannot connect');

$offset = -s $node->logfile;
$node->safe_psql('portfolio', "SELECT pg_terminate_backend($pid)");
ok(wait_until(sub { log_since($offset) =~ /LOG:  consistency_manager is waiting for role "cm_sync" to be allowed to log in/ }, 60),
	'no worker connects as a role without LOGIN: the launcher waits for it, and says so');
unlike(log_since($offset), qr/FATAL:  role "cm_sync" is not permitted to log in/, 'no FATAL loop');
$node->safe_psql('portfolio', 'ALTER ROLE cm_sync LOGIN');
ok( $node->poll_query_until('portfolio',
		q{SELECT usename FROM pg_stat_activity WHERE backend_type = 'consistency_manager'}, 'cm_sync'),
	'once cm_sync may log in, the postmaster restarts the worker by itself');
add_requests($node, 'login', 5, $ACCOUNTS);
wait_synced($node, $node, 'after LOGIN is given back');
is(superusers(), 'app_owner=false,cm_sync=false,queue_reader=false', 'nobody became a superuser');

done_testing();
