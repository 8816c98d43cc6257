-- 08_dead_letters.sql -- dead letters an operator can read and close.
--
-- cm_discard_dead_letter() closes a dead letter that can never apply: it is
-- recorded in cm.discarded (who, when, why) and the cycle never reads that
-- version of the queue row again -- even once its cause is gone -- unless
-- the queue row changes.  cm_dead_letters() and cm_cycle_history() are
-- read-only and open to pg_monitor.

BEGIN;
SET LOCAL client_min_messages = warning;

SELECT plan(19);

\ir lib/helpers.sql

SELECT is((SELECT count(*)::int FROM cm_attach_queue('queue_server')), 2, 'the split layout is attached');
INSERT INTO user_portfolios (accountid,
        tier1_allocation, tier2_allocation, tier3_allocation, total_allocation,
        tier1_value, tier2_value, tier3_value, total_value)
VALUES ('D1', 1000.00, 2000.00, 3000.00, 6000.00, 1000.00, 2000.00, 3000.00, 6000.00);

SELECT source_id AS inv FROM cm.source WHERE layout = 'investment' \gset
SELECT pg_temp.queue_writable();
INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (801, 'D1',     1, 2, 3, 'd8000000-0000-4000-8000-000000000001', 'COMPLETED', now(), now()),
       (802, 'NOBODY', 1, 2, 3, 'd8000000-0000-4000-8000-000000000002', 'COMPLETED', now(), now()),
       (803, 'NOBODY', 1, 2, 3, 'd8000000-0000-4000-8000-000000000003', 'PENDING', now(), now());

SELECT is(pg_temp.sync(), 'sources=2 rows_read=3 created=1 updated=0 completed_applied=1 compensated=0 dead_lettered=2',
    'one row applies, two have no account');
SELECT is((SELECT string_agg(queue_id || ': ' || reason, '; ' ORDER BY queue_id) FROM cm_dead_letters()),
    '802: account ''NOBODY'' has no row in public.user_portfolios; 803: account ''NOBODY'' has no row in public.user_portfolios',
    'cm_dead_letters() lists them with their reasons');

-- bad calls change nothing
SELECT throws_ok(format('SELECT cm_discard_dead_letter(%s, 802, %L)', :inv, '  '), '22023',
    'a reason is required to discard a dead letter', 'discarding needs a reason');
SELECT throws_ok(format('SELECT cm_discard_dead_letters(%s, ARRAY[802, 999], %L)', :inv, 'typo'), 'P0002',
    format('source %s has no dead letter for queue_id 999', :inv), 'an unknown queue_id: an error naming it');
SELECT is((SELECT count(*)::int FROM cm_dead_letters()), 2, 'and nothing was discarded (all or nothing)');

-- the operator closes 802
SELECT ok(cm_discard_dead_letter(:inv, 802, 'account closed, refunded by hand'), 'cm_discard_dead_letter() closes one');
SELECT is((SELECT format('%s %s %s / %s', queue_id, status, discarded_by, discard_reason) FROM cm.discarded),
    format('802 COMPLETED %s / account closed, refunded by hand', session_user),
    'cm.discarded records the version, who closed it and why');
SELECT is((SELECT string_agg(queue_id::text, ',') FROM cm_dead_letters()), '803', 'it left the dead letters');

-- never read again, even once its cause is gone
INSERT INTO user_portfolios (accountid,
        tier1_allocation, tier2_allocation, tier3_allocation, total_allocation,
        tier1_value, tier2_value, tier3_value, total_value)
VALUES ('NOBODY', 1000.00, 2000.00, 3000.00, 6000.00, 1000.00, 2000.00, 3000.00, 6000.00);
SET LOCAL consistency_manager.lookback_window = '1h';
SELECT is(pg_temp.sync(), 'sources=2 rows_read=3 created=1 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'the next cycle applies 803 (its account exists now) and not the discarded 802');
SELECT is(pg_temp.tx('d8000000-0000-4000-8000-000000000002'), NULL, '802 is not in portfolio_transactions');
SELECT is(pg_temp.account('NOBODY'), 'allocation 1000.00+2000.00+3000.00=6000.00 value 1000.00+2000.00+3000.00=6000.00',
    'and its completion was not applied');
SELECT is_empty('SELECT * FROM cm_dead_letters()', 'no dead letter is left');

-- a newer version of the discarded row is read again
UPDATE cm_remote.queue_server_investment_queue SET status = 'CANCELLED' WHERE queue_id = 802;
SELECT is(pg_temp.sync(), 'sources=2 rows_read=3 created=1 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'once the queue row changes, the cycle reads it again');
SELECT is(pg_temp.tx('d8000000-0000-4000-8000-000000000002'), 'NOBODY INVEST 1.00 2.00 3.00=6.00 CANCELLED',
    'and syncs its new version');

-- who may call what
SELECT ok(NOT has_function_privilege('public', 'cm_discard_dead_letter(integer, bigint, text)', 'EXECUTE'),
    'PUBLIC may not discard dead letters');
SELECT ok(NOT has_function_privilege('pg_monitor', 'cm_discard_dead_letters(integer, bigint[], text)', 'EXECUTE'),
    'pg_monitor may not discard dead letters');
SELECT ok(has_function_privilege('pg_monitor', 'cm_dead_letters()', 'EXECUTE')
          AND has_function_privilege('pg_monitor', 'cm_cycle_history(integer)', 'EXECUTE'),
    'pg_monitor may read the dead letters and the cycle history');
SELECT is((SELECT count(*)::int FROM cm_cycle_history(2)), 2, 'cm_cycle_history(n) returns the newest n cycles');

SELECT * FROM finish();
ROLLBACK;
