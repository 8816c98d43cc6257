-- The sync cycle against a loopback postgres_fdw server: both layouts, the
-- status map, every status transition, compounding, compensation, dead
-- letters and their retry, re-reads, many pages, and the pushdown.
SELECT current_database() AS portfolio_db \gset
CREATE DATABASE cm_regress_queue;
\c cm_regress_queue
\set ECHO none
\i test/fixtures/queue_db.sql
\set ECHO all
\c :portfolio_db
\set ECHO none
\i test/fixtures/portfolio_db.sql
\set ECHO all
CREATE EXTENSION consistency_manager CASCADE;
DO $$
BEGIN
    EXECUTE format('CREATE SERVER queue_server FOREIGN DATA WRAPPER postgres_fdw'
                   ' OPTIONS (host %L, port %L, dbname %L)',
                   '127.0.0.1', current_setting('port'), 'cm_regress_queue');
END
$$;
CREATE USER MAPPING FOR CURRENT_USER SERVER queue_server;

-- attaching: both split tables; again is harmless; the unified schema too
SELECT * FROM cm_attach_queue('queue_server');
SELECT * FROM cm_attach_queue('queue_server');
SELECT * FROM cm_attach_queue('queue_server', 'unified');
SELECT * FROM cm_attach_queue('queue_server', 'nowhere');
SELECT * FROM cm_attach_queue('no_such_server');
SELECT source_id, table_name, layout, account_column, watermark, enabled FROM cm.source ORDER BY 1;
-- read in pages of one round trip each, never written, and reconciled beside the local checksums
SELECT ftoptions FROM pg_foreign_table WHERE ftrelid = 'cm_remote.queue_server_investment_queue'::regclass;

-- the keyset page goes to queue-db whole: filter, order and limit (the cycle
-- plans its pages with enable_sort off, so the order is never done locally)
SET enable_sort = off;
PREPARE page(timestamptz, bigint, bigint) AS
    SELECT q.queue_id, q.uuid, q.account_number, q.tier_1, q.tier_2, q.tier_3, q.status,
           q.created_at, q.updated_at
      FROM cm_remote.queue_server_investment_queue q
     WHERE q.updated_at >= $1 AND (q.updated_at > $1 OR q.queue_id > $2)
     ORDER BY q.updated_at, q.queue_id LIMIT $3;
EXPLAIN (VERBOSE, COSTS OFF) EXECUTE page('2026-01-01', 0, 100);
DEALLOCATE page;
RESET enable_sort;

-- a deliberately narrow column, widened later: the row waits in dead letters
ALTER TABLE portfolio_transactions ALTER COLUMN total_amount TYPE numeric(8,2);
INSERT INTO user_portfolios VALUES
    ('A1', 100.00, 200.00, 300.00, 600.00, 1000.00, 2000.00, 3000.00, 6000.00),
    ('A2', 10.00, 20.00, 30.00, 60.00, 10.00, 20.00, 30.00, 60.00);
SELECT cm_set_tier_values(1, 1000000, 1050000);
SELECT cm_set_tier_values(3, 500000, 450000);

\c cm_regress_queue
INSERT INTO investment_queue (account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at) VALUES
    ('A1', 10, 20, 30,    '00000000-0000-4000-8000-000000000001', 'COMPLETED',  '2026-01-01 10:00+00', '2026-01-01 10:00+00'),
    ('A1', 1.005, 0, 0,   '00000000-0000-4000-8000-000000000002', 'COMPLETED',  '2026-01-01 10:01+00', '2026-01-01 10:01+00'),
    ('A2', 1, 2, 3,       '00000000-0000-4000-8000-000000000003', 'PENDING',    '2026-01-01 10:02+00', '2026-01-01 10:02+00'),
    ('A2', 4, 5, 6,       '00000000-0000-4000-8000-000000000004', 'PROCESSING', '2026-01-01 10:03+00', '2026-01-01 10:03+00'),
    ('A2', 1, 1, 1,       'not-a-uuid',                           'COMPLETED',  '2026-01-01 10:04+00', '2026-01-01 10:04+00'),
    ('A3', 1, 1, 1,       '00000000-0000-4000-8000-000000000006', 'COMPLETED',  '2026-01-01 10:05+00', '2026-01-01 10:05+00'),
    ('A2', 1, 1, 1,       '00000000-0000-4000-8000-000000000007', NULL,         '2026-01-01 10:06+00', '2026-01-01 10:06+00'),
    ('A2', 1, 1, 1,       '00000000-0000-4000-8000-000000000008', 'ON_HOLD',    '2026-01-01 10:07+00', '2026-01-01 10:07+00'),
    ('A2', -1, 1, 1,      '00000000-0000-4000-8000-000000000009', 'COMPLETED',  '2026-01-01 10:08+00', '2026-01-01 10:08+00'),
    ('A2', 999999.99, 0, 0.01,
                          '00000000-0000-4000-8000-000000000010', 'PENDING',    '2026-01-01 10:09+00', '2026-01-01 10:09+00'),
    ('ACCOUNT_TOO_LONG', 1, 1, 1,
                          '00000000-0000-4000-8000-000000000011', 'PENDING',    '2026-01-01 10:10+00', '2026-01-01 10:10+00'),
    ('A2', 'NaN', 1, 1,   '00000000-0000-4000-8000-000000000012', 'PENDING',    '2026-01-01 10:11+00', '2026-01-01 10:11+00'),
    ('A2', 1, 1, 1,       'ABCDEF00-0000-4000-8000-000000000013', 'PENDING',    '2026-01-01 10:12+00', '2026-01-01 10:12+00');
INSERT INTO withdrawal_queue (account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at) VALUES
    ('A1', 5, 5, 5,       '00000000-0000-4000-8000-000000000101', 'COMPLETED',  '2026-01-01 10:00+00', '2026-01-01 10:00+00'),
    ('A2', 1, 1, 1,       '00000000-0000-4000-8000-000000000001', 'PENDING',    '2026-01-01 10:01+00', '2026-01-01 10:01+00');
\c :portfolio_db

-- first cycle: good rows applied, bad rows dead-lettered, nothing stops
SELECT sources, rows_read, created, updated, completed_applied, compensated, dead_lettered FROM cm_sync_now();
SELECT id, accountid, transaction_type, tier1_change, tier2_change, tier3_change, total_amount, status, updated_at
  FROM portfolio_transactions ORDER BY id;
-- A1: two completed investments compound: 1000 * 1.05^2 = 1102.50, 3000 * 0.9^2 = 2430;
-- one completed withdrawal: 100 * 0.95 = 95, 300 * 1.1 = 330
SELECT accountid, tier1_allocation, tier2_allocation, tier3_allocation, total_allocation,
       tier1_value, tier2_value, tier3_value, total_value FROM user_portfolios ORDER BY accountid;
SELECT source_id, queue_id, uuid, accountid, status, reason, attempts FROM cm.dead_letter ORDER BY source_id, queue_id;
SELECT uuid, source_id, kind, status, applied, factor1, factor2, factor3 FROM cm.ledger ORDER BY uuid;
SELECT source_id, watermark FROM cm.source ORDER BY 1;

-- a second cycle re-reads the look-back window: no effect, twice no effect
SELECT sources, rows_read, created, updated, completed_applied, compensated, dead_lettered FROM cm_sync_now();
SELECT sources, rows_read, created, updated, completed_applied, compensated, dead_lettered FROM cm_sync_now();
SELECT accountid, total_value, total_allocation FROM user_portfolios ORDER BY accountid;
SELECT queue_id, attempts FROM cm.dead_letter WHERE source_id = 1 ORDER BY queue_id;

-- transitions: PENDING -> PROCESSING -> COMPLETED; COMPLETED -> FAILED compensates
\c cm_regress_queue
UPDATE investment_queue SET status = 'PROCESSING' WHERE uuid = '00000000-0000-4000-8000-000000000003';
UPDATE investment_queue SET status = 'COMPLETED' WHERE uuid = '00000000-0000-4000-8000-000000000004';
UPDATE investment_queue SET status = 'FAILED' WHERE uuid = '00000000-0000-4000-8000-000000000002';
UPDATE withdrawal_queue SET status = 'CANCELLED' WHERE uuid = '00000000-0000-4000-8000-000000000101';
\c :portfolio_db
SELECT sources, rows_read, created, updated, completed_applied, compensated, dead_lettered FROM cm_sync_now();
SELECT id, status, total_amount FROM portfolio_transactions ORDER BY id;
-- A1: the failed investment's factor divided back out (1102.50 / 1.05 = 1050, 2430 / 0.9 = 2700),
-- the cancelled withdrawal's too (95 / 0.95 = 100, 330 / 1.1 = 300);
-- A2: 10 * 1.05 = 10.50, 30 * 0.9 = 27
SELECT accountid, tier1_allocation, tier2_allocation, tier3_allocation, total_allocation,
       tier1_value, tier2_value, tier3_value, total_value FROM user_portfolios ORDER BY accountid;
SELECT uuid, status, applied, factor1 FROM cm.ledger ORDER BY uuid;

-- a completion that comes back after a failure applies again, once
\c cm_regress_queue
UPDATE investment_queue SET status = 'COMPLETED' WHERE uuid = '00000000-0000-4000-8000-000000000002';
\c :portfolio_db
SELECT sources, rows_read, created, updated, completed_applied, compensated, dead_lettered FROM cm_sync_now();
SELECT accountid, tier1_value, tier3_value, total_value FROM user_portfolios ORDER BY accountid;

-- dead letters are retried every cycle and leave once they apply
INSERT INTO user_portfolios VALUES ('A3', 0, 0, 0, 0, 100.00, 100.00, 100.00, 300.00);
INSERT INTO cm.status_map VALUES ('ON_HOLD', 'PENDING');
ALTER TABLE portfolio_transactions ALTER COLUMN total_amount TYPE numeric(15,2);
SELECT sources, rows_read, created, updated, completed_applied, compensated, dead_lettered FROM cm_sync_now();
SELECT source_id, queue_id, reason FROM cm.dead_letter ORDER BY source_id, queue_id;
SELECT accountid, tier1_value, tier2_value, tier3_value, total_value FROM user_portfolios WHERE accountid = 'A3';
SELECT id, accountid, status FROM portfolio_transactions
 WHERE id IN ('00000000-0000-4000-8000-000000000006', '00000000-0000-4000-8000-000000000008',
              '00000000-0000-4000-8000-000000000010') ORDER BY id;

-- the unified layout: transaction_type says which
\c cm_regress_queue
INSERT INTO unified.investment_withdrawal_queue (accountid, transaction_type, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at) VALUES
    ('A2', 'INVEST',   2, 0, 0, '00000000-0000-4000-8000-000000000201', 'COMPLETED', '2026-01-02 10:00+00', '2026-01-02 10:00+00'),
    ('A2', 'WITHDRAW', 1, 0, 1, '00000000-0000-4000-8000-000000000202', 'COMPLETED', '2026-01-02 10:01+00', '2026-01-02 10:01+00'),
    ('A2', 'SWAP',     1, 0, 0, '00000000-0000-4000-8000-000000000203', 'COMPLETED', '2026-01-02 10:02+00', '2026-01-02 10:02+00'),
    ('A2', 'INVEST',   1, 0, 0, '00000000-0000-4000-8000-000000000101', 'PENDING',   '2026-01-02 10:03+00', '2026-01-02 10:03+00');
\c :portfolio_db
SELECT sources, rows_read, created, updated, completed_applied, compensated, dead_lettered FROM cm_sync_now();
SELECT id, transaction_type, tier1_change, tier3_change, total_amount, status FROM portfolio_transactions
 WHERE id::text LIKE '%20_' ORDER BY id;
SELECT accountid, tier1_value, tier1_allocation, tier3_allocation, total_allocation FROM user_portfolios WHERE accountid = 'A2';
SELECT d.queue_id, d.reason FROM cm.dead_letter d JOIN cm.source s USING (source_id)
 WHERE s.layout = 'unified' ORDER BY d.queue_id;

-- many pages: a batch of 2 rows per round trip still reads everything
\c cm_regress_queue
INSERT INTO investment_queue (account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
SELECT 'A3', i, 0, 0, format('00000000-0000-4000-8000-%s', lpad(i::text, 12, '1')), 'COMPLETED',
       now(), now()
  FROM generate_series(1, 7) i;
\c :portfolio_db
SET consistency_manager.batch_size = 2;
SELECT sources, rows_read, created, updated, completed_applied, compensated, dead_lettered FROM cm_sync_now();
-- seven more compounded completions: 105 * 1.05^7 = 147.75, 90 * 0.9^7 = 43.05
SELECT accountid, tier1_value, tier2_value, tier3_value, total_value FROM user_portfolios WHERE accountid = 'A3';
RESET consistency_manager.batch_size;

-- every application CHECK still holds, one ledger row per transaction
SELECT count(*) FILTER (WHERE total_value <> tier1_value + tier2_value + tier3_value
                           OR total_allocation <> tier1_allocation + tier2_allocation + tier3_allocation) AS broken_totals
  FROM user_portfolios;
SELECT (SELECT count(*) FROM cm.ledger) AS ledger_rows, (SELECT count(*) FROM portfolio_transactions) AS transactions;
SELECT trigger, sources, rows_read, created, updated, completed_applied, compensated, dead_lettered
  FROM cm.cycle_history ORDER BY cycle_id;

-- a source whose foreign table went away says what to do
ALTER EXTENSION consistency_manager DROP FOREIGN TABLE cm_remote.queue_server_unified_investment_withdrawal_queue;
DROP FOREIGN TABLE cm_remote.queue_server_unified_investment_withdrawal_queue;
-- the source without its foreign table fails alone: the others sync
SELECT sources, rows_read, created, updated, completed_applied, compensated, dead_lettered FROM cm_sync_now();
SELECT source_id, last_error FROM cm_sources() WHERE last_error IS NOT NULL;
SELECT source_id FROM cm_attach_queue('queue_server', 'unified');
SELECT sources, rows_read, created, updated, completed_applied, compensated, dead_lettered FROM cm_sync_now();
SELECT count(*) AS failing_sources FROM cm_sources() WHERE last_error IS NOT NULL;

DROP EXTENSION consistency_manager;
DROP SERVER queue_server CASCADE;
DROP EXTENSION postgres_fdw;
DROP TABLE portfolio_transactions, user_portfolios;
\c postgres
DROP DATABASE cm_regress_queue;
