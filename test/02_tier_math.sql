-- 02_tier_math.sql -- the tier-delta contract (docs/ARCHITECTURE.md, section 5).
--
--   delta_n = (market_n - pool_n) / pool_n, 0 when pool_n is 0
--   investment: value * (1 + delta); withdrawal: allocation * (1 - delta),
--   rounded to the column's scale, totals = sums of the rounded tiers.
--
-- Bad pool/market values are the caller's mistake: 22023
-- (invalid_parameter_value); a NULL argument to cm_set_tier_values is 22004
-- (null_value_not_allowed); an unknown account in cm_preview is P0002.

BEGIN;
SET LOCAL client_min_messages = warning;

SELECT plan(45);

-- cm_tier_delta: exact values -------------------------------------------------
SELECT is(cm_tier_delta(1000000, 1050000)::text, '0.05', 'cm_tier_delta(1000000, 1050000) = 0.05');
SELECT is(cm_tier_delta(500000, 450000)::text, '-0.1', 'cm_tier_delta(500000, 450000) = -0.1');
SELECT is(cm_tier_delta(2000000, 2000000)::text, '0', 'cm_tier_delta of an unchanged market is 0');
SELECT is(cm_tier_delta(0, 5)::text, '0', 'cm_tier_delta with pool 0 is 0, not a division error');
SELECT is(cm_tier_delta(0, 0)::text, '0', 'cm_tier_delta(0, 0) is 0');
SELECT is(cm_tier_delta(5, 0)::text, '-1', 'cm_tier_delta with market 0 is -1');
SELECT is(cm_tier_delta(1000000.50, 1050000.525)::text, '0.05', 'cm_tier_delta with fractional amounts is exact');
SELECT is(cm_tier_delta(10000000000000000000, 10000000000000000001)::text, '0.0000000000000000001',
    'cm_tier_delta of 20-digit amounts keeps every digit (1e-19)');
SELECT is(cm_tier_delta(12345678901234567890, 24691357802469135780)::text, '1',
    'cm_tier_delta(12345678901234567890, 24691357802469135780) = 1');
SELECT is(cm_tier_delta(99999999999999999999, 0)::text, '-1',
    'cm_tier_delta(99999999999999999999, 0) = -1');
SELECT is(cm_tier_delta(NULL, 1), NULL, 'cm_tier_delta is strict: NULL in, NULL out');

-- cm_tier_delta: bad input ----------------------------------------------------
SELECT throws_ok('SELECT cm_tier_delta(-1, 1)', '22023', 'pool value must not be negative',
    'cm_tier_delta rejects a negative pool');
SELECT throws_ok('SELECT cm_tier_delta(1, -0.01)', '22023', 'market value must not be negative',
    'cm_tier_delta rejects a negative market');
SELECT throws_ok($$SELECT cm_tier_delta('NaN', 1)$$, '22023', 'pool value must be a finite number',
    'cm_tier_delta rejects a NaN pool');
SELECT throws_ok($$SELECT cm_tier_delta(1, 'NaN')$$, '22023', 'market value must be a finite number',
    'cm_tier_delta rejects a NaN market');
SELECT throws_ok($$SELECT cm_tier_delta('Infinity', 1)$$, '22023', 'pool value must be a finite number',
    'cm_tier_delta rejects an infinite pool');
SELECT throws_ok($$SELECT cm_tier_delta(1, 'Infinity')$$, '22023', 'market value must be a finite number',
    'cm_tier_delta rejects an infinite market');
SELECT throws_ok($$SELECT cm_tier_delta('-Infinity', 1)$$, '22023', NULL,
    'cm_tier_delta rejects a pool of -Infinity');

-- cm_set_tier_values ----------------------------------------------------------
SELECT lives_ok('SELECT cm_set_tier_values(1, 1000000, 1050000)',
    'cm_set_tier_values(1, 1000000, 1050000) succeeds');
SELECT lives_ok('SELECT cm_set_tier_values(3, 500000, 450000)',
    'cm_set_tier_values(3, 500000, 450000) succeeds');

SELECT results_eq(
    'SELECT tier, pool_value, market_value FROM cm.tier_value ORDER BY tier',
    $$VALUES (1, 1000000::numeric, 1050000::numeric),
             (2, 2000000::numeric, 2000000::numeric),
             (3,  500000::numeric,  450000::numeric)$$,
    'cm_set_tier_values changed tiers 1 and 3 and left tier 2 alone');

SELECT results_eq(
    $$SELECT tier, old_pool_value, old_market_value, new_pool_value, new_market_value, changed_by::text
        FROM cm.tier_value_history ORDER BY change_id$$,
    $$VALUES (1, 1000000::numeric, 1000000::numeric, 1000000::numeric, 1050000::numeric, session_user::text),
             (3,  500000::numeric,  500000::numeric,  500000::numeric,  450000::numeric, session_user::text)$$,
    'each change is audited in cm.tier_value_history with old and new values');

SELECT is((SELECT updated_by::text FROM cm.tier_value WHERE tier = 1), session_user::text,
    'cm.tier_value.updated_by records who made the change');

SELECT throws_ok('SELECT cm_set_tier_values(0, 1, 1)', '22023', 'tier 0 does not exist',
    'cm_set_tier_values rejects tier 0');
SELECT throws_ok('SELECT cm_set_tier_values(4, 1, 1)', '22023', 'tier 4 does not exist',
    'cm_set_tier_values rejects tier 4');
SELECT throws_ok('SELECT cm_set_tier_values(NULL, 1, 1)', '22004', NULL,
    'cm_set_tier_values rejects a NULL tier');
SELECT throws_ok('SELECT cm_set_tier_values(1, NULL, 1)', '22004', NULL,
    'cm_set_tier_values rejects a NULL pool value');
SELECT throws_ok('SELECT cm_set_tier_values(1, 1, NULL)', '22004', NULL,
    'cm_set_tier_values rejects a NULL market value');
SELECT throws_ok($$SELECT cm_set_tier_values(1, 'NaN', 1)$$, '22023', NULL,
    'cm_set_tier_values rejects a NaN pool value');
SELECT throws_ok($$SELECT cm_set_tier_values(2, 1, 'NaN')$$, '22023', NULL,
    'cm_set_tier_values rejects a NaN market value');
SELECT throws_ok($$SELECT cm_set_tier_values(1, 'Infinity', 1)$$, '22023', NULL,
    'cm_set_tier_values rejects an infinite pool value');
SELECT throws_ok($$SELECT cm_set_tier_values(3, 1, 'Infinity')$$, '22023', NULL,
    'cm_set_tier_values rejects an infinite market value');
SELECT throws_ok('SELECT cm_set_tier_values(1, -1000000, 1050000)', '22023', NULL,
    'cm_set_tier_values rejects a negative pool value');
SELECT throws_ok('SELECT cm_set_tier_values(2, 2000000, -1)', '22023', NULL,
    'cm_set_tier_values rejects a negative market value');

-- the same rejected calls, made from PL/pgSQL: each fails with its SQLSTATE
-- and leaves neither cm.tier_value nor its history changed
CREATE FUNCTION pg_temp.try_set(t integer, p numeric, m numeric) RETURNS text
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM cm_set_tier_values(t, p, m);
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE;
END $$;
SELECT is(
    (SELECT string_agg(pg_temp.try_set(t, p, m), ',' ORDER BY ord)
       FROM (VALUES (1, 0, 1::numeric, 1::numeric), (2, 2, NULL, 1),
                    (3, 1, 'NaN', 1), (4, 3, 1, 'Infinity'), (5, 2, -5, 5)) AS v(ord, t, p, m)),
    '22023,22004,22023,22023,22023',
    'the rejected calls fail with the documented SQLSTATEs');
SELECT results_eq(
    'SELECT tier, pool_value, market_value FROM cm.tier_value ORDER BY tier',
    $$VALUES (1, 1000000::numeric, 1050000::numeric),
             (2, 2000000::numeric, 2000000::numeric),
             (3,  500000::numeric,  450000::numeric)$$,
    'rejected calls leave cm.tier_value unchanged');
SELECT is((SELECT count(*)::int FROM cm.tier_value_history), 2,
    'rejected calls write nothing to cm.tier_value_history');

-- cm_tier_deltas --------------------------------------------------------------
SELECT is((SELECT count(*)::int FROM cm_tier_deltas()), 3, 'cm_tier_deltas returns 3 rows');
SELECT results_eq(
    'SELECT tier, pool_value, market_value, delta::text FROM cm_tier_deltas()',
    $$VALUES (1, 1000000::numeric, 1050000::numeric, '0.05'),
             (2, 2000000::numeric, 2000000::numeric, '0'),
             (3,  500000::numeric,  450000::numeric, '-0.1')$$,
    'cm_tier_deltas returns each tier''s pool, market and delta, in tier order');

-- cm_preview ------------------------------------------------------------------
INSERT INTO user_portfolios (accountid,
        tier1_allocation, tier2_allocation, tier3_allocation, total_allocation,
        tier1_value, tier2_value, tier3_value, total_value)
VALUES ('PV1', 77.77, 200.00, 55.55, 333.32, 333.33, 2000.00, 123.45, 2456.78);

-- values:      333.33 * 1.05 = 349.9965 -> 350.00;  2000.00 * 1 = 2000.00;
--              123.45 * 0.9  = 111.105  -> 111.11;  total 2461.11
-- allocations:  77.77 * 0.95 = 73.8815  -> 73.88;   200.00 * 1 = 200.00;
--               55.55 * 1.1  = 61.105   -> 61.11;   total 334.99
SELECT results_eq(
    $$SELECT tier, delta::text, value_before::text, value_after::text,
             allocation_before::text, allocation_after::text
        FROM cm_preview('PV1')$$,
    $$VALUES ('1', '0.05', '333.33', '350.00', '77.77', '73.88'),
             ('2', '0', '2000.00', '2000.00', '200.00', '200.00'),
             ('3', '-0.1', '123.45', '111.11', '55.55', '61.11'),
             ('total', NULL, '2456.78', '2461.11', '333.32', '334.99')$$,
    'cm_preview shows each tier rounded to 2 places and totals that are sums of the rounded tiers');

SELECT results_eq(
    $$SELECT tier1_value, total_value, tier1_allocation, total_allocation
        FROM user_portfolios WHERE accountid = 'PV1'$$,
    $$VALUES (333.33::numeric, 2456.78::numeric, 77.77::numeric, 333.32::numeric)$$,
    'cm_preview changes nothing');

SELECT throws_ok($$SELECT * FROM cm_preview('NOSUCH')$$, 'P0002', 'account "NOSUCH" has no portfolio',
    'cm_preview of an unknown account fails with P0002');
SELECT throws_ok($$SELECT * FROM cm_preview(NULL)$$, 'P0002', NULL,
    'cm_preview(NULL) fails with P0002');

-- a pool of 0 means "no movement"; a market of 0 wipes out values
SELECT cm_set_tier_values(2, 0, 123);
SELECT cm_set_tier_values(3, 500000, 0);
SELECT results_eq(
    $$SELECT tier, delta::text, value_after::text, allocation_after::text FROM cm_preview('PV1')$$,
    $$VALUES ('1', '0.05', '350.00', '73.88'),
             ('2', '0', '2000.00', '200.00'),
             ('3', '-1', '0.00', '111.10'),
             ('total', NULL, '2350.00', '384.98')$$,
    'cm_preview with pool 0 (delta 0) and market 0 (delta -1)');

-- the scale comes from the column: a widened column is honoured at once
ALTER TABLE user_portfolios ALTER COLUMN tier1_value TYPE numeric(17,4);
SELECT is((SELECT value_after::text FROM cm_preview('PV1') WHERE tier = '1'), '349.9965',
    'cm_preview rounds to the scale of the column it would write (numeric(17,4))');

SELECT * FROM finish();
ROLLBACK;
