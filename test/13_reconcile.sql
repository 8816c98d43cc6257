-- 13_reconcile.sql -- reconciliation: every kind of difference from a tampered
-- fixture, its diagnosis, repair through the cycle (exactly once), the
-- checksum pushed down to queue-db, and who may call what.
--
-- Tier deltas: tier 1 +5 %, tier 2 0, tier 3 -10 %: a completed investment
-- multiplies an account's values by 1.05, 1 and 0.9.
--
-- Rows are stamped 10 minutes ago (the read position after the first cycle);
-- with lookback_window = 1h (helpers.sql), a row stamped 5 hours ago and
-- written after that cycle is behind the watermark: no cycle reads it.

BEGIN;
SET LOCAL client_min_messages = warning;

SELECT plan(49);

\ir lib/helpers.sql

-- EXPLAIN VERBOSE of a statement, as one text
CREATE FUNCTION pg_temp.explain(q text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    line text;
    out  text := '';
BEGIN
    FOR line IN EXECUTE 'EXPLAIN (VERBOSE, COSTS OFF) ' || q LOOP
        out := out || line || E'\n';
    END LOOP;
    RETURN out;
END
$$;

-- the items of a run, one line each
CREATE FUNCTION pg_temp.items(run bigint) RETURNS SETOF text LANGUAGE sql AS $$
    SELECT format('%s %s: %s', queue_id, kind, diagnosis)
      FROM cm.reconciliation_item WHERE run_id = run ORDER BY queue_id, kind
$$;

SELECT cm_set_tier_values(1, 1000000, 1050000);
SELECT cm_set_tier_values(3, 500000, 450000);

INSERT INTO user_portfolios (accountid,
        tier1_allocation, tier2_allocation, tier3_allocation, total_allocation,
        tier1_value, tier2_value, tier3_value, total_value)
SELECT a, 1000.00, 2000.00, 3000.00, 6000.00, 1000.00, 2000.00, 3000.00, 6000.00
  FROM unnest(ARRAY['R1', 'R2', 'R3', 'R4']) a;

SELECT is((SELECT count(*)::int FROM cm_attach_queue('queue_server')), 2, 'the split layout is attached');
SELECT source_id AS inv FROM cm.source WHERE layout = 'investment' \gset
SELECT source_id AS wd FROM cm.source WHERE layout = 'withdrawal' \gset
SELECT pg_temp.queue_writable();

INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
SELECT v.id, v.acct, v.t1, v.t2, v.t3, format('c1000000-0000-4000-8000-%s', lpad(v.id::text, 12, '0')),
       v.status, now() - interval '10 min', now() - interval '10 min'
  FROM (VALUES (1001, 'R1', 100, 200, 300, 'COMPLETED'),
               (1002, 'R1', 1, 1, 1, 'PENDING'),
               (1003, 'R2', 10, 20, 30, 'COMPLETED'),
               (1004, 'R2', 1, 2, 3, 'PENDING'),
               (1005, 'R3', 5, 5, 5, 'COMPLETED'),
               (1006, 'NOBODY', 1, 2, 3, 'COMPLETED'),
               (1009, 'R4', 7, 7, 7, 'PENDING'),
               (1011, 'R1', 2, 2, 2, 'PENDING'),
               (1013, 'R2', 1, 1, 1, 'PENDING')) v(id, acct, t1, t2, t3, status);

SELECT is(pg_temp.sync(), 'sources=2 rows_read=9 created=8 updated=0 completed_applied=3 compensated=0 dead_lettered=1',
    'the first cycle applies eight rows and dead-letters one');

-- a clean state first: no difference, nothing fetched
SELECT is((SELECT format('compared=%s differences=%s fetched=%s', rows_compared, differences, rows_fetched)
             FROM cm_reconcile(:inv)),
    'compared=9 differences=1 fetched=0',
    'in agreement (but for the dead letter, read locally) no queue row crosses the network');

-- tamper with both sides
DELETE FROM portfolio_transactions WHERE id = 'c1000000-0000-4000-8000-000000001001';
UPDATE portfolio_transactions SET status = 'COMPLETED', updated_at = now() + interval '1 min'
 WHERE id = 'c1000000-0000-4000-8000-000000001002';
UPDATE portfolio_transactions SET accountid = 'R1', tier1_change = 10.01, total_amount = 60.01,
       updated_at = now() + interval '1 min'
 WHERE id = 'c1000000-0000-4000-8000-000000001003';
UPDATE portfolio_transactions SET tier1_change = 5, total_amount = 10, updated_at = now() + interval '1 min'
 WHERE id = 'c1000000-0000-4000-8000-000000001004';
DELETE FROM cm_remote.queue_server_investment_queue WHERE queue_id = 1005;
-- committed late, stamped before the read position less the look-back
INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (1007, 'R3', 4, 4, 4, 'c1000000-0000-4000-8000-000000001007', 'COMPLETED',
        now() - interval '5 hours', now() - interval '5 hours');
-- its completion, committed late too (the queue row written again with an old stamp)
DELETE FROM cm_remote.queue_server_investment_queue WHERE queue_id = 1009;
INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (1009, 'R4', 7, 7, 7, 'c1000000-0000-4000-8000-000000001009', 'COMPLETED',
        now() - interval '5 hours', now() - interval '5 hours');
UPDATE portfolio_transactions SET transaction_type = 'WITHDRAWAL' WHERE id = 'c1000000-0000-4000-8000-000000001013';

SELECT is(pg_temp.sync(), 'sources=2 rows_read=7 created=0 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'the cycle never reads the late rows (it re-reads the look-back window and retries the dead letter)');
-- changed after the read position: in flight, never a difference
UPDATE cm_remote.queue_server_investment_queue SET status = 'CANCELLED' WHERE queue_id = 1011;

SELECT run_id AS run, rows_compared, differences, repaired, rows_fetched
  FROM cm_reconcile(:inv, amount_tolerance => 0.05) \gset
SELECT is(:differences::int, 10, 'ten differences');
SELECT results_eq(format('SELECT * FROM pg_temp.items(%s)', :run), $$VALUES
    ('1001 missing: deleted from user-portfolio-db after it was synced'),
    ('1002 status: edited in user-portfolio-db after it was synced (portfolio updated_at later than the ledger''s synced_at)'),
    ('1003 account: edited in user-portfolio-db after it was synced (portfolio updated_at later than the ledger''s synced_at)'),
    ('1004 amount: edited in user-portfolio-db after it was synced (portfolio updated_at later than the ledger''s synced_at)'),
    ('1005 orphan: queue row deleted after it was synced'),
    ('1006 missing: dead-lettered: account ''NOBODY'' has no row in public.user_portfolios'),
    ('1007 missing: behind the watermark: committed later than lookback_window allows, so the cycle never read it — widen consistency_manager.lookback_window'),
    ('1009 effect: changed in queue-db behind the watermark: committed later than lookback_window allows (the ledger holds an older version) — widen consistency_manager.lookback_window'),
    ('1009 status: changed in queue-db behind the watermark: committed later than lookback_window allows (the ledger holds an older version) — widen consistency_manager.lookback_window'),
    ('1013 type: differs from what the cycle wrote (changed in user-portfolio-db without updated_at)')$$,
    'every kind, each with its diagnosis; the row changed during the run (1011) is not one of them');
SELECT is((SELECT format('%s | %s', queue_value, portfolio_value) FROM cm.reconciliation_item
            WHERE run_id = :run AND queue_id = 1004),
    '1.00+2.00+3.00=6.00 | 5.00+2.00+3.00=10.00', 'an amount item shows both sides');
SELECT is((SELECT format('%s | %s | %s', queue_value, portfolio_value, amount_at_stake) FROM cm.reconciliation_item
            WHERE run_id = :run AND queue_id = 1009 AND kind = 'status'),
    'COMPLETED (COMPLETED) | PENDING | 21.00', 'a status item shows the mapped and the raw queue status');
SELECT is((SELECT in_flight FROM cm.reconciliation_run WHERE run_id = :run), 1::bigint,
    'the row changed after the read position is counted in flight');
SELECT ok(:rows_fetched::int BETWEEN 1 AND 20, 'only rows of differing ranges were fetched');
SELECT is((SELECT string_agg(format('%s %s', kind, items), ', ' ORDER BY kind) FROM
            (SELECT kind, sum(items) AS items FROM cm_reconciliation_summary(:run) GROUP BY kind) s),
    'account 1, amount 1, effect 1, missing 3, orphan 1, status 2, type 1', 'cm_reconciliation_summary() counts by kind');
SELECT matches(cm_reconciliation_report(:run),
    '^Run \d+: 8 rows compared in [0-9.]+ s across 1 source\(s\); 10 difference\(s\): 1 account \(1 edited in user-portfolio-db after it was synced\); .*3 missing \(1 behind the watermark, 1 dead-lettered, 1 deleted from user-portfolio-db after it was synced\); 1 orphan \(1 queue row deleted after it was synced\); .* 1 row\(s\) were changing or not yet synced and were left to the cycle\. Nothing repaired yet: SELECT cm_repair\(\d+\);$',
    'cm_reconciliation_report() tells the story');

SELECT matches((SELECT detail FROM cm_health()),
    format('reconciliation run %s \(.*\) found 8 unrepaired difference\(s\) between queue-db and user-portfolio-db', :run),
    'cm_health() reports the unrepaired differences of the last run');
SELECT is((SELECT run_id FROM cm_last_reconciliation()), :run::bigint, 'cm_last_reconciliation() shows the last run');

-- the tolerance: 1003's tier 1 differs by 0.01
SELECT run_id AS exact FROM cm_reconcile(:inv) \gset
SELECT is((SELECT count(*)::int FROM cm.reconciliation_item i
            WHERE i.run_id = :exact AND i.queue_id = 1003 AND i.kind = 'amount'), 1,
    'without a tolerance the 0.01 difference is an amount difference');

-- repair
SELECT is(pg_temp.account('R4'), 'allocation 1000.00+2000.00+3000.00=6000.00 value 1000.00+2000.00+3000.00=6000.00',
    'before the repair, the late completion of 1009 is not applied');
SELECT is(cm_repair(:run), 8::bigint, 'cm_repair() repairs the eight repairable items');
SELECT is(pg_temp.account('R1'), 'allocation 1000.00+2000.00+3000.00=6000.00 value 1050.00+2000.00+2700.00=5750.00',
    'R1: 1001 restored in portfolio_transactions, its completion not applied twice');
SELECT is(pg_temp.account('R3'), 'allocation 1000.00+2000.00+3000.00=6000.00 value 1102.50+2000.00+2430.00=5532.50',
    'R3: the behind-the-watermark completion 1007 applied once');
SELECT is(pg_temp.account('R4'), 'allocation 1000.00+2000.00+3000.00=6000.00 value 1050.00+2000.00+2700.00=5750.00',
    'R4: the late completion of 1009 applied once');
SELECT is(pg_temp.account('R2'), 'allocation 1000.00+2000.00+3000.00=6000.00 value 1050.00+2000.00+2700.00=5750.00',
    'R2: the edits overwritten, no effect');
SELECT is(pg_temp.tx('c1000000-0000-4000-8000-000000001004'), 'R2 INVEST 1.00 2.00 3.00=6.00 PENDING',
    'the amount edited in user-portfolio-db is overwritten from the queue');
SELECT is(pg_temp.tx('c1000000-0000-4000-8000-000000001003'), 'R2 INVEST 10.00 20.00 30.00=60.00 COMPLETED',
    'so is the account');
SELECT is(pg_temp.ledger('c1000000-0000-4000-8000-000000001009'), 'INVEST COMPLETED applied=true factors=1.05,1,0.9',
    'the ledger records the late completion');
SELECT is((SELECT format('%s/%s', repaired, differences) FROM cm.reconciliation_run WHERE run_id = :run), '8/10',
    'the run records what was repaired');
SELECT is_empty(format('SELECT * FROM cm.reconciliation_item WHERE run_id = %s AND repaired <> (kind NOT IN (%L) AND queue_id <> 1006)',
                       :run, 'orphan'),
    'the orphan and the dead letter are reported, not repaired');
SELECT is(cm_repair(:run), 0::bigint, 'a second cm_repair() repairs nothing');
SELECT is(pg_temp.account('R4'), 'allocation 1000.00+2000.00+3000.00=6000.00 value 1050.00+2000.00+2700.00=5750.00',
    'and changes nothing');

SELECT run_id AS run2, differences AS d2 FROM cm_reconcile(:inv, 0.05, repair => true) \gset
SELECT results_eq(format('SELECT * FROM pg_temp.items(%s)', :run2), $$VALUES
    ('1005 orphan: queue row deleted after it was synced'),
    ('1006 missing: dead-lettered: account ''NOBODY'' has no row in public.user_portfolios')$$,
    'reconciled again: only the orphan and the dead letter are left');
SELECT doesnt_match((SELECT detail FROM cm_health()), 'unrepaired difference',
    'cm_health() says nothing of a last run whose differences are only reported ones');
SELECT is(pg_temp.account('R3'), 'allocation 1000.00+2000.00+3000.00=6000.00 value 1102.50+2000.00+2430.00=5532.50',
    'and a reconcile with repair => true changes no account');

-- a disabled source: compared when named, its rows only reported
UPDATE cm.source SET enabled = false WHERE source_id = :wd;
INSERT INTO cm_remote.queue_server_withdrawal_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (2001, 'R1', 1, 1, 1, 'c2000000-0000-4000-8000-000000002001', 'PENDING', now(), now());
SELECT run_id AS all_run FROM cm_reconcile() \gset
SELECT is((SELECT source_ids FROM cm.reconciliation_run r WHERE r.run_id = :all_run),
    ARRAY[:inv], 'cm_reconcile() compares the enabled sources');
SELECT results_eq(format('SELECT format(%L, queue_id, kind, diagnosis, repairable) FROM cm.reconciliation_item WHERE run_id = %s',
                         '%s %s: %s %s', (SELECT run_id FROM cm_reconcile(:wd))),
    $$VALUES ('2001 missing: source disabled: the sync cycle does not read it (UPDATE cm.source SET enabled = true) f')$$,
    'a disabled source named explicitly: its rows are missing, diagnosed, not repairable');

-- a uuid spelled in upper case in the queue lands in another bucket than its
-- portfolio row: both buckets differ, and the row, compared one by one, is equal
INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (1020, 'R1', 1, 1, 1, 'C1000000-0000-4000-8000-000000001020', 'PENDING',
        now() - interval '1 min', now() - interval '1 min');
SELECT matches(pg_temp.sync(), ' created=1 updated=0 completed_applied=0 compensated=0 dead_lettered=0$',
    'the row with an upper-case uuid is synced');
-- an applied flag that disagrees with the ledger's own status, queue and portfolio equal
UPDATE cm.ledger SET applied = false WHERE uuid = 'c1000000-0000-4000-8000-000000001001';
SELECT run_id AS run3, rows_fetched AS fetched3 FROM cm_reconcile(:inv) \gset
SELECT results_eq(format('SELECT * FROM pg_temp.items(%s)', :run3), $$VALUES
    ('1001 effect: completion never applied to the account'),
    ('1005 orphan: queue row deleted after it was synced'),
    ('1006 missing: dead-lettered: account ''NOBODY'' has no row in public.user_portfolios')$$,
    'the ledger''s applied flag is checked by its own checksum; the upper-case uuid is no difference');
SELECT ok(:fetched3 >= 3, 'the rows of the differing buckets were fetched (the upper-case uuid''s among them)');

-- many rows the application wrote itself (no ledger entry) make most buckets of
-- portfolio_transactions differ: it is compared again, restricted to the rows the
-- ledger knows, and they are no difference and cost no fetch
SELECT run_id AS before_app, rows_fetched AS fetched_before_app FROM cm_reconcile() \gset
INSERT INTO portfolio_transactions (id, accountid, transaction_type, tier1_change, tier2_change, tier3_change,
                                    total_amount, status)
SELECT gen_random_uuid(), 'R4', 'INVEST', 1, 2, 3, 6, 'COMPLETED' FROM generate_series(1, 300);
SELECT run_id AS with_app, rows_fetched AS fetched_with_app FROM cm_reconcile() \gset
SELECT results_eq(format('SELECT * FROM pg_temp.items(%s)', :with_app), format('SELECT * FROM pg_temp.items(%s)', :before_app),
    'rows the application wrote itself, 300 of them, are no difference');
SELECT is(:fetched_with_app::bigint, :fetched_before_app::bigint,
    'and cost no fetch: portfolio_transactions is compared again, restricted to the rows the ledger knows');
DELETE FROM portfolio_transactions p WHERE p.accountid = 'R4' AND NOT EXISTS (SELECT 1 FROM cm.ledger l WHERE l.uuid = p.id);

-- the checksums go to queue-db: the statement cm_reconcile() runs, whole
SELECT pg_temp.explain(cm.reconcile_queue_sql(s, 1023, now(), '{1006}')) AS plan
  FROM cm.source s WHERE s.source_id = :inv \gset
SELECT matches(:'plan'::text,
    '^Foreign Scan\n  Output: .*\n  Relations: Aggregate on \(cm_remote.queue_server_investment_queue q\)\n  Remote SQL: SELECT \(hashtextextended\(uuid::text, 0::bigint\) & 1023::bigint\), count\(\*\), bit_xor\(hash_numeric_extended\(round\(tier_3, 2\), hash_numeric_extended\(round\(tier_2, 2\), hash_numeric_extended\(round\(tier_1, 2\), hashtextextended\(\(account_number::text \|\| ''#INVEST#''::text\), hashtextextended\(uuid::text, 0::bigint\)\)\)\)\)\), bit_xor\(hashtextextended\(status::text, hashint8extended\(queue_id::bigint, 0::bigint\)\)\) FROM public.investment_queue WHERE \(\(updated_at <= .*\)\) AND \(\(queue_id::bigint <> ALL \(''\{1006\}''::bigint\[\]\)\)\) GROUP BY 1\n$',
    'EXPLAIN VERBOSE: queue-db computes the count, the image hash and the version hash per bucket; nothing is left to do locally');
-- one statement computes every side's checksums: queue-db's run while the local ones are computed
SELECT pg_temp.explain(cm.reconcile_sums_sql(0, array_agg(s ORDER BY s.source_id), 1023, array_agg(now() ORDER BY s.source_id))) AS sums_plan,
       count(*) AS sources
  FROM cm.source s WHERE s.enabled \gset
SELECT is((SELECT count(*) FROM regexp_matches(:'sums_plan'::text, '->  Async Foreign Scan\n[^\n]*\n  +Relations: Aggregate on [^\n]*\n  +Remote SQL: SELECT \(\(hashtextextended\(uuid::text, 0::bigint\) & 1023::bigint\) \| [0-9]+::bigint\), count\(\*\), bit_xor\(', 'g')),
          :sources::bigint,
    'EXPLAIN VERBOSE: each source''s checksums are one remote aggregate, run asynchronously, its side and source computed by queue-db');
SELECT is((SELECT count(*) FROM regexp_matches(:'sums_plan'::text, '->  Foreign Scan', 'g')), 0::bigint,
    'EXPLAIN VERBOSE: no remote aggregate waits for the local ones');
SELECT is_empty($$
    SELECT s.source_id FROM cm.source s JOIN pg_foreign_table t ON t.ftrelid = format('%I.%I', s.table_schema, s.table_name)::regclass
     WHERE NOT 'async_capable=true' = ANY (t.ftoptions)$$,
    'cm_attach_queue() makes the foreign tables async_capable');
SELECT pg_temp.explain(format('SELECT q.queue_id FROM cm_remote.queue_server_investment_queue q WHERE (%s & 1023) = ANY (%L::bigint[])',
                              cm.reconcile_key_sql('q.uuid::text'), '{1,5,17}')) AS fetch_plan \gset
SELECT matches(:'fetch_plan'::text,
    '^Foreign Scan on cm_remote.queue_server_investment_queue q\n  Output: queue_id\n  Remote SQL: SELECT queue_id FROM public.investment_queue WHERE \(\(\(hashtextextended\(uuid::text, 0::bigint\) & 1023::bigint\) = ANY \(''\{1,5,17\}''::bigint\[\]\)\)\)\n$',
    'EXPLAIN VERBOSE: the rows of the differing buckets are chosen by queue-db');

-- bad calls, and who may call what
SELECT throws_ok('SELECT cm_reconcile(amount_tolerance => -1)', '22023', NULL, 'a negative tolerance is refused');
SELECT throws_ok('SELECT cm_reconcile(9999)', 'P0002', 'source 9999 does not exist', 'an unknown source is refused');
SELECT throws_ok('SELECT cm_repair(-1)', 'P0002', 'reconciliation run -1 does not exist', 'an unknown run is refused');
SELECT is_empty($$
    SELECT p.oid::regprocedure FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.deptype = 'e'
     WHERE d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'consistency_manager')
       AND (p.proname LIKE '%reconcil%' OR p.proname = 'cm_repair')
       AND has_function_privilege('public', p.oid, 'EXECUTE')$$,
    'no reconciliation function is executable by PUBLIC');
SELECT ok(NOT has_table_privilege('public', 'cm.reconciliation_item', 'SELECT')
          AND NOT has_table_privilege('public', 'cm.reconciliation_run', 'SELECT')
          AND NOT has_function_privilege('pg_monitor', 'cm_repair(bigint)', 'EXECUTE')
          AND NOT has_function_privilege('pg_monitor', 'cm_reconcile(integer, numeric, boolean)', 'EXECUTE'),
    'PUBLIC reads no run or item; pg_monitor may not reconcile or repair');
SELECT ok(has_function_privilege('pg_monitor', 'cm_reconciliation_report(bigint)', 'EXECUTE')
          AND has_table_privilege('pg_monitor', 'cm.reconciliation_item', 'SELECT'),
    'pg_monitor reads the reports and the items');

SELECT * FROM finish();
ROLLBACK;
