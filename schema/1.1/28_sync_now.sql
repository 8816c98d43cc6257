/*
 * cm_sync_now(keep_connections): a manual cycle closes, when its
 * transaction ends, the connections to queue-db it opened (unless the
 * session already had postgres_fdw connections, or keep_connections is
 * true).  cm_sync_now() without an argument, as in 1.0, does the same with
 * keep_connections = false; its privileges are untouched by the update.
 */

CREATE FUNCTION @extschema@.cm_sync_now(keep_connections boolean,
        OUT sources integer, OUT rows_read bigint, OUT created bigint, OUT updated bigint,
        OUT completed_applied bigint, OUT compensated bigint, OUT dead_lettered bigint,
        OUT duration_ms double precision)
    RETURNS record
    AS 'MODULE_PATHNAME', 'cm_sync_now'
    LANGUAGE C VOLATILE STRICT SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.cm_sync_now(boolean) IS 'run one sync cycle now, in the caller''s transaction (waits for a cycle the worker runs); with keep_connections = false, close at the end of the transaction the connections to queue-db it opened';
REVOKE ALL ON FUNCTION @extschema@.cm_sync_now(boolean) FROM PUBLIC;

COMMENT ON FUNCTION @extschema@.cm_sync_now() IS 'run one sync cycle now, in the caller''s transaction (waits for a cycle the worker runs), and report what it did; the connections to queue-db it opened are closed when the transaction ends (see cm_sync_now(keep_connections))';
