-- 06_bad_input.sql -- rows that cannot be applied (docs/ARCHITECTURE.md, 4.6).
--
-- Each class of bad row goes to cm.dead_letter with a reason while the good
-- rows of the same batch are applied; dead letters are retried every cycle
-- and leave the table once they apply.
--
-- Amount overflow: the queue's decimal(20,8) holds less than 10^12, and three
-- such tiers add up to less than 10^13, so nothing read from this queue can
-- overflow the fixture's numeric(15,2) transaction columns.  This file
-- narrows them to numeric(12,2) (limit 10^10) -- the extension reads the
-- column definitions it finds -- and overflows an account's numeric(15,2)
-- value with a completion.
--
-- Tier deltas: tier 1 +5 %, tier 2 0, tier 3 -10 %.

BEGIN;
SET LOCAL client_min_messages = warning;

SELECT plan(53);

\ir lib/helpers.sql

-- the reason a queue row of a source ('investment', 'withdrawal', 'unified') was dead-lettered
CREATE FUNCTION pg_temp.reason(src text, qid bigint) RETURNS text LANGUAGE sql AS $$
    SELECT coalesce((SELECT d.reason FROM cm.dead_letter d JOIN cm.source s USING (source_id)
                      WHERE s.layout = src AND d.queue_id = qid), '(not dead-lettered)')
$$;
CREATE FUNCTION pg_temp.dead(src text) RETURNS text LANGUAGE sql AS $$
    SELECT coalesce(string_agg(d.queue_id::text, ',' ORDER BY d.queue_id), '')
      FROM cm.dead_letter d JOIN cm.source s USING (source_id) WHERE s.layout = src
$$;

SELECT cm_set_tier_values(1, 1000000, 1050000);
SELECT cm_set_tier_values(3, 500000, 450000);

ALTER TABLE portfolio_transactions
    ALTER COLUMN tier1_change TYPE numeric(12,2),
    ALTER COLUMN tier2_change TYPE numeric(12,2),
    ALTER COLUMN tier3_change TYPE numeric(12,2),
    ALTER COLUMN total_amount TYPE numeric(12,2);

INSERT INTO user_portfolios (accountid,
        tier1_allocation, tier2_allocation, tier3_allocation, total_allocation,
        tier1_value, tier2_value, tier3_value, total_value)
VALUES ('B1', 1000.00, 2000.00, 3000.00, 6000.00, 1000.00, 2000.00, 3000.00, 6000.00),
       ('BIG', 0, 0, 0, 0, 9999999999999.00, 0, 0, 9999999999999.00);

SELECT is((SELECT count(*)::int FROM cm_attach_queue('queue_server')), 2, 'the split layout is attached');
SELECT is((SELECT count(*)::int FROM cm_attach_queue('queue_server', 'unified')), 1, 'the unified layout is attached');

-- 1. one batch, good and bad rows -------------------------------------------
SELECT pg_temp.queue_writable();
INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES ( 1, 'B1', 10, 20, 30, 'e0000000-0000-4000-8000-000000000001', 'PENDING', now(), now()),
       ( 2, 'B1', 10, 20, 30, 'not-a-uuid', 'PENDING', now(), now()),
       ( 3, 'B1', 10, 20, 30, 'e0000000-0000-4000-8000-000000000003', NULL, now(), now()),
       ( 4, 'B1', 10, 20, 30, 'e0000000-0000-4000-8000-000000000004', 'WEIRD', now(), now()),
       ( 5, 'B1', 10, -5, 30, 'e0000000-0000-4000-8000-000000000005', 'PENDING', now(), now()),
       ( 6, 'B1', 10, 20, 'NaN', 'e0000000-0000-4000-8000-000000000006', 'PENDING', now(), now()),
       ( 7, 'B1', 4000000000, 4000000000, 4000000000, 'e0000000-0000-4000-8000-000000000007', 'PENDING', now(), now()),
       ( 8, 'B1', 10000000000, 1, 1, 'e0000000-0000-4000-8000-000000000008', 'PENDING', now(), now()),
       ( 9, 'B1', 9999999999.995, 1, 1, 'e0000000-0000-4000-8000-000000000009', 'PENDING', now(), now()),
       (10, 'ACCOUNT_TOO_LONG', 1, 1, 1, 'e0000000-0000-4000-8000-000000000010', 'PENDING', now(), now()),
       (11, 'NOPE', 100, 100, 100, 'e0000000-0000-4000-8000-000000000011', 'COMPLETED', now(), now()),
       (12, 'B1', 100, 100, 100, 'e0000000-0000-4000-8000-000000000012', 'COMPLETED', now(), now()),
       (13, 'BIG', 1, 1, 1, 'e0000000-0000-4000-8000-000000000013', 'COMPLETED', now(), now()),
       (14, 'B1', NULL, 1, 1, 'e0000000-0000-4000-8000-000000000014', 'PENDING', now(), now()),
       (15, 'B1', 1, 1, 1, 'e0000000-0000-4000-8000-000000000015', 'PENDING', now(), now()),
       (16, 'B1', 1, 1, 1, 'e0000000-0000-4000-8000-000000000016', 'PENDING', now(), now() - interval '1 minute');
-- withdrawal 2 reuses the uuid of investment 16 (and is newer)
INSERT INTO cm_remote.queue_server_withdrawal_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (2, 'B1', 1, 1, 1, 'e0000000-0000-4000-8000-000000000016', 'PENDING', now(), now()),
       (3, 'B1', 10, 10, 10, 'e0000000-0000-4000-8000-000000000103', 'COMPLETED', now(), now());
INSERT INTO cm_remote.queue_server_unified_investment_withdrawal_queue
        (queue_id, accountid, transaction_type, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (1, 'B1', 'INVEST', 1, 1, 1, 'e0000000-0000-4000-8000-000000000201', 'PENDING', now(), now()),
       (2, 'B1', 'TRANSFER', 1, 1, 1, 'e0000000-0000-4000-8000-000000000202', 'PENDING', now(), now()),
       (3, 'B1', NULL, 1, 1, 1, 'e0000000-0000-4000-8000-000000000203', 'PENDING', now(), now()),
       (4, 'B1', 'WITHDRAW', 1, 1, 1, 'e0000000-0000-4000-8000-000000000204', 'PENDING', now(), now());

-- read 16 + 2 + 4 = 22; created: investments 1, 12, 15, 16, withdrawal 3,
-- unified 1 and 4; completions: investment 12 and withdrawal 3; dead
-- letters: 12 investments, 1 withdrawal, 2 unified
SELECT is(pg_temp.sync(),
    'sources=3 rows_read=22 created=7 updated=0 completed_applied=2 compensated=0 dead_lettered=15',
    'cycle 1: the good rows are applied and the 15 bad ones dead-lettered');

SELECT matches(pg_temp.reason('investment', 2), '^malformed uuid ''not-a-uuid''',
    'malformed uuid: dead-lettered with the uuid in the reason');
SELECT matches(pg_temp.reason('investment', 3), '^status is NULL',
    'NULL status: dead-lettered');
SELECT matches(pg_temp.reason('investment', 4), '^unknown status ''WEIRD''.*cm\.status_map',
    'unknown status: dead-lettered, pointing at cm.status_map');
SELECT matches(pg_temp.reason('investment', 5), '^a tier amount is negative',
    'negative amount: dead-lettered');
SELECT matches(pg_temp.reason('investment', 6), '^a tier amount is not finite.*NaN',
    'NaN amount: dead-lettered');
SELECT matches(pg_temp.reason('investment', 7), '^total amount 12000000000\.00 does not fit .*portfolio_transactions\.total_amount',
    'a total that overflows numeric(12,2): dead-lettered');
SELECT matches(pg_temp.reason('investment', 8), '^tier 1 amount 10000000000(\.0*)? does not fit .*portfolio_transactions\.tier1_change',
    'a tier that overflows numeric(12,2): dead-lettered');
SELECT matches(pg_temp.reason('investment', 9), '^tier 1 amount 9999999999\.995(0*)? does not fit .*portfolio_transactions\.tier1_change',
    'a tier that overflows numeric(12,2) once rounded to 2 places: dead-lettered');
SELECT matches(pg_temp.reason('investment', 10), '^account id ''ACCOUNT_TOO_LONG'' is longer than the 10 characters',
    'account id longer than user_portfolios.accountid: dead-lettered');
SELECT matches(pg_temp.reason('investment', 11), '^account ''NOPE'' has no row in .*user_portfolios',
    'account without a portfolio: dead-lettered');
SELECT matches(pg_temp.reason('investment', 13), '^tier 1 value 10499999999998\.95 would not fit .*user_portfolios\.tier1_value',
    'a completion that would overflow the account''s numeric(15,2) value: dead-lettered');
SELECT matches(pg_temp.reason('investment', 14), '^a tier amount is NULL',
    'NULL amount: dead-lettered');
SELECT matches(pg_temp.reason('withdrawal', 2), '^uuid e0000000-0000-4000-8000-000000000016 is already used by source [0-9]+, queue_id 16 \(INVEST\)$',
    'a uuid already used by the investment queue: the withdrawal is dead-lettered');
SELECT matches(pg_temp.reason('unified', 2), '^unknown transaction_type ''TRANSFER''',
    'unknown transaction_type in the unified layout: dead-lettered');
SELECT matches(pg_temp.reason('unified', 3), '^unknown transaction_type NULL',
    'NULL transaction_type in the unified layout: dead-lettered');

SELECT is(pg_temp.dead('investment'), '2,3,4,5,6,7,8,9,10,11,13,14', 'exactly the bad investment rows are dead letters');
SELECT is(pg_temp.dead('withdrawal'), '2', 'exactly the bad withdrawal row is a dead letter');
SELECT is(pg_temp.dead('unified'), '2,3', 'exactly the bad unified rows are dead letters');
SELECT results_eq(
    $$SELECT d.uuid, d.accountid, d.transaction_type, d.tier_1, d.tier_2, d.tier_3, d.status, d.attempts
        FROM cm.dead_letter d JOIN cm.source s USING (source_id)
       WHERE s.layout = 'investment' AND d.queue_id = 2$$,
    $$VALUES ('not-a-uuid', 'B1', 'INVEST', 10::numeric, 20::numeric, 30::numeric, 'PENDING', 1)$$,
    'a dead letter keeps the queue row as read, with attempts = 1');
SELECT results_eq(
    $$SELECT s.layout, x.dead_letters FROM cm_sources() x JOIN cm.source s USING (source_id) ORDER BY s.source_id$$,
    $$VALUES ('investment', 12::bigint), ('withdrawal', 1::bigint), ('unified', 2::bigint)$$,
    'cm_sources() counts the dead letters of each source');

SELECT set_eq('SELECT id::text FROM portfolio_transactions',
    $$VALUES ('e0000000-0000-4000-8000-000000000001'), ('e0000000-0000-4000-8000-000000000012'),
             ('e0000000-0000-4000-8000-000000000015'), ('e0000000-0000-4000-8000-000000000016'),
             ('e0000000-0000-4000-8000-000000000103'), ('e0000000-0000-4000-8000-000000000201'),
             ('e0000000-0000-4000-8000-000000000204')$$,
    'only the good rows became transactions');
SELECT set_eq('SELECT id FROM portfolio_transactions', 'SELECT uuid FROM cm.ledger',
    'only the good rows are in the ledger');
SELECT is(pg_temp.tx('e0000000-0000-4000-8000-000000000016'), 'B1 INVEST 1.00 1.00 1.00=3.00 PENDING',
    'the first source to use a uuid keeps it');
-- B1: investment 12 completes (values 1050.00, 2000.00, 2700.00);
--     withdrawal 3 completes (allocations 950.00, 2000.00, 3300.00)
SELECT is(pg_temp.account('B1'), 'allocation 950.00+2000.00+3300.00=6250.00 value 1050.00+2000.00+2700.00=5750.00',
    'the good completions of the batch are applied');
SELECT is(pg_temp.account('BIG'), 'allocation 0.00+0.00+0.00=0.00 value 9999999999999.00+0.00+0.00=9999999999999.00',
    'an account whose completion would overflow is left as it was');
SELECT is((SELECT count(*)::int FROM cm.source WHERE watermark IS NULL), 0,
    'the watermarks advance past dead-lettered rows (they are retried from cm.dead_letter)');

SELECT is(pg_temp.sync(),
    'sources=3 rows_read=22 created=0 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'cycle 2 (re-run): dead letters are retried, still fail, and are not counted again');
SELECT is((SELECT count(*)::int FROM cm.dead_letter), 15, 'the 15 dead letters are still there');
SELECT is(pg_temp.reason('investment', 11), 'account ''NOPE'' has no row in public.user_portfolios',
    'a retried dead letter keeps its reason');

-- 2. dead letters apply once their cause is fixed ---------------------------
-- NOPE gets a portfolio: its COMPLETED investment 11 applies
--   (values 100.00 * 1.05 = 105.00, 100.00, 100.00 * 0.9 = 90.00, total 295.00);
-- WEIRD gets a status_map row; BIG's value is brought down so that its
-- completion fits (1000.00 * 1.05 = 1050.00); rows 2 (uuid) and 3 (status)
-- are corrected in the queue.
INSERT INTO user_portfolios (accountid,
        tier1_allocation, tier2_allocation, tier3_allocation, total_allocation,
        tier1_value, tier2_value, tier3_value, total_value)
VALUES ('NOPE', 100.00, 100.00, 100.00, 300.00, 100.00, 100.00, 100.00, 300.00);
INSERT INTO cm.status_map VALUES ('WEIRD', 'ON_HOLD');
UPDATE user_portfolios SET tier1_value = 1000.00, total_value = 1000.00 WHERE accountid = 'BIG';
UPDATE cm_remote.queue_server_investment_queue
   SET uuid = 'e0000000-0000-4000-8000-000000000002' WHERE queue_id = 2;
UPDATE cm_remote.queue_server_investment_queue SET status = 'PENDING' WHERE queue_id = 3;

SELECT is(pg_temp.sync(),
    'sources=3 rows_read=22 created=5 updated=0 completed_applied=2 compensated=0 dead_lettered=0',
    'cycle 3: the five fixed rows are applied, two of them completions');
SELECT is(pg_temp.dead('investment'), '5,6,7,8,9,10,14', 'the fixed rows left cm.dead_letter');
SELECT is(pg_temp.account('NOPE'), 'allocation 100.00+100.00+100.00=300.00 value 105.00+100.00+90.00=295.00',
    'the retried completion of NOPE is applied');
SELECT is(pg_temp.account('BIG'), 'allocation 0.00+0.00+0.00=0.00 value 1050.00+0.00+0.00=1050.00',
    'the retried completion of BIG is applied');
SELECT is(pg_temp.tx('e0000000-0000-4000-8000-000000000011'), 'NOPE INVEST 100.00 100.00 100.00=300.00 COMPLETED',
    'the retried row of NOPE is a transaction');
SELECT is(pg_temp.tx('e0000000-0000-4000-8000-000000000004'), 'B1 INVEST 10.00 20.00 30.00=60.00 ON_HOLD',
    'the row with the newly mapped status is a transaction with the mapped status');
SELECT is(pg_temp.tx('e0000000-0000-4000-8000-000000000002'), 'B1 INVEST 10.00 20.00 30.00=60.00 PENDING',
    'the row whose uuid was corrected in the queue is a transaction');
SELECT is(pg_temp.tx('e0000000-0000-4000-8000-000000000003'), 'B1 INVEST 10.00 20.00 30.00=60.00 PENDING',
    'the row whose status was corrected in the queue is a transaction');
SELECT is(pg_temp.account('B1'), 'allocation 950.00+2000.00+3300.00=6250.00 value 1050.00+2000.00+2700.00=5750.00',
    'B1 is untouched by the retries');
SELECT is((SELECT count(*)::int FROM cm.ledger), 12, 'the ledger has one row per applied uuid');
SELECT is((SELECT count(DISTINCT uuid)::int FROM cm.ledger), 12, 'no uuid is in the ledger twice');

SELECT is(pg_temp.sync(),
    'sources=3 rows_read=22 created=0 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'cycle 4 (re-run): a dead letter that applied is not applied again');
SELECT is(pg_temp.account('NOPE'), 'allocation 100.00+100.00+100.00=300.00 value 105.00+100.00+90.00=295.00',
    'NOPE is unchanged by the re-run');
SELECT is((SELECT count(*)::int FROM cm.dead_letter), 10, '10 dead letters remain');

-- 3. a uuid used by both queues, whatever the timestamps ----------------------
-- Investment 20 and withdrawal 4 share a uuid and were written by one
-- queue-db transaction (same updated_at, same status); withdrawal 5 shares
-- investment 21's uuid and is older.  The investment source is read first
-- and wins; the withdrawals must be dead-lettered, not dropped.
INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (20, 'B1', 1, 1, 1, 'e0000000-0000-4000-8000-000000000020', 'PENDING', now(), now()),
       (21, 'B1', 1, 1, 1, 'e0000000-0000-4000-8000-000000000021', 'PENDING', now(), now());
INSERT INTO cm_remote.queue_server_withdrawal_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (4, 'B1', 2, 2, 2, 'e0000000-0000-4000-8000-000000000020', 'PENDING', now(), now()),
       (5, 'B1', 2, 2, 2, 'e0000000-0000-4000-8000-000000000021', 'PENDING', now(), now() - interval '1 minute');

SELECT is(pg_temp.sync(),
    'sources=3 rows_read=26 created=2 updated=0 completed_applied=0 compensated=0 dead_lettered=2',
    'cycle 5: two investments are created, the two withdrawals reusing their uuids are dead-lettered');
SELECT matches(pg_temp.reason('withdrawal', 4), '^uuid e0000000-0000-4000-8000-000000000020 is already used by source [0-9]+, queue_id 20 \(INVEST\)$',
    'a withdrawal with the same uuid, updated_at and status as an investment is dead-lettered');
SELECT matches(pg_temp.reason('withdrawal', 5), '^uuid e0000000-0000-4000-8000-000000000021 is already used by source [0-9]+, queue_id 21 \(INVEST\)$',
    'a withdrawal with the uuid of a newer investment is dead-lettered');
SELECT is(pg_temp.tx('e0000000-0000-4000-8000-000000000020'), 'B1 INVEST 1.00 1.00 1.00=3.00 PENDING',
    'the investment keeps the uuid');

-- investment 16 moves on; withdrawal 2, dead-lettered in cycle 1 for reusing
-- its uuid, has not been fixed and must stay a dead letter
UPDATE cm_remote.queue_server_investment_queue SET status = 'PROCESSING' WHERE queue_id = 16;
DO $$ BEGIN PERFORM cm_sync_now(); END $$;
SELECT matches(pg_temp.reason('withdrawal', 2), '^uuid e0000000-0000-4000-8000-000000000016 is already used by source [0-9]+, queue_id 16 \(INVEST\)$',
    'a uuid-conflict dead letter stays when the winning investment changes later');
SELECT is(pg_temp.tx('e0000000-0000-4000-8000-000000000016'), 'B1 INVEST 1.00 1.00 1.00=3.00 PENDING',
    'the investment that owns the uuid is updated');
SELECT is(pg_temp.account('B1'), 'allocation 950.00+2000.00+3300.00=6250.00 value 1050.00+2000.00+2700.00=5750.00',
    'no withdrawal reusing a uuid touched B1');

SELECT * FROM finish();
ROLLBACK;
