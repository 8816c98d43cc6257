/*
 * Dead letters an operator can read and close.
 *
 * cm_dead_letters() and cm_cycle_history() let a pg_monitor member follow
 * the troubleshooting table without privileges on schema cm.
 * cm_discard_dead_letter() closes a dead letter that can never apply: the
 * version of the queue row it holds is recorded in cm.discarded, and the
 * cycle never reads that version again (it is not even staged).  A newer
 * version of the queue row (its updated_at changed) is read as usual.
 */

CREATE TABLE cm.discarded (
    source_id      integer NOT NULL,
    queue_id       bigint NOT NULL,
    updated_at     timestamptz,
    uuid           text,
    accountid      text,
    status         text,
    reason         text NOT NULL,
    discard_reason text NOT NULL,
    discarded_by   name NOT NULL DEFAULT session_user,
    discarded_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_id, queue_id)
);
COMMENT ON TABLE cm.discarded IS 'dead letters closed with cm_discard_dead_letter(): the version of the queue row (updated_at) the cycle never reads again, who closed it, when and why';
COMMENT ON COLUMN cm.discarded.updated_at IS 'updated_at of the discarded version; a queue row with another updated_at is read again';
COMMENT ON COLUMN cm.discarded.reason IS 'why the row could not be applied (the dead letter''s reason)';
COMMENT ON COLUMN cm.discarded.discard_reason IS 'why the operator closed it';
REVOKE ALL ON cm.discarded FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('cm.discarded', '');

CREATE FUNCTION @extschema@.cm_discard_dead_letters(source_id integer, queue_ids bigint[], reason text)
    RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    missing bigint[];
    n       integer;
BEGIN
    IF reason IS NULL OR btrim(reason) = '' THEN
        RAISE EXCEPTION 'a reason is required to discard a dead letter'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Say why the row will never be applied, for example cm_discard_dead_letter(1, 42, ''duplicate request, refunded by hand'').';
    END IF;
    SELECT array_agg(q ORDER BY q) INTO missing
      FROM unnest(queue_ids) q
     WHERE NOT EXISTS (SELECT 1 FROM cm.dead_letter d
                        WHERE d.source_id = cm_discard_dead_letters.source_id AND d.queue_id = q);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'source % has no dead letter for queue_id %', source_id, array_to_string(missing, ', ')
            USING ERRCODE = 'no_data_found',
                  HINT = 'See SELECT * FROM cm_dead_letters(); nothing was discarded.';
    END IF;
    WITH closed AS (
        DELETE FROM cm.dead_letter d
         WHERE d.source_id = cm_discard_dead_letters.source_id AND d.queue_id = ANY (queue_ids)
        RETURNING d.*)
    INSERT INTO cm.discarded AS x (source_id, queue_id, updated_at, uuid, accountid, status,
                                   reason, discard_reason)
    SELECT c.source_id, c.queue_id, c.updated_at, c.uuid, c.accountid, c.status, c.reason,
           cm_discard_dead_letters.reason
      FROM closed c
    ON CONFLICT ON CONSTRAINT discarded_pkey DO UPDATE
       SET updated_at = excluded.updated_at, uuid = excluded.uuid, accountid = excluded.accountid,
           status = excluded.status, reason = excluded.reason,
           discard_reason = excluded.discard_reason, discarded_by = session_user,
           discarded_at = now();
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
COMMENT ON FUNCTION @extschema@.cm_discard_dead_letters(integer, bigint[], text) IS 'close dead letters that can never apply: recorded in cm.discarded with who, when and why, and never read again unless their queue row changes; all or nothing';
REVOKE ALL ON FUNCTION @extschema@.cm_discard_dead_letters(integer, bigint[], text) FROM PUBLIC;

CREATE FUNCTION @extschema@.cm_discard_dead_letter(source_id integer, queue_id bigint, reason text)
    RETURNS boolean
    LANGUAGE sql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$ SELECT @extschema@.cm_discard_dead_letters($1, ARRAY[$2], $3) = 1 $$;
COMMENT ON FUNCTION @extschema@.cm_discard_dead_letter(integer, bigint, text) IS 'close one dead letter that can never apply (see cm_discard_dead_letters)';
REVOKE ALL ON FUNCTION @extschema@.cm_discard_dead_letter(integer, bigint, text) FROM PUBLIC;

CREATE FUNCTION @extschema@.cm_dead_letters()
    RETURNS TABLE (source_id integer, queue_id bigint, uuid text, accountid text, status text,
                   reason text, first_seen timestamptz, last_seen timestamptz, attempts integer)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT d.source_id, d.queue_id, d.uuid, d.accountid, d.status, d.reason,
               d.first_seen, d.last_seen, d.attempts
          FROM cm.dead_letter d
         ORDER BY d.source_id, d.queue_id
    $$;
COMMENT ON FUNCTION @extschema@.cm_dead_letters() IS 'the dead letters: queue rows that could not be applied yet, with the reason; read-only, for pg_monitor';
REVOKE ALL ON FUNCTION @extschema@.cm_dead_letters() FROM PUBLIC;

CREATE FUNCTION @extschema@.cm_cycle_history(max_rows integer DEFAULT 100)
    RETURNS SETOF cm.cycle_history
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT * FROM cm.cycle_history h ORDER BY h.cycle_id DESC
         LIMIT CASE WHEN max_rows < 0 THEN 0 ELSE max_rows END
    $$;
COMMENT ON FUNCTION @extschema@.cm_cycle_history(integer) IS 'the newest max_rows rows of cm.cycle_history (cycles that did work or failed; all of them when max_rows is NULL, none when it is negative); read-only, for pg_monitor';
REVOKE ALL ON FUNCTION @extschema@.cm_cycle_history(integer) FROM PUBLIC;

GRANT EXECUTE ON FUNCTION @extschema@.cm_dead_letters(), @extschema@.cm_cycle_history(integer) TO pg_monitor;
