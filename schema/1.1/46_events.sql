/*
 * The event journal (outbox) and its consumers.
 *
 * cm.event is append-only: the sync cycle writes one row per transaction
 * created, status changed, effect applied or compensated and row
 * dead-lettered, set-based, in the cycle's own transaction, and announces
 * each committed cycle that wrote some with one NOTIFY consistency_manager
 * (payload: first and last event_id).
 *
 * event_id is strictly increasing in commit order, so a consumer that
 * reads "event_id > my offset" never skips an event: only the cycle writes
 * the journal (no other role has INSERT), the cycle holds the cycle lock
 * (an advisory lock at transaction level) from before its first event to
 * after its commit is visible, and the identity is only ever drawn inside
 * a cycle.  So every id of a cycle is greater than every id of the cycles
 * committed before it, and a reader that sees a cycle sees all earlier
 * ones.  A cycle rolled back leaves a gap in the ids, never a late id.
 *
 * Consumers are named offsets in cm.consumer, advanced by cm_events_ack()
 * in the caller's transaction: a consumer that writes its results in this
 * database and acknowledges in the same transaction processes each event
 * exactly once.
 */

/*
 * cm.journal stores what the cycle knows as typed columns (the queue row,
 * the factors or amounts, the account's values before and after as
 * numeric[]); the jsonb payload of an event is built only when it is read,
 * by the view cm.event.  Building jsonb in the cycle (every numeric printed
 * and parsed) and storing it (0.7 to 1 kB a row) cost the cycle about as
 * much as the rest of a catch-up; the typed row is a third of the size.
 * With consistency_manager.event_payload on, the cycle also stores the
 * payload in cm.journal.payload, for Debezium's outbox event router, which
 * reads the table itself from the WAL (see the README).
 *
 * An effect's account values before and after are the same for every
 * effect the cycle's one update of that account combined, so they are
 * stored once per account and cycle, in cm.journal_account, which the
 * effects reach by (cycle, accountid).  The effects are then written by the
 * processing statement itself, with the other events of their rows and in
 * the same queue order, before the accounts are updated.  With
 * event_payload on, a stored payload must hold the values before and after,
 * so the effects are written after the accounts, each with its values
 * (before, after, effects_in_cycle), as one row per effect.
 */
CREATE TABLE cm.journal (
    event_id    bigint GENERATED ALWAYS AS IDENTITY (CACHE 1) PRIMARY KEY,
    occurred_at timestamptz NOT NULL DEFAULT now(),
    source_id   integer,
    uuid        uuid,
    accountid   text,
    event_type  text NOT NULL
        CONSTRAINT journal_event_type_check CHECK (event_type IN ('transaction_created', 'status_changed',
            'transaction_updated', 'effect_applied', 'effect_compensated', 'dead_lettered')),
    queue_row   cm.event_queue_row,
    portfolio_status text,
    previous_status text,
    adopted     boolean,
    reason      text,
    policy      text,
    kind        text,
    factors     numeric[],
    amounts     numeric[],
    before      numeric[],
    after       numeric[],
    effects_in_cycle integer,
    payload     jsonb,
    cycle       bigint
);
-- No index by account: an account's effects are found through
-- cm.journal_account (accountid, cycle) and the event_id range of each of
-- those cycles (see cm_account_history).  An index of the effects by
-- (accountid, event_id) took a random place in a btree per effect, a quarter
-- of the journal's cost to a catch-up (bench/results/events).
COMMENT ON TABLE cm.journal IS 'append-only journal of the sync cycle (outbox), as typed columns: one row per transaction created, status changed, effect applied or compensated and row dead-lettered; event_id increases in commit order; read it through the view cm.event';
COMMENT ON COLUMN cm.journal.event_id IS 'position in the journal: strictly increasing in commit order (only the sync cycle writes it, under the cycle lock)';
COMMENT ON COLUMN cm.journal.occurred_at IS 'start of the cycle''s transaction that wrote the event';
COMMENT ON COLUMN cm.journal.event_type IS 'transaction_created, status_changed, transaction_updated, effect_applied, effect_compensated or dead_lettered';
COMMENT ON COLUMN cm.journal.queue_row IS 'the queue row as the cycle read it';
COMMENT ON COLUMN cm.journal.portfolio_status IS 'transaction or dead letter: the status the portfolio transaction got';
COMMENT ON COLUMN cm.journal.previous_status IS 'transaction: the status the ledger had before';
COMMENT ON COLUMN cm.journal.adopted IS 'transaction: the portfolio transaction existed already and was adopted';
COMMENT ON COLUMN cm.journal.reason IS 'dead letter: why the row cannot be applied';
COMMENT ON COLUMN cm.journal.policy IS 'effect: the effect policy applied or undone';
COMMENT ON COLUMN cm.journal.kind IS 'effect: investment or withdrawal';
COMMENT ON COLUMN cm.journal.factors IS 'effect (market_delta): the factors of tiers 1 to 3';
COMMENT ON COLUMN cm.journal.amounts IS 'effect (amount): the amounts added to tiers 1 to 3';
COMMENT ON COLUMN cm.journal.before IS 'effect: the account''s tier1..3_value, total_value, tier1..3_allocation, total_allocation before the cycle''s update of the account';
COMMENT ON COLUMN cm.journal.after IS 'effect: the same values after the cycle''s update of the account';
COMMENT ON COLUMN cm.journal.effects_in_cycle IS 'effect: how many effects the cycle''s one update of the account combined';
COMMENT ON COLUMN cm.journal.cycle IS 'the cycle that wrote the event, a key shared by the events of one cycle: the last event_id before it, or one past the newest key of cm.journal_account when that is larger (a key is never used twice); an effect without its own before and after finds them in cm.journal_account by (cycle, accountid)';
COMMENT ON COLUMN cm.journal.payload IS 'the event''s jsonb payload, stored only with consistency_manager.event_payload on (for Debezium''s outbox event router); otherwise NULL, and cm.event builds it when read';
REVOKE ALL ON cm.journal FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('cm.journal', '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('cm.journal', 'event_id')::pg_catalog.regclass, '');

CREATE TABLE cm.journal_account (
    cycle     bigint NOT NULL,
    accountid text NOT NULL,
    before    numeric[],
    after     numeric[],
    effects   integer NOT NULL,
    PRIMARY KEY (cycle, accountid)
);
-- the cycles that changed an account (cm_account_history, cm_verify_accounts)
CREATE INDEX journal_account_accountid_idx ON cm.journal_account (accountid, cycle);
COMMENT ON TABLE cm.journal_account IS 'the account values around each update of an account by the sync cycle: one row per cycle and account it changed, shared by the effects of cm.journal the update combined (with event_payload on, each effect also carries them); the index of an account''s effects; removed with the last of them';
COMMENT ON COLUMN cm.journal_account.cycle IS 'the cycle (cm.journal.cycle)';
COMMENT ON COLUMN cm.journal_account.before IS 'tier1..3_value, total_value, tier1..3_allocation, total_allocation before the cycle''s update of the account';
COMMENT ON COLUMN cm.journal_account.after IS 'the same values after the update (what it wrote, triggers included)';
COMMENT ON COLUMN cm.journal_account.effects IS 'how many effects the update combined';
REVOKE ALL ON cm.journal_account FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('cm.journal_account', '');

-- per account, how many effects of the running cycle it combines
ALTER TABLE cm.batch_account ADD COLUMN effects integer;
COMMENT ON COLUMN cm.batch_account.effects IS 'how many effects (completions applied or compensated) these factors and amounts combine';

/* An account's eight values (cm.journal.before, after) as a payload's jsonb. */
CREATE FUNCTION cm.event_account_jsonb(v numeric[])
    RETURNS jsonb
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
        SELECT to_jsonb(ROW(v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8])::cm.event_account)
    $$;
COMMENT ON FUNCTION cm.event_account_jsonb(numeric[]) IS 'an account''s tier1..3_value, total_value, tier1..3_allocation, total_allocation as the jsonb of an event''s before or after';
REVOKE ALL ON FUNCTION cm.event_account_jsonb(numeric[]) FROM PUBLIC;

/*
 * An event's jsonb payload from its typed columns: the queue row, and for
 * effects the policy, the factors or amounts, the account's values before
 * and after and effects_in_cycle (an effect's own, or those of its row x of
 * cm.journal_account).
 */
CREATE FUNCTION cm.event_payload(j cm.journal, x cm.journal_account DEFAULT NULL)
    RETURNS jsonb
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$
        SELECT CASE WHEN j.event_type IN ('effect_applied', 'effect_compensated') THEN
                    to_jsonb(ROW(j.queue_row, j.policy, j.kind, j.factors, j.amounts)::cm.event_effect)
                    || jsonb_build_object(
                        'before', cm.event_account_jsonb(coalesce(j.before, x.before)),
                        'after', cm.event_account_jsonb(coalesce(j.after, x.after)),
                        'effects_in_cycle', coalesce(j.effects_in_cycle, x.effects))
               ELSE to_jsonb(ROW(j.queue_row, j.portfolio_status, j.previous_status, j.adopted,
                                 j.reason)::cm.event_change)
               END
    $$;
COMMENT ON FUNCTION cm.event_payload(cm.journal, cm.journal_account) IS 'the jsonb payload of an event of the journal, built from its typed columns, and for an effect without its own before and after from the row of cm.journal_account of its cycle and account';
REVOKE ALL ON FUNCTION cm.event_payload(cm.journal, cm.journal_account) FROM PUBLIC;

CREATE VIEW cm.event AS
    SELECT j.event_id, j.occurred_at, j.source_id, j.uuid, j.accountid, j.event_type,
           coalesce(j.payload, cm.event_payload(j, x)) AS payload
      FROM cm.journal j
      LEFT JOIN cm.journal_account x
             ON j.after IS NULL AND j.event_type IN ('effect_applied', 'effect_compensated')
            AND x.cycle = j.cycle AND x.accountid = j.accountid;
COMMENT ON VIEW cm.event IS 'the journal of the sync cycle (outbox), one row per event, with its payload as jsonb (built when read from the typed columns of cm.journal); event_id increases in commit order';
COMMENT ON COLUMN cm.event.payload IS 'the queue row, and for effects the policy, the factors or amounts, and the account''s tier values and allocations before and after the cycle''s update of the account';
REVOKE ALL ON cm.event FROM PUBLIC;

CREATE VIEW cm.event_outbox AS
    SELECT e.event_id AS id, 'account'::text AS aggregatetype, e.accountid AS aggregateid,
           e.event_type AS type, e.payload, e.occurred_at, e.source_id, e.uuid
      FROM cm.event e;
COMMENT ON VIEW cm.event_outbox IS 'cm.event with the column names of Debezium''s outbox event router (id, aggregatetype, aggregateid, type, payload); Debezium itself reads cm.journal (with consistency_manager.event_payload on) with the field mappings of the README';
REVOKE ALL ON cm.event_outbox FROM PUBLIC;

CREATE TABLE cm.consumer (
    name        text PRIMARY KEY CONSTRAINT consumer_name_check CHECK (btrim(name) <> ''),
    acked_id    bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  name NOT NULL DEFAULT session_user,
    acked_at    timestamptz
);
COMMENT ON TABLE cm.consumer IS 'named readers of cm.event and their committed offsets (the last event_id each acknowledged)';
COMMENT ON COLUMN cm.consumer.acked_id IS 'last event_id acknowledged: cm_events() returns the events after it';
REVOKE ALL ON cm.consumer FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('cm.consumer', '');

CREATE FUNCTION @extschema@.cm_consumer_create(name text, from_start boolean DEFAULT false)
    RETURNS bigint
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    start bigint;
BEGIN
    IF name IS NULL OR btrim(name) = '' THEN
        RAISE EXCEPTION 'a consumer needs a name'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'For example SELECT cm_consumer_create(''notifications'');';
    END IF;
    start := CASE WHEN from_start THEN 0 ELSE coalesce((SELECT max(e.event_id) FROM cm.journal e), 0) END;
    INSERT INTO cm.consumer AS c (name, acked_id) VALUES (cm_consumer_create.name, start)
        ON CONFLICT ON CONSTRAINT consumer_pkey DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'consumer % already exists', quote_literal(name)
            USING ERRCODE = 'duplicate_object',
                  HINT = 'Read its events with cm_events(), or choose another name.';
    END IF;
    RETURN start;
END
$$;
COMMENT ON FUNCTION @extschema@.cm_consumer_create(text, boolean) IS 'register a consumer of the event journal; it reads the events after the current end (or all those retained, with from_start); returns its offset';
REVOKE ALL ON FUNCTION @extschema@.cm_consumer_create(text, boolean) FROM PUBLIC;

CREATE FUNCTION @extschema@.cm_consumer_drop(name text)
    RETURNS boolean
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
BEGIN
    DELETE FROM cm.consumer c WHERE c.name = cm_consumer_drop.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'consumer % does not exist', coalesce(quote_literal(name), 'NULL')
            USING ERRCODE = 'undefined_object',
                  HINT = 'See SELECT * FROM cm_consumers();';
    END IF;
    RETURN true;
END
$$;
COMMENT ON FUNCTION @extschema@.cm_consumer_drop(text) IS 'forget a consumer of the event journal (its unacknowledged events no longer hold back retention)';
REVOKE ALL ON FUNCTION @extschema@.cm_consumer_drop(text) FROM PUBLIC;

CREATE FUNCTION @extschema@.cm_events(consumer text, max_events integer DEFAULT 1000)
    RETURNS SETOF cm.event
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    offs bigint;
BEGIN
    IF max_events IS NULL OR max_events < 0 THEN
        RAISE EXCEPTION 'max_events must be zero or more, not %', coalesce(max_events::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'The default is 1000 events per call.';
    END IF;
    SELECT c.acked_id INTO offs FROM cm.consumer c WHERE c.name = consumer;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'consumer % does not exist', coalesce(quote_literal(consumer), 'NULL')
            USING ERRCODE = 'undefined_object',
                  HINT = 'Create it first: SELECT cm_consumer_create(''name'');';
    END IF;
    RETURN QUERY SELECT e.* FROM cm.event e WHERE e.event_id > offs
                  ORDER BY e.event_id LIMIT max_events;
END
$$;
COMMENT ON FUNCTION @extschema@.cm_events(text, integer) IS 'the next events of the journal for a consumer (after its acknowledged offset, oldest first, at most max_events); reading does not move the offset: acknowledge with cm_events_ack()';
REVOKE ALL ON FUNCTION @extschema@.cm_events(text, integer) FROM PUBLIC;

CREATE FUNCTION @extschema@.cm_events_ack(consumer text, event_id bigint)
    RETURNS bigint
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    offs bigint;
    last bigint;
BEGIN
    SELECT c.acked_id INTO offs FROM cm.consumer c WHERE c.name = consumer FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'consumer % does not exist', coalesce(quote_literal(consumer), 'NULL')
            USING ERRCODE = 'undefined_object',
                  HINT = 'Create it first: SELECT cm_consumer_create(''name'');';
    END IF;
    IF event_id IS NULL THEN
        RAISE EXCEPTION 'event_id must not be NULL'
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'Acknowledge the event_id of the last event processed.';
    END IF;
    IF event_id <= offs THEN
        RETURN offs;            -- acknowledged already
    END IF;
    SELECT max(e.event_id) INTO last FROM cm.journal e;
    IF last IS NULL OR event_id > last THEN
        RAISE EXCEPTION 'cannot acknowledge event % for consumer %: the journal ends at %',
                        event_id, quote_literal(consumer), coalesce(last, offs)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Acknowledge the event_id of an event cm_events() returned.';
    END IF;
    UPDATE cm.consumer c SET acked_id = event_id, acked_at = now() WHERE c.name = consumer;
    RETURN event_id;
END
$$;
COMMENT ON FUNCTION @extschema@.cm_events_ack(text, bigint) IS 'commit a consumer''s offset: the events up to event_id are processed; takes effect when the caller''s transaction commits; returns the offset';
REVOKE ALL ON FUNCTION @extschema@.cm_events_ack(text, bigint) FROM PUBLIC;

CREATE FUNCTION @extschema@.cm_consumers()
    RETURNS TABLE (name text, acked_id bigint, last_event_id bigint, lag_events bigint,
                   oldest_unacked_at timestamptz, created_at timestamptz, acked_at timestamptz)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT c.name, c.acked_id, l.last_id,
               (SELECT count(*) FROM cm.journal e WHERE e.event_id > c.acked_id),
               (SELECT e.occurred_at FROM cm.journal e WHERE e.event_id > c.acked_id
                 ORDER BY e.event_id LIMIT 1),
               c.created_at, c.acked_at
          FROM cm.consumer c
         CROSS JOIN (SELECT max(e.event_id) AS last_id FROM cm.journal e) l
         ORDER BY c.name
    $$;
COMMENT ON FUNCTION @extschema@.cm_consumers() IS 'each consumer of the event journal: its acknowledged offset, the last event, how many events it has not acknowledged and since when';
REVOKE ALL ON FUNCTION @extschema@.cm_consumers() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.cm_consumers() TO pg_monitor;

CREATE FUNCTION @extschema@.cm_account_history(accountid text)
    RETURNS TABLE (event_id bigint, occurred_at timestamptz, event_type text, source_id integer,
                   uuid uuid, policy text, before jsonb, after jsonb, payload jsonb)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
        -- the cycles that changed the account, then the account's effects
        -- among the events of each: event_ids after the cycle's key, up to
        -- the next cycle's key (cm_sql_journal_end)
        SELECT e.event_id, e.occurred_at, e.event_type, e.source_id, e.uuid,
               e.payload->>'policy', e.payload->'before', e.payload->'after', e.payload
          FROM cm.journal_account x
         CROSS JOIN LATERAL (
                SELECT j.event_id, j.occurred_at, j.event_type, j.source_id, j.uuid,
                       coalesce(j.payload, cm.event_payload(j, x)) AS payload
                  FROM cm.journal j
                 WHERE j.event_id > x.cycle
                   AND j.event_id <= coalesce((SELECT min(y.cycle) FROM cm.journal_account y
                                                WHERE y.cycle > x.cycle), 9223372036854775807)
                   AND j.cycle = x.cycle AND j.accountid = x.accountid
                   AND j.event_type IN ('effect_applied', 'effect_compensated')) e
         WHERE x.accountid = cm_account_history.accountid
         ORDER BY e.event_id
    $$;
COMMENT ON FUNCTION @extschema@.cm_account_history(text) IS 'the effects the sync cycle had on an account, in order, with its tier values and allocations before and after, the request uuid and the policy';
REVOKE ALL ON FUNCTION @extschema@.cm_account_history(text) FROM PUBLIC;

CREATE FUNCTION @extschema@.cm_verify_accounts()
    RETURNS TABLE (accountid text, event_id bigint, column_name text, expected numeric, actual numeric)
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    portfolios regclass := to_regclass(format('%I.user_portfolios',
                                              current_setting('consistency_manager.portfolio_schema')));
BEGIN
    IF portfolios IS NULL THEN
        RAISE EXCEPTION 'table %.user_portfolios does not exist',
                        quote_ident(current_setting('consistency_manager.portfolio_schema'))
            USING ERRCODE = 'undefined_table',
                  HINT = 'Set consistency_manager.portfolio_schema to the schema of the portfolio tables.';
    END IF;
    RETURN QUERY EXECUTE format($q$
        WITH last AS MATERIALIZED (
            -- each account's last update by the cycle, and what it wrote
            SELECT DISTINCT ON (x.accountid) x.accountid, x.cycle, x.after
              FROM cm.journal_account x
             ORDER BY x.accountid, x.cycle DESC),
        ev AS (
            -- the last effect of each account in that cycle
            SELECT j.accountid, j.cycle, max(j.event_id) AS event_id
              FROM cm.journal j
             WHERE j.event_id > (SELECT min(l.cycle) FROM last l)
               AND j.event_type IN ('effect_applied', 'effect_compensated')
             GROUP BY j.accountid, j.cycle)
        SELECT l.accountid, ev.event_id, v.col, l.after[v.i], v.actual
          FROM last l
          JOIN ev ON ev.accountid = l.accountid AND ev.cycle = l.cycle
          LEFT JOIN %s p ON p.accountid = l.accountid
         CROSS JOIN LATERAL (VALUES
                (1, 'tier1_value', p.tier1_value::numeric), (2, 'tier2_value', p.tier2_value::numeric),
                (3, 'tier3_value', p.tier3_value::numeric), (4, 'total_value', p.total_value::numeric),
                (5, 'tier1_allocation', p.tier1_allocation::numeric),
                (6, 'tier2_allocation', p.tier2_allocation::numeric),
                (7, 'tier3_allocation', p.tier3_allocation::numeric),
                (8, 'total_allocation', p.total_allocation::numeric)) v(i, col, actual)
         WHERE l.after[v.i] IS DISTINCT FROM v.actual
         ORDER BY l.accountid, v.col$q$, portfolios);
END
$$;
COMMENT ON FUNCTION @extschema@.cm_verify_accounts() IS 'accounts whose current tier values or allocations differ from the after of their last effect in the journal (changed outside the sync cycle since), one row per differing column; none after a clean run';
REVOKE ALL ON FUNCTION @extschema@.cm_verify_accounts() FROM PUBLIC;

/*
 * A consumer too far behind: its oldest unacknowledged event is older than
 * consistency_manager.event_retention, so the journal keeps growing for it
 * (retention never removes an event a consumer has not acknowledged).
 */
CREATE FUNCTION cm.consumer_lag_notes()
    RETURNS text[]
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT coalesce(array_agg(format('consumer %s is %s events behind, the oldest from %s, older than consistency_manager.event_retention (%s): the journal keeps them until it acknowledges them (cm_events_ack), or drop it (cm_consumer_drop)',
                                         quote_literal(c.name),
                                         (SELECT count(*) FROM cm.journal e WHERE e.event_id > c.acked_id),
                                         o.occurred_at, current_setting('consistency_manager.event_retention'))
                                  ORDER BY c.name), '{}')
          FROM cm.consumer c
         CROSS JOIN LATERAL (SELECT e.occurred_at FROM cm.journal e WHERE e.event_id > c.acked_id
                              ORDER BY e.event_id LIMIT 1) o
         WHERE o.occurred_at < now() - current_setting('consistency_manager.event_retention')::interval
    $$;
COMMENT ON FUNCTION cm.consumer_lag_notes() IS 'what cm_health() says about consumers of the event journal whose oldest unacknowledged event is older than consistency_manager.event_retention';
REVOKE ALL ON FUNCTION cm.consumer_lag_notes() FROM PUBLIC;
