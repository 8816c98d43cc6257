-- 10_monitoring_states.sql -- the monitoring functions answer in every state.
--
-- cm_sources(), cm_status(), cm_health(), cm_stats(), cm_dead_letters(),
-- cm_cycle_history() and cm_cycle_lock() are what a dashboard and an alert
-- call; an error there hides the state it was called to show.  Each state
-- below (never synced with a backlog, watermarks and times at +/-infinity,
-- NULLs) must give an answer, never an error.

BEGIN;
SET LOCAL client_min_messages = warning;

SELECT plan(17);

\ir lib/helpers.sql

-- every monitoring call; returns '' when all answer, else 'call: error; ...'
CREATE FUNCTION pg_temp.monitoring_errors() RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    call text;
    errors text[] := '{}';
BEGIN
    FOREACH call IN ARRAY ARRAY[
        'SELECT * FROM cm_sources()', 'SELECT cm_status()', 'SELECT * FROM cm_health()',
        'SELECT * FROM cm_stats()', 'SELECT * FROM cm_dead_letters()',
        'SELECT * FROM cm_cycle_history()', 'SELECT * FROM cm_cycle_history(NULL)',
        'SELECT * FROM cm_cycle_history(-1)', 'SELECT * FROM cm_cycle_lock()',
        'SELECT * FROM cm_tier_deltas()']
    LOOP
        BEGIN
            EXECUTE call;
        EXCEPTION WHEN OTHERS THEN
            errors := errors || format('%s: %s', call, SQLERRM);
        END;
    END LOOP;
    RETURN array_to_string(errors, '; ');
END
$$;
CREATE FUNCTION pg_temp.set_source_times(wm timestamptz, ls timestamptz) RETURNS void
LANGUAGE sql AS $$
    UPDATE cm.source SET watermark = wm, last_synced_at = ls
$$;

INSERT INTO user_portfolios (accountid,
        tier1_allocation, tier2_allocation, tier3_allocation, total_allocation,
        tier1_value, tier2_value, tier3_value, total_value)
VALUES ('M1', 1000.00, 2000.00, 3000.00, 6000.00, 1000.00, 2000.00, 3000.00, 6000.00);
SELECT is((SELECT count(*)::int FROM cm_attach_queue('queue_server')), 2, 'the split layout is attached');

-- 1. attached, never synced, a backlog in queue-db ---------------------------
SELECT pg_temp.queue_writable();
INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
SELECT i, 'M1', 1, 1, 1, format('cccccccc-0000-4000-8000-%s', lpad(i::text, 12, '0')), 'PENDING', now(), now()
  FROM generate_series(1, 5) i;
SELECT is(pg_temp.monitoring_errors(), '', 'never synced, a backlog waiting: every monitoring function answers');
SELECT results_eq($$SELECT watermark, lag FROM cm_sources() ORDER BY source_id$$,
    $$VALUES (NULL::timestamptz, NULL::interval), (NULL, NULL)$$,
    'never synced: no watermark and no lag');

-- 2. times at +infinity, -infinity and NULL, in every combination that matters
SELECT pg_temp.set_source_times('infinity', 'infinity');
SELECT is(pg_temp.monitoring_errors(), '', 'watermark (the newest change read) and last sync at +infinity: every monitoring function answers');
SELECT results_eq($$SELECT watermark, newest_change, lag FROM cm_sources() ORDER BY source_id LIMIT 1$$,
    $$VALUES ('infinity'::timestamptz, 'infinity'::timestamptz, NULL::interval)$$,
    'cm_sources() shows the infinite times as they are, with no lag');
SELECT is(cm_status()->'sources'->0->>'watermark', 'infinity', 'cm_status() shows an infinite watermark');

SELECT pg_temp.set_source_times('-infinity', '-infinity');
SELECT is(pg_temp.monitoring_errors(), '', 'watermark (the newest change read) and last sync at -infinity: every monitoring function answers');
SELECT results_eq($$SELECT watermark, lag FROM cm_sources() ORDER BY source_id LIMIT 1$$,
    $$VALUES ('-infinity'::timestamptz, NULL::interval)$$,
    'a last sync at -infinity has no lag');

SELECT pg_temp.set_source_times(NULL, '-infinity');
SELECT is(pg_temp.monitoring_errors(), '', 'no watermark, last sync at -infinity: every monitoring function answers');
SELECT pg_temp.set_source_times('-infinity', 'infinity');
SELECT is(pg_temp.monitoring_errors(), '', 'watermark at -infinity, last sync at +infinity: every monitoring function answers');

SELECT pg_temp.set_source_times(now() - interval '1 hour', now() - interval '10 minutes');
SELECT results_eq($$SELECT lag FROM cm_sources() ORDER BY source_id LIMIT 1$$,
    $$VALUES (interval '10 minutes')$$, 'a finite last sync still gives its lag');

-- 3. history and dead letters with infinite times and NULL columns ------------------
INSERT INTO cm.cycle_history (started_at, finished_at, duration_ms, trigger, sources, rows_read,
                              created, updated, completed_applied, compensated, dead_lettered)
VALUES ('-infinity', 'infinity', 'Infinity', 'manual', 2, 0, 0, 0, 0, 0, 0),
       ('infinity', '-infinity', 'NaN', 'worker', 2, 0, 0, 0, 0, 0, 0);
INSERT INTO cm.dead_letter (source_id, queue_id, uuid, accountid, transaction_type, tier_1, tier_2, tier_3,
                            status, created_at, updated_at, reason, first_seen, last_seen)
SELECT source_id, 99, NULL, NULL, NULL, NULL, NULL, NULL, NULL, '-infinity', 'infinity', 'test', '-infinity', 'infinity'
  FROM cm.source LIMIT 1;
SELECT is(pg_temp.monitoring_errors(), '', 'history and dead letters with infinite and NULL times: every monitoring function answers');
SELECT is((SELECT count(*)::int FROM cm_cycle_history(-1)), 0, 'cm_cycle_history() of a negative count is empty');
SELECT is((SELECT count(*)::int FROM cm_cycle_history(NULL)), (SELECT count(*)::int FROM cm.cycle_history),
    'cm_cycle_history(NULL) is the whole history');
SELECT is((SELECT count(*)::int FROM cm_dead_letters() WHERE first_seen = '-infinity'), 1,
    'cm_dead_letters() lists a dead letter with infinite times');

-- 4. and a cycle over such a state still runs -------------------------------
SELECT pg_temp.set_source_times('-infinity', '-infinity');
SELECT is(pg_temp.sync(),
    'sources=2 rows_read=5 created=5 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'a cycle from a watermark at -infinity reads the whole backlog');
SELECT is(pg_temp.monitoring_errors(), '', 'after that cycle: every monitoring function answers');

SELECT * FROM finish();
ROLLBACK;
