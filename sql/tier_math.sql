-- The tier-delta math: exact values, boundaries and every rejected input.
CREATE EXTENSION consistency_manager CASCADE;

-- cm_tier_delta: (market - pool) / pool, 0 when pool is 0
SELECT cm_tier_delta(1000000, 1050000) AS up_5_percent,
       cm_tier_delta(2000000, 1900000) AS down_5_percent,
       cm_tier_delta(500000, 500000) AS flat,
       cm_tier_delta(0, 123) AS pool_zero,
       cm_tier_delta(0, 0) AS both_zero,
       cm_tier_delta(1000000, 0) AS minus_100_percent,
       cm_tier_delta(3, 1) AS repeating;
-- 20-digit amounts stay exact
SELECT cm_tier_delta(12345678901234567890, 12345678901234567891) AS one_in_1e19,
       cm_tier_delta(99999999999999999999.99999999, 199999999999999999999.99999998) AS doubled;
SELECT cm_tier_delta(NULL, 1) IS NULL AS null_in_null_out;
-- rejected: negative, NaN, infinite
SELECT cm_tier_delta(-1, 1);
SELECT cm_tier_delta(1, -0.01);
SELECT cm_tier_delta('NaN', 1);
SELECT cm_tier_delta(1, 'Infinity');
SELECT cm_tier_delta('-Infinity', 1);

-- defaults: market = pool, every delta 0
SELECT * FROM cm_tier_deltas();

-- cm_set_tier_values: transactional and audited
SELECT cm_set_tier_values(1, 1000000, 1050000);
SELECT cm_set_tier_values(3, 500000, 450000);
SELECT * FROM cm_tier_deltas();
SELECT tier, old_pool_value, old_market_value, new_pool_value, new_market_value
  FROM cm.tier_value_history ORDER BY change_id;
BEGIN;
SELECT cm_set_tier_values(2, 1, 2);
ROLLBACK;
SELECT tier, pool_value, market_value FROM cm.tier_value WHERE tier = 2;

-- rejected inputs leave everything unchanged
SELECT cm_set_tier_values(0, 1, 1);
SELECT cm_set_tier_values(4, 1, 1);
SELECT cm_set_tier_values(NULL, 1, 1);
SELECT cm_set_tier_values(1, NULL, 1);
SELECT cm_set_tier_values(1, 1, NULL);
SELECT cm_set_tier_values(1, 'NaN', 1);
SELECT cm_set_tier_values(1, 1, 'Infinity');
SELECT cm_set_tier_values(1, -5, 1);
SELECT tier, pool_value, market_value FROM cm.tier_value ORDER BY tier;
SELECT count(*) AS audit_rows FROM cm.tier_value_history;

-- cm_preview: needs the application's user_portfolios
SELECT * FROM cm_preview('A1');
\set ECHO none
\i test/fixtures/portfolio_db.sql
\set ECHO all
INSERT INTO user_portfolios VALUES
    ('A1', 100.00, 200.00, 300.00, 600.00, 1000.00, 2000.00, 3000.00, 6000.00),
    ('ROUND', 0.01, 0.03, 0.05, 0.09, 0.01, 0.03, 0.05, 0.09),
    ('BIG', 9999999999999.99, 0, 0, 9999999999999.99, 9999999999999.99, 0, 0, 9999999999999.99);
SELECT * FROM cm_preview('A1');
-- each tier rounded to the column's scale; totals are sums of the rounded tiers
SELECT * FROM cm_preview('ROUND');
SELECT * FROM cm_preview('BIG');
SELECT * FROM cm_preview('nobody');
-- a delta of -100 %: values go to 0, allocations double
SELECT cm_set_tier_values(2, 2000000, 0);
SELECT tier, value_before, value_after, allocation_before, allocation_after FROM cm_preview('A1');

-- nothing is executable by PUBLIC
SELECT p.proname, has_function_privilege('public', p.oid, 'EXECUTE') AS public_can_execute
  FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.classid = 'pg_proc'::regclass
  JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'consistency_manager'
 WHERE d.deptype = 'e' AND has_function_privilege('public', p.oid, 'EXECUTE')
 ORDER BY 1;

DROP EXTENSION consistency_manager, postgres_fdw;
SELECT count(*) AS left_behind FROM pg_namespace WHERE nspname IN ('cm', 'cm_remote');
DROP TABLE portfolio_transactions, user_portfolios;
