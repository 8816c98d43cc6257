/*
 * A column whose type changed in queue-db.
 *
 * cm_attach_queue() imports each queue table once, and the foreign table
 * keeps the column types queue-db had then.  When queue-db widens a column
 * (ALTER TABLE investment_queue ALTER tier_1 TYPE numeric(30,10)), a value
 * that no longer fits the old type makes every read of the source fail
 * (numeric field overflow, SQLSTATE 22003) until the foreign table is
 * changed.  The cycle does it itself: when a source's read fails with a
 * data exception (class 22) or a type mismatch (42804, 42846, 42883), it
 * calls cm.reimport_source(), which imports the queue table afresh beside
 * the source's foreign table, compares the two column by column, and gives
 * the foreign table the types queue-db has now; the cycle then reads the
 * source again, once, in the same cycle.  The foreign table keeps its name,
 * OID, membership of the extension, options and grants: only the types of
 * the changed columns change (ALTER FOREIGN TABLE ... ALTER COLUMN ...
 * TYPE), and the change is recorded in cm.source (reimported_at,
 * reimported_columns), which cm_health() reports for a day.
 */

ALTER TABLE cm.source
    ADD COLUMN reimported_at timestamptz,
    ADD COLUMN reimported_columns text;
COMMENT ON COLUMN cm.source.reimported_at IS 'when the sync cycle last gave the foreign table of this source the column types queue-db has now (cm.reimport_source), after a read failed on a changed type';
COMMENT ON COLUMN cm.source.reimported_columns IS 'the columns whose type the last re-import changed: name, old type -> new type';

/*
 * cm.reimport_source(source_id): give the foreign table of a source the
 * column types its queue table has now in queue-db; returns the columns it
 * changed ('tier_1 numeric(20,8) -> numeric(30,10)'), none when they match.
 * The queue table is imported under its own name into cm_remote (where the
 * foreign tables of sources are always named <server>_...), compared, and
 * dropped.  A column the cycle reads whose new type it cannot use is an
 * error (42804), and nothing is changed.  With the rights of the
 * extension's owner, whose user mapping imports (as in cm_attach_queue());
 * the sync cycle calls it, so the sync role may execute it
 * (cm_grant_sync_role()).
 */
CREATE FUNCTION cm.reimport_source(source_id integer)
    RETURNS text[]
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    src      record;
    ft       regclass;
    fresh    text;
    col      record;
    changed  text[] := '{}';
BEGIN
    SELECT s.* INTO src FROM cm.source s WHERE s.source_id = reimport_source.source_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'source % does not exist', source_id
            USING ERRCODE = 'no_data_found', HINT = 'See SELECT * FROM cm_sources().';
    END IF;
    ft := to_regclass(format('%I.%I', src.table_schema, src.table_name));
    IF ft IS NULL THEN
        RAISE EXCEPTION 'foreign table %.% of source % does not exist', src.table_schema, src.table_name, source_id
            USING ERRCODE = 'undefined_table',
                  HINT = format('Run SELECT cm_attach_queue(%L, %L) again.', src.server_name, src.remote_schema);
    END IF;
    fresh := format('cm_remote.%I', src.remote_table);
    IF to_regclass(fresh) IS NOT NULL THEN
        RAISE EXCEPTION 'cannot compare foreign table % with queue-db: relation % already exists', ft, fresh
            USING ERRCODE = 'duplicate_table',
                  HINT = format('cm.reimport_source() imports the queue table as %s for a moment; rename or drop that relation.', fresh);
    END IF;
    EXECUTE format('IMPORT FOREIGN SCHEMA %I LIMIT TO (%I) FROM SERVER %I INTO cm_remote',
                   src.remote_schema, src.remote_table, src.server_name);
    IF to_regclass(fresh) IS NULL THEN
        RAISE EXCEPTION 'queue table %.% does not exist on server "%"', src.remote_schema, src.remote_table, src.server_name
            USING ERRCODE = 'undefined_table';
    END IF;

    FOR col IN
        SELECT a.attname,
               format_type(a.atttypid, a.atttypmod) AS local_type,
               format_type(r.atttypid, r.atttypmod) AS remote_type,
               r.atttypid::regtype AS remote_base,
               need.types
          FROM pg_attribute a
          JOIN pg_attribute r ON r.attrelid = fresh::regclass AND r.attname = a.attname
                             AND r.attnum > 0 AND NOT r.attisdropped
          -- the columns the cycle reads, and the types it can use (30_privileges.sql)
          LEFT JOIN cm.queue_columns(src.account_column, src.layout) AS need(col, types)
                 ON need.col = a.attname::text
         WHERE a.attrelid = ft AND a.attnum > 0 AND NOT a.attisdropped
           AND (a.atttypid, a.atttypmod) IS DISTINCT FROM (r.atttypid, r.atttypmod)
         ORDER BY a.attnum
    LOOP
        IF col.types IS NOT NULL AND NOT col.remote_base = ANY (col.types) THEN
            RAISE EXCEPTION 'column "%" of queue table %.% on server "%" has type % now, which the sync cycle cannot use',
                            col.attname, src.remote_schema, src.remote_table, src.server_name, col.remote_type
                USING ERRCODE = 'datatype_mismatch',
                      DETAIL = format('Foreign table %s has %s.', ft, col.local_type),
                      HINT = format('Expected one of: %s.  Change the column in queue-db, then SELECT cm.reimport_source(%s).',
                                    array_to_string(col.types, ', '), source_id);
        END IF;
        EXECUTE format('ALTER FOREIGN TABLE %s ALTER COLUMN %I TYPE %s', ft, col.attname, col.remote_type);
        changed := changed || format('%s %s -> %s', col.attname, col.local_type, col.remote_type);
    END LOOP;
    EXECUTE format('DROP FOREIGN TABLE %s', fresh);

    IF cardinality(changed) > 0 THEN
        UPDATE cm.source s
           SET reimported_at = now(), reimported_columns = array_to_string(changed, ', ')
         WHERE s.source_id = reimport_source.source_id;
    END IF;
    RETURN changed;
END
$$;
COMMENT ON FUNCTION cm.reimport_source(integer) IS 'give the foreign table of a source the column types its queue table has now in queue-db, keeping its name, membership, options and grants; returns the columns changed (none when they match); the sync cycle calls it when a read fails on a changed type';
REVOKE ALL ON FUNCTION cm.reimport_source(integer) FROM PUBLIC;
