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

CREATE OR REPLACE FUNCTION @extschema@.cm_sources()
    RETURNS TABLE (source_id integer, foreign_table text, layout text, enabled boolean,
                   watermark timestamptz, last_synced_at timestamptz,
                   newest_change timestamptz, lag interval, dead_letters bigint)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT s.source_id, format('%I.%I', s.table_schema, s.table_name), s.layout, s.enabled,
               s.watermark, s.last_synced_at, s.newest_read,
               -- never an error, whatever the state: no lag for a time that is not finite
               CASE WHEN isfinite(s.last_synced_at) THEN greatest(now() - s.last_synced_at, interval '0') END,
               (SELECT count(*) FROM cm.dead_letter d WHERE d.source_id = s.source_id)
          FROM cm.source s
         ORDER BY s.source_id
    $$;
COMMENT ON FUNCTION @extschema@.cm_sources() IS 'each source with its watermark, the newest change its last read saw, and its lag (time since the last cycle that read and applied it; NULL before the first, or when that time is not finite); opens no connection to queue-db';
