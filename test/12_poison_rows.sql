-- 09_poison_rows.sql -- one row the portfolio tables refuse never stops the others.
--
-- On the strict fixture (mixed scales and a CHECK the cycle does not model),
-- with an application trigger that refuses one request and a CHECK on
-- user_portfolios that one account's new value breaks: the cycle applies
-- everything else in the same cycle, dead-letters each refused row with
-- PostgreSQL's message, SQLSTATE and the constraint or code that refused
-- it, retries the dead letters once the cause is gone, and still fails on
-- errors that are not the rows' (and when every row fails).

BEGIN;
SET LOCAL client_min_messages = warning;

SELECT plan(24);

\ir lib/helpers.sql
\ir fixtures/portfolio_strict.sql

SELECT is((SELECT count(*)::int FROM cm_attach_queue('queue_server')), 2, 'the split layout is attached');
SELECT cm_set_tier_values(1, 1000000, 1100000), cm_set_tier_values(2, 1000000, 1000000),
       cm_set_tier_values(3, 1000000, 1000000);
INSERT INTO user_portfolios (accountid,
        tier1_allocation, tier2_allocation, tier3_allocation, total_allocation,
        tier1_value, tier2_value, tier3_value, total_value)
VALUES ('P1', 100.00, 200.00, 300.00, 600.00, 1000.00, 2000.00, 3000.00, 6000.00),
       ('P2', 100.00, 200.00, 300.00, 600.00, 1000.00, 2000.00, 3000.00, 6000.00),
       ('P3', 100.00, 200.00, 300.00, 600.00, 4990.00, 2000.00, 3000.00, 9990.00),
       ('P4', 100.00, 200.00, 300.00, 600.00, 1000.00, 2000.00, 3000.00, 6000.00);

-- the application's own rules
CREATE FUNCTION pg_temp.app_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id = 'e9000000-0000-4000-8000-000000000903' THEN
        RAISE EXCEPTION 'the application refuses transaction %', NEW.id;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER app_refuse BEFORE INSERT ON portfolio_transactions
    FOR EACH ROW EXECUTE FUNCTION pg_temp.app_refuse();
ALTER TABLE user_portfolios ADD CONSTRAINT tier1_cap CHECK (tier1_value < 5000);

SELECT pg_temp.queue_writable();
INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (901, 'P1', 1, 2, 3,     'e9000000-0000-4000-8000-000000000901', 'COMPLETED', now(), now()),
       (902, 'P1', 0.001, 2, 3, 'e9000000-0000-4000-8000-000000000902', 'PENDING', now(), now()),
       (903, 'P2', 10, 0, 0,    'e9000000-0000-4000-8000-000000000903', 'COMPLETED', now(), now()),
       (904, 'P3', 100, 0, 0,   'e9000000-0000-4000-8000-000000000904', 'COMPLETED', now(), now()),
       (905, 'P3', 5, 0, 0,     'e9000000-0000-4000-8000-000000000905', 'PENDING', now(), now()),
       (906, 'P4', 1, 1, 1,     'e9000000-0000-4000-8000-000000000906', 'COMPLETED', now(), now());

SELECT is(pg_temp.sync(), 'sources=2 rows_read=6 created=3 updated=0 completed_applied=2 compensated=0 dead_lettered=3',
    'three rows apply, three are refused: the cycle succeeds');
SELECT is((SELECT string_agg(t.id::text, ',' ORDER BY t.id) FROM portfolio_transactions t),
    'e9000000-0000-4000-8000-000000000901,e9000000-0000-4000-8000-000000000905,e9000000-0000-4000-8000-000000000906',
    'the rows of the same batch that can apply are applied');
SELECT alike((SELECT reason FROM cm.dead_letter WHERE queue_id = 902),
    'new row for relation "portfolio_transactions" violates check constraint "portfolio_transactions_check" (SQLSTATE 23514, constraint portfolio_transactions_check of public.portfolio_transactions) DETAIL: Failing row contains %',
    'a CHECK the cycle does not model: the row is dead-lettered with the message, SQLSTATE, constraint and failing row');
SELECT alike((SELECT reason FROM cm.dead_letter WHERE queue_id = 903),
    'the application refuses transaction e9000000-0000-4000-8000-000000000903 (SQLSTATE P0001, raised by PL/pgSQL function pg_temp_%.app_refuse() line % at RAISE)',
    'a trigger that raises for one request: dead-lettered with the trigger that raised');
SELECT alike((SELECT reason FROM cm.dead_letter WHERE queue_id = 904),
    'new row for relation "user_portfolios" violates check constraint "tier1_cap" (SQLSTATE 23514, constraint tier1_cap of public.user_portfolios) DETAIL: Failing row contains (P3, %',
    'a CHECK on user_portfolios one account''s new value breaks: that completion is dead-lettered');
SELECT is(pg_temp.account('P3'), 'allocation 100.00+200.00+300.00=600.00 value 4990.00+2000.00+3000.00=9990.00',
    'and that account is left as it was');
SELECT is(pg_temp.account('P1'), 'allocation 100.00+200.00+300.00=600.00 value 1100.00+2000.00+3000.00=6100.00',
    'other accounts get their completions in the same cycle');
SELECT is(pg_temp.account('P4'), 'allocation 100.00+200.00+300.00=600.00 value 1100.00+2000.00+3000.00=6100.00',
    'all of them');
SELECT is((SELECT error FROM cm.cycle_history ORDER BY cycle_id DESC LIMIT 1), NULL,
    'the cycle records no error');

-- once the causes are gone, the dead letters apply, each once
DROP TRIGGER app_refuse ON portfolio_transactions;
ALTER TABLE user_portfolios DROP CONSTRAINT tier1_cap;
SELECT is(pg_temp.sync(), 'sources=2 rows_read=6 created=2 updated=0 completed_applied=2 compensated=0 dead_lettered=0',
    'with the trigger and the cap gone, their dead letters apply');
SELECT is(pg_temp.account('P3'), 'allocation 100.00+200.00+300.00=600.00 value 5489.00+2000.00+3000.00=10489.00',
    'the account gets the completion once');
SELECT is((SELECT string_agg(queue_id::text, ',') FROM cm.dead_letter), '902',
    'the row the CHECK still refuses stays a dead letter');
SELECT is(pg_temp.sync(), 'sources=2 rows_read=6 created=0 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'and is not counted again');

-- many rows refused by CHECKs of portfolio_transactions: one the cycle can
-- evaluate over the columns it writes (the refused rows are found in one
-- statement) and one over a column of the application's (found by halving)
ALTER TABLE portfolio_transactions ADD COLUMN channel text NOT NULL DEFAULT 'queue',
    ADD CONSTRAINT no_thirteen CHECK (abs(tier2_change) <> 13),
    ADD CONSTRAINT no_fourteen_from_queue CHECK (channel <> 'queue' OR abs(tier2_change) <> 14);
INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
SELECT 920 + i, 'P4', 1, CASE WHEN i % 7 = 0 THEN 13 WHEN i % 9 = 0 THEN 14 ELSE 2 END, 3,
       format('e9200000-0000-4000-8000-%s', lpad(i::text, 12, '0')), 'PENDING', now(), now()
  FROM generate_series(1, 40) i;
SELECT is((SELECT format('created=%s dead_lettered=%s', created, dead_lettered) FROM cm_sync_now()),
    'created=31 dead_lettered=9', 'of 40 rows, the 9 that two CHECKs refuse are dead-lettered, the 31 others apply');
SELECT is((SELECT string_agg(queue_id::text, ',' ORDER BY queue_id) FROM cm.dead_letter
            WHERE reason LIKE '%constraint "no_thirteen"%(SQLSTATE 23514, constraint no_thirteen of public.portfolio_transactions) DETAIL: Failing row contains%'),
    '927,934,941,948,955', 'each row the first CHECK refuses, with its own failing row');
SELECT is((SELECT string_agg(queue_id::text, ',' ORDER BY queue_id) FROM cm.dead_letter
            WHERE reason LIKE '%constraint "no_fourteen_from_queue"%DETAIL: Failing row contains%'),
    '929,938,947,956', 'each row the CHECK over the application''s column refuses');
SELECT is((SELECT count(*)::int FROM portfolio_transactions WHERE id::text LIKE 'e9200000-%'), 31,
    'and exactly the others are in portfolio_transactions');
-- (and out of the way of what follows)
DELETE FROM cm_remote.queue_server_investment_queue WHERE queue_id BETWEEN 921 AND 960;
DELETE FROM cm.dead_letter WHERE queue_id BETWEEN 921 AND 960;
DELETE FROM cm.ledger WHERE uuid::text LIKE 'e9200000-%';
DELETE FROM portfolio_transactions WHERE id::text LIKE 'e9200000-%';
ALTER TABLE portfolio_transactions DROP CONSTRAINT no_thirteen, DROP CONSTRAINT no_fourteen_from_queue,
    DROP COLUMN channel;

-- a domain and an exclusion constraint the cycle does not model
CREATE DOMAIN cm_t_account AS varchar(10) CHECK (VALUE <> 'P5');
ALTER TABLE portfolio_transactions ALTER COLUMN accountid TYPE cm_t_account;
ALTER TABLE portfolio_transactions ADD CONSTRAINT one_pending_per_account
    EXCLUDE USING btree ((accountid::text) WITH =) WHERE (status = 'PENDING');
INSERT INTO user_portfolios (accountid) VALUES ('P5');
INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (908, 'P5', 1, 1, 1, 'e9000000-0000-4000-8000-000000000908', 'PENDING', now(), now()),
       (909, 'P4', 1, 1, 1, 'e9000000-0000-4000-8000-000000000909', 'PENDING', now(), now()),
       (910, 'P4', 1, 1, 1, 'e9000000-0000-4000-8000-000000000910', 'PENDING', now(), now());
SELECT is(pg_temp.sync(), 'sources=2 rows_read=9 created=1 updated=0 completed_applied=0 compensated=0 dead_lettered=2',
    'a domain''s CHECK and an exclusion constraint refuse one row each; the third applies');
SELECT alike((SELECT reason FROM cm.dead_letter WHERE queue_id = 908),
    'value for domain public.cm_t_account violates check constraint "cm_t_account_check" (SQLSTATE 23514, constraint cm_t_account_check)',
    'the domain''s refusal is the dead letter''s reason');
SELECT alike((SELECT reason FROM cm.dead_letter WHERE queue_id = 910),
    'conflicting key value violates exclusion constraint "one_pending_per_account" (SQLSTATE 23P01, constraint one_pending_per_account of public.portfolio_transactions) DETAIL: %',
    'the exclusion constraint''s refusal too: the first of the two rows applies, the second is refused');

-- an error that is not the rows' fails the cycle, as before
CREATE FUNCTION pg_temp.app_unavailable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the application is in maintenance' USING ERRCODE = '55000';
END $$;
CREATE TRIGGER app_unavailable BEFORE INSERT ON portfolio_transactions
    FOR EACH ROW EXECUTE FUNCTION pg_temp.app_unavailable();
INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (907, 'P4', 1, 1, 1, 'e9000000-0000-4000-8000-000000000907', 'PENDING', now(), now());
SELECT throws_ok('SELECT pg_temp.sync()', '55000', 'the application is in maintenance',
    'an error that is not a row''s fails the cycle');
DROP TRIGGER app_unavailable ON portfolio_transactions;

-- and so do more than 1000 failing rows: the cause is not in the rows
CREATE FUNCTION pg_temp.app_refuse_all() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the application refuses every transaction';
END $$;
CREATE TRIGGER app_refuse_all BEFORE INSERT ON portfolio_transactions
    FOR EACH ROW EXECUTE FUNCTION pg_temp.app_refuse_all();
INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
SELECT 10000 + i, 'P4', 1, 1, 1, format('e9100000-0000-4000-8000-%s', lpad(i::text, 12, '0')), 'PENDING', now(), now()
  FROM generate_series(1, 1100) i;
SELECT throws_like('SELECT pg_temp.sync()',
    'more than 1000 rows of source % cannot be applied in one cycle: the application refuses every transaction',
    'more than 1000 failing rows fail the cycle');
SELECT is((SELECT count(*)::int FROM cm.dead_letter), 3, 'and leave the dead letters as they were');

SELECT * FROM finish();
ROLLBACK;
