-- 03_cycle.sql -- the sync cycle over the split layout (docs/ARCHITECTURE.md, section 3).
--
-- Queue rows are written through the foreign tables: postgres_fdw keeps one
-- remote transaction per local one, so cm_sync_now() sees them and the
-- ROLLBACK at the end undoes both sides.  Inside that remote transaction
-- CURRENT_TIMESTAMP is constant: every UPDATE stamps the same updated_at, and
-- the ledger tells the versions apart by their status.
--
-- Tier deltas: tier 1 +5 % (1000000 -> 1050000), tier 2 0, tier 3 -10 %
-- (500000 -> 450000).  Expected values are worked out by hand next to each
-- assertion.

BEGIN;
SET LOCAL client_min_messages = warning;

SELECT plan(56);

\ir lib/helpers.sql

SELECT cm_set_tier_values(1, 1000000, 1050000);
SELECT cm_set_tier_values(3, 500000, 450000);

INSERT INTO user_portfolios (accountid,
        tier1_allocation, tier2_allocation, tier3_allocation, total_allocation,
        tier1_value, tier2_value, tier3_value, total_value)
VALUES ('A1', 1000.00, 2000.00, 3000.00, 6000.00, 1000.00, 2000.00, 3000.00, 6000.00),
       ('A2', 1000.00, 2000.00, 3000.00, 6000.00, 1000.00, 2000.00, 3000.00, 6000.00),
       ('A3', 1000.07, 2000.00, 3000.03, 6000.10, 1000.07, 2000.00, 3000.03, 6000.10),
       ('A4', 10.00, 10.00, 10.00, 30.00, 10.00, 10.00, 10.00, 30.00);

SELECT results_eq(
    $$SELECT foreign_table::text, layout FROM cm_attach_queue('queue_server') ORDER BY source_id$$,
    $$VALUES ('cm_remote.queue_server_investment_queue', 'investment'),
             ('cm_remote.queue_server_withdrawal_queue', 'withdrawal')$$,
    'cm_attach_queue registers both tables of the split layout');

SELECT is(pg_temp.sync(),
    'sources=2 rows_read=0 created=0 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'a cycle over empty queues does nothing');
SELECT is((SELECT count(*)::int FROM cm.source WHERE watermark IS NOT NULL), 0,
    'an empty read leaves the watermarks unset');

-- 1. new requests: PENDING ------------------------------------------------------
-- I1's amounts have 8 decimals, so the
-- tiers are rounded to the 2 of portfolio_transactions and the total is the
-- sum of the rounded tiers: 100.01 + 200.00 + 300.13 = 600.14 (the raw sum
-- 600.134 would round to 600.13).
SELECT pg_temp.queue_writable();
INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (1, 'A1', 100.005, 200.004, 300.125, 'a1b2c3d4-0000-4000-8000-000000000001', 'PENDING',
        '2024-05-01 10:00:00+00', now());
INSERT INTO cm_remote.queue_server_withdrawal_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (1, 'A2', 50, 25.5, 10.25, 'a1b2c3d4-0000-4000-8000-000000000002', 'PENDING',
        '2024-05-01 11:00:00+00', now());

SELECT is(pg_temp.sync(),
    'sources=2 rows_read=2 created=2 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'cycle 1: two new PENDING requests are created');
SELECT is(pg_temp.tx('a1b2c3d4-0000-4000-8000-000000000001'),
    'A1 INVEST 100.01 200.00 300.13=600.14 PENDING',
    'the investment is stored under its uuid, positive, rounded, total = sum of rounded tiers');
SELECT is(pg_temp.tx('a1b2c3d4-0000-4000-8000-000000000002'),
    'A2 WITHDRAWAL -50.00 -25.50 -10.25=-85.75 PENDING',
    'the withdrawal is stored under its uuid with negative tier changes');
SELECT results_eq(
    $$SELECT created_at, updated_at FROM portfolio_transactions
       WHERE id = 'a1b2c3d4-0000-4000-8000-000000000001'$$,
    $$VALUES ('2024-05-01 10:00:00+00'::timestamptz, now())$$,
    'created_at and updated_at are carried over from the queue');
SELECT is(pg_temp.account('A1'), 'allocation 1000.00+2000.00+3000.00=6000.00 value 1000.00+2000.00+3000.00=6000.00',
    'a PENDING investment does not touch the account');
SELECT is(pg_temp.account('A2'), 'allocation 1000.00+2000.00+3000.00=6000.00 value 1000.00+2000.00+3000.00=6000.00',
    'a PENDING withdrawal does not touch the account');
SELECT is(pg_temp.ledger('a1b2c3d4-0000-4000-8000-000000000001'), 'INVEST PENDING applied=false factors=NULL,NULL,NULL',
    'the ledger records the investment as seen, nothing applied');
SELECT results_eq(
    $$SELECT s.layout, s.watermark FROM cm.source s ORDER BY s.source_id$$,
    $$VALUES ('investment', now()), ('withdrawal', now())$$,
    'each source''s watermark advances to the newest updated_at it read');
SELECT is_empty('SELECT * FROM cm.batch', 'cm.batch is empty after a cycle');

SELECT is(pg_temp.sync(),
    'sources=2 rows_read=2 created=0 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'cycle 2 (re-run): the rows are re-read through the look-back window and change nothing');

-- 2. PROCESSING maps to PENDING ---------------------------------------------
UPDATE cm_remote.queue_server_investment_queue SET status = 'PROCESSING' WHERE queue_id = 1;
UPDATE cm_remote.queue_server_withdrawal_queue SET status = 'PROCESSING' WHERE queue_id = 1;

SELECT is(pg_temp.sync(),
    'sources=2 rows_read=2 created=0 updated=2 completed_applied=0 compensated=0 dead_lettered=0',
    'cycle 3: PENDING -> PROCESSING updates both requests');
SELECT results_eq(
    $$SELECT status::text FROM portfolio_transactions ORDER BY id$$,
    $$VALUES ('PENDING'), ('PENDING')$$,
    'PROCESSING is mapped to PENDING in portfolio_transactions');
SELECT is(pg_temp.ledger('a1b2c3d4-0000-4000-8000-000000000001'), 'INVEST PROCESSING applied=false factors=NULL,NULL,NULL',
    'the ledger keeps the queue status PROCESSING');
SELECT is((SELECT updated_at FROM portfolio_transactions WHERE id = 'a1b2c3d4-0000-4000-8000-000000000001'),
          (SELECT updated_at FROM cm_remote.queue_server_investment_queue WHERE queue_id = 1),
    'portfolio_transactions.updated_at follows the queue row''s updated_at');
SELECT ok((SELECT watermark FROM cm.source WHERE layout = 'investment') > now(),
    'the watermark moved to the updated_at the queue''s trigger stamped');
SELECT is((SELECT watermark FROM cm.source WHERE layout = 'investment'),
          (SELECT max(updated_at) FROM cm_remote.queue_server_investment_queue),
    'the watermark is the newest updated_at of the investment queue');
SELECT is(pg_temp.account('A1'), 'allocation 1000.00+2000.00+3000.00=6000.00 value 1000.00+2000.00+3000.00=6000.00',
    'PROCESSING does not touch the account');

-- 3. COMPLETED applies the tier math once ---------------------------------------
-- A1 (investment): values 1000.00 * 1.05 = 1050.00, 2000.00 * 1 = 2000.00,
--   3000.00 * 0.9 = 2700.00, total 5750.00; allocations unchanged.
-- A2 (withdrawal): allocations 1000.00 * 0.95 = 950.00, 2000.00,
--   3000.00 * 1.1 = 3300.00, total 6250.00; values unchanged.
UPDATE cm_remote.queue_server_investment_queue SET status = 'COMPLETED' WHERE queue_id = 1;
UPDATE cm_remote.queue_server_withdrawal_queue SET status = 'COMPLETED' WHERE queue_id = 1;

SELECT is(pg_temp.sync(),
    'sources=2 rows_read=2 created=0 updated=2 completed_applied=2 compensated=0 dead_lettered=0',
    'cycle 4: PROCESSING -> COMPLETED applies both completions');
SELECT is(pg_temp.account('A1'), 'allocation 1000.00+2000.00+3000.00=6000.00 value 1050.00+2000.00+2700.00=5750.00',
    'a completed investment multiplies the values by (1 + delta)');
SELECT is(pg_temp.account('A2'), 'allocation 950.00+2000.00+3300.00=6250.00 value 1000.00+2000.00+3000.00=6000.00',
    'a completed withdrawal multiplies the allocations by (1 - delta)');
SELECT results_eq(
    $$SELECT status::text FROM portfolio_transactions ORDER BY id$$,
    $$VALUES ('COMPLETED'), ('COMPLETED')$$,
    'both transactions are COMPLETED');
SELECT is(pg_temp.ledger('a1b2c3d4-0000-4000-8000-000000000001'), 'INVEST COMPLETED applied=true factors=1.05,1,0.9',
    'the ledger records the investment''s factors 1 + delta');
SELECT is(pg_temp.ledger('a1b2c3d4-0000-4000-8000-000000000002'), 'WITHDRAWAL COMPLETED applied=true factors=0.95,1,1.1',
    'the ledger records the withdrawal''s factors 1 - delta');

SELECT is(pg_temp.sync(),
    'sources=2 rows_read=2 created=0 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'cycle 5 (re-run): a completion read again is not applied again');
SELECT is(pg_temp.account('A1'), 'allocation 1000.00+2000.00+3000.00=6000.00 value 1050.00+2000.00+2700.00=5750.00',
    'the investment''s account is unchanged by the re-run');
SELECT is(pg_temp.account('A2'), 'allocation 950.00+2000.00+3300.00=6250.00 value 1000.00+2000.00+3000.00=6000.00',
    'the withdrawal''s account is unchanged by the re-run');

-- 4. leaving COMPLETED compensates ------------------------------------------
-- 1050.00 / 1.05 = 1000.00, 2700.00 / 0.9 = 3000.00; 950.00 / 0.95 = 1000.00,
-- 3300.00 / 1.1 = 3000.00.
UPDATE cm_remote.queue_server_investment_queue SET status = 'FAILED' WHERE queue_id = 1;
UPDATE cm_remote.queue_server_withdrawal_queue SET status = 'CANCELLED' WHERE queue_id = 1;

SELECT is(pg_temp.sync(),
    'sources=2 rows_read=2 created=0 updated=2 completed_applied=0 compensated=2 dead_lettered=0',
    'cycle 6: COMPLETED -> FAILED / CANCELLED compensates both');
SELECT is(pg_temp.account('A1'), 'allocation 1000.00+2000.00+3000.00=6000.00 value 1000.00+2000.00+3000.00=6000.00',
    'COMPLETED -> FAILED divides the investment''s factors back out');
SELECT is(pg_temp.account('A2'), 'allocation 1000.00+2000.00+3000.00=6000.00 value 1000.00+2000.00+3000.00=6000.00',
    'COMPLETED -> CANCELLED divides the withdrawal''s factors back out');
SELECT results_eq(
    $$SELECT id::text, status::text FROM portfolio_transactions ORDER BY id$$,
    $$VALUES ('a1b2c3d4-0000-4000-8000-000000000001', 'FAILED'),
             ('a1b2c3d4-0000-4000-8000-000000000002', 'CANCELLED')$$,
    'FAILED and CANCELLED are mirrored');
SELECT is((SELECT count(*)::int FROM cm.ledger WHERE applied), 0,
    'no completion is applied any more');

UPDATE cm_remote.queue_server_investment_queue SET status = 'CANCELLED' WHERE queue_id = 1;
SELECT is(pg_temp.sync(),
    'sources=2 rows_read=2 created=0 updated=1 completed_applied=0 compensated=0 dead_lettered=0',
    'cycle 7: FAILED -> CANCELLED is an update without effect on the account');
SELECT is(pg_temp.account('A1'), 'allocation 1000.00+2000.00+3000.00=6000.00 value 1000.00+2000.00+3000.00=6000.00',
    'FAILED -> CANCELLED does not compensate twice');
SELECT is(pg_temp.tx('a1b2c3d4-0000-4000-8000-000000000001'), 'A1 INVEST 100.01 200.00 300.13=600.14 CANCELLED',
    'the investment is CANCELLED');

-- 5. several completions of one account in one cycle compound -----------------
-- A3 values 1000.07 / 2000.00 / 3000.03, three investments complete:
--   1000.07 * 1.05^3 = 1157.70603375 -> 1157.71 (rounding after each step
--   would give 1157.70), 3000.03 * 0.9^3 = 2187.02187 -> 2187.02 (stepwise
--   2187.03), total 1157.71 + 2000.00 + 2187.02 = 5344.73.
-- A3 allocations, two withdrawals complete:
--   1000.07 * 0.95^2 = 902.563175 -> 902.56 (stepwise 902.57),
--   3000.03 * 1.1^2 = 3630.0363 -> 3630.04 (stepwise 3630.03), total 6532.60.
INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (2, 'A3', 10, 10, 10, 'a1b2c3d4-0000-4000-8000-000000000003', 'COMPLETED', now(), now()),
       (3, 'A3', 10, 10, 10, 'a1b2c3d4-0000-4000-8000-000000000004', 'COMPLETED', now(), now()),
       (4, 'A3', 10, 10, 10, 'a1b2c3d4-0000-4000-8000-000000000005', 'COMPLETED', now(), now()),
       (5, 'A3', 10, 10, 10, 'a1b2c3d4-0000-4000-8000-000000000006', 'PENDING', now(), now());
INSERT INTO cm_remote.queue_server_withdrawal_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (2, 'A3', 1, 2, 3, 'a1b2c3d4-0000-4000-8000-000000000007', 'COMPLETED', now(), now()),
       (3, 'A3', 1, 2, 3, 'a1b2c3d4-0000-4000-8000-000000000008', 'COMPLETED', now(), now());

SELECT is(pg_temp.sync(),
    'sources=2 rows_read=8 created=6 updated=0 completed_applied=5 compensated=0 dead_lettered=0',
    'cycle 8: six new requests, five of them completed on arrival');
SELECT is(pg_temp.account('A3'), 'allocation 902.56+2000.00+3630.04=6532.60 value 1157.71+2000.00+2187.02=5344.73',
    'completions of one account in one cycle compound ((1 + delta)^k), rounded once');
SELECT is(pg_temp.account('A1'), 'allocation 1000.00+2000.00+3000.00=6000.00 value 1000.00+2000.00+3000.00=6000.00',
    'other accounts are untouched');

-- two of the three investments fail and the PENDING one completes, in one
-- cycle: the factors compound to 1 / 1.05 (tier 1) and 1 / 0.9 (tier 3):
--   1157.71 / 1.05 = 1102.5809... -> 1102.58, 2187.02 / 0.9 = 2430.0222... -> 2430.02,
--   total 1102.58 + 2000.00 + 2430.02 = 5532.60
UPDATE cm_remote.queue_server_investment_queue SET status = 'FAILED' WHERE queue_id IN (2, 3);
UPDATE cm_remote.queue_server_investment_queue SET status = 'COMPLETED' WHERE queue_id = 5;

SELECT is(pg_temp.sync(),
    'sources=2 rows_read=8 created=0 updated=3 completed_applied=1 compensated=2 dead_lettered=0',
    'cycle 9: two compensations and one completion of one account');
SELECT is(pg_temp.account('A3'), 'allocation 902.56+2000.00+3630.04=6532.60 value 1102.58+2000.00+2430.02=5532.60',
    'compensations and a completion of one account in one cycle compound');
SELECT results_eq(
    $$SELECT uuid::text, applied FROM cm.ledger WHERE accountid = 'A3' AND kind = 'INVEST' ORDER BY uuid$$,
    $$VALUES ('a1b2c3d4-0000-4000-8000-000000000003', false),
             ('a1b2c3d4-0000-4000-8000-000000000004', false),
             ('a1b2c3d4-0000-4000-8000-000000000005', true),
             ('a1b2c3d4-0000-4000-8000-000000000006', true)$$,
    'the ledger knows which completions are applied');

-- 6. the status map is a table ----------------------------------------------
INSERT INTO cm.status_map VALUES ('ON_HOLD', 'HELD');
INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (6, 'A4', 1, 1, 1, 'a1b2c3d4-0000-4000-8000-000000000009', 'ON_HOLD', now(), now());
UPDATE cm.status_map SET portfolio_status = 'QUEUED' WHERE queue_status = 'PENDING';
INSERT INTO cm_remote.queue_server_withdrawal_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (4, 'A4', 1, 1, 1, 'a1b2c3d4-0000-4000-8000-00000000000a', 'PENDING', now(), now());

SELECT is(pg_temp.sync(),
    'sources=2 rows_read=10 created=2 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'cycle 10: requests with custom status mappings are created');
SELECT is(pg_temp.tx('a1b2c3d4-0000-4000-8000-000000000009'), 'A4 INVEST 1.00 1.00 1.00=3.00 HELD',
    'a status added to cm.status_map is mapped as configured');
SELECT is(pg_temp.tx('a1b2c3d4-0000-4000-8000-00000000000a'), 'A4 WITHDRAWAL -1.00 -1.00 -1.00=-3.00 QUEUED',
    'a changed cm.status_map row is honoured');
SELECT is(pg_temp.account('A4'), 'allocation 10.00+10.00+10.00=30.00 value 10.00+10.00+10.00=30.00',
    'requests that are not COMPLETED leave the account alone');

-- 7. the state the cycles leave ------------------------------------------------
SELECT is((SELECT count(*)::int FROM cm.ledger), 10, 'the ledger has one row per request');
SELECT is((SELECT count(DISTINCT uuid)::int FROM cm.ledger), 10, 'the ledger has one row per uuid');
SELECT set_eq('SELECT uuid FROM cm.ledger', 'SELECT id FROM portfolio_transactions',
    'every ledger row is a portfolio transaction with id = uuid');
SELECT set_eq(
    $$SELECT lower(uuid)::uuid FROM cm_remote.queue_server_investment_queue
      UNION ALL SELECT lower(uuid)::uuid FROM cm_remote.queue_server_withdrawal_queue$$,
    'SELECT id FROM portfolio_transactions',
    'every queue row became a portfolio transaction');
SELECT results_eq(
    $$SELECT layout, watermark FROM cm.source ORDER BY source_id$$,
    $$SELECT 'investment', max(updated_at) FROM cm_remote.queue_server_investment_queue
      UNION ALL SELECT 'withdrawal', max(updated_at) FROM cm_remote.queue_server_withdrawal_queue$$,
    'each watermark is the newest updated_at of its queue');
SELECT is_empty('SELECT * FROM cm.dead_letter', 'nothing was dead-lettered');
SELECT is(
    (SELECT count(*)::int FROM cm.cycle_history
      WHERE trigger = 'manual' AND sources = 2 AND started_at >= now()),
    11, 'cm.cycle_history has a row for each manual cycle');

SELECT is(pg_temp.sync(),
    'sources=2 rows_read=10 created=0 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'a final re-run changes nothing');
SELECT ok((SELECT duration_ms >= 0 AND sources = 2 FROM cm_sync_now()),
    'cm_sync_now() reports a duration');

SELECT * FROM finish();
ROLLBACK;
