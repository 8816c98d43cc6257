-- 07_least_privilege.sql -- the cycle runs as the sync role, never as the
-- superuser who calls cm_sync_now() (docs/ARCHITECTURE.md, 4.9).
--
-- The application's tables belong to cm_t_app, an ordinary role, so it is
-- the sync role (consistency_manager.role is not set here).  A trigger on
-- portfolio_transactions, the application's code, records who runs it and
-- tries what a sandbox must refuse: becoming superuser, creating a
-- temporary table, changing a setting for the rest of the session.
--
-- The queue rows are written through the foreign tables, as in 03_cycle:
-- the user mapping for PUBLIC replaces the one for postgres, so the cycle's
-- reads (as cm_t_app) and the writes here (as postgres) share one
-- connection, and so one remote transaction.

BEGIN;
SET LOCAL client_min_messages = warning;

SELECT plan(40);

\ir lib/helpers.sql

CREATE ROLE cm_t_app NOLOGIN;
CREATE ROLE cm_t_ops NOLOGIN;
CREATE ROLE cm_t_mon NOLOGIN IN ROLE pg_monitor;
ALTER TABLE user_portfolios OWNER TO cm_t_app;
ALTER TABLE portfolio_transactions OWNER TO cm_t_app;

DROP USER MAPPING FOR postgres SERVER queue_server;
CREATE USER MAPPING FOR PUBLIC SERVER queue_server
    OPTIONS (user 'postgres', password_required 'false');

CREATE TABLE trigger_log (
    who          name,
    superuser    text,
    temp_table   text,
    is_superuser boolean
);
ALTER TABLE trigger_log OWNER TO cm_t_app;

CREATE FUNCTION app_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    su text := 'done';
    tt text := 'done';
BEGIN
    IF current_setting('cm_test.fail', true) = 'on' THEN
        RAISE EXCEPTION 'the application refuses this row' USING ERRCODE = '55000';  -- not the row's fault: fails the cycle
    END IF;
    BEGIN
        ALTER ROLE cm_t_app SUPERUSER;
    EXCEPTION WHEN insufficient_privilege THEN
        su := SQLERRM;
    END;
    BEGIN
        CREATE TEMP TABLE app_scratch (x int);
    EXCEPTION WHEN insufficient_privilege THEN
        tt := SQLERRM;
    END;
    PERFORM set_config('work_mem', '1234kB', false);
    INSERT INTO public.trigger_log
    VALUES (current_user, su, tt,
            (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = 'cm_t_app'));
    RETURN NEW;
END
$$;
ALTER FUNCTION app_trigger() OWNER TO cm_t_app;
CREATE TRIGGER app_trigger BEFORE INSERT OR UPDATE ON portfolio_transactions
    FOR EACH ROW EXECUTE FUNCTION app_trigger();

INSERT INTO user_portfolios (accountid,
        tier1_allocation, tier2_allocation, tier3_allocation, total_allocation,
        tier1_value, tier2_value, tier3_value, total_value)
VALUES ('P1', 100.00, 100.00, 100.00, 300.00, 100.00, 100.00, 100.00, 300.00);

-- the sync role ------------------------------------------------------------------
SELECT is(cm.sync_role()::text, 'cm_t_app',
    'without consistency_manager.role, the sync role is the owner of user_portfolios');

SELECT results_eq(
    $$SELECT foreign_table::text FROM cm_attach_queue('queue_server') ORDER BY source_id$$,
    $$VALUES ('cm_remote.queue_server_investment_queue'), ('cm_remote.queue_server_withdrawal_queue')$$,
    'a superuser attaches the queue (the sync role has a mapping: PUBLIC''s)');
SELECT is(
    (SELECT string_agg(regexp_replace(c.relname, '^activity_\d+$', 'activity_<server>') || '='
                       || has_table_privilege('cm_t_app', c.oid, 'SELECT'), ', ' ORDER BY c.relname)
       FROM pg_class c WHERE c.relnamespace = 'cm_remote'::regnamespace),
    'activity_<server>=true, queue_server_investment_queue=true, queue_server_withdrawal_queue=true',
    'cm_attach_queue grants the sync role SELECT on the foreign tables it creates');

-- nothing granted yet: the cycle refuses to start, and says what is missing ------
SELECT throws_like('SELECT cm_sync_now()',
    'sync role "cm_t_app" lacks USAGE on schema cm and % other privileges the sync cycle needs',
    'without grants the cycle fails at once, naming the first missing privilege');
SELECT throws_ok('SELECT cm_sync_now()', '42501', NULL,
    'the missing privileges fail the cycle with SQLSTATE 42501');
SELECT ok(
    (SELECT detail FROM cm_health()) LIKE '%sync role cm_t_app lacks % privileges the sync cycle needs (USAGE on schema cm, %: run SELECT cm_grant_sync_role(''cm_t_app'')%',
    'cm_health() names what the sync role lacks and what to run');
SELECT is(
    (SELECT missing::text FROM cm_check_sync_role('cm_t_app')
      WHERE object_type = 'schema' AND object = 'cm' AND privilege = 'USAGE'),
    'true', 'cm_check_sync_role lists USAGE on schema cm as missing');
SELECT is(
    (SELECT missing::text || ' ' || detail FROM cm_check_sync_role('cm_t_app') WHERE object = 'queue_server'),
    'false the mapping for PUBLIC', 'cm_check_sync_role finds the user mapping for PUBLIC');
SELECT is(
    (SELECT count(*)::int FROM cm_check_sync_role('cm_t_app')
      WHERE object_type = 'queue table' AND missing IS NULL AND detail LIKE 'not probed: grant the local privileges%'),
    2, 'queue-db is not probed while local privileges are missing');
SELECT is(
    (SELECT missing::text FROM cm_check_sync_role('cm_t_app') WHERE privilege = 'NOSUPERUSER'),
    'false', 'the sync role is not a superuser');
SELECT is(
    (SELECT count(*)::int FROM cm_check_sync_role('cm_t_app')
      WHERE object_type = 'table' AND object IN ('public.user_portfolios', 'public.portfolio_transactions')
        AND missing),
    0, 'the owner of the portfolio tables lacks nothing on them');
SELECT is(
    (SELECT count(*)::int FROM cm_check_sync_role('cm_t_app') WHERE privilege = 'REFERENCES'),
    0, 'no REFERENCES is asked for: the foreign key is checked as the owner of user_portfolios');

-- the grant ------------------------------------------------------------------------
CREATE TEMP TABLE missing_before AS
    SELECT grant_command FROM cm.sync_role_privileges('cm_t_app') WHERE missing;
SELECT set_eq('SELECT * FROM cm_grant_sync_role(''cm_t_app'')', 'SELECT * FROM missing_before',
    'cm_grant_sync_role runs the GRANT of each missing privilege, and says so');
SELECT is_empty('SELECT * FROM cm_grant_sync_role(''cm_t_app'')',
    'cm_grant_sync_role again grants nothing (idempotent)');
SELECT is_empty($$SELECT * FROM cm_check_sync_role('cm_t_app') WHERE missing IS DISTINCT FROM false$$,
    'after the grant cm_check_sync_role finds nothing missing, queue-db probed as the role included');
SELECT is(
    (SELECT string_agg(privilege, ',' ORDER BY privilege) FROM cm_check_sync_role('cm_t_app')
      WHERE object = 'cm.source.watermark' OR object = 'cm.source.last_synced_at'),
    'UPDATE,UPDATE', 'of cm.source the sync role may update the watermark columns only');
SELECT is(has_table_privilege('cm_t_app', 'cm.source', 'UPDATE'), false,
    'the sync role may not rewrite cm.source (where cm_health() and cm_sources() read table names)');
SELECT ok(NOT EXISTS (SELECT 1 FROM cm.sync_role_health() h, unnest(h.problems || h.warnings) p
                      WHERE p LIKE '%cm_t_app%'),
    'cm_health() has nothing to say about the sync role any more');

-- a cycle as the sync role -----------------------------------------------------------
SELECT pg_temp.queue_writable();
INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (1, 'P1', 1, 2, 3, 'c0000000-0000-4000-8000-000000000001', 'COMPLETED', now(), now());

SET LOCAL work_mem = '4321kB';
SELECT is(pg_temp.sync(),
    'sources=2 rows_read=1 created=1 updated=0 completed_applied=1 compensated=0 dead_lettered=0',
    'a superuser''s cm_sync_now() syncs the request');
SELECT is(
    (SELECT format('%s | %s | %s | superuser=%s', who, superuser, temp_table, is_superuser::text) FROM trigger_log),
    'cm_t_app | must be superuser to alter superuser roles or change superuser attribute | cannot create temporary table within security-restricted operation | superuser=false',
    'the application''s trigger ran as the sync role, in a security-restricted operation, and could not become superuser');
SELECT is((SELECT rolsuper FROM pg_roles WHERE rolname = 'cm_t_app'), false,
    'the owner of the portfolio tables is still no superuser');
SELECT is(current_user::text, 'postgres', 'after the cycle the caller is itself again');
SELECT is(current_setting('work_mem'), '4321kB',
    'a setting the trigger changed for the session is undone when the cycle ends');
SELECT lives_ok('CREATE TEMP TABLE after_cycle (x int)',
    'after the cycle the session is no longer in a security-restricted operation');

-- an error inside the cycle, caught by the caller ----------------------------------
UPDATE cm_remote.queue_server_investment_queue SET status = 'FAILED' WHERE queue_id = 1;
SET LOCAL cm_test.fail = 'on';
SELECT throws_ok('SELECT cm_sync_now()', '55000', 'the application refuses this row',
    'an error raised by the application''s trigger (not a data error) fails the cycle');
SET LOCAL cm_test.fail = 'off';
SELECT is(current_user::text, 'postgres', 'after the failed cycle the caller is itself again');
SELECT is(current_setting('search_path'), '"$user", public',
    'after the failed cycle search_path is the caller''s again');
SELECT lives_ok('CREATE TEMP TABLE after_failure (x int)',
    'after the failed cycle the session is no longer in a security-restricted operation');
SELECT is(pg_temp.sync(),
    'sources=2 rows_read=1 created=0 updated=1 completed_applied=0 compensated=1 dead_lettered=0',
    'the next cycle applies the change');

-- a row-level security policy that refuses one row: that row is dead-lettered -------
INSERT INTO user_portfolios (accountid) VALUES ('P2');
ALTER TABLE portfolio_transactions ENABLE ROW LEVEL SECURITY;
ALTER TABLE portfolio_transactions FORCE ROW LEVEL SECURITY;   -- cm_t_app owns it
CREATE POLICY cm_t_not_p2 ON portfolio_transactions USING (true) WITH CHECK (accountid <> 'P2');
INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (2, 'P1', 1, 1, 1, 'c0000000-0000-4000-8000-000000000002', 'PENDING', now(), now()),
       (3, 'P2', 1, 1, 1, 'c0000000-0000-4000-8000-000000000003', 'PENDING', now(), now());
SELECT is(pg_temp.sync(),
    'sources=2 rows_read=3 created=1 updated=0 completed_applied=0 compensated=0 dead_lettered=1',
    'a policy of the application refuses one row, as the sync role: the other applies');
SELECT alike((SELECT reason FROM cm.dead_letter WHERE queue_id = 3),
    'new row violates row-level security policy % (SQLSTATE 42501%',
    'the refused row is a dead letter with the policy''s error');
DROP POLICY cm_t_not_p2 ON portfolio_transactions;
ALTER TABLE portfolio_transactions NO FORCE ROW LEVEL SECURITY;
ALTER TABLE portfolio_transactions DISABLE ROW LEVEL SECURITY;

-- cm_attach_queue checks the role that calls it -----------------------------------
GRANT EXECUTE ON FUNCTION cm_attach_queue(name, text) TO cm_t_ops;
SET LOCAL ROLE cm_t_ops;
SELECT throws_ok($$SELECT * FROM cm_attach_queue('queue_server')$$, '42501',
    'permission denied for foreign server queue_server',
    'EXECUTE on cm_attach_queue is not enough: the caller needs USAGE on the server');
RESET ROLE;
GRANT USAGE ON FOREIGN SERVER queue_server TO cm_t_ops;
SET LOCAL ROLE cm_t_ops;
SELECT is(
    (SELECT count(*)::int FROM cm_attach_queue('queue_server')), 2,
    'with USAGE on the server the caller attaches it (again, harmlessly)');
RESET ROLE;

DO $$
BEGIN
    EXECUTE format('CREATE SERVER other_server FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host %L, port %L, dbname %L)',
                   '127.0.0.1', current_setting('port'), 'queue');
END
$$;
GRANT USAGE ON FOREIGN SERVER other_server TO cm_t_ops;
SET LOCAL ROLE cm_t_ops;
SELECT throws_ok($$SELECT * FROM cm_attach_queue('other_server')$$, '42501',
    'sync role "cm_t_app" has no user mapping for server "other_server"',
    'a server the sync role has no user mapping for is refused, naming the mapping');
RESET ROLE;
CREATE USER MAPPING FOR cm_t_app SERVER other_server OPTIONS (user 'postgres', password_required 'false');
SET LOCAL ROLE cm_t_ops;
SELECT throws_ok($$SELECT * FROM cm_attach_queue('other_server')$$, '42501',
    'the extension''s owner "postgres" has no user mapping for server "other_server"',
    'without a mapping for the extension''s owner (it imports the definitions) the server is refused too');
RESET ROLE;

-- pg_monitor reads, and changes nothing --------------------------------------------
SET LOCAL ROLE cm_t_mon;
SELECT lives_ok('SELECT * FROM cm_health()', 'a member of pg_monitor runs cm_health()');
SELECT throws_ok('SELECT cm_sync_now()', '42501', NULL, 'a member of pg_monitor cannot run cm_sync_now()');
RESET ROLE;

-- a superuser sync role is reported -----------------------------------------------
ALTER TABLE user_portfolios OWNER TO postgres;
SELECT ok(
    (SELECT detail FROM cm_health()) LIKE '%warning: sync role postgres is a superuser, so the application''s triggers, defaults and policies on the portfolio tables run with superuser rights%',
    'cm_health() warns when the sync role is a superuser');
SELECT is((SELECT missing::text FROM cm_check_sync_role() WHERE privilege = 'NOSUPERUSER'), 'true',
    'cm_check_sync_role() (the configured sync role) flags a superuser');

-- cm_preview reads an account with its owner's rights: never through a view ---------
CREATE SCHEMA cm_t_views;
CREATE VIEW cm_t_views.user_portfolios AS SELECT * FROM public.user_portfolios;
SET LOCAL consistency_manager.portfolio_schema = 'cm_t_views';
SELECT throws_ok($$SELECT * FROM cm_preview('P1')$$, '42809', '"user_portfolios" is not a table',
    'cm_preview() refuses a view named user_portfolios (its code would run as the extension''s owner)');
RESET consistency_manager.portfolio_schema;

SELECT * FROM finish();
ROLLBACK;
