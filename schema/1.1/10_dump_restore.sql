/*
 * pg_dump and pg_restore.
 *
 * pg_dump writes CREATE EXTENSION (not the extension's objects) and the
 * rows of the tables registered with pg_extension_config_dump; pg_restore
 * runs the install script, then COPYs those rows in.  Under 1.0 that lost
 * state twice over:
 *
 *  - cm.tier_value and cm.status_map are seeded by the install script, so
 *    the COPY of their dumped rows hit the seeded keys and failed as a
 *    whole: custom tier values and status mappings were silently replaced
 *    by the defaults.  An INSERT of a key these tables already hold now
 *    replaces that row (a BEFORE INSERT trigger turns it into an UPDATE),
 *    so the restored rows win over the defaults.
 *  - the identity sequences of cm.tier_value_history, cm.source and
 *    cm.cycle_history were not dumped, so after a restore the next history
 *    row or source collided with a restored id.  They are registered now,
 *    and pg_dump writes their positions.
 *
 * The foreign tables in cm_remote are extension members, which pg_dump
 * never writes; the foreign servers and user mappings are not members and
 * are dumped.  A restored database gets its foreign tables back from
 * cm_attach_queue() (README, "Backup and restore"), which keeps each
 * source's id, watermark and enabled flag.
 */

CREATE FUNCTION cm.tier_value_replace() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $$
BEGIN
    UPDATE cm.tier_value t
       SET pool_value = NEW.pool_value,
           market_value = NEW.market_value,
           updated_at = NEW.updated_at,
           updated_by = NEW.updated_by
     WHERE t.tier = NEW.tier;
    IF FOUND THEN
        RETURN NULL;            -- the existing row now holds the new values
    END IF;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION cm.tier_value_replace() IS 'trigger of cm.tier_value: an INSERT of an existing tier replaces its values (pg_restore''s COPY replaces the defaults of CREATE EXTENSION)';
REVOKE ALL ON FUNCTION cm.tier_value_replace() FROM PUBLIC;

CREATE TRIGGER replace_existing_tier
    BEFORE INSERT ON cm.tier_value
    FOR EACH ROW EXECUTE FUNCTION cm.tier_value_replace();
COMMENT ON TRIGGER replace_existing_tier ON cm.tier_value IS 'an INSERT of an existing tier updates it instead, so that restoring a dump keeps the dumped tier values';

CREATE FUNCTION cm.status_map_replace() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $$
BEGIN
    UPDATE cm.status_map m
       SET portfolio_status = NEW.portfolio_status
     WHERE m.queue_status = NEW.queue_status;
    IF FOUND THEN
        RETURN NULL;            -- the existing row now holds the new mapping
    END IF;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION cm.status_map_replace() IS 'trigger of cm.status_map: an INSERT of an existing queue status replaces its mapping (pg_restore''s COPY replaces the defaults of CREATE EXTENSION)';
REVOKE ALL ON FUNCTION cm.status_map_replace() FROM PUBLIC;

CREATE TRIGGER replace_existing_status
    BEFORE INSERT ON cm.status_map
    FOR EACH ROW EXECUTE FUNCTION cm.status_map_replace();
COMMENT ON TRIGGER replace_existing_status ON cm.status_map IS 'an INSERT of an existing queue status updates its mapping instead, so that restoring a dump keeps the dumped mappings';

SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('cm.tier_value_history', 'change_id')::pg_catalog.regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('cm.source', 'source_id')::pg_catalog.regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('cm.cycle_history', 'cycle_id')::pg_catalog.regclass, '');
