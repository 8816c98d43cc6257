/*
 * Effect policies.
 *
 * What a completion does to its account is a per-source choice:
 *
 *  - market_delta (the default, 1.0's rule): a completed investment
 *    multiplies tierN_value by 1 + delta_n, a completed withdrawal
 *    multiplies tierN_allocation by 1 - delta_n;
 *  - amount: plain accounting, a completed investment adds its tier
 *    amounts to tierN_value and tierN_allocation, a completed withdrawal
 *    subtracts them (never below zero: such a withdrawal is dead-lettered);
 *  - none: transactions and statuses are mirrored, accounts never touched.
 *
 * The ledger records, per completion, the policy it was applied under and
 * what it applied (the factors or the signed amounts), so a compensation
 * undoes exactly that, whatever the source's policy is by then.
 */

/*
 * The shapes of the journal's payloads (cm.event.payload, 46_events.sql):
 * the cycle builds each payload with one to_jsonb() of a row of these
 * types, about twice as fast as nested jsonb_build_object() calls.
 */
CREATE TYPE cm.event_queue_row AS (
    queue_id bigint, uuid text, accountid text, transaction_type text,
    tier_1 numeric, tier_2 numeric, tier_3 numeric, status text,
    created_at timestamptz, updated_at timestamptz);
COMMENT ON TYPE cm.event_queue_row IS 'a queue row as the sync cycle read it, in the payload of an event';
CREATE TYPE cm.event_change AS (
    queue_row cm.event_queue_row, portfolio_status text, previous_status text,
    adopted boolean, reason text);
COMMENT ON TYPE cm.event_change IS 'payload of a transaction_created, status_changed, transaction_updated or dead_lettered event';
CREATE TYPE cm.event_account AS (
    tier1_value numeric, tier2_value numeric, tier3_value numeric, total_value numeric,
    tier1_allocation numeric, tier2_allocation numeric, tier3_allocation numeric,
    total_allocation numeric);
COMMENT ON TYPE cm.event_account IS 'an account''s tier values and allocations, before or after an effect';
CREATE TYPE cm.event_effect AS (
    queue_row cm.event_queue_row, policy text, kind text, factors numeric[], amounts numeric[]);
COMMENT ON TYPE cm.event_effect IS 'payload of an effect_applied or effect_compensated event, without the account''s values before and after (built once per account, then added)';
REVOKE USAGE ON TYPE cm.event_queue_row, cm.event_change, cm.event_account, cm.event_effect FROM PUBLIC;

ALTER TABLE cm.source
    ADD COLUMN effect_policy text NOT NULL DEFAULT 'market_delta'
        CONSTRAINT source_effect_policy_check CHECK (effect_policy IN ('market_delta', 'amount', 'none'));
COMMENT ON COLUMN cm.source.effect_policy IS 'what a completion of this source does to its account: market_delta (tier factors), amount (adds or subtracts the tier amounts) or none; set with cm_set_effect_policy()';

ALTER TABLE cm.ledger
    ADD COLUMN policy text,
    ADD COLUMN amount1 numeric,
    ADD COLUMN amount2 numeric,
    ADD COLUMN amount3 numeric;
COMMENT ON COLUMN cm.ledger.policy IS 'effect policy the applied completion was applied under (NULL with factors: market_delta, applied by version 1.0; NULL without: adopted, its effect unknown)';
COMMENT ON COLUMN cm.ledger.amount1 IS 'amount added to tier 1 value and allocation at completion under the amount policy (negative for a withdrawal)';
COMMENT ON COLUMN cm.ledger.amount2 IS 'amount added to tier 2 value and allocation at completion under the amount policy (negative for a withdrawal)';
COMMENT ON COLUMN cm.ledger.amount3 IS 'amount added to tier 3 value and allocation at completion under the amount policy (negative for a withdrawal)';

ALTER TABLE cm.batch_account
    ADD COLUMN ad1 numeric, ADD COLUMN ad2 numeric, ADD COLUMN ad3 numeric;
COMMENT ON COLUMN cm.batch_account.ad1 IS 'sum of the amounts added to tier 1 value and allocation (amount policy), after the factors';

/*
 * The effects of the running cycle, one row per completion applied or
 * compensated, for the journal: the account step writes one cm.event per
 * row, with the account's values before and after.
 */
CREATE UNLOGGED TABLE cm.batch_effect (
    ord        bigint GENERATED ALWAYS AS IDENTITY,
    source_id  integer NOT NULL,
    queue_id   bigint NOT NULL,
    uuid       uuid NOT NULL,
    accountid  text NOT NULL,
    event_type text NOT NULL,
    queue_row  cm.event_queue_row NOT NULL,
    policy     text NOT NULL,
    kind       text NOT NULL,
    factors    numeric[],
    amounts    numeric[]
);
COMMENT ON TABLE cm.batch_effect IS 'scratch table of the running sync cycle: each effect applied or compensated, journalled with the account''s values when the accounts are written; always empty outside a cycle';
REVOKE ALL ON cm.batch_effect FROM PUBLIC;

CREATE FUNCTION @extschema@.cm_set_effect_policy(source_id integer, policy text)
    RETURNS text
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    old text;
BEGIN
    IF policy IS NULL OR policy NOT IN ('market_delta', 'amount', 'none') THEN
        RAISE EXCEPTION 'unknown effect policy %', coalesce(quote_literal(policy), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use market_delta, amount or none.';
    END IF;
    SELECT s.effect_policy INTO old FROM cm.source s
     WHERE s.source_id = cm_set_effect_policy.source_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'source % does not exist', source_id
            USING ERRCODE = 'no_data_found',
                  HINT = 'See SELECT * FROM cm_sources();';
    END IF;
    UPDATE cm.source s SET effect_policy = policy
     WHERE s.source_id = cm_set_effect_policy.source_id;
    RETURN old;
END
$$;
COMMENT ON FUNCTION @extschema@.cm_set_effect_policy(integer, text) IS 'set what completions of a source do to accounts from the next cycle on (market_delta, amount or none); returns the previous policy; completions already applied are compensated by what they applied';
REVOKE ALL ON FUNCTION @extschema@.cm_set_effect_policy(integer, text) FROM PUBLIC;
