/*
 * cm_health() answers at once, whatever state queue-db is in: it opens no
 * remote connection.  It reads the worker's state from shared memory
 * (cm_stats()) and what the worker is doing now from pg_stat_activity,
 * where the cycle names the source and server it is reading.
 *
 * It warns when the worker has skipped its turns for longer than
 * max(30 s, 10 * polling_interval) because another session holds the cycle
 * lock (a cm_sync_now() in a transaction left open), naming that session
 * (cm_cycle_lock(), 34_cycle_lock.sql).
 */

CREATE OR REPLACE FUNCTION @extschema@.cm_health(
        OUT healthy boolean, OUT worker_running boolean, OUT queue_reachable boolean, OUT detail text)
    RETURNS record
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    st       record;
    waiting  record;
    problems text[] := '{}';
    sync     record;
    failing  record;
    lck      record;
    skip_limit interval;
    notes    text[] := '{}';
    unplaced bigint;
    win      record;
BEGIN
    SELECT * INTO st FROM @extschema@.cm_stats();
    worker_running := st.worker_pid IS NOT NULL;
    queue_reachable := true;

    IF NOT worker_running THEN
        problems := problems || format('worker not running (%s)', st.worker_state);
    ELSE
        -- a read of queue-db that has not answered for a while
        SELECT a.query, now() - a.query_start AS waited INTO waiting
          FROM pg_catalog.pg_stat_activity a
         WHERE a.pid = st.worker_pid
           AND a.query LIKE 'consistency_manager: reading queue-db%'
           AND a.state = 'active'
           AND a.query_start < now() - interval '10 s';
        IF FOUND THEN
            queue_reachable := false;
            problems := problems || format('the worker has waited %s s for queue-db: %s',
                                           round(extract(epoch FROM waiting.waited)),
                                           substr(waiting.query, length('consistency_manager: reading queue-db ') + 1));
        END IF;
        -- a session that keeps the cycle lock: the worker skips every turn
        skip_limit := greatest(interval '30 s',
                               10 * coalesce(current_setting('consistency_manager.polling_interval', true)::interval,
                                             interval '30 s'));
        SELECT * INTO lck FROM @extschema@.cm_cycle_lock();
        IF lck.held AND lck.worker_skipping_since < now() - skip_limit THEN
            problems := problems || format('the worker has skipped its turns for %s s: the cycle lock is held by %s',
                round(extract(epoch FROM now() - lck.worker_skipping_since)),
                CASE WHEN lck.holder_pid IS NULL THEN 'a prepared transaction (see pg_prepared_xacts)'
                     ELSE format('pid %s (%s, transaction open for %s s)', lck.holder_pid,
                                 coalesce(lck.holder_state, 'unknown state'),
                                 coalesce(round(extract(epoch FROM now() - lck.holder_xact_start))::text, '?'))
                END);
        END IF;
        IF st.consecutive_failures > 0 THEN
            problems := problems || format('last %s cycles failed: %s', st.consecutive_failures, st.last_error);
            IF st.last_error ~* '(could not connect|connection to server|server closed the connection|cycle_timeout|\(SQLSTATE (08|28))' THEN
                queue_reachable := false;
            END IF;
        END IF;
    END IF;

    -- a source that fails alone (the others sync): named, with its error
    FOR failing IN
        SELECT s.source_id, format('%I.%I', s.table_schema, s.table_name) AS foreign_table,
               s.server_name, s.last_error, s.last_error_at
          FROM cm.source s
         WHERE s.enabled AND s.last_error IS NOT NULL
         ORDER BY s.source_id
    LOOP
        problems := problems || format('source %s (%s, server %s) fails since %s: %s',
                                       failing.source_id, failing.foreign_table, failing.server_name,
                                       failing.last_error_at, failing.last_error);
        IF failing.last_error ~* '(could not connect|connection to server|server closed the connection|\(SQLSTATE (08|28))' THEN
            queue_reachable := false;
        END IF;
    END LOOP;

    IF NOT EXISTS (SELECT 1 FROM cm.source WHERE enabled) THEN
        problems := problems || 'no enabled source: attach one with cm_attach_queue()'::text;
    END IF;

    -- the read window (34_read_position.sql): warnings, not failures
    FOR win IN
        SELECT s.server_name, bool_and(s.horizon_visible) AS visible,
               min(s.oldest_open_xact) AS oldest,
               string_agg(s.source_id::text, ', ' ORDER BY s.source_id) AS ids
          FROM cm.source s
         WHERE s.enabled AND s.horizon_visible IS NOT NULL
         GROUP BY s.server_name ORDER BY s.server_name
    LOOP
        IF NOT win.visible THEN
            notes := notes || format('server %s hides the open transactions of other roles: sources %s re-read the fixed consistency_manager.lookback_fallback each cycle (GRANT pg_read_all_stats TO the queue-db role of the user mapping)',
                                     win.server_name, win.ids);
        ELSIF win.oldest < now() - interval '5 min' THEN
            notes := notes || format('a queue-db transaction on server %s open since %s (%s min) holds the read window of sources %s open: every cycle reads again what changed since',
                                     win.server_name, win.oldest,
                                     round(extract(epoch FROM now() - win.oldest) / 60), win.ids);
        END IF;
    END LOOP;
    SELECT count(*) INTO unplaced FROM cm.dead_letter d WHERE d.reason LIKE 'updated_at is %';
    IF unplaced > 0 THEN
        notes := notes || format('%s queue rows have no place in the order of updated_at (NULL or infinite): see cm_dead_letters()',
                                 unplaced);
    END IF;

    -- a column type that changed in queue-db, followed by the cycle (35_type_drift.sql): for a day
    notes := notes || ARRAY(
        SELECT format('source %s (%I.%I, server %s): queue-db changed column types, and the cycle re-imported them at %s: %s',
                      s.source_id, s.table_schema, s.table_name, s.server_name, s.reimported_at, s.reimported_columns)
          FROM cm.source s
         WHERE s.enabled AND s.reimported_at > now() - interval '1 day'
         ORDER BY s.source_id);

    -- consumers of the event journal that fall behind (46_events.sql)
    notes := notes || cm.consumer_lag_notes();

    -- the sync role: superuser (a warning), privileges, user mappings (30_privileges.sql)
    SELECT * INTO sync FROM cm.sync_role_health();
    problems := problems || sync.problems;

    -- the last reconciliation's unrepaired differences (40_reconcile.sql)
    problems := problems || cm.reconciliation_health();

    healthy := cardinality(problems) = 0;
    detail := array_to_string(CASE WHEN healthy THEN ARRAY['ok'] ELSE problems END || sync.warnings || notes, '; ');
END
$$;
COMMENT ON FUNCTION @extschema@.cm_health() IS 'whether the worker runs, whether its reads of queue-db succeed, whether the sync role has what the cycle needs, and why not; answers from shared memory and the local catalogs, without connecting to queue-db';
