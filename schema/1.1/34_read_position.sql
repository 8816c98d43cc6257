/*
 * Where the next read of a source starts.
 *
 * The read position is a keyset, (updated_at, queue_id) of the last row
 * read (watermark, watermark_id): a cycle after a catch-up reads nothing
 * it has already read, however many rows share one updated_at.
 *
 * A row invisible to a read was written by a queue-db transaction open at
 * that moment, and the queue's trigger stamps updated_at with that
 * transaction's start: so it is no older than the oldest transaction then
 * open.  Each read records that time (read_horizon), from queue-db's
 * pg_stat_activity read through a foreign table of its own per server
 * (cm_remote.activity_<server oid>), and the next read starts from the older
 * of the position and the horizon, less consistency_manager.lookback_window
 * (a margin, 0 by default, for applications that stamp updated_at with their
 * own clock).  When queue-db does not show the read's role the other
 * sessions (no pg_read_all_stats), the horizon is the read's time less
 * consistency_manager.lookback_fallback instead, and cm_health() says so.
 */

/*
 * cm.attach_activity(server): the foreign table over queue-db's
 * pg_stat_activity for one server, created once, a member of the extension,
 * readable by the sync role.  Named by the server's OID, so that it fits
 * NAMEDATALEN whatever the server's name.  cm_attach_queue() calls it.
 */
CREATE FUNCTION cm.attach_activity(server name)
    RETURNS regclass
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    srv  oid;
    rel  text;
BEGIN
    SELECT s.oid INTO srv FROM pg_foreign_server s WHERE s.srvname = server;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'foreign server "%" does not exist', server USING ERRCODE = 'undefined_object';
    END IF;
    rel := format('cm_remote.%I', 'activity_' || srv);
    IF to_regclass(rel) IS NULL THEN
        EXECUTE format('CREATE FOREIGN TABLE %s (datid oid, datname name, backend_type text, state text,'
                       ' xact_start timestamptz, query_start timestamptz, state_change timestamptz) SERVER %I'
                       ' OPTIONS (schema_name %L, table_name %L, updatable %L)',
                       rel, server, 'pg_catalog', 'pg_stat_activity', 'false');
        IF NOT EXISTS (SELECT 1 FROM pg_depend d
                        WHERE d.classid = 'pg_class'::regclass AND d.objid = rel::regclass
                          AND d.deptype = 'e') THEN
            EXECUTE format('ALTER EXTENSION consistency_manager ADD FOREIGN TABLE %s', rel);
        END IF;
        EXECUTE format('COMMENT ON FOREIGN TABLE %s IS %L', rel,
                       format('queue-db''s pg_stat_activity through server %s: the sync cycle reads the start of the oldest open transaction there', server));
    END IF;
    IF NOT has_table_privilege(cm.sync_role(), rel, 'SELECT') THEN
        EXECUTE format('GRANT SELECT ON %s TO %s', rel, cm.sync_role());
    END IF;
    RETURN rel::regclass;
END
$$;
COMMENT ON FUNCTION cm.attach_activity(name) IS 'create (once) the foreign table over queue-db''s pg_stat_activity of one server, which the cycle reads to follow queue-db''s open transactions, and let the sync role read it';
REVOKE ALL ON FUNCTION cm.attach_activity(name) FROM PUBLIC;

-- the servers attached in 1.0 get theirs now
SELECT cm.attach_activity(s.srvname)
  FROM pg_foreign_server s
 WHERE s.srvname IN (SELECT DISTINCT server_name FROM cm.source);
