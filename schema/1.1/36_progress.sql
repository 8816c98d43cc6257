/*
 * cm_progress(): what the sync cycle of this database is doing now, for a
 * DBA watching a catch-up: the running cycle's step (the page of the source
 * it reads, the processing, the accounts), the rows it has read so far and
 * its rate, and the rows still behind every source with the time they take
 * at that rate.  Without a running cycle, the last one's rows and rate.
 * Reads shared memory and cm.source; opens no connection to queue-db.
 */
CREATE FUNCTION @extschema@.cm_progress(
        OUT running boolean, OUT pid integer, OUT phase text, OUT started_at timestamptz,
        OUT elapsed interval, OUT rows_read bigint, OUT rows_per_second numeric,
        OUT rows_behind bigint, OUT eta interval)
    RETURNS record
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
        WITH p AS (SELECT * FROM cm.cycle_progress()),
             r AS (SELECT p.*,
                          CASE WHEN p.pid IS NOT NULL
                               THEN extract(epoch FROM clock_timestamp() - p.started_at)
                               ELSE p.last_cycle_duration_ms / 1000.0 END AS secs,
                          CASE WHEN p.pid IS NOT NULL THEN p.rows_read ELSE p.last_cycle_rows END AS n
                     FROM p),
             b AS (SELECT sum(s.rows_behind)::bigint AS behind FROM cm.source s WHERE s.enabled)
        SELECT r.pid IS NOT NULL, r.pid, r.phase, r.started_at,
               CASE WHEN r.pid IS NOT NULL THEN clock_timestamp() - r.started_at END,
               r.n,
               CASE WHEN r.secs > 0 THEN round(r.n / r.secs::numeric, 1) END,
               b.behind,
               CASE WHEN b.behind > 0 AND r.n > 0 AND r.secs > 0
                    THEN make_interval(secs => round(b.behind * r.secs / r.n)) END
          FROM r CROSS JOIN b
    $$;
COMMENT ON FUNCTION @extschema@.cm_progress() IS 'the sync cycle running now in this database: its backend, step (source and page being read, processing, accounts), start, rows read so far and rate; without one, the last cycle''s rows and rate; and the rows still behind the enabled sources with the time they take at that rate';
REVOKE ALL ON FUNCTION @extschema@.cm_progress() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.cm_progress() TO pg_monitor;
