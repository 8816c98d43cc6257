/*
 * cm_sources() answers from local state: it opens no connection to
 * queue-db (a dashboard polling it must not hold one connection per
 * foreign server per session, nor wait on a hung remote).  Every cycle
 * records, per source it read successfully, when it read it and the newest
 * updated_at it saw; lag is the time since that read.
 */

ALTER TABLE cm.source ADD COLUMN newest_read timestamptz;
COMMENT ON COLUMN cm.source.newest_read IS 'newest updated_at the last successful read of this source saw in queue-db';
COMMENT ON COLUMN cm.source.last_synced_at IS 'start of the last cycle that read this source and applied what it read';

/*
 * One source failing never stops the others: the cycle reads each source
 * in a subtransaction, and a source whose read fails keeps its watermark
 * and records why here (cleared by its next successful read).
 */
ALTER TABLE cm.source
    ADD COLUMN last_error text,
    ADD COLUMN last_error_at timestamptz;
COMMENT ON COLUMN cm.source.last_error IS 'why the last read of this source failed (message, SQLSTATE, DETAIL, HINT) while the other sources synced; NULL once it reads again';
COMMENT ON COLUMN cm.source.last_error_at IS 'since when this source fails with last_error';

-- new result columns: the 1.0 function is replaced, not altered
DROP FUNCTION @extschema@.cm_sources();
CREATE FUNCTION @extschema@.cm_sources()
    RETURNS TABLE (source_id integer, foreign_table text, layout text, enabled boolean,
                   watermark timestamptz, last_synced_at timestamptz,
                   newest_change timestamptz, lag interval, dead_letters bigint,
                   last_error text, failing_since timestamptz)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT s.source_id, format('%I.%I', s.table_schema, s.table_name), s.layout, s.enabled,
               s.watermark, s.last_synced_at, s.newest_read,
               -- never an error, whatever the state: no lag for a time that is not finite
               CASE WHEN isfinite(s.last_synced_at) THEN greatest(now() - s.last_synced_at, interval '0') END,
               (SELECT count(*) FROM cm.dead_letter d WHERE d.source_id = s.source_id),
               s.last_error, s.last_error_at
          FROM cm.source s
         ORDER BY s.source_id
    $$;
REVOKE ALL ON FUNCTION @extschema@.cm_sources() FROM PUBLIC;
COMMENT ON FUNCTION @extschema@.cm_sources() IS 'each source with its watermark, the newest change its last read saw, its lag (time since the last cycle that read and applied it; NULL before the first, or when that time is not finite) and, while its reads fail, why and since when; opens no connection to queue-db';
