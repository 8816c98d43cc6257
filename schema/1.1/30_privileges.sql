/*
 * Least privilege.
 *
 * The sync cycle runs as the sync role (consistency_manager.role, else the
 * owner of user_portfolios), never as a superuser, inside a
 * security-restricted operation (src/privilege.c): the application's
 * triggers, defaults and policies on the portfolio tables run with no more
 * rights than that role.  This file gives the DBA the means to grant that
 * role exactly what the cycle needs and to check it, makes cm_attach_queue()
 * check its caller, and opens the read-only monitoring functions to
 * pg_monitor.  Who may call what: README, section Security.
 */

-- The sync role and what it needs -------------------------------------------

CREATE FUNCTION cm.sync_role() RETURNS regrole
    AS 'MODULE_PATHNAME', 'cm_sync_role_sql'
    LANGUAGE C STABLE;
COMMENT ON FUNCTION cm.sync_role() IS 'the role the sync cycle runs as: consistency_manager.role when set, else the owner of user_portfolios';
REVOKE ALL ON FUNCTION cm.sync_role() FROM PUBLIC;

CREATE FUNCTION cm.sync_role_privileges(role regrole)
    RETURNS TABLE (object_type text, object text, privilege text, missing boolean, grant_command text)
    AS 'MODULE_PATHNAME', 'cm_sync_role_privileges'
    LANGUAGE C VOLATILE STRICT;
COMMENT ON FUNCTION cm.sync_role_privileges(regrole) IS 'every privilege the sync cycle needs in this database (schemas, cm tables and functions, the foreign tables of the sources, the portfolio tables), whether the role lacks it, and the GRANT that gives it';
REVOKE ALL ON FUNCTION cm.sync_role_privileges(regrole) FROM PUBLIC;

CREATE FUNCTION cm.probe_as(role regrole, relation regclass) RETURNS text
    AS 'MODULE_PATHNAME', 'cm_probe_as'
    LANGUAGE C VOLATILE STRICT;
COMMENT ON FUNCTION cm.probe_as(regrole, regclass) IS 'read one row of a foreign table as the role, through its user mapping, as the cycle would: NULL when that works, else the error; only for a role that has the privileges of the given one';
REVOKE ALL ON FUNCTION cm.probe_as(regrole, regclass) FROM PUBLIC;

/*
 * SECURITY INVOKER: a GRANT runs with the caller's rights, so only a role
 * that may grant these privileges (a superuser, the owners) gets them
 * granted.  As SECURITY DEFINER, it would let anyone allowed to execute it
 * give any role write access to the ledger and the portfolio tables.
 */
CREATE FUNCTION @extschema@.cm_grant_sync_role(role regrole) RETURNS SETOF text
    LANGUAGE plpgsql VOLATILE STRICT
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    p     record;
    still text;
BEGIN
    FOR p IN SELECT * FROM cm.sync_role_privileges(role) x WHERE x.missing LOOP
        EXECUTE p.grant_command;
        RETURN NEXT p.grant_command;
    END LOOP;

    SELECT string_agg(format('%s on %s %s', x.privilege, x.object_type, x.object), ', ')
      INTO still FROM cm.sync_role_privileges(role) x WHERE x.missing;
    IF still IS NOT NULL THEN
        RAISE EXCEPTION 'could not grant role % every privilege the sync cycle needs', role
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = format('Still missing: %s.', still),
                  HINT = 'Run cm_grant_sync_role() as a superuser, or as a role that owns those objects or holds their privileges WITH GRANT OPTION.';
    END IF;
END
$$;
COMMENT ON FUNCTION @extschema@.cm_grant_sync_role(regrole) IS 'grant the role every privilege the sync cycle needs in this database that it lacks (idempotent); returns the GRANT statements it ran';
REVOKE ALL ON FUNCTION @extschema@.cm_grant_sync_role(regrole) FROM PUBLIC;

/*
 * One row per thing the sync role needs, every row (filter on missing):
 * role attributes, the local privileges, a user mapping on each attached
 * server, and SELECT on every enabled queue table in queue-db (probed
 * through the foreign table as the role, so through its user mapping).
 * missing is NULL when it could not be told.  SECURITY INVOKER: reading
 * queue-db as a role is for a role that has its privileges.
 */
CREATE FUNCTION @extschema@.cm_check_sync_role(role regrole DEFAULT NULL)
    RETURNS TABLE (object_type text, object text, privilege text, missing boolean, detail text)
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
    AS $$
#variable_conflict use_column
DECLARE
    r          regrole := coalesce(role, cm.sync_role());
    attrs      record;
    configured text := current_setting('consistency_manager.role', true);
    s          record;
    m          record;
    ft         regclass;
    local_ok   boolean;
    err        text;
BEGIN
    SELECT a.rolname, a.rolsuper, a.rolcanlogin INTO attrs FROM pg_roles a WHERE a.oid = r;

    object_type := 'role';
    object := r::text;
    privilege := 'NOSUPERUSER';
    missing := attrs.rolsuper;
    detail := CASE WHEN attrs.rolsuper
                   THEN 'a superuser: the application''s triggers, defaults and policies on the portfolio tables run with superuser rights'
                   ELSE 'the application''s code on the portfolio tables runs with this role''s rights' END;
    RETURN NEXT;
    IF attrs.rolname = configured THEN
        privilege := 'LOGIN';
        missing := NOT attrs.rolcanlogin;
        detail := format('the background worker connects as consistency_manager.role%s',
                         CASE WHEN attrs.rolcanlogin THEN '' ELSE format(': ALTER ROLE %s LOGIN', r) END);
        RETURN NEXT;
        object_type := 'database';
        object := quote_ident(current_database());
        privilege := 'CONNECT';
        missing := NOT has_database_privilege(r, current_database(), 'CONNECT');
        detail := format('the background worker connects to this database%s',
                         CASE WHEN missing THEN format(': GRANT CONNECT ON DATABASE %I TO %s', current_database(), r) ELSE '' END);
        RETURN NEXT;
    END IF;

    RETURN QUERY
        SELECT x.object_type, x.object, x.privilege, x.missing,
               CASE WHEN x.missing THEN x.grant_command || ' (or cm_grant_sync_role())' END
          FROM cm.sync_role_privileges(r) x;

    FOR s IN SELECT DISTINCT c.server_name FROM cm.source c ORDER BY 1 LOOP
        object_type := 'foreign server';
        object := quote_ident(s.server_name);
        privilege := 'USER MAPPING';
        SELECT u.umuser INTO m FROM pg_user_mappings u
         WHERE u.srvname = s.server_name AND u.umuser IN (r::oid, 0)
         ORDER BY u.umuser = 0 LIMIT 1;
        missing := NOT FOUND;
        detail := CASE WHEN NOT FOUND
                       THEN format('CREATE USER MAPPING FOR %s SERVER %I OPTIONS (user ''...'', password ''...'') with a queue-db role that may SELECT the queue tables', r, s.server_name)
                       WHEN m.umuser = 0 THEN 'the mapping for PUBLIC'
                       ELSE format('the mapping for %s', r) END;
        RETURN NEXT;
    END LOOP;

    FOR s IN SELECT * FROM cm.source c WHERE c.enabled ORDER BY c.source_id LOOP
        ft := to_regclass(format('%I.%I', s.table_schema, s.table_name));
        object_type := 'queue table';
        object := format('%I.%I on server %I', s.remote_schema, s.remote_table, s.server_name);
        privilege := 'SELECT';
        local_ok := ft IS NOT NULL AND has_schema_privilege(r, 'cm_remote', 'USAGE')
                    AND has_table_privilege(r, ft, 'SELECT');
        IF ft IS NULL THEN
            missing := NULL;
            detail := format('not probed: foreign table %I.%I does not exist; run cm_attach_queue(%L) again',
                             s.table_schema, s.table_name, s.server_name);
        ELSIF NOT pg_has_role(current_user, r, 'USAGE') THEN
            missing := NULL;
            detail := format('not probed: only a role with the privileges of %s may read queue-db as it', r);
        ELSIF NOT local_ok THEN
            missing := NULL;
            detail := format('not probed: grant the local privileges on %s first', ft);
        ELSE
            err := cm.probe_as(r, ft);
            missing := err IS NOT NULL;
            detail := CASE WHEN err IS NULL THEN format('read through %s', ft)
                           ELSE format('read through %s: %s', ft, err) END;
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;
COMMENT ON FUNCTION @extschema@.cm_check_sync_role(regrole) IS 'what the sync role (by default the configured one) needs, one row each: role attributes, local privileges, user mappings, and SELECT on the queue tables in queue-db (probed as the role); filter on missing';
REVOKE ALL ON FUNCTION @extschema@.cm_check_sync_role(regrole) FROM PUBLIC;

/*
 * What cm_health() says about the sync role, from the local catalogs only
 * (cm_health() opens no remote connection): problems make it unhealthy,
 * warnings do not.  Called by cm_health(), so with its owner's rights.
 */
CREATE FUNCTION cm.sync_role_health(OUT problems text[], OUT warnings text[])
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    r       regrole;
    attrs   record;
    lacking text[];
    s       record;
BEGIN
    problems := '{}';
    warnings := '{}';
    BEGIN
        r := cm.sync_role();
    EXCEPTION WHEN OTHERS THEN
        problems := problems || format('sync role unknown: %s', SQLERRM);
        RETURN;
    END;

    SELECT a.rolname, a.rolsuper, a.rolcanlogin INTO attrs FROM pg_roles a WHERE a.oid = r;
    IF attrs.rolsuper THEN
        warnings := warnings || format('warning: sync role %s is a superuser, so the application''s triggers, defaults and policies on the portfolio tables run with superuser rights; set consistency_manager.role to a role without SUPERUSER (README, Security)', r);
    END IF;
    IF attrs.rolname = current_setting('consistency_manager.role', true) THEN
        IF NOT attrs.rolcanlogin THEN
            problems := problems || format('role %s (consistency_manager.role) cannot log in, so the worker cannot connect: ALTER ROLE %s LOGIN', r, r);
        END IF;
        IF NOT has_database_privilege(r, current_database(), 'CONNECT') THEN
            problems := problems || format('role %s (consistency_manager.role) lacks CONNECT on database %I, so the worker cannot connect', r, current_database());
        END IF;
    END IF;

    SELECT array_agg(format('%s on %s %s', x.privilege, x.object_type, x.object))
      INTO lacking FROM cm.sync_role_privileges(r) x WHERE x.missing;
    IF lacking IS NOT NULL THEN
        problems := problems || format('sync role %s lacks %s privileges the sync cycle needs (%s): run SELECT cm_grant_sync_role(%L)',
                                       r, cardinality(lacking), array_to_string(lacking, ', '), r::text);
    END IF;

    FOR s IN SELECT DISTINCT c.server_name FROM cm.source c WHERE c.enabled ORDER BY 1 LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_user_mappings u
                        WHERE u.srvname = s.server_name AND u.umuser IN (r::oid, 0)) THEN
            problems := problems || format('sync role %s has no user mapping (nor PUBLIC) for server %I', r, s.server_name);
        END IF;
    END LOOP;
END
$$;
COMMENT ON FUNCTION cm.sync_role_health() IS 'what cm_health() reports about the sync role: a superuser (warning), no LOGIN or CONNECT for the worker, missing privileges, missing user mappings';
REVOKE ALL ON FUNCTION cm.sync_role_health() FROM PUBLIC;

-- cm_attach_queue() checks its caller -----------------------------------------

/*
 * The options cm_attach_queue() gives the foreign table of a queue table
 * (ADD or SET each, from the options it has): a page is read in one round
 * trip (fetch_size), queue-db is only ever read (updatable), and a
 * reconciliation's checksum statement runs on queue-db while the local
 * checksums are computed (async_capable; see 40_reconcile.sql).
 */
CREATE FUNCTION cm.foreign_table_options(opts text[])
    RETURNS text
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
    SELECT string_agg(format('%s %s %L',
                             CASE WHEN EXISTS (SELECT 1 FROM unnest(opts) o WHERE o LIKE v.name || '=%')
                                  THEN 'SET' ELSE 'ADD' END, v.name, v.value), ', ' ORDER BY v.name)
      FROM (VALUES ('fetch_size', '10000'), ('updatable', 'false'), ('async_capable', 'true')) AS v(name, value)
$$;
COMMENT ON FUNCTION cm.foreign_table_options(text[]) IS 'the OPTIONS clause of ALTER FOREIGN TABLE that cm_attach_queue() gives a queue table''s foreign table: fetch_size 10000, updatable false, async_capable true';
REVOKE ALL ON FUNCTION cm.foreign_table_options(text[]) FROM PUBLIC;

-- foreign tables attached by 1.0 get the options too
DO $$
DECLARE
    ft regclass;
BEGIN
    FOR ft IN
        SELECT c.oid FROM cm.source s
          JOIN pg_catalog.pg_class c ON c.relname = s.table_name
          JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace AND n.nspname = s.table_schema
         WHERE c.relkind = 'f'
    LOOP
        EXECUTE format('ALTER FOREIGN TABLE %s OPTIONS (%s)', ft,
                       cm.foreign_table_options((SELECT t.ftoptions FROM pg_catalog.pg_foreign_table t WHERE t.ftrelid = ft)));
    END LOOP;
END
$$;

/*
 * The columns of a queue table the sync cycle reads, and the types it can
 * use for each: cm.attach_queue checks them when it imports a queue table,
 * cm.reimport_source (35_type_drift.sql) when queue-db changed one.
 */
CREATE FUNCTION cm.queue_columns(account_column text, layout text)
    RETURNS TABLE (col text, types regtype[])
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT r.col, r.types
          FROM (VALUES
                ('queue_id', '{smallint,integer,bigint}'::regtype[]),
                (account_column, '{text,character varying,character}'),
                ('tier_1', '{numeric,smallint,integer,bigint}'),
                ('tier_2', '{numeric,smallint,integer,bigint}'),
                ('tier_3', '{numeric,smallint,integer,bigint}'),
                ('uuid', '{text,character varying,character,uuid}'),
                ('status', '{text,character varying,character}'),
                ('created_at', '{timestamp with time zone,timestamp without time zone}'),
                ('updated_at', '{timestamp with time zone}'),
                ('transaction_type', '{text,character varying,character}')) AS r(col, types)
         WHERE r.col <> 'transaction_type' OR layout = 'unified'
    $$;
COMMENT ON FUNCTION cm.queue_columns(text, text) IS 'the columns of a queue table the sync cycle reads, with the types it can use for each (transaction_type in the unified layout only)';
REVOKE ALL ON FUNCTION cm.queue_columns(text, text) FROM PUBLIC;

CREATE FUNCTION cm.attach_queue(server name, remote_schema text)
    RETURNS TABLE (source_id integer, foreign_table regclass, layout text)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
#variable_conflict use_column
DECLARE
    sync_role regrole := cm.sync_role();
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
                  HINT = 'Create it with CREATE SERVER ... FOREIGN DATA WRAPPER postgres_fdw, and user mappings for the sync role and the extension''s owner.';
    ELSIF fdw <> 'postgres_fdw' THEN
        RAISE EXCEPTION 'foreign server "%" uses foreign-data wrapper "%", not postgres_fdw', server, fdw
            USING ERRCODE = 'wrong_object_type',
                  HINT = 'consistency_manager reads queue-db through postgres_fdw.';
    END IF;

    -- every wait on queue-db bounded (25_remote_waits.sql)
    PERFORM cm.bound_remote_waits(server);

    -- the application's tables must exist before anything is attached
    PERFORM cm.target_table('user_portfolios'), cm.target_table('portfolio_transactions');

    FOR cand IN
        SELECT * FROM (VALUES ('investment_queue', 'investment', 'account_number'),
                              ('withdrawal_queue', 'withdrawal', 'account_number'),
                              ('investment_withdrawal_queue', 'unified', 'accountid'))
                      AS v(remote_table, layout, account_column)
    LOOP
        -- a queue table attached before keeps its foreign table's name (a second
        -- call, a restore); a new one gets cm_remote.<server>_<table> (with
        -- the remote schema when it is not public), made to fit and unique
        SELECT s.table_name INTO local
          FROM cm.source s
         WHERE s.server_name = server AND s.remote_schema = attach_queue.remote_schema
           AND s.remote_table = cand.remote_table;
        IF NOT FOUND THEN
            local := cm.foreign_table_name(server, remote_schema, cand.remote_table, false);
            IF EXISTS (SELECT 1 FROM cm.source s WHERE s.table_schema = 'cm_remote' AND s.table_name = local)
               OR to_regclass(format('cm_remote.%I', local)) IS NOT NULL THEN
                local := cm.foreign_table_name(server, remote_schema, cand.remote_table, true);
            END IF;
        END IF;
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
            SELECT * FROM cm.queue_columns(cand.account_column, cand.layout)
        LOOP
            SELECT a.atttypid::regtype INTO typ
              FROM pg_attribute a
             WHERE a.attrelid = ft AND a.attname = req.col AND a.attnum > 0 AND NOT a.attisdropped;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'queue table %.% on server "%" has no column "%"',
                                remote_schema, cand.remote_table, server, req.col
                    USING ERRCODE = 'undefined_column',
                          DETAIL = format('The sync cycle reads %s.', req.col),
                          HINT = format('Add the column in queue-db, then run ALTER EXTENSION consistency_manager DROP FOREIGN TABLE %s; DROP FOREIGN TABLE %s; and call cm_attach_queue() again.', ft, ft);
            ELSIF NOT typ = ANY (req.types) THEN
                RAISE EXCEPTION 'column "%" of queue table %.% has type %, which the sync cycle cannot use',
                                req.col, remote_schema, cand.remote_table, typ
                    USING ERRCODE = 'datatype_mismatch',
                          HINT = format('Expected one of: %s.', array_to_string(req.types, ', '));
            END IF;
        END LOOP;

        -- pages are read in one round trip each; queue-db is only ever read;
        -- a reconciliation's checksums run on queue-db while it computes the
        -- local ones (async_capable: see 40_reconcile.sql)
        SELECT t.ftoptions INTO opts FROM pg_foreign_table t WHERE t.ftrelid = ft;
        EXECUTE format('ALTER FOREIGN TABLE %s OPTIONS (%s)', ft, cm.foreign_table_options(opts));

        INSERT INTO cm.source AS s (server_name, remote_schema, remote_table, table_name, layout, account_column)
        VALUES (server, remote_schema, cand.remote_table, local, cand.layout, cand.account_column)
        ON CONFLICT (server_name, remote_schema, remote_table)
            DO UPDATE SET table_name = excluded.table_name, layout = excluded.layout,
                          account_column = excluded.account_column
        RETURNING s.source_id INTO attach_queue.source_id;

        -- the cycle reads it as the sync role
        IF NOT has_table_privilege(sync_role, ft, 'SELECT') THEN
            EXECUTE format('GRANT SELECT ON %s TO %s', ft, sync_role);
        END IF;

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
COMMENT ON FUNCTION cm.attach_queue(name, text) IS 'the work of cm_attach_queue(), with the extension owner''s rights: import the queue tables, register them as sources, grant the sync role SELECT on them';
REVOKE ALL ON FUNCTION cm.attach_queue(name, text) FROM PUBLIC;

/*
 * SECURITY INVOKER, in C (src/privilege.c): it checks the role that calls
 * it (USAGE on the server, a user mapping for the sync role and one for the
 * owner), then runs cm.attach_queue with the owner's rights.
 */
CREATE OR REPLACE FUNCTION @extschema@.cm_attach_queue(server name, remote_schema text DEFAULT 'public')
    RETURNS TABLE (source_id integer, foreign_table regclass, layout text)
    AS 'MODULE_PATHNAME', 'cm_attach_queue'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION @extschema@.cm_attach_queue(name, text) IS 'import the queue tables of a postgres_fdw server as foreign tables in cm_remote and register them as sources (idempotent); the caller needs USAGE on the server, and the sync role a user mapping for it';

-- Monitoring: read-only, open to pg_monitor -----------------------------------

GRANT EXECUTE ON FUNCTION
    @extschema@.cm_stats(),
    @extschema@.cm_health(),
    @extschema@.cm_status(),
    @extschema@.cm_sources(),
    @extschema@.cm_tier_deltas()
TO pg_monitor;
