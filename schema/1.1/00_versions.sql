/*
 * Versions: which schema is installed, which library is loaded.
 *
 * The library refuses to run a cycle against a schema it was not built for
 * (cm_check_schema_version in src/util.c); cm_status() shows both versions
 * so a DBA sees at once whether ALTER EXTENSION ... UPDATE is due.
 */

CREATE FUNCTION cm.library_version() RETURNS text
    AS 'MODULE_PATHNAME', 'cm_library_version'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION cm.library_version() IS 'the extension version the loaded library serves; it runs cycles only when the installed extension has that version';
REVOKE ALL ON FUNCTION cm.library_version() FROM PUBLIC;

CREATE OR REPLACE FUNCTION @extschema@.cm_status() RETURNS jsonb
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT jsonb_build_object(
            'extension_version', (SELECT e.extversion FROM pg_catalog.pg_extension e
                                   WHERE e.extname = 'consistency_manager'),
            'library_version', cm.library_version(),
            'stats', (SELECT to_jsonb(s) FROM @extschema@.cm_stats() s),
            'tiers', (SELECT jsonb_agg(to_jsonb(t) ORDER BY t.tier) FROM @extschema@.cm_tier_deltas() t),
            'polling_interval', current_setting('consistency_manager.polling_interval', true),
            'enabled', current_setting('consistency_manager.enabled', true),
            'sources', (SELECT jsonb_agg(to_jsonb(x) ORDER BY x.source_id) FROM @extschema@.cm_sources() x))
    $$;
COMMENT ON FUNCTION @extschema@.cm_status() IS 'one document with the extension and library versions, the statistics, the tier values and deltas, the polling interval and the sources';
