/*
 * Every wait on queue-db is bounded.
 *
 * libpq's connection establishment cannot be interrupted, and a remote
 * that accepts a connection and never answers (a hung pooler, a frozen
 * server) would otherwise hold it forever; keepalives and tcp_user_timeout
 * let the kernel notice a peer that is gone.  cm_attach_queue() adds these
 * libpq options to the foreign server when it does not set them itself;
 * a DBA's own values are kept.  The worker's cycle deadline
 * (consistency_manager.cycle_timeout) bounds the rest.
 */

CREATE FUNCTION cm.bound_remote_waits(server name)
    RETURNS text[]
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    have    text[];
    added   text[] := '{}';
    opt     record;
BEGIN
    SELECT coalesce(s.srvoptions, '{}') INTO have FROM pg_foreign_server s WHERE s.srvname = server;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'foreign server "%" does not exist', server
            USING ERRCODE = 'undefined_object';
    END IF;
    FOR opt IN
        SELECT * FROM (VALUES ('connect_timeout', '3'),
                              ('keepalives', '1'),
                              ('keepalives_idle', '30'),
                              ('keepalives_interval', '10'),
                              ('keepalives_count', '3'),
                              ('tcp_user_timeout', '30000')) AS v(name, value)
    LOOP
        IF NOT EXISTS (SELECT 1 FROM unnest(have) o WHERE split_part(o, '=', 1) = opt.name) THEN
            EXECUTE format('ALTER SERVER %I OPTIONS (ADD %I %L)', server, opt.name, opt.value);
            added := added || format('%s=%s', opt.name, opt.value);
        END IF;
    END LOOP;
    RETURN added;
END
$$;
COMMENT ON FUNCTION cm.bound_remote_waits(name) IS 'add connect_timeout, keepalives and tcp_user_timeout to a foreign server that does not set them; returns the options added';
REVOKE ALL ON FUNCTION cm.bound_remote_waits(name) FROM PUBLIC;
