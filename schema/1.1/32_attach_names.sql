/*
 * Names of the foreign tables cm_attach_queue() creates.
 *
 * A foreign table is named cm_remote.<server>_<table> (with the remote
 * schema between them when it is not public).  1.0 cut that name to 63
 * characters; PostgreSQL cuts identifiers to 63 bytes (NAMEDATALEN - 1),
 * so with a long server name the tables of one server got the same name
 * (a duplicate key in cm.source, or a source reading another table), and a
 * multibyte name got a name other than the one recorded.  A name that does
 * not fit is now cut to at most 54 bytes, at a character boundary, and
 * ends in _ and 8 hexadecimal digits of the md5 of what it stands for
 * (server, schema, table), so it stays unique; a name that fits is
 * unchanged, and a queue table attached before keeps its name.
 */

CREATE FUNCTION cm.foreign_table_name(server name, remote_schema text, remote_table text, hashed boolean)
    RETURNS name
    LANGUAGE plpgsql IMMUTABLE STRICT
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    full_name text := concat_ws('_', server, nullif(remote_schema, 'public'), remote_table);
    tag       text;
    prefix    text;
BEGIN
    IF octet_length(full_name) <= 63 AND NOT hashed THEN
        RETURN full_name;
    END IF;
    tag := '_' || left(md5(format('%I.%I.%I', server, remote_schema, remote_table)), 8);
    -- as many whole characters as fit in 63 bytes with the tag
    prefix := left(full_name, 63 - octet_length(tag));
    WHILE octet_length(prefix) > 63 - octet_length(tag) LOOP
        prefix := left(prefix, -1);
    END LOOP;
    RETURN prefix || tag;
END
$$;
COMMENT ON FUNCTION cm.foreign_table_name(name, text, text, boolean) IS 'the name cm_attach_queue() gives the foreign table of a queue table: <server>_[<schema>_]<table>, or, when that does not fit in 63 bytes (or hashed is true), a prefix of it cut at a character boundary followed by _ and 8 hex digits of its md5';
REVOKE ALL ON FUNCTION cm.foreign_table_name(name, text, text, boolean) FROM PUBLIC;

CREATE OR REPLACE FUNCTION cm.attach_queue(server name, remote_schema text)
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
