/* consistency_manager--1.0.sql
 *
 * Install script.  Internal state lives in schema cm; the cm_* functions a
 * DBA calls live in the extension's schema (the first schema of search_path
 * at CREATE EXTENSION time, usually public).  Nothing is executable by
 * PUBLIC: the DBA grants EXECUTE on the functions an operator role needs.
 */

\echo Use "CREATE EXTENSION consistency_manager CASCADE" to load this file. \quit

CREATE SCHEMA cm;
COMMENT ON SCHEMA cm IS 'consistency_manager: internal state (tier values, sources, ledger, dead letters, history)';

CREATE SCHEMA cm_remote;
COMMENT ON SCHEMA cm_remote IS 'consistency_manager: foreign tables over the queue tables, created by cm_attach_queue()';

REVOKE ALL ON SCHEMA cm, cm_remote FROM PUBLIC;

------------------------------------------------------------------------------
-- Tier values and their audit trail
------------------------------------------------------------------------------

CREATE TABLE cm.tier_value (
    tier         integer PRIMARY KEY CHECK (tier BETWEEN 1 AND 3),
    pool_value   numeric NOT NULL CHECK (pool_value >= 0 AND pool_value < 'Infinity'),
    market_value numeric NOT NULL CHECK (market_value >= 0 AND market_value < 'Infinity'),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    updated_by   name NOT NULL DEFAULT current_user
);
COMMENT ON TABLE cm.tier_value IS 'pool and market value of each investment tier; change it with cm_set_tier_values()';
COMMENT ON COLUMN cm.tier_value.pool_value IS 'value of the tier''s pool';
COMMENT ON COLUMN cm.tier_value.market_value IS 'current market value of the tier; delta = (market - pool) / pool';

INSERT INTO cm.tier_value (tier, pool_value, market_value) VALUES
    (1, 1000000, 1000000),
    (2, 2000000, 2000000),
    (3,  500000,  500000);

CREATE TABLE cm.tier_value_history (
    change_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    changed_at       timestamptz NOT NULL DEFAULT now(),
    changed_by       name NOT NULL DEFAULT session_user,
    tier             integer NOT NULL,
    old_pool_value   numeric,
    old_market_value numeric,
    new_pool_value   numeric NOT NULL,
    new_market_value numeric NOT NULL
);
COMMENT ON TABLE cm.tier_value_history IS 'audit trail of every change made by cm_set_tier_values()';

------------------------------------------------------------------------------
-- Sources, status map, ledger, dead letters, cycle history
------------------------------------------------------------------------------

CREATE TABLE cm.source (
    source_id      integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    server_name    name NOT NULL,
    remote_schema  text NOT NULL,
    remote_table   text NOT NULL,
    table_schema   name NOT NULL DEFAULT 'cm_remote',
    table_name     name NOT NULL,
    layout         text NOT NULL CHECK (layout IN ('investment', 'withdrawal', 'unified')),
    account_column name NOT NULL,
    watermark      timestamptz,
    enabled        boolean NOT NULL DEFAULT true,
    attached_at    timestamptz NOT NULL DEFAULT now(),
    last_synced_at timestamptz,
    UNIQUE (server_name, remote_schema, remote_table),
    UNIQUE (table_schema, table_name)
);
COMMENT ON TABLE cm.source IS 'queue tables read by the sync cycle, one row per foreign table; set enabled = false to skip one';
COMMENT ON COLUMN cm.source.layout IS 'investment or withdrawal (split layout, type fixed by the table) or unified (type from transaction_type)';
COMMENT ON COLUMN cm.source.watermark IS 'newest updated_at applied from this source; the next cycle reads from watermark minus consistency_manager.lookback_window';

CREATE TABLE cm.status_map (
    queue_status     text PRIMARY KEY,
    portfolio_status text NOT NULL
);
COMMENT ON TABLE cm.status_map IS 'queue status -> portfolio_transactions.status; a queue status missing here sends its rows to cm.dead_letter';

INSERT INTO cm.status_map VALUES
    ('PENDING', 'PENDING'),
    ('PROCESSING', 'PENDING'),
    ('COMPLETED', 'COMPLETED'),
    ('FAILED', 'FAILED'),
    ('CANCELLED', 'CANCELLED');

CREATE TABLE cm.ledger (
    uuid       uuid PRIMARY KEY,
    source_id  integer NOT NULL,
    queue_id   bigint NOT NULL,
    kind       text NOT NULL,
    accountid  text NOT NULL,
    status     text NOT NULL,
    updated_at timestamptz NOT NULL,
    applied    boolean NOT NULL,
    factor1    numeric,
    factor2    numeric,
    factor3    numeric,
    synced_at  timestamptz NOT NULL
);
COMMENT ON TABLE cm.ledger IS 'one row per synced request: the last queue status and updated_at seen, and the completion factors currently applied to the account';
COMMENT ON COLUMN cm.ledger.applied IS 'true while the completion''s tier factors are applied to the account';
COMMENT ON COLUMN cm.ledger.factor1 IS 'multiplier applied to tier 1 at completion (1 + delta for an investment''s value, 1 - delta for a withdrawal''s allocation)';

CREATE TABLE cm.dead_letter (
    source_id        integer NOT NULL,
    queue_id         bigint NOT NULL,
    uuid             text,
    accountid        text,
    transaction_type text,
    tier_1           numeric,
    tier_2           numeric,
    tier_3           numeric,
    status           text,
    created_at       timestamptz,
    updated_at       timestamptz,
    reason           text NOT NULL,
    first_seen       timestamptz NOT NULL DEFAULT now(),
    last_seen        timestamptz NOT NULL DEFAULT now(),
    attempts         integer NOT NULL DEFAULT 1,
    PRIMARY KEY (source_id, queue_id)
);
COMMENT ON TABLE cm.dead_letter IS 'queue rows that could not be applied, with the reason; retried every cycle and removed once they apply';

/* Scratch space of one cycle: the rows read from one source.  Unlogged, and
 * emptied by the cycle that filled it before that cycle's transaction ends. */
CREATE UNLOGGED TABLE cm.batch (
    source_id        integer NOT NULL,
    queue_id         bigint NOT NULL,
    uuid             text,
    accountid        text,
    transaction_type text,
    tier_1           numeric,
    tier_2           numeric,
    tier_3           numeric,
    status           text,
    created_at       timestamptz,
    updated_at       timestamptz
);
COMMENT ON TABLE cm.batch IS 'scratch table of the running sync cycle; always empty outside a cycle';

/* New tier values and allocations of the accounts the running cycle touches,
 * computed with the batch and written to user_portfolios right after it. */
CREATE UNLOGGED TABLE cm.batch_account (
    accountid text NOT NULL,
    v1 numeric, v2 numeric, v3 numeric,
    a1 numeric, a2 numeric, a3 numeric
);
COMMENT ON TABLE cm.batch_account IS 'scratch table of the running sync cycle: new account values; always empty outside a cycle';

CREATE TABLE cm.cycle_history (
    cycle_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at        timestamptz NOT NULL,
    finished_at       timestamptz NOT NULL,
    duration_ms       double precision NOT NULL,
    trigger           text NOT NULL,
    sources           integer NOT NULL DEFAULT 0,
    rows_read         bigint NOT NULL DEFAULT 0,
    created           bigint NOT NULL DEFAULT 0,
    updated           bigint NOT NULL DEFAULT 0,
    completed_applied bigint NOT NULL DEFAULT 0,
    compensated       bigint NOT NULL DEFAULT 0,
    dead_lettered     bigint NOT NULL DEFAULT 0,
    error             text
);
CREATE INDEX ON cm.cycle_history (started_at);
COMMENT ON TABLE cm.cycle_history IS 'one row per sync cycle that did work or failed; pruned by consistency_manager.history_retention';

SELECT pg_catalog.pg_extension_config_dump('cm.tier_value', '');
SELECT pg_catalog.pg_extension_config_dump('cm.tier_value_history', '');
SELECT pg_catalog.pg_extension_config_dump('cm.source', '');
SELECT pg_catalog.pg_extension_config_dump('cm.status_map', '');
SELECT pg_catalog.pg_extension_config_dump('cm.ledger', '');
SELECT pg_catalog.pg_extension_config_dump('cm.dead_letter', '');
SELECT pg_catalog.pg_extension_config_dump('cm.cycle_history', '');

------------------------------------------------------------------------------
-- Internal helpers (schema cm)
------------------------------------------------------------------------------

CREATE FUNCTION cm.factor_mul(numeric, numeric) RETURNS numeric
    AS 'MODULE_PATHNAME', 'cm_factor_mul'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION cm.factor_mul(numeric, numeric) IS 'product of two tier factors, kept to 40 decimal places (transition function of cm.product)';

CREATE FUNCTION cm.factor_pow(numeric, bigint) RETURNS numeric
    AS 'MODULE_PATHNAME', 'cm_factor_pow'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION cm.factor_pow(numeric, bigint) IS 'a tier factor to the k-th power, kept to 40 decimal places (k completions of one account in one cycle)';

CREATE AGGREGATE cm.product(numeric) (
    SFUNC = cm.factor_mul,
    STYPE = numeric,
    INITCOND = '1'
);
COMMENT ON AGGREGATE cm.product(numeric) IS 'product of tier factors (numeric, 40 decimal places)';

CREATE FUNCTION cm.try_uuid(text) RETURNS uuid
    AS 'MODULE_PATHNAME', 'cm_try_uuid'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION cm.try_uuid(text) IS 'the uuid written in canonical 8-4-4-4-12 lower-case form, or NULL when the text is not one';

CREATE FUNCTION cm.typmod_scale(integer) RETURNS integer
    AS 'MODULE_PATHNAME', 'cm_typmod_scale'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION cm.typmod_scale(integer) IS 'scale of a numeric column from its atttypmod; NULL when the column is unconstrained';

CREATE FUNCTION cm.target_table(text) RETURNS regclass
    AS 'MODULE_PATHNAME', 'cm_target_table'
    LANGUAGE C STABLE STRICT;
COMMENT ON FUNCTION cm.target_table(text) IS 'an application table (user_portfolios, portfolio_transactions) in consistency_manager.portfolio_schema; an error when it does not exist';

CREATE FUNCTION cm.column_scale(regclass, name) RETURNS integer
    LANGUAGE sql STABLE STRICT
    SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT cm.typmod_scale(a.atttypmod)
          FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = $1 AND a.attname = $2 AND NOT a.attisdropped
    $$;
COMMENT ON FUNCTION cm.column_scale(regclass, name) IS 'scale of a numeric column of a table; NULL when unconstrained';

CREATE FUNCTION cm.typmod_limit(integer) RETURNS numeric
    AS 'MODULE_PATHNAME', 'cm_typmod_limit'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION cm.typmod_limit(integer) IS 'for a numeric(p,s) atttypmod, 10^(p-s): the first magnitude that does not fit; NULL when unconstrained';

CREATE FUNCTION cm.round_to(numeric, integer) RETURNS numeric
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS 'SELECT CASE WHEN $2 IS NULL THEN $1 ELSE pg_catalog.round($1, $2) END';
COMMENT ON FUNCTION cm.round_to(numeric, integer) IS 'round to a column''s scale; unchanged when the scale is NULL (unconstrained numeric)';

------------------------------------------------------------------------------
-- Tier-delta math
------------------------------------------------------------------------------

CREATE FUNCTION @extschema@.cm_tier_delta(pool numeric, market numeric) RETURNS numeric
    AS 'MODULE_PATHNAME', 'cm_tier_delta'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION @extschema@.cm_tier_delta(numeric, numeric) IS '(market - pool) / pool, 0 when pool is 0; an error for a negative or non-finite input';

CREATE FUNCTION @extschema@.cm_tier_deltas()
    RETURNS TABLE (tier integer, pool_value numeric, market_value numeric, delta numeric)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT t.tier, t.pool_value, t.market_value,
               @extschema@.cm_tier_delta(t.pool_value, t.market_value)
          FROM cm.tier_value t
         ORDER BY t.tier
    $$;
COMMENT ON FUNCTION @extschema@.cm_tier_deltas() IS 'each tier''s pool value, market value and the delta a completion applies now';

CREATE FUNCTION @extschema@.cm_set_tier_values(tier integer, pool_value numeric, market_value numeric)
    RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    old cm.tier_value%ROWTYPE;
BEGIN
    IF tier IS NULL OR pool_value IS NULL OR market_value IS NULL THEN
        RAISE EXCEPTION 'tier, pool_value and market_value must not be NULL'
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'Pass all three arguments, for example cm_set_tier_values(1, 1000000, 1050000).';
    END IF;
    IF tier NOT BETWEEN 1 AND 3 THEN
        RAISE EXCEPTION 'tier % does not exist', tier
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Tiers are numbered 1, 2 and 3.';
    END IF;
    -- cm_tier_delta rejects negative, NaN and infinite values with a hint
    PERFORM @extschema@.cm_tier_delta(pool_value, market_value);

    SELECT * INTO old FROM cm.tier_value t WHERE t.tier = cm_set_tier_values.tier FOR UPDATE;
    UPDATE cm.tier_value t
       SET pool_value = cm_set_tier_values.pool_value,
           market_value = cm_set_tier_values.market_value,
           updated_at = now(),
           updated_by = session_user
     WHERE t.tier = cm_set_tier_values.tier;
    INSERT INTO cm.tier_value_history
           (tier, old_pool_value, old_market_value, new_pool_value, new_market_value)
    VALUES (tier, old.pool_value, old.market_value, pool_value, market_value);
END
$$;
COMMENT ON FUNCTION @extschema@.cm_set_tier_values(integer, numeric, numeric) IS 'set a tier''s pool and market value (transactional, audited in cm.tier_value_history)';

CREATE FUNCTION @extschema@.cm_preview(accountid text)
    RETURNS TABLE (tier text, delta numeric,
                   value_before numeric, value_after numeric,
                   allocation_before numeric, allocation_after numeric)
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    portfolios regclass := cm.target_table('user_portfolios');
    acct  record;
    d     numeric[];
    v     numeric[];
    a     numeric[];
    vs    integer[];
    als   integer[];
    tv    numeric;
    ta    numeric;
    i     integer;
BEGIN
    EXECUTE format('SELECT tier1_value, tier2_value, tier3_value,
                           tier1_allocation, tier2_allocation, tier3_allocation
                      FROM %s WHERE accountid = $1', portfolios)
       INTO acct USING accountid;
    IF acct IS NULL THEN
        RAISE EXCEPTION 'account "%" has no portfolio', accountid
            USING ERRCODE = 'no_data_found',
                  HINT = format('Check the account id against %s.accountid.', portfolios);
    END IF;

    SELECT array_agg(x.delta ORDER BY x.tier) INTO d FROM @extschema@.cm_tier_deltas() x;
    v := ARRAY[acct.tier1_value, acct.tier2_value, acct.tier3_value];
    a := ARRAY[acct.tier1_allocation, acct.tier2_allocation, acct.tier3_allocation];
    vs := ARRAY[cm.column_scale(portfolios, 'tier1_value'), cm.column_scale(portfolios, 'tier2_value'),
                cm.column_scale(portfolios, 'tier3_value')];
    als := ARRAY[cm.column_scale(portfolios, 'tier1_allocation'), cm.column_scale(portfolios, 'tier2_allocation'),
                 cm.column_scale(portfolios, 'tier3_allocation')];
    tv := 0;
    ta := 0;
    FOR i IN 1..3 LOOP
        tier := i::text;
        delta := d[i];
        value_before := v[i];
        allocation_before := a[i];
        value_after := v[i] * (1 + d[i]);
        allocation_after := a[i] * (1 - d[i]);
        IF vs[i] IS NOT NULL THEN
            value_after := round(value_after, vs[i]);
        END IF;
        IF als[i] IS NOT NULL THEN
            allocation_after := round(allocation_after, als[i]);
        END IF;
        tv := tv + value_after;
        ta := ta + allocation_after;
        RETURN NEXT;
    END LOOP;
    tier := 'total';
    delta := NULL;
    value_before := v[1] + v[2] + v[3];
    allocation_before := a[1] + a[2] + a[3];
    value_after := tv;
    allocation_after := ta;
    RETURN NEXT;
END
$$;
COMMENT ON FUNCTION @extschema@.cm_preview(text) IS 'what a completed investment (values) and a completed withdrawal (allocations) would do to an account now';

------------------------------------------------------------------------------
-- Sources and the sync cycle
------------------------------------------------------------------------------

CREATE FUNCTION @extschema@.cm_attach_queue(server name, remote_schema text DEFAULT 'public')
    RETURNS TABLE (source_id integer, foreign_table regclass, layout text)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
#variable_conflict use_column
DECLARE
    fdw       name;
    cand      record;
    req       record;
    local     name;
    ft        regclass;
    typ       regtype;
    opts      text[];
    found_any boolean := false;
BEGIN
    SELECT w.fdwname INTO fdw
      FROM pg_foreign_server s JOIN pg_foreign_data_wrapper w ON w.oid = s.srvfdw
     WHERE s.srvname = server;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'foreign server "%" does not exist', server
            USING ERRCODE = 'undefined_object',
                  HINT = 'Create it with CREATE SERVER ... FOREIGN DATA WRAPPER postgres_fdw, and a user mapping for the extension''s owner.';
    ELSIF fdw <> 'postgres_fdw' THEN
        RAISE EXCEPTION 'foreign server "%" uses foreign-data wrapper "%", not postgres_fdw', server, fdw
            USING ERRCODE = 'wrong_object_type',
                  HINT = 'consistency_manager reads queue-db through postgres_fdw.';
    END IF;

    -- the application's tables must exist before anything is attached
    PERFORM cm.target_table('user_portfolios'), cm.target_table('portfolio_transactions');

    FOR cand IN
        SELECT * FROM (VALUES ('investment_queue', 'investment', 'account_number'),
                              ('withdrawal_queue', 'withdrawal', 'account_number'),
                              ('investment_withdrawal_queue', 'unified', 'accountid'))
                      AS v(remote_table, layout, account_column)
    LOOP
        -- cm_remote.<server>_<table>, with the remote schema when it is not public
        local := left(concat_ws('_', server, nullif(remote_schema, 'public'), cand.remote_table), 63);
        IF to_regclass(format('cm_remote.%I', local)) IS NULL THEN
            EXECUTE format('IMPORT FOREIGN SCHEMA %I LIMIT TO (%I) FROM SERVER %I INTO cm_remote',
                           remote_schema, cand.remote_table, server);
            IF to_regclass(format('cm_remote.%I', cand.remote_table)) IS NULL THEN
                CONTINUE;       -- queue-db has no such table
            END IF;
            EXECUTE format('ALTER FOREIGN TABLE cm_remote.%I RENAME TO %I', cand.remote_table, local);
            EXECUTE format('ALTER EXTENSION consistency_manager ADD FOREIGN TABLE cm_remote.%I', local);
        END IF;
        ft := format('cm_remote.%I', local)::regclass;

        -- every column the cycle reads, with a type it can use
        FOR req IN
            SELECT * FROM (VALUES
                ('queue_id', '{smallint,integer,bigint}'::regtype[]),
                (cand.account_column, '{text,character varying,character}'),
                ('tier_1', '{numeric,smallint,integer,bigint}'),
                ('tier_2', '{numeric,smallint,integer,bigint}'),
                ('tier_3', '{numeric,smallint,integer,bigint}'),
                ('uuid', '{text,character varying,character,uuid}'),
                ('status', '{text,character varying,character}'),
                ('created_at', '{timestamp with time zone,timestamp without time zone}'),
                ('updated_at', '{timestamp with time zone}'),
                ('transaction_type', '{text,character varying,character}')) AS r(col, types)
             WHERE r.col <> 'transaction_type' OR cand.layout = 'unified'
        LOOP
            SELECT a.atttypid::regtype INTO typ
              FROM pg_attribute a
             WHERE a.attrelid = ft AND a.attname = req.col AND a.attnum > 0 AND NOT a.attisdropped;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'queue table %.% on server "%" has no column "%"',
                                remote_schema, cand.remote_table, server, req.col
                    USING ERRCODE = 'undefined_column',
                          DETAIL = format('The sync cycle reads %s.', req.col),
                          HINT = format('Add the column in queue-db, then drop foreign table %s and call cm_attach_queue() again.', ft);
            ELSIF NOT typ = ANY (req.types) THEN
                RAISE EXCEPTION 'column "%" of queue table %.% has type %, which the sync cycle cannot use',
                                req.col, remote_schema, cand.remote_table, typ
                    USING ERRCODE = 'datatype_mismatch',
                          HINT = format('Expected one of: %s.', array_to_string(req.types, ', '));
            END IF;
        END LOOP;

        -- pages are read in one round trip each; queue-db is only ever read
        SELECT t.ftoptions INTO opts FROM pg_foreign_table t WHERE t.ftrelid = ft;
        EXECUTE format('ALTER FOREIGN TABLE %s OPTIONS (%s fetch_size %L, %s updatable %L)', ft,
                       CASE WHEN EXISTS (SELECT 1 FROM unnest(opts) o WHERE o LIKE 'fetch_size=%')
                            THEN 'SET' ELSE 'ADD' END, '10000',
                       CASE WHEN EXISTS (SELECT 1 FROM unnest(opts) o WHERE o LIKE 'updatable=%')
                            THEN 'SET' ELSE 'ADD' END, 'false');

        INSERT INTO cm.source AS s (server_name, remote_schema, remote_table, table_name, layout, account_column)
        VALUES (server, remote_schema, cand.remote_table, local, cand.layout, cand.account_column)
        ON CONFLICT (server_name, remote_schema, remote_table)
            DO UPDATE SET table_name = excluded.table_name, layout = excluded.layout,
                          account_column = excluded.account_column
        RETURNING s.source_id INTO cm_attach_queue.source_id;

        foreign_table := ft;
        layout := cand.layout;
        found_any := true;
        RETURN NEXT;
    END LOOP;

    IF NOT found_any THEN
        RAISE EXCEPTION 'no queue table found in schema "%" on server "%"', remote_schema, server
            USING ERRCODE = 'undefined_table',
                  DETAIL = 'Looked for investment_queue, withdrawal_queue and investment_withdrawal_queue.',
                  HINT = 'Check the remote schema name and that the user mapping''s role can see the tables.';
    END IF;
END
$$;
COMMENT ON FUNCTION @extschema@.cm_attach_queue(name, text) IS 'import the queue tables of a postgres_fdw server as foreign tables in cm_remote and register them as sources (idempotent)';

CREATE FUNCTION @extschema@.cm_sync_now(
        OUT sources integer, OUT rows_read bigint, OUT created bigint, OUT updated bigint,
        OUT completed_applied bigint, OUT compensated bigint, OUT dead_lettered bigint,
        OUT duration_ms double precision)
    RETURNS record
    AS 'MODULE_PATHNAME', 'cm_sync_now'
    LANGUAGE C VOLATILE STRICT SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.cm_sync_now() IS 'run one sync cycle now, in the caller''s transaction (waits for a cycle the worker runs), and report what it did';

------------------------------------------------------------------------------
-- The worker and what it shows
------------------------------------------------------------------------------

CREATE FUNCTION @extschema@.cm_stats(
        OUT cycles bigint, OUT rows_read bigint, OUT created bigint, OUT updated bigint,
        OUT completed_applied bigint, OUT compensated bigint, OUT dead_lettered bigint,
        OUT errors bigint, OUT consecutive_failures bigint, OUT last_error text,
        OUT last_error_at timestamptz, OUT last_cycle_start timestamptz,
        OUT last_cycle_end timestamptz, OUT last_cycle_duration_ms double precision,
        OUT worker_pid integer, OUT worker_state text, OUT skipped_turns bigint)
    RETURNS record
    AS 'MODULE_PATHNAME', 'cm_stats'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.cm_stats() IS 'counters of the sync cycle since the server started, and the worker''s state';

CREATE FUNCTION @extschema@.cm_sources()
    RETURNS TABLE (source_id integer, foreign_table text, layout text, enabled boolean,
                   watermark timestamptz, last_synced_at timestamptz,
                   newest_change timestamptz, lag interval, dead_letters bigint)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    s record;
BEGIN
    FOR s IN SELECT * FROM cm.source ORDER BY 1 LOOP
        source_id := s.source_id;
        foreign_table := format('%I.%I', s.table_schema, s.table_name);
        layout := s.layout;
        enabled := s.enabled;
        watermark := s.watermark;
        last_synced_at := s.last_synced_at;
        newest_change := NULL;
        BEGIN
            EXECUTE format('SELECT max(updated_at) FROM %s', foreign_table) INTO newest_change;
        EXCEPTION WHEN OTHERS THEN
            newest_change := NULL;      -- queue-db unreachable: lag unknown
        END;
        lag := CASE WHEN newest_change IS NULL THEN NULL
                    ELSE greatest(newest_change - coalesce(s.watermark, '-infinity'), interval '0') END;
        SELECT count(*) INTO dead_letters FROM cm.dead_letter d WHERE d.source_id = s.source_id;
        RETURN NEXT;
    END LOOP;
END
$$;
COMMENT ON FUNCTION @extschema@.cm_sources() IS 'each source with its watermark and lag (newest change in queue-db minus the watermark; NULL when queue-db cannot be reached)';

CREATE FUNCTION @extschema@.cm_wake() RETURNS boolean
    AS 'MODULE_PATHNAME', 'cm_wake'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.cm_wake() IS 'ask the background worker for a cycle now; false when no worker runs';

CREATE FUNCTION @extschema@.cm_worker_start() RETURNS boolean
    AS 'MODULE_PATHNAME', 'cm_worker_start'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.cm_worker_start() IS 'start the background worker when none runs; false when one already does';

CREATE FUNCTION @extschema@.cm_worker_stop() RETURNS boolean
    AS 'MODULE_PATHNAME', 'cm_worker_stop'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.cm_worker_stop() IS 'stop the background worker until cm_worker_start() or a restart; false when none runs';

CREATE FUNCTION @extschema@.cm_health(
        OUT healthy boolean, OUT worker_running boolean, OUT queue_reachable boolean, OUT detail text)
    RETURNS record
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    st record;
    s record;
    problems text[] := '{}';
BEGIN
    SELECT * INTO st FROM @extschema@.cm_stats();
    worker_running := st.worker_pid IS NOT NULL;
    IF NOT worker_running THEN
        problems := problems || format('worker not running (%s)', st.worker_state);
    ELSIF st.consecutive_failures > 0 THEN
        problems := problems || format('last %s cycles failed: %s', st.consecutive_failures, st.last_error);
    END IF;

    queue_reachable := true;
    FOR s IN SELECT * FROM cm.source WHERE enabled ORDER BY source_id LOOP
        BEGIN
            EXECUTE format('SELECT 1 FROM %I.%I LIMIT 1', s.table_schema, s.table_name);
        EXCEPTION WHEN OTHERS THEN
            queue_reachable := false;
            problems := problems || format('source %s (%I.%I) unreachable: %s',
                                           s.source_id, s.table_schema, s.table_name, SQLERRM);
        END;
    END LOOP;
    IF NOT EXISTS (SELECT 1 FROM cm.source WHERE enabled) THEN
        problems := problems || 'no enabled source: attach one with cm_attach_queue()'::text;
    END IF;

    healthy := cardinality(problems) = 0;
    detail := CASE WHEN healthy THEN 'ok' ELSE array_to_string(problems, '; ') END;
END
$$;
COMMENT ON FUNCTION @extschema@.cm_health() IS 'whether the worker runs and queue-db can be reached, and why not';

CREATE FUNCTION @extschema@.cm_status() RETURNS jsonb
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT jsonb_build_object(
            'stats', (SELECT to_jsonb(s) FROM @extschema@.cm_stats() s),
            'tiers', (SELECT jsonb_agg(to_jsonb(t) ORDER BY t.tier) FROM @extschema@.cm_tier_deltas() t),
            'polling_interval', current_setting('consistency_manager.polling_interval', true),
            'enabled', current_setting('consistency_manager.enabled', true),
            'sources', (SELECT jsonb_agg(to_jsonb(x) ORDER BY x.source_id) FROM @extschema@.cm_sources() x))
    $$;
COMMENT ON FUNCTION @extschema@.cm_status() IS 'one document with the statistics, the tier values and deltas, the polling interval and the sources';

------------------------------------------------------------------------------
-- Privileges: nothing for PUBLIC; the DBA grants EXECUTE where needed.
------------------------------------------------------------------------------

REVOKE ALL ON ALL TABLES IN SCHEMA cm FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA cm FROM PUBLIC;
REVOKE ALL ON FUNCTION
    @extschema@.cm_tier_delta(numeric, numeric),
    @extschema@.cm_tier_deltas(),
    @extschema@.cm_set_tier_values(integer, numeric, numeric),
    @extschema@.cm_preview(text),
    @extschema@.cm_attach_queue(name, text),
    @extschema@.cm_sync_now(),
    @extschema@.cm_stats(),
    @extschema@.cm_sources(),
    @extschema@.cm_wake(),
    @extschema@.cm_worker_start(),
    @extschema@.cm_worker_stop(),
    @extschema@.cm_health(),
    @extschema@.cm_status()
FROM PUBLIC;
