-- 05_pages_lookback.sql -- reading a source in keyset pages, and the
-- look-back window (docs/ARCHITECTURE.md, 4.3 to 4.5).
--
-- Pages: 20 rows read 3 at a time, with updated_at ties that straddle page
-- boundaries and queue_ids that run against the updated_at order, so only a
-- correct (updated_at, queue_id) keyset reads each row exactly once.
--
-- Look-back: a row whose updated_at is older than the watermark but inside
-- the window is still read (a transaction that committed late); one older
-- than the window is not, until the window is widened.

BEGIN;
SET LOCAL client_min_messages = warning;

SELECT plan(25);

\ir lib/helpers.sql

SELECT cm_set_tier_values(1, 1000000, 1050000);
SELECT cm_set_tier_values(3, 500000, 450000);

INSERT INTO user_portfolios (accountid,
        tier1_allocation, tier2_allocation, tier3_allocation, total_allocation,
        tier1_value, tier2_value, tier3_value, total_value)
VALUES ('P1', 1000.00, 1000.00, 1000.00, 3000.00, 1000.00, 1000.00, 1000.00, 3000.00),
       ('P2', 100.00, 100.00, 100.00, 300.00, 100.00, 100.00, 100.00, 300.00);

SELECT is((SELECT count(*)::int FROM cm_attach_queue('queue_server')), 2, 'the split layout is attached');

-- 1. pages -----------------------------------------------------------------
-- i = 1..20: queue_id 21 - i, updated_at now() - ((20 - i) / 4) s, so five
-- groups of four equal timestamps; tiers (i, 2i, 0.25); every fifth row
-- COMPLETED (i = 5, 10, 15, 20).  Total of all rows: 3 * 210 + 20 * 0.25 = 635.00.
-- P1 after four completions: 1000.00 * 1.05^4 = 1215.50625 -> 1215.51,
-- 1000.00, 1000.00 * 0.9^4 = 656.10, total 2871.61.
SELECT pg_temp.queue_writable();
INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
SELECT 21 - i, 'P1', i, 2 * i, 0.25,
       format('c0000000-0000-4000-8000-%s', lpad(i::text, 12, '0')),
       CASE WHEN i % 5 = 0 THEN 'COMPLETED' ELSE 'PENDING' END,
       now(), now() - make_interval(secs => (20 - i) / 4)
  FROM generate_series(1, 20) AS i;

SET LOCAL consistency_manager.batch_size = 3;
SELECT is(pg_temp.sync(),
    'sources=2 rows_read=20 created=20 updated=0 completed_applied=4 compensated=0 dead_lettered=0',
    'batch_size = 3: the 20 rows are read in 7 pages and all applied');
SELECT is((SELECT count(*)::int FROM portfolio_transactions), 20, 'every row became a transaction');
SELECT is((SELECT sum(total_amount) FROM portfolio_transactions), 635.00::numeric,
    'the amounts of all 20 rows are there');
SELECT set_eq(
    'SELECT lower(uuid)::uuid FROM cm_remote.queue_server_investment_queue',
    'SELECT id FROM portfolio_transactions',
    'the transactions are exactly the queue rows');
SELECT is(pg_temp.account('P1'), 'allocation 1000.00+1000.00+1000.00=3000.00 value 1215.51+1000.00+656.10=2871.61',
    'the four completions read in different pages compound in one cycle');
SELECT is((SELECT watermark FROM cm.source WHERE layout = 'investment'), now(),
    'the watermark is the newest updated_at of the last page');
SELECT is((SELECT count(*)::int FROM cm.ledger), 20, 'the ledger has a row per uuid');
SELECT is_empty('SELECT * FROM cm.batch', 'cm.batch is empty after a cycle');

SELECT is(pg_temp.sync(),
    'sources=2 rows_read=20 created=0 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'batch_size = 3: the re-run re-reads the 20 rows in pages and changes nothing');
SET LOCAL consistency_manager.batch_size = 1;
SELECT is(pg_temp.sync(),
    'sources=2 rows_read=20 created=0 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'batch_size = 1: every row is read once');
SET LOCAL consistency_manager.batch_size = 4;
SELECT is(pg_temp.sync(),
    'sources=2 rows_read=20 created=0 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'batch_size = 4 (pages end exactly on the ties): every row is read once');
SET LOCAL consistency_manager.batch_size = 20;
SELECT is(pg_temp.sync(),
    'sources=2 rows_read=20 created=0 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'batch_size = 20 (one full page, then an empty one): every row is read once');

-- a change in a late page is picked up with its neighbours
SET LOCAL consistency_manager.batch_size = 3;
UPDATE cm_remote.queue_server_investment_queue SET status = 'FAILED' WHERE queue_id IN (16, 11);
SELECT is(pg_temp.sync(),
    'sources=2 rows_read=20 created=0 updated=2 completed_applied=0 compensated=2 dead_lettered=0',
    'two completions fail: both compensated, read through pages');
-- 1215.51 / 1.05^2 = 1102.5034... -> 1102.50; 656.10 / 0.81 = 810.00
SELECT is(pg_temp.account('P1'), 'allocation 1000.00+1000.00+1000.00=3000.00 value 1102.50+1000.00+810.00=2912.50',
    'the compensations compound');
RESET consistency_manager.batch_size;

-- 2. look-back window -------------------------------------------------------
-- Only the withdrawal source takes part: switch the investment source off.
UPDATE cm.source SET enabled = false WHERE layout = 'investment';
SET LOCAL consistency_manager.lookback_window = '10min';

INSERT INTO cm_remote.queue_server_withdrawal_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (1, 'P2', 1, 1, 1, 'd0000000-0000-4000-8000-000000000001', 'PENDING', now(), now() - interval '1 hour');

SELECT is(pg_temp.sync(),
    'sources=1 rows_read=1 created=1 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'a disabled source is skipped; the withdrawal is created');
SELECT is((SELECT watermark FROM cm.source WHERE layout = 'withdrawal'), now() - interval '1 hour',
    'the watermark is the updated_at of the row read');

-- L2 committed late: 5 minutes older than the watermark (inside the window);
-- L3 is 20 minutes older (outside it)
INSERT INTO cm_remote.queue_server_withdrawal_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (2, 'P2', 2, 2, 2, 'd0000000-0000-4000-8000-000000000002', 'PENDING', now(), now() - interval '65 minutes'),
       (3, 'P2', 3, 3, 3, 'd0000000-0000-4000-8000-000000000003', 'PENDING', now(), now() - interval '80 minutes');

SELECT is(pg_temp.sync(),
    'sources=1 rows_read=2 created=1 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'look-back: the late row inside the window is read; the row read before is a no-op');
SELECT results_eq(
    $$SELECT total_amount FROM portfolio_transactions WHERE accountid = 'P2' ORDER BY total_amount$$,
    $$VALUES (-6.00::numeric), (-3.00::numeric)$$,
    'the row older than the window is not read');
SELECT is((SELECT watermark FROM cm.source WHERE layout = 'withdrawal'), now() - interval '1 hour',
    'the watermark never moves back');

SET LOCAL consistency_manager.lookback_window = '30min';
SELECT is(pg_temp.sync(),
    'sources=1 rows_read=3 created=1 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'a wider window reads the older row too');

SET LOCAL consistency_manager.lookback_window = 0;
SELECT is(pg_temp.sync(),
    'sources=1 rows_read=0 created=0 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'with no window nothing already read is read again (the read position is a keyset)');

-- P2 allocations: 100.00 * 0.95 = 95.00, 100.00, 100.00 * 1.1 = 110.00, total 305.00
UPDATE cm_remote.queue_server_withdrawal_queue SET status = 'COMPLETED' WHERE queue_id = 2;
SELECT is(pg_temp.sync(),
    'sources=1 rows_read=1 created=0 updated=1 completed_applied=1 compensated=0 dead_lettered=0',
    'an update stamps a new updated_at past the watermark and is read, alone');
SELECT is(pg_temp.account('P2'), 'allocation 95.00+100.00+110.00=305.00 value 100.00+100.00+100.00=300.00',
    'the completed withdrawal is applied once');
SELECT is(pg_temp.sync(),
    'sources=1 rows_read=1 created=0 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'the re-run reads the row at the watermark and changes nothing');

SELECT * FROM finish();
ROLLBACK;
