/*
 * cm_sources() answers from local state: it opens no connection to
 * queue-db (a dashboard polling it must not hold one connection per
 * foreign server per session, nor wait on a hung remote).  Every cycle
 * records, per source it read successfully, when it read it and its read
 * position (the newest change read); lag is the time since that read.
 */

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

/*
 * The read position and the horizon of the next read (34_read_position.sql
 * explains them); cm_sources() shows where the next read starts and why.
 */
ALTER TABLE cm.source
    ADD COLUMN watermark_id bigint,
    ADD COLUMN read_horizon timestamptz,
    ADD COLUMN oldest_open_xact timestamptz,
    ADD COLUMN horizon_visible boolean,
    ADD COLUMN probed_at timestamptz;
COMMENT ON COLUMN cm.source.watermark IS 'read position, part one: updated_at of the last row read from queue-db (rows are read in (updated_at, queue_id) order)';
COMMENT ON COLUMN cm.source.watermark_id IS 'read position, part two: queue_id of the last row read; with watermark, a keyset';
COMMENT ON COLUMN cm.source.read_horizon IS 'the oldest updated_at a row invisible to the last read can have: the start of the oldest queue-db transaction then open (or the read''s time less lookback_fallback when queue-db hides other sessions); the next read starts no later';
COMMENT ON COLUMN cm.source.oldest_open_xact IS 'start of the oldest other transaction open in queue-db at the last read (NULL: none, or not visible)';
COMMENT ON COLUMN cm.source.probed_at IS 'queue-db''s clock when the last read asked its pg_stat_activity (the next read''s horizon is no later: see 34_read_position.sql)';
COMMENT ON COLUMN cm.source.horizon_visible IS 'whether the last read could see every queue-db session''s transaction start (false: the remote role lacks pg_read_all_stats and the fixed lookback_fallback applies)';

/*
 * The cycle running now in this database and the last one finished, from
 * shared memory (NULL without shared_preload_libraries): cm_progress() and
 * cm_sources() read it.
 */
CREATE FUNCTION cm.cycle_progress(OUT pid integer, OUT phase text, OUT started_at timestamptz,
        OUT rows_read bigint, OUT last_cycle_rows bigint, OUT last_cycle_duration_ms double precision)
    RETURNS record
    AS 'MODULE_PATHNAME', 'cm_cycle_progress'
    LANGUAGE C VOLATILE STRICT;
COMMENT ON FUNCTION cm.cycle_progress() IS 'the sync cycle running now in this database (backend, step, start, rows read so far; NULL when none runs) and the rows and duration of the last one finished';
REVOKE ALL ON FUNCTION cm.cycle_progress() FROM PUBLIC;

/*
 * Progress of a catch-up read in bounded cycles (max_rows_per_cycle): the
 * rows still past the read position, counted on queue-db when a cycle stops
 * at the limit (at most every five minutes) and less the rows read since in
 * between; 0 once a read gets to the end.
 */
ALTER TABLE cm.source
    ADD COLUMN rows_behind bigint,
    ADD COLUMN rows_behind_at timestamptz;
COMMENT ON COLUMN cm.source.rows_behind IS 'rows of queue-db past the read position after the last read: 0 when it read to the end; when it stopped at max_rows_per_cycle, counted on queue-db (at most every 5 minutes) less the rows read since';
COMMENT ON COLUMN cm.source.rows_behind_at IS 'when rows_behind was last counted (or found to be 0)';

-- new result columns: the 1.0 function is replaced, not altered
DROP FUNCTION @extschema@.cm_sources();
CREATE FUNCTION @extschema@.cm_sources()
    RETURNS TABLE (source_id integer, foreign_table text, layout text, enabled boolean,
                   watermark timestamptz, last_synced_at timestamptz,
                   newest_change timestamptz, lag interval, dead_letters bigint,
                   last_error text, failing_since timestamptz,
                   next_read_from timestamptz, read_window text,
                   rows_behind bigint, eta interval)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT s.source_id, format('%I.%I', s.table_schema, s.table_name), s.layout, s.enabled,
               s.watermark, s.last_synced_at, s.watermark,
               -- never an error, whatever the state: no lag for a time that is not finite
               CASE WHEN isfinite(s.last_synced_at) THEN greatest(now() - s.last_synced_at, interval '0') END,
               (SELECT count(*) FROM cm.dead_letter d WHERE d.source_id = s.source_id),
               s.last_error, s.last_error_at,
               -- where the next read starts (stage_source in cycle.c), and what set it
               CASE WHEN s.watermark IS NULL OR NOT isfinite(s.watermark) THEN '-infinity'::timestamptz
                    ELSE CASE WHEN s.read_horizon IS NULL
                              THEN s.watermark - coalesce(current_setting('consistency_manager.lookback_fallback', true)::interval,
                                                          interval '2 min')
                              ELSE least(s.watermark, s.read_horizon) END
                         - coalesce(current_setting('consistency_manager.lookback_window', true)::interval, interval '0')
               END,
               CASE WHEN s.read_horizon IS NULL THEN 'lookback_fallback (queue-db''s open transactions not read yet)'
                    WHEN NOT s.horizon_visible THEN 'lookback_fallback (queue-db hides other roles'' sessions: grant pg_read_all_stats)'
                    WHEN s.oldest_open_xact < s.watermark THEN 'oldest open queue-db transaction'
                    ELSE 'read position' END,
               s.rows_behind,
               -- at the rate of the last cycle that read rows in this database
               CASE WHEN s.rows_behind > 0 AND p.last_cycle_rows > 0 AND p.last_cycle_duration_ms > 0
                    THEN make_interval(secs => round(s.rows_behind * p.last_cycle_duration_ms
                                                     / p.last_cycle_rows / 1000.0)) END
          FROM cm.source s
          LEFT JOIN cm.cycle_progress() p ON true
         ORDER BY s.source_id
    $$;
REVOKE ALL ON FUNCTION @extschema@.cm_sources() FROM PUBLIC;
COMMENT ON FUNCTION @extschema@.cm_sources() IS 'each source with its read position (watermark), the newest change its last read saw, its lag (time since the last cycle that read and applied it; NULL before the first, or when that time is not finite), while its reads fail why and since when, where its next read starts and what set that, the rows still behind its read position (see cm.source.rows_behind) and the time they take at the last cycle''s rate; opens no connection to queue-db';
