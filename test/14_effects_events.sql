-- 14_effects_events.sql -- effect policies, the event journal, consumers and audit.
--
-- Split layout (source 1: investments, source 2: withdrawals).  The
-- look-back window of the helpers (1 h) re-reads every queue row each cycle,
-- so rows_read counts them all; the ledger makes the re-read a no-op.  Tier deltas:
-- tier 1 +5 %, tier 2 0, tier 3 -10 %, as in 03_cycle.sql.  Every expected
-- value is worked out by hand next to its assertion.

BEGIN;
SET LOCAL client_min_messages = warning;

SELECT plan(88);

\ir lib/helpers.sql

SELECT cm_set_tier_values(1, 1000000, 1050000);
SELECT cm_set_tier_values(3, 500000, 450000);

INSERT INTO user_portfolios (accountid,
        tier1_allocation, tier2_allocation, tier3_allocation, total_allocation,
        tier1_value, tier2_value, tier3_value, total_value)
VALUES ('A1', 1000.00, 2000.00, 3000.00, 6000.00, 1000.00, 2000.00, 3000.00, 6000.00),
       ('A2', 1000.00, 2000.00, 3000.00, 6000.00, 1000.00, 2000.00, 3000.00, 6000.00),
       ('A3', 1000.00, 2000.00, 3000.00, 6000.00, 1000.00, 2000.00, 3000.00, 6000.00),
       ('A4', 10.00, 10.00, 10.00, 30.00, 10.00, 10.00, 10.00, 30.00);

SELECT is((SELECT count(*)::int FROM cm_attach_queue('queue_server')), 2, 'both queue tables attached');
SELECT pg_temp.queue_writable();
-- source ids differ from run to run (their identity outlives rolled-back tests)
SELECT source_id AS inv FROM cm.source WHERE layout = 'investment' \gset
SELECT source_id AS wd FROM cm.source WHERE layout = 'withdrawal' \gset

-- the events written since the last mark, as "type:account" in journal order
CREATE TEMP TABLE mark (id bigint);
INSERT INTO mark VALUES (0);
CREATE FUNCTION pg_temp.new_events() RETURNS text LANGUAGE sql AS $$
    WITH n AS (SELECT string_agg(e.event_type || ':' || coalesce(e.accountid, '-'), ',' ORDER BY e.event_id) AS s
                 FROM cm.event e WHERE e.event_id > (SELECT id FROM mark)),
         u AS (UPDATE mark SET id = (SELECT coalesce(max(event_id), 0) FROM cm.event) RETURNING 1)
    SELECT coalesce(n.s, '') FROM n, (SELECT count(*) FROM u) x
$$;
UPDATE mark SET id = (SELECT coalesce(max(event_id), 0) FROM cm.event);
-- the last event of a type for an account
CREATE FUNCTION pg_temp.last_event(a text, t text) RETURNS jsonb LANGUAGE sql AS $$
    SELECT e.payload FROM cm.event e WHERE e.accountid = a AND e.event_type = t
     ORDER BY e.event_id DESC LIMIT 1
$$;

SELECT is((SELECT effect_policy FROM cm.source WHERE source_id = :inv), 'market_delta',
    'a source''s effect policy is market_delta by default');

-- 1. market_delta, journalled ---------------------------------------------------
INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (1, 'A1', 100, 200, 300, 'e0000000-0000-4000-8000-000000000001', 'PENDING', now(), now());
SELECT is(pg_temp.sync(),
    'sources=2 rows_read=1 created=1 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'a new request');
SELECT is(pg_temp.new_events(), 'transaction_created:A1', 'one event: the transaction created');
SELECT is(pg_temp.last_event('A1', 'transaction_created')->'queue_row'->>'status', 'PENDING',
    'the event carries the queue row');

UPDATE cm_remote.queue_server_investment_queue SET status = 'COMPLETED' WHERE queue_id = 1;
SELECT is(pg_temp.sync(),
    'sources=2 rows_read=1 created=0 updated=1 completed_applied=1 compensated=0 dead_lettered=0',
    'the completion applies');
SELECT is(pg_temp.new_events(), 'status_changed:A1,effect_applied:A1',
    'one event per change: the status, then the effect');
-- 1000.00 * 1.05 = 1050.00, 2000.00, 3000.00 * 0.9 = 2700.00
SELECT is(pg_temp.account('A1'), 'allocation 1000.00+2000.00+3000.00=6000.00 value 1050.00+2000.00+2700.00=5750.00',
    'market_delta: tier values times 1 + delta');
SELECT is(pg_temp.last_event('A1', 'status_changed')->>'previous_status', 'PENDING',
    'status_changed names the previous status');
SELECT results_eq(
    $$SELECT p->>'policy', (p->'factors'->>0)::numeric, (p->'factors'->>1)::numeric, (p->'factors'->>2)::numeric,
             p->'before'->>'tier1_value', p->'after'->>'tier1_value',
             p->'before'->>'total_value', p->'after'->>'total_value', (p->>'effects_in_cycle')::int
        FROM pg_temp.last_event('A1', 'effect_applied') p$$,
    $$VALUES ('market_delta', 1.05, 1::numeric, 0.9, '1000.00', '1050.00', '6000.00', '5750.00', 1)$$,
    'effect_applied: policy, factors, values before and after');
SELECT is(pg_temp.ledger('e0000000-0000-4000-8000-000000000001') IS NOT NULL, true, 'ledger row');
SELECT is((SELECT policy FROM cm.ledger WHERE uuid = 'e0000000-0000-4000-8000-000000000001'), 'market_delta',
    'the ledger records the policy applied');

-- 2. amount: sums, several completions of one account --------------------------
SELECT is(cm_set_effect_policy(:inv, 'amount'), 'market_delta', 'cm_set_effect_policy returns the previous policy');
INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (2, 'A2', 100, 200, 300, 'e0000000-0000-4000-8000-000000000002', 'COMPLETED', now(), now()),
       (3, 'A3', 10, 20, 30, 'e0000000-0000-4000-8000-000000000003', 'COMPLETED', now(), now()),
       (4, 'A3', 1.005, 0, 0, 'e0000000-0000-4000-8000-000000000004', 'COMPLETED', now(), now());
SELECT is(pg_temp.sync(),
    'sources=2 rows_read=4 created=3 updated=0 completed_applied=3 compensated=0 dead_lettered=0',
    'three completions under amount');
SELECT is(pg_temp.new_events(),
    'transaction_created:A2,effect_applied:A2,transaction_created:A3,effect_applied:A3,transaction_created:A3,effect_applied:A3',
    'one event per transaction and per effect');
SELECT is(pg_temp.account('A2'), 'allocation 1100.00+2200.00+3300.00=6600.00 value 1100.00+2200.00+3300.00=6600.00',
    'amount: an investment adds its amounts to allocations and values');
-- 1000 + 10 + 1.01 (1.005 rounded to the 2 decimals of tier1_change), 2000 + 20, 3000 + 30
SELECT is(pg_temp.account('A3'), 'allocation 1011.01+2020.00+3030.00=6061.01 value 1011.01+2020.00+3030.00=6061.01',
    'amount: two completions of one account in a cycle sum');
SELECT results_eq(
    $$SELECT e.payload->>'policy', e.payload->'amounts', e.payload->'before'->>'tier1_allocation',
             e.payload->'after'->>'tier1_allocation', (e.payload->>'effects_in_cycle')::int
        FROM cm.event e WHERE e.accountid = 'A3' AND e.event_type = 'effect_applied' ORDER BY e.event_id$$,
    $$VALUES ('amount', '[10.00, 20.00, 30.00]'::jsonb, '1000.00', '1011.01', 2),
             ('amount', '[1.01, 0.00, 0.00]'::jsonb, '1000.00', '1011.01', 2)$$,
    'each effect has its amounts and the account before and after the cycle''s combined update');
SELECT results_eq(
    $$SELECT policy, amount1, amount2, amount3, factor1 FROM cm.ledger WHERE uuid = 'e0000000-0000-4000-8000-000000000002'$$,
    $$VALUES ('amount', 100.00, 200.00, 300.00, NULL::numeric)$$,
    'the ledger records the amounts applied');

-- 3. compensation after a policy change ----------------------------------------
SELECT is(cm_set_effect_policy(:inv, 'none'), 'amount', 'policy changed to none');
UPDATE cm_remote.queue_server_investment_queue SET status = 'FAILED' WHERE queue_id IN (1, 2);
SELECT is(pg_temp.sync(),
    'sources=2 rows_read=4 created=0 updated=2 completed_applied=0 compensated=2 dead_lettered=0',
    'two completions reversed');
SELECT is(pg_temp.account('A1'), 'allocation 1000.00+2000.00+3000.00=6000.00 value 1000.00+2000.00+3000.00=6000.00',
    'the market_delta completion is divided back out, whatever the policy is now');
SELECT is(pg_temp.account('A2'), 'allocation 1000.00+2000.00+3000.00=6000.00 value 1000.00+2000.00+3000.00=6000.00',
    'the amount completion is subtracted back, whatever the policy is now');
SELECT is(pg_temp.new_events(), 'status_changed:A1,effect_compensated:A1,status_changed:A2,effect_compensated:A2',
    'compensations are journalled');
SELECT results_eq(
    $$SELECT p->>'policy', p->'amounts', p->'before'->>'tier1_value', p->'after'->>'tier1_value'
        FROM pg_temp.last_event('A2', 'effect_compensated') p$$,
    $$VALUES ('amount', '[-100.00, -200.00, -300.00]'::jsonb, '1100.00', '1000.00')$$,
    'effect_compensated records the policy it undid and the amounts taken back');
SELECT is(pg_temp.last_event('A1', 'effect_compensated')->>'policy', 'market_delta',
    'the market_delta compensation is recorded as such');

-- 4. none -------------------------------------------------------------------------
INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (5, 'A1', 100, 200, 300, 'e0000000-0000-4000-8000-000000000005', 'COMPLETED', now(), now());
SELECT is(pg_temp.sync(),
    'sources=2 rows_read=5 created=1 updated=0 completed_applied=1 compensated=0 dead_lettered=0',
    'a completion under none');
SELECT is(pg_temp.account('A1'), 'allocation 1000.00+2000.00+3000.00=6000.00 value 1000.00+2000.00+3000.00=6000.00',
    'none: the account is not touched');
SELECT is(pg_temp.tx('e0000000-0000-4000-8000-000000000005'), 'A1 INVEST 100.00 200.00 300.00=600.00 COMPLETED',
    'none: the transaction is mirrored');
SELECT is(pg_temp.new_events(), 'transaction_created:A1', 'none: no effect event');
SELECT is((SELECT policy || ' ' || applied FROM cm.ledger WHERE uuid = 'e0000000-0000-4000-8000-000000000005'),
    'none true', 'none: the ledger records the completion as seen under none');
UPDATE cm_remote.queue_server_investment_queue SET status = 'CANCELLED' WHERE queue_id = 5;
SELECT cm_set_effect_policy(:inv, 'amount');
SELECT is(pg_temp.sync(),
    'sources=2 rows_read=5 created=0 updated=1 completed_applied=0 compensated=1 dead_lettered=0',
    'reversing a completion applied under none');
SELECT is(pg_temp.account('A1'), 'allocation 1000.00+2000.00+3000.00=6000.00 value 1000.00+2000.00+3000.00=6000.00',
    'a completion applied under none is reversed as none, though the source is amount now');
SELECT is(pg_temp.new_events(), 'status_changed:A1', 'nothing to compensate: only the status event');

-- 5. amount: a withdrawal larger than the account ------------------------------
SELECT cm_set_effect_policy(:wd, 'amount');
INSERT INTO cm_remote.queue_server_withdrawal_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (1, 'A4', 50, 0, 0, 'e0000000-0000-4000-8000-000000000101', 'COMPLETED', now(), now()),
       (2, 'A3', 1, 2, 3, 'e0000000-0000-4000-8000-000000000102', 'COMPLETED', now(), now());
INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (6, 'A4', 1, 1, 1, 'e0000000-0000-4000-8000-000000000006', 'COMPLETED', now(), now());
SELECT is(pg_temp.sync(),
    'sources=2 rows_read=8 created=2 updated=0 completed_applied=2 compensated=0 dead_lettered=1',
    'the withdrawal that would take A4 below zero is dead-lettered, the rest applies');
SELECT is(pg_temp.account('A4'), 'allocation 11.00+11.00+11.00=33.00 value 11.00+11.00+11.00=33.00',
    'A4 gets its investment (+1 each tier) but not the withdrawal');
SELECT is(pg_temp.account('A3'), 'allocation 1010.01+2018.00+3027.00=6055.01 value 1010.01+2018.00+3027.00=6055.01',
    'amount: a withdrawal subtracts its amounts from allocations and values');
SELECT is((SELECT reason FROM cm.dead_letter WHERE source_id = :wd AND queue_id = 1),
    'tier 1 would fall below zero (value -39.00, allocation -39.00): account A4 holds less than the amount taken from it',
    'the dead letter says why');
SELECT is(pg_temp.new_events(),
    'transaction_created:A4,effect_applied:A4,dead_lettered:A4,transaction_created:A3,effect_applied:A3',
    'the dead letter is journalled; no effect for it');
SELECT is(pg_temp.tx('e0000000-0000-4000-8000-000000000101'), NULL, 'the dead-lettered withdrawal is not mirrored');
SELECT is(pg_temp.sync(),
    'sources=2 rows_read=8 created=0 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'the dead letter is retried and still cannot apply');
SELECT is(pg_temp.new_events(), '', 'a dead letter that stays is not journalled again');

-- 6. events off -----------------------------------------------------------------
SET LOCAL consistency_manager.events = off;
INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (7, 'A2', 1, 1, 1, 'e0000000-0000-4000-8000-000000000007', 'PENDING', now(), now());
SELECT is(pg_temp.sync(),
    'sources=2 rows_read=9 created=1 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'a cycle with the journal off');
SELECT is(pg_temp.new_events(), '', 'consistency_manager.events = off writes no event');
SET LOCAL consistency_manager.events = on;

-- 7. audit ---------------------------------------------------------------------------
SELECT is_empty('SELECT * FROM cm_verify_accounts()', 'cm_verify_accounts: every account matches its journal');
SELECT results_eq(
    $$SELECT event_type, policy, before->>'tier1_allocation', after->>'tier1_allocation'
        FROM cm_account_history('A3')$$,
    $$VALUES ('effect_applied', 'amount', '1000.00', '1011.01'),
             ('effect_applied', 'amount', '1000.00', '1011.01'),
             ('effect_applied', 'amount', '1011.01', '1010.01')$$,
    'cm_account_history: the effects on A3 in order, with before and after');
UPDATE user_portfolios SET tier2_value = tier2_value + 1, total_value = total_value + 1 WHERE accountid = 'A3';
SELECT results_eq(
    $$SELECT accountid, column_name, expected, actual FROM cm_verify_accounts()$$,
    $$VALUES ('A3', 'tier2_value', 2018.00, 2019.00), ('A3', 'total_value', 6055.01, 6056.01)$$,
    'cm_verify_accounts finds the hand-edited account, column by column');

-- 8. consumers -----------------------------------------------------------------------
SELECT is(cm_consumer_create('audit', true), 0::bigint, 'a consumer from the start');
SELECT is(cm_consumer_create('live'), (SELECT max(event_id) FROM cm.event), 'a consumer from the end');
SELECT throws_ok($$SELECT cm_consumer_create('live')$$, '42710', 'consumer ''live'' already exists',
    'a consumer name is unique');
SELECT throws_ok($$SELECT cm_consumer_create(' ')$$, '22023', 'a consumer needs a name', 'a name is required');
SELECT throws_ok($$SELECT * FROM cm_events('nobody')$$, '42704', 'consumer ''nobody'' does not exist',
    'unknown consumer');
SELECT throws_ok($$SELECT * FROM cm_events('audit', -1)$$, '22023', NULL, 'max_events must not be negative');
SELECT is((SELECT count(*)::int FROM cm_events('audit')),
          (SELECT count(*)::int FROM cm.event), 'a consumer from the start reads every event');
SELECT is_empty($$SELECT * FROM cm_events('live')$$, 'a consumer from the end has nothing to read yet');
SELECT results_eq($$SELECT event_id FROM cm_events('audit', 3)$$,
    $$SELECT event_id FROM cm.event ORDER BY event_id LIMIT 3$$, 'max_events bounds a read, oldest first');
SELECT is(cm_events_ack('audit', (SELECT max(event_id) FROM cm_events('audit', 3))),
          (SELECT event_id FROM cm.event ORDER BY event_id OFFSET 2 LIMIT 1), 'ack returns the new offset');
SELECT is((SELECT min(event_id) FROM cm_events('audit', 1)),
          (SELECT event_id FROM cm.event ORDER BY event_id OFFSET 3 LIMIT 1), 'the next read starts after the ack');
SELECT is(cm_events_ack('audit', 1), (SELECT event_id FROM cm.event ORDER BY event_id OFFSET 2 LIMIT 1),
    'an older ack leaves the offset where it is');
SELECT throws_ok($$SELECT cm_events_ack('audit', (SELECT max(event_id) + 1 FROM cm.event))$$, '22023', NULL,
    'an event past the end cannot be acknowledged');
SELECT results_eq($$SELECT name, lag_events FROM cm_consumers()$$,
    $$VALUES ('audit', (SELECT count(*) - 3 FROM cm.event)), ('live', 0::bigint)$$,
    'cm_consumers shows each consumer''s lag');
SELECT results_eq($$SELECT id, aggregatetype, aggregateid, type FROM cm.event_outbox ORDER BY id LIMIT 1$$,
    $$SELECT event_id, 'account', accountid, event_type FROM cm.event ORDER BY event_id LIMIT 1$$,
    'the outbox view has Debezium''s column names');

-- 9. retention ------------------------------------------------------------------------
-- every event so far is made 30 days old (event_retention is 7 days); 'audit'
-- has acknowledged the first three, 'live' everything so far
UPDATE cm.journal SET occurred_at = occurred_at - interval '30 days';
CREATE TEMP TABLE before_prune AS SELECT event_id FROM cm.event;
SELECT alike((SELECT detail FROM cm_health()), '%consumer ''audit'' is % events behind, the oldest from %',
    'cm_health names a consumer whose unacknowledged events are older than event_retention');
INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (8, 'A2', 1, 1, 1, 'e0000000-0000-4000-8000-000000000008', 'PENDING', now(), now());
SELECT is(pg_temp.sync(),
    'sources=2 rows_read=10 created=1 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'a cycle that writes an event prunes the journal');
SELECT is((SELECT count(*)::int FROM before_prune b WHERE NOT EXISTS (SELECT 1 FROM cm.event e WHERE e.event_id = b.event_id)),
    3, 'the old events every consumer acknowledged are removed');
SELECT is_empty($$SELECT b.event_id FROM before_prune b
                   WHERE b.event_id > (SELECT acked_id FROM cm.consumer WHERE name = 'audit')
                     AND NOT EXISTS (SELECT 1 FROM cm.event e WHERE e.event_id = b.event_id)$$,
    'an event a consumer has not acknowledged is never removed, however old');
SELECT unalike((SELECT detail FROM cm_health()), '%consumer ''live''%',
    'a consumer that keeps up is not named');
SELECT is_empty($$SELECT j.event_id FROM cm.journal j
                   WHERE j.event_type IN ('effect_applied', 'effect_compensated')
                     AND NOT EXISTS (SELECT 1 FROM cm.journal_account x WHERE x.cycle = j.cycle AND x.accountid = j.accountid)$$,
    'every effect left keeps the account values of its cycle');
SELECT is_empty($$SELECT x.cycle FROM cm.journal_account x
                   WHERE x.cycle < (SELECT j.cycle FROM cm.journal j WHERE j.cycle IS NOT NULL ORDER BY j.event_id LIMIT 1)$$,
    'the account values of a cycle go with its last event');

-- 9b. the account values around an effect are stored once per account and cycle ----------
SELECT is((SELECT count(*)::int FROM cm.journal j
            WHERE j.event_type IN ('effect_applied', 'effect_compensated') AND (j.before IS NOT NULL OR j.after IS NOT NULL)), 0,
    'an effect stores no account values of its own (event_payload off)');
SELECT is((SELECT count(*)::int FROM cm.journal_account),
          (SELECT count(DISTINCT (j.cycle, j.accountid))::int FROM cm.journal j
            WHERE j.event_type IN ('effect_applied', 'effect_compensated')),
    'one row of cm.journal_account per account and cycle with effects');
-- the journal emptied by hand: the next cycle's key is still new
TRUNCATE cm.journal;
INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (10, 'A3', 1, 1, 1, 'e0000000-0000-4000-8000-000000000010', 'COMPLETED', now(), now());
SELECT is(pg_temp.sync(),
    'sources=2 rows_read=11 created=1 updated=0 completed_applied=1 compensated=0 dead_lettered=0',
    'a cycle after the journal was emptied by hand journals its effect');
SELECT results_eq(
    $$SELECT e.event_type, e.payload->'before'->>'tier1_value', e.payload->'after'->>'tier1_value'
        FROM cm.event e ORDER BY e.event_id$$,
    $$SELECT * FROM (VALUES ('transaction_created', NULL, NULL),
                            ('effect_applied', (SELECT (tier1_value - 1)::text FROM user_portfolios WHERE accountid = 'A3'),
                                               (SELECT tier1_value::text FROM user_portfolios WHERE accountid = 'A3'))) v$$,
    'its effect has the account''s values before and after, not those of an older cycle');

-- 10. errors of cm_set_effect_policy -----------------------------------------------------
SELECT throws_ok($$SELECT cm_set_effect_policy(1, 'double')$$, '22023', 'unknown effect policy ''double''',
    'an unknown policy is refused');
SELECT throws_ok($$SELECT cm_set_effect_policy(-1, 'none')$$, 'P0002', 'source -1 does not exist',
    'an unknown source is refused');

-- 10b. the payload stored for Debezium (consistency_manager.event_payload) -----------------
CREATE TEMP TABLE payload_mark AS SELECT max(event_id) AS id FROM cm.journal;
SET LOCAL consistency_manager.event_payload = on;
INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (9, 'A2', 1, 2, 3, 'e0000000-0000-4000-8000-000000000009', 'COMPLETED', now(), now());
SELECT pg_temp.sync();
RESET consistency_manager.event_payload;
SELECT results_eq(
    $$SELECT j.event_type, j.payload->'queue_row'->>'queue_id', j.payload->>'policy', j.payload->'amounts',
             (j.payload->'after'->>'tier1_value')::numeric - (j.payload->'before'->>'tier1_value')::numeric,
             (j.payload->'after'->>'total_allocation')::numeric - (j.payload->'before'->>'total_allocation')::numeric,
             j.payload->'after'->>'tier3_value'
        FROM cm.journal j WHERE j.event_id > (SELECT id FROM payload_mark) ORDER BY j.event_id$$,
    $$VALUES ('transaction_created', '9', NULL, NULL, NULL, NULL, NULL),
             ('effect_applied', '9', 'amount', '[1.00, 2.00, 3.00]'::jsonb, 1.00, 6.00,
              (SELECT tier3_value::text FROM user_portfolios WHERE accountid = 'A2'))$$,
    'event_payload on: the cycle stores each event''s payload in cm.journal');
SELECT is_empty($$SELECT j.event_id FROM cm.journal j
                   WHERE j.event_id > (SELECT id FROM payload_mark) AND j.payload IS DISTINCT FROM cm.event_payload(j)$$,
    'the stored payload is the one cm.event builds from the typed columns');
SELECT is((SELECT count(*)::int FROM cm.journal j WHERE j.payload IS NOT NULL AND j.event_id <= (SELECT id FROM payload_mark)), 0,
    'event_payload off (the default): no payload is stored');
SELECT is((SELECT x.after FROM cm.journal j JOIN cm.journal_account x ON x.cycle = j.cycle AND x.accountid = j.accountid
            WHERE j.event_id > (SELECT id FROM payload_mark) AND j.event_type = 'effect_applied'),
          (SELECT j.after FROM cm.journal j
            WHERE j.event_id > (SELECT id FROM payload_mark) AND j.event_type = 'effect_applied'),
    'event_payload on: the account''s update is recorded in cm.journal_account too, under the effect''s cycle');
SELECT is((SELECT h.payload FROM cm_account_history('A2') h ORDER BY h.event_id DESC LIMIT 1),
          (SELECT j.payload FROM cm.journal j
            WHERE j.event_id > (SELECT id FROM payload_mark) AND j.event_type = 'effect_applied'),
    'cm_account_history finds the effect written with event_payload on, last, with its stored payload');
SELECT is_empty('SELECT * FROM cm_verify_accounts()',
    'cm_verify_accounts: A2 matches its last effect, written with event_payload on');

-- 11. privileges ---------------------------------------------------------------------------
SELECT is_empty($$
    SELECT p.oid::regprocedure::text FROM pg_proc p
     WHERE p.proname IN ('cm_set_effect_policy', 'cm_consumer_create', 'cm_consumer_drop', 'cm_events',
                         'cm_events_ack', 'cm_consumers', 'cm_account_history', 'cm_verify_accounts')
       AND (p.proacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) a WHERE a.grantee = 0))$$,
    'PUBLIC may execute none of the new functions');
SELECT is_empty($$
    SELECT c.oid::regclass::text FROM pg_class c
     WHERE c.oid IN ('cm.event'::regclass, 'cm.journal'::regclass, 'cm.consumer'::regclass, 'cm.batch_effect'::regclass,
                     'cm.event_outbox'::regclass)
       AND EXISTS (SELECT 1 FROM aclexplode(c.relacl) a WHERE a.grantee = 0)$$,
    'PUBLIC has no privilege on the journal''s tables');
CREATE ROLE cm_test_consumer NOLOGIN;
GRANT EXECUTE ON FUNCTION cm_events(text, integer), cm_events_ack(text, bigint) TO cm_test_consumer;
SET LOCAL ROLE cm_test_consumer;
SELECT is((SELECT count(*)::int FROM cm_events('audit', 2)), 2, 'a consumer role with EXECUTE only reads events');
SELECT ok(cm_events_ack('audit', (SELECT max(event_id) FROM cm_events('audit', 2))) > 0,
    'and acknowledges them');
SELECT throws_ok('SELECT * FROM cm.event', '42501', NULL, 'but cannot read the journal itself');
SELECT throws_ok('SELECT * FROM cm.journal', '42501', NULL, 'nor its table');
SELECT throws_ok($$SELECT cm_consumer_create('mine')$$, '42501', NULL, 'nor create consumers without EXECUTE');
RESET ROLE;

SELECT * FROM finish();
ROLLBACK;
