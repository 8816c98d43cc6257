/*
 * cm_sync_now(keep_connections): a manual cycle closes, when its
 * transaction ends, the connections to queue-db it opened (unless the
 * session already had postgres_fdw connections, or keep_connections is
 * true).  cm_sync_now() without an argument, as in 1.0, does the same with
 * keep_connections = false; its privileges are untouched by the update.
 */

CREATE FUNCTION @extschema@.cm_sync_now(keep_connections boolean,
        until_caught_up boolean DEFAULT false,
        OUT sources integer, OUT rows_read bigint, OUT created bigint, OUT updated bigint,
        OUT completed_applied bigint, OUT compensated bigint, OUT dead_lettered bigint,
        OUT duration_ms double precision, OUT cycles integer, OUT behind boolean)
    RETURNS record
    AS 'MODULE_PATHNAME', 'cm_sync_now'
    LANGUAGE C VOLATILE STRICT SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION @extschema@.cm_sync_now(boolean, boolean) IS 'run one sync cycle now, in the caller''s transaction (waits for a cycle the worker runs), or with until_caught_up = true as many as it takes to read every source to its end (still one transaction: CALL cm_catch_up() commits after each); with keep_connections = false, close at the end of the transaction the connections to queue-db it opened; behind: a source stopped at consistency_manager.max_rows_per_cycle';
REVOKE ALL ON FUNCTION @extschema@.cm_sync_now(boolean, boolean) FROM PUBLIC;

/*
 * cm_catch_up(): bounded cycles, each committed, until every source is read
 * to its end; a NOTICE after each says where it stands.  A procedure (CALL,
 * outside a transaction block) so that it can commit; it runs with the
 * caller's rights and needs EXECUTE on cm_sync_now(boolean, boolean).  It
 * has no SET search_path (a procedure with one cannot commit): every name
 * in it is qualified.
 */
CREATE PROCEDURE @extschema@.cm_catch_up(max_cycles integer DEFAULT NULL)
    LANGUAGE plpgsql
AS $$
DECLARE
    r record;
    n integer := 0;
    total bigint := 0;
    t0 timestamptz := pg_catalog.clock_timestamp();
BEGIN
    IF max_cycles IS NOT NULL AND max_cycles < 1 THEN
        RAISE EXCEPTION 'max_cycles must be at least 1, not %', max_cycles
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Leave it NULL to run cycles until every source is caught up.';
    END IF;
    LOOP
        SELECT * INTO r FROM @extschema@.cm_sync_now(false, false);
        COMMIT;
        n := n + 1;
        total := total + r.rows_read;
        RAISE NOTICE 'cycle %: % rows read (% in all, % rows/s)%', n, r.rows_read, total,
            pg_catalog.round(total / GREATEST(EXTRACT(epoch FROM pg_catalog.clock_timestamp() - t0), 0.001)),
            CASE WHEN r.behind THEN pg_catalog.format(', about %s rows behind',
                     coalesce((SELECT pg_catalog.sum(s.rows_behind)::text FROM @extschema@.cm_sources() s), 'an unknown number of'))
                 ELSE ', caught up' END;
        EXIT WHEN NOT r.behind OR n >= max_cycles;
    END LOOP;
END
$$;
COMMENT ON PROCEDURE @extschema@.cm_catch_up(integer) IS 'run bounded sync cycles (consistency_manager.max_rows_per_cycle rows per source), committing after each, until every source is caught up or max_cycles ran; a NOTICE after each cycle gives the rows read, the rate and the rows still behind';
REVOKE ALL ON PROCEDURE @extschema@.cm_catch_up(integer) FROM PUBLIC;

COMMENT ON FUNCTION @extschema@.cm_sync_now() IS 'run one sync cycle now, in the caller''s transaction (waits for a cycle the worker runs), and report what it did; the connections to queue-db it opened are closed when the transaction ends (see cm_sync_now(keep_connections))';
