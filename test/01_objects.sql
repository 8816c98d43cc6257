-- 01_objects.sql -- the objects the install script creates, and who may use them.
--
-- docs/ARCHITECTURE.md, section 8: internal state in schema cm,
-- the cm_* functions in the extension's schema (public here), nothing
-- executable by or granted to PUBLIC, SECURITY DEFINER functions pin
-- search_path.  A role created in this transaction stands for "anyone": it
-- holds exactly what PUBLIC holds.

BEGIN;
SET LOCAL client_min_messages = warning;
CREATE ROLE cm_nobody NOLOGIN;

SELECT plan(76);

-- schemas ---------------------------------------------------------------------
SELECT has_schema('cm', 'schema cm (internal state) exists');
SELECT has_schema('cm_remote', 'schema cm_remote (foreign tables over queue-db) exists');
SELECT schema_privs_are('cm', 'cm_nobody', ARRAY[]::text[],
    'PUBLIC has no privilege on schema cm');
SELECT schema_privs_are('cm_remote', 'cm_nobody', ARRAY[]::text[],
    'PUBLIC has no privilege on schema cm_remote');

-- tables ----------------------------------------------------------------------
SELECT has_table('cm', 'tier_value', 'table cm.tier_value exists');
SELECT has_table('cm', 'tier_value_history', 'table cm.tier_value_history exists');
SELECT has_table('cm', 'source', 'table cm.source exists');
SELECT has_table('cm', 'status_map', 'table cm.status_map exists');
SELECT has_table('cm', 'ledger', 'table cm.ledger exists');
SELECT has_table('cm', 'dead_letter', 'table cm.dead_letter exists');
SELECT has_table('cm', 'batch', 'table cm.batch exists');
SELECT has_table('cm', 'cycle_history', 'table cm.cycle_history exists');

SELECT table_privs_are('cm', 'tier_value', 'cm_nobody', ARRAY[]::text[],
    'PUBLIC has no privilege on cm.tier_value');
SELECT table_privs_are('cm', 'tier_value_history', 'cm_nobody', ARRAY[]::text[],
    'PUBLIC has no privilege on cm.tier_value_history');
SELECT table_privs_are('cm', 'source', 'cm_nobody', ARRAY[]::text[],
    'PUBLIC has no privilege on cm.source');
SELECT table_privs_are('cm', 'status_map', 'cm_nobody', ARRAY[]::text[],
    'PUBLIC has no privilege on cm.status_map');
SELECT table_privs_are('cm', 'ledger', 'cm_nobody', ARRAY[]::text[],
    'PUBLIC has no privilege on cm.ledger');
SELECT table_privs_are('cm', 'dead_letter', 'cm_nobody', ARRAY[]::text[],
    'PUBLIC has no privilege on cm.dead_letter');
SELECT table_privs_are('cm', 'batch', 'cm_nobody', ARRAY[]::text[],
    'PUBLIC has no privilege on cm.batch');
SELECT table_privs_are('cm', 'cycle_history', 'cm_nobody', ARRAY[]::text[],
    'PUBLIC has no privilege on cm.cycle_history');

SELECT is_empty($$
    SELECT c.oid::regclass::text, p.privilege_type
      FROM pg_class c
      CROSS JOIN LATERAL (VALUES ('SELECT'), ('INSERT'), ('UPDATE'), ('DELETE'),
                                 ('TRUNCATE'), ('REFERENCES'), ('TRIGGER')) AS p(privilege_type)
     WHERE c.relnamespace = 'cm'::regnamespace
       AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S', 'u')
       AND CASE WHEN c.relkind = 'S'
                THEN p.privilege_type = 'SELECT' AND has_sequence_privilege('cm_nobody', c.oid, 'SELECT,USAGE,UPDATE')
                ELSE has_table_privilege('cm_nobody', c.oid, p.privilege_type) END
$$, 'PUBLIC has no privilege on any relation or sequence of schema cm');

SELECT is(
    (SELECT count(*)::int FROM pg_class c
      WHERE c.relnamespace = 'cm'::regnamespace AND c.relkind = 'r'
        AND obj_description(c.oid, 'pg_class') IS NULL),
    0, 'every table of schema cm has a COMMENT');

SELECT is(
    (SELECT relpersistence::text FROM pg_class WHERE oid = 'cm.batch'::regclass),
    'u', 'cm.batch (scratch space of one cycle) is unlogged');

SELECT is_empty('SELECT * FROM cm.batch', 'cm.batch is empty outside a cycle');

SELECT results_eq(
    'SELECT tier, pool_value, market_value FROM cm.tier_value ORDER BY tier',
    $$VALUES (1, 1000000::numeric, 1000000::numeric),
             (2, 2000000::numeric, 2000000::numeric),
             (3,  500000::numeric,  500000::numeric)$$,
    'cm.tier_value holds the default pool and market values of the three tiers');

SELECT set_eq(
    'SELECT queue_status, portfolio_status FROM cm.status_map',
    $$VALUES ('PENDING', 'PENDING'), ('PROCESSING', 'PENDING'), ('COMPLETED', 'COMPLETED'),
             ('FAILED', 'FAILED'), ('CANCELLED', 'CANCELLED')$$,
    'cm.status_map maps PROCESSING to PENDING and mirrors the other statuses');

SELECT is_empty('SELECT * FROM cm.source', 'no source is attached after CREATE EXTENSION');

-- functions -------------------------------------------------------------------
SELECT has_function('public', 'cm_tier_delta', ARRAY['numeric', 'numeric'], 'function cm_tier_delta(numeric, numeric) exists');
SELECT has_function('public', 'cm_tier_deltas', ARRAY[]::text[], 'function cm_tier_deltas() exists');
SELECT has_function('public', 'cm_set_tier_values', ARRAY['integer', 'numeric', 'numeric'], 'function cm_set_tier_values(integer, numeric, numeric) exists');
SELECT has_function('public', 'cm_preview', ARRAY['text'], 'function cm_preview(text) exists');
SELECT has_function('public', 'cm_attach_queue', ARRAY['name', 'text'], 'function cm_attach_queue(name, text) exists');
SELECT has_function('public', 'cm_sync_now', ARRAY[]::text[], 'function cm_sync_now() exists');
SELECT has_function('public', 'cm_stats', ARRAY[]::text[], 'function cm_stats() exists');
SELECT has_function('public', 'cm_sources', ARRAY[]::text[], 'function cm_sources() exists');
SELECT has_function('public', 'cm_wake', ARRAY[]::text[], 'function cm_wake() exists');
SELECT has_function('public', 'cm_worker_start', ARRAY[]::text[], 'function cm_worker_start() exists');
SELECT has_function('public', 'cm_worker_stop', ARRAY[]::text[], 'function cm_worker_stop() exists');
SELECT has_function('public', 'cm_health', ARRAY[]::text[], 'function cm_health() exists');
SELECT has_function('public', 'cm_status', ARRAY[]::text[], 'function cm_status() exists');
SELECT has_function('public', 'cm_grant_sync_role', ARRAY['regrole'], 'function cm_grant_sync_role(regrole) exists');
SELECT has_function('public', 'cm_check_sync_role', ARRAY['regrole'], 'function cm_check_sync_role(regrole) exists');

SELECT function_privs_are('public', 'cm_tier_delta', ARRAY['numeric', 'numeric'], 'cm_nobody', ARRAY[]::text[],
    'PUBLIC cannot execute cm_tier_delta');
SELECT function_privs_are('public', 'cm_tier_deltas', ARRAY[]::text[], 'cm_nobody', ARRAY[]::text[],
    'PUBLIC cannot execute cm_tier_deltas');
SELECT function_privs_are('public', 'cm_set_tier_values', ARRAY['integer', 'numeric', 'numeric'], 'cm_nobody', ARRAY[]::text[],
    'PUBLIC cannot execute cm_set_tier_values');
SELECT function_privs_are('public', 'cm_preview', ARRAY['text'], 'cm_nobody', ARRAY[]::text[],
    'PUBLIC cannot execute cm_preview');
SELECT function_privs_are('public', 'cm_attach_queue', ARRAY['name', 'text'], 'cm_nobody', ARRAY[]::text[],
    'PUBLIC cannot execute cm_attach_queue');
SELECT function_privs_are('public', 'cm_sync_now', ARRAY[]::text[], 'cm_nobody', ARRAY[]::text[],
    'PUBLIC cannot execute cm_sync_now');
SELECT function_privs_are('public', 'cm_stats', ARRAY[]::text[], 'cm_nobody', ARRAY[]::text[],
    'PUBLIC cannot execute cm_stats');
SELECT function_privs_are('public', 'cm_sources', ARRAY[]::text[], 'cm_nobody', ARRAY[]::text[],
    'PUBLIC cannot execute cm_sources');
SELECT function_privs_are('public', 'cm_wake', ARRAY[]::text[], 'cm_nobody', ARRAY[]::text[],
    'PUBLIC cannot execute cm_wake');
SELECT function_privs_are('public', 'cm_worker_start', ARRAY[]::text[], 'cm_nobody', ARRAY[]::text[],
    'PUBLIC cannot execute cm_worker_start');
SELECT function_privs_are('public', 'cm_worker_stop', ARRAY[]::text[], 'cm_nobody', ARRAY[]::text[],
    'PUBLIC cannot execute cm_worker_stop');
SELECT function_privs_are('public', 'cm_health', ARRAY[]::text[], 'cm_nobody', ARRAY[]::text[],
    'PUBLIC cannot execute cm_health');
SELECT function_privs_are('public', 'cm_status', ARRAY[]::text[], 'cm_nobody', ARRAY[]::text[],
    'PUBLIC cannot execute cm_status');
SELECT function_privs_are('public', 'cm_grant_sync_role', ARRAY['regrole'], 'cm_nobody', ARRAY[]::text[],
    'PUBLIC cannot execute cm_grant_sync_role');
SELECT function_privs_are('public', 'cm_check_sync_role', ARRAY['regrole'], 'cm_nobody', ARRAY[]::text[],
    'PUBLIC cannot execute cm_check_sync_role');

-- pg_monitor may read, out of the box; it may change nothing
SELECT set_eq($$
    SELECT p.proname::text
      FROM pg_proc p
      JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
      JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'consistency_manager'
     WHERE has_function_privilege('pg_monitor', p.oid, 'EXECUTE')
$$, $$VALUES ('cm_stats'), ('cm_health'), ('cm_status'), ('cm_sources'), ('cm_tier_deltas'),
             ('cm_dead_letters'), ('cm_cycle_history'), ('cm_cycle_lock'), ('cm_progress'),
             ('cm_reconciliation_summary'), ('cm_reconciliation_report'), ('cm_last_reconciliation'), ('cm_consumers')$$,
    'pg_monitor may execute exactly the read-only monitoring functions');

SELECT is_empty($$
    SELECT p.oid::regprocedure::text
      FROM pg_proc p
      JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
      JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'consistency_manager'
     WHERE has_function_privilege('cm_nobody', p.oid, 'EXECUTE')
$$, 'PUBLIC cannot execute any function or aggregate of the extension (cm.* included)');

SELECT is_empty($$
    SELECT p.oid::regprocedure::text
      FROM pg_proc p
      JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
      JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'consistency_manager'
     WHERE p.prosecdef
       AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) c WHERE c LIKE 'search\_path=%')
$$, 'every SECURITY DEFINER function of the extension pins search_path');

SELECT set_eq($$
    SELECT p.proname::text, c
      FROM pg_proc p
      LEFT JOIN LATERAL unnest(p.proconfig) c ON c LIKE 'search\_path=%'
     WHERE p.pronamespace = 'public'::regnamespace AND p.proname LIKE 'cm\_%' AND p.prosecdef
$$, $$VALUES ('cm_tier_deltas', 'search_path=pg_catalog, pg_temp'),
             ('cm_set_tier_values', 'search_path=pg_catalog, pg_temp'),
             ('cm_preview', 'search_path=pg_catalog, pg_temp'),
             ('cm_sync_now', 'search_path=pg_catalog, pg_temp'),
             ('cm_sources', 'search_path=pg_catalog, pg_temp'),
             ('cm_health', 'search_path=pg_catalog, pg_temp'),
             ('cm_status', 'search_path=pg_catalog, pg_temp'),
             ('cm_dead_letters', 'search_path=pg_catalog, pg_temp'),
             ('cm_cycle_history', 'search_path=pg_catalog, pg_temp'),
             ('cm_discard_dead_letter', 'search_path=pg_catalog, pg_temp'),
             ('cm_discard_dead_letters', 'search_path=pg_catalog, pg_temp'),
             ('cm_cycle_lock', 'search_path=pg_catalog, pg_temp'),
             ('cm_reconcile', 'search_path=pg_catalog, pg_temp'),
             ('cm_repair', 'search_path=pg_catalog, pg_temp'),
             ('cm_reconciliation_summary', 'search_path=pg_catalog, pg_temp'),
             ('cm_reconciliation_report', 'search_path=pg_catalog, pg_temp'),
             ('cm_last_reconciliation', 'search_path=pg_catalog, pg_temp'),
             ('cm_progress', 'search_path=pg_catalog, pg_temp'),
             ('cm_set_effect_policy', 'search_path=pg_catalog, pg_temp'),
             ('cm_consumer_create', 'search_path=pg_catalog, pg_temp'),
             ('cm_consumer_drop', 'search_path=pg_catalog, pg_temp'),
             ('cm_events', 'search_path=pg_catalog, pg_temp'),
             ('cm_events_ack', 'search_path=pg_catalog, pg_temp'),
             ('cm_consumers', 'search_path=pg_catalog, pg_temp'),
             ('cm_account_history', 'search_path=pg_catalog, pg_temp'),
             ('cm_verify_accounts', 'search_path=pg_catalog, pg_temp')$$,
    'the SECURITY DEFINER cm_* functions are these twenty-six, each with search_path = pg_catalog, pg_temp');

SELECT is(
    (SELECT format('%s %s', l.lanname, p.prosecdef::text) FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
      WHERE p.oid = 'public.cm_attach_queue(name, text)'::regprocedure),
    'c false',
    'cm_attach_queue is SECURITY INVOKER (in C): it checks the role that calls it, then runs cm.attach_queue as the owner');
SELECT is(
    (SELECT string_agg(format('%s definer=%s', p.proname, p.prosecdef::text), ', ' ORDER BY p.proname)
       FROM pg_proc p WHERE p.proname IN ('cm_grant_sync_role', 'cm_check_sync_role')
        AND p.pronamespace = 'public'::regnamespace),
    'cm_check_sync_role definer=false, cm_grant_sync_role definer=false',
    'cm_grant_sync_role and cm_check_sync_role run with the caller''s rights (a GRANT must be the caller''s)');

SELECT is(
    (SELECT count(*)::int FROM pg_proc p
      WHERE p.pronamespace = 'public'::regnamespace AND p.proname LIKE 'cm\_%'
        AND obj_description(p.oid, 'pg_proc') IS NULL),
    0, 'every cm_* function has a COMMENT');

SET LOCAL ROLE cm_nobody;
SELECT throws_ok('SELECT cm_sync_now()', '42501', NULL,
    'a role without a grant cannot run cm_sync_now()');
SELECT throws_ok('SELECT cm_tier_delta(1, 2)', '42501', NULL,
    'a role without a grant cannot run cm_tier_delta()');
SELECT throws_ok('SELECT * FROM cm_attach_queue(''queue_server'')', '42501', NULL,
    'a role without a grant cannot run cm_attach_queue()');
SELECT throws_ok('SELECT * FROM cm_grant_sync_role(''cm_nobody'')', '42501', NULL,
    'a role without a grant cannot run cm_grant_sync_role()');
RESET ROLE;

SET LOCAL ROLE pg_monitor;
SELECT lives_ok('SELECT * FROM cm_stats()', 'pg_monitor can run cm_stats()');
SELECT lives_ok('SELECT * FROM cm_health()', 'pg_monitor can run cm_health()');
SELECT lives_ok('SELECT cm_status()', 'pg_monitor can run cm_status()');
SELECT lives_ok('SELECT * FROM cm_tier_deltas()', 'pg_monitor can run cm_tier_deltas()');
SELECT throws_ok('SELECT cm_sync_now()', '42501', NULL,
    'pg_monitor cannot run cm_sync_now()');
RESET ROLE;

-- foreign tables created by cm_attach_queue -----------------------------------
SELECT results_eq(
    $$SELECT foreign_table::text, layout FROM cm_attach_queue('queue_server') ORDER BY 1$$,
    $$VALUES ('cm_remote.queue_server_investment_queue', 'investment'),
             ('cm_remote.queue_server_withdrawal_queue', 'withdrawal')$$,
    'cm_attach_queue(server) imports the split layout into cm_remote');
SELECT has_foreign_table('cm_remote', 'queue_server_investment_queue',
    'foreign table cm_remote.queue_server_investment_queue exists after cm_attach_queue');
SELECT table_privs_are('cm_remote', 'queue_server_investment_queue', 'cm_nobody', ARRAY[]::text[],
    'PUBLIC has no privilege on the foreign tables cm_attach_queue creates');

SELECT * FROM finish();
ROLLBACK;
