/*
 * Who holds the cycle lock, and for how long the worker has gone without it.
 *
 * Only one cycle runs at a time in a database (the advisory lock
 * pg_advisory_xact_lock(17229, 1), src/util.c); the worker skips its turn
 * while another session holds it.  A cm_sync_now() in a transaction left
 * open holds it until that transaction ends, and the worker then skips
 * every turn.  cm_cycle_lock() says who holds it and since when the worker
 * has skipped its turns; cm_health() warns when that lasts too long.
 */

CREATE FUNCTION cm.worker_skipping_since() RETURNS timestamptz
    AS 'MODULE_PATHNAME', 'cm_worker_skipping_since'
    LANGUAGE C VOLATILE;
COMMENT ON FUNCTION cm.worker_skipping_since() IS 'since when the sync worker has skipped every turn because another session held the cycle lock; NULL when its last turn was not skipped or no worker runs';
REVOKE ALL ON FUNCTION cm.worker_skipping_since() FROM PUBLIC;

CREATE FUNCTION @extschema@.cm_cycle_lock(
        OUT held boolean, OUT holder_pid integer, OUT holder_state text,
        OUT holder_xact_start timestamptz, OUT worker_skipping_since timestamptz)
    RETURNS record
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT l.granted IS NOT NULL, l.pid, coalesce(a.state, CASE WHEN l.granted AND l.pid IS NULL
                                                                    THEN 'prepared transaction' END),
               a.xact_start, cm.worker_skipping_since()
          FROM (SELECT 1) AS one
          LEFT JOIN pg_catalog.pg_locks l
                 ON l.locktype = 'advisory' AND l.granted
                AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d
                                   WHERE d.datname = pg_catalog.current_database())
                AND l.classid = 17229 AND l.objid = 1 AND l.objsubid = 2
          LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
    $$;
COMMENT ON FUNCTION @extschema@.cm_cycle_lock() IS 'the cycle lock of this database (pg_advisory_xact_lock(17229, 1)): whether it is held, by which backend, its state and transaction start; and since when the sync worker has skipped its turns for want of it (NULL when it has not)';
REVOKE ALL ON FUNCTION @extschema@.cm_cycle_lock() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.cm_cycle_lock() TO pg_monitor;
