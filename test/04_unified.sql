-- 04_unified.sql -- the sync cycle over the unified layout (docs/ARCHITECTURE.md, section 1):
-- one table, accountid instead of account_number, and a transaction_type
-- column (INVEST / WITHDRAW) that decides the sign and the tier math.
--
-- Tier deltas: tier 1 +5 %, tier 2 0, tier 3 -10 %.

BEGIN;
SET LOCAL client_min_messages = warning;

SELECT plan(21);

\ir lib/helpers.sql

SELECT cm_set_tier_values(1, 1000000, 1050000);
SELECT cm_set_tier_values(3, 500000, 450000);

INSERT INTO user_portfolios (accountid,
        tier1_allocation, tier2_allocation, tier3_allocation, total_allocation,
        tier1_value, tier2_value, tier3_value, total_value)
VALUES ('U1', 1000.00, 2000.00, 3000.00, 6000.00, 1000.00, 2000.00, 3000.00, 6000.00),
       ('U2', 500.00, 500.00, 500.00, 1500.00, 500.00, 500.00, 500.00, 1500.00);

SELECT results_eq(
    $$SELECT foreign_table::text, layout FROM cm_attach_queue('queue_server', 'unified')$$,
    $$VALUES ('cm_remote.queue_server_unified_investment_withdrawal_queue', 'unified')$$,
    'cm_attach_queue(server, ''unified'') registers the unified table');
SELECT results_eq(
    $$SELECT remote_schema, remote_table, layout, account_column::text COLLATE "default" FROM cm.source$$,
    $$VALUES ('unified', 'investment_withdrawal_queue', 'unified', 'accountid')$$,
    'the unified source reads accountid');
SELECT results_eq(
    $$SELECT layout FROM cm_attach_queue('queue_server', 'unified')$$,
    $$VALUES ('unified')$$,
    'cm_attach_queue is idempotent');
SELECT is((SELECT count(*)::int FROM cm.source), 1, 'attaching twice registers one source');

SELECT pg_temp.queue_writable();
INSERT INTO cm_remote.queue_server_unified_investment_withdrawal_queue
        (queue_id, accountid, transaction_type, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (1, 'U1', 'INVEST',   100, 200, 300.005, 'b0000000-0000-4000-8000-000000000001', 'PENDING',   now(), now()),
       (2, 'U1', 'WITHDRAW', 10,  20,  30,      'b0000000-0000-4000-8000-000000000002', 'PENDING',   now(), now()),
       (3, 'U2', 'WITHDRAW', 1,   2,   3,       'b0000000-0000-4000-8000-00000000000c', 'COMPLETED', now(), now());

-- U2 allocations: 500.00 * 0.95 = 475.00, 500.00, 500.00 * 1.1 = 550.00, total 1525.00
SELECT is(pg_temp.sync(),
    'sources=1 rows_read=3 created=3 updated=0 completed_applied=1 compensated=0 dead_lettered=0',
    'cycle 1: three new requests, one completed on arrival');
SELECT is(pg_temp.tx('b0000000-0000-4000-8000-000000000001'), 'U1 INVEST 100.00 200.00 300.01=600.01 PENDING',
    'INVEST is stored as INVEST with positive tier changes');
SELECT is(pg_temp.tx('b0000000-0000-4000-8000-000000000002'), 'U1 WITHDRAWAL -10.00 -20.00 -30.00=-60.00 PENDING',
    'WITHDRAW is stored as WITHDRAWAL with negative tier changes');
SELECT is(pg_temp.tx('b0000000-0000-4000-8000-00000000000c'), 'U2 WITHDRAWAL -1.00 -2.00 -3.00=-6.00 COMPLETED',
    'a lower-case uuid is stored as the same uuid');
SELECT is(pg_temp.account('U2'), 'allocation 475.00+500.00+550.00=1525.00 value 500.00+500.00+500.00=1500.00',
    'a withdrawal completed on arrival multiplies the allocations by (1 - delta)');
SELECT is(pg_temp.account('U1'), 'allocation 1000.00+2000.00+3000.00=6000.00 value 1000.00+2000.00+3000.00=6000.00',
    'PENDING requests leave the account alone');

UPDATE cm_remote.queue_server_unified_investment_withdrawal_queue SET status = 'PROCESSING' WHERE queue_id IN (1, 2);
SELECT is(pg_temp.sync(),
    'sources=1 rows_read=3 created=0 updated=2 completed_applied=0 compensated=0 dead_lettered=0',
    'cycle 2: PENDING -> PROCESSING');
SELECT results_eq(
    $$SELECT status::text FROM portfolio_transactions WHERE accountid = 'U1' ORDER BY id$$,
    $$VALUES ('PENDING'), ('PENDING')$$,
    'PROCESSING is mapped to PENDING');

-- U1 values: 1000.00 * 1.05 = 1050.00, 2000.00, 3000.00 * 0.9 = 2700.00, total 5750.00
-- U1 allocations: 1000.00 * 0.95 = 950.00, 2000.00, 3000.00 * 1.1 = 3300.00, total 6250.00
UPDATE cm_remote.queue_server_unified_investment_withdrawal_queue SET status = 'COMPLETED' WHERE queue_id IN (1, 2);
SELECT is(pg_temp.sync(),
    'sources=1 rows_read=3 created=0 updated=2 completed_applied=2 compensated=0 dead_lettered=0',
    'cycle 3: both requests of U1 complete');
SELECT is(pg_temp.account('U1'), 'allocation 950.00+2000.00+3300.00=6250.00 value 1050.00+2000.00+2700.00=5750.00',
    'an investment and a withdrawal of one account complete in one cycle');

SELECT is(pg_temp.sync(),
    'sources=1 rows_read=3 created=0 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'cycle 4 (re-run) changes nothing');
SELECT is(pg_temp.account('U1'), 'allocation 950.00+2000.00+3300.00=6250.00 value 1050.00+2000.00+2700.00=5750.00',
    'the re-run leaves U1 alone');

UPDATE cm_remote.queue_server_unified_investment_withdrawal_queue SET status = 'CANCELLED' WHERE queue_id = 2;
UPDATE cm_remote.queue_server_unified_investment_withdrawal_queue SET status = 'FAILED' WHERE queue_id = 3;
SELECT is(pg_temp.sync(),
    'sources=1 rows_read=3 created=0 updated=2 completed_applied=0 compensated=2 dead_lettered=0',
    'cycle 5: two withdrawals leave COMPLETED');
SELECT is(pg_temp.account('U1'), 'allocation 1000.00+2000.00+3000.00=6000.00 value 1050.00+2000.00+2700.00=5750.00',
    'the cancelled withdrawal''s allocation factors are divided back out; the investment stays');
SELECT is(pg_temp.account('U2'), 'allocation 500.00+500.00+500.00=1500.00 value 500.00+500.00+500.00=1500.00',
    'the failed withdrawal is compensated');

SELECT results_eq(
    $$SELECT uuid::text, kind, status, applied FROM cm.ledger ORDER BY uuid$$,
    $$VALUES ('b0000000-0000-4000-8000-000000000001', 'INVEST', 'COMPLETED', true),
             ('b0000000-0000-4000-8000-000000000002', 'WITHDRAWAL', 'CANCELLED', false),
             ('b0000000-0000-4000-8000-00000000000c', 'WITHDRAWAL', 'FAILED', false)$$,
    'the ledger has one row per uuid with the last status seen');
SELECT is((SELECT watermark FROM cm.source),
          (SELECT max(updated_at) FROM cm_remote.queue_server_unified_investment_withdrawal_queue),
    'the watermark of the unified source is its newest updated_at');

SELECT * FROM finish();
ROLLBACK;
