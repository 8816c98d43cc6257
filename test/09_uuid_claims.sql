-- 09_uuid_claims.sql -- how a queue row's uuid is read, and who owns it.
--
-- A queue uuid is whatever PostgreSQL's uuid type reads as one (either case,
-- braces, hyphens after any group of four digits or none); the transaction
-- gets the canonical form.  One uuid is one request: when two queue rows
-- with different queue_ids claim it (in one spelling or two, in one source
-- or two), the first claim -- the one in the ledger, or within one batch
-- the lowest queue_id -- applies, and the others are dead-lettered with a
-- reason naming it.  A queue row without created_at takes its updated_at.
--
-- Tier deltas: tier 1 +5 %, so that a wrong completion or compensation
-- shows in the account.

BEGIN;
SET LOCAL client_min_messages = warning;

SELECT plan(28);

\ir lib/helpers.sql

CREATE FUNCTION pg_temp.reason(src text, qid bigint) RETURNS text LANGUAGE sql AS $$
    SELECT coalesce((SELECT d.reason FROM cm.dead_letter d JOIN cm.source s USING (source_id)
                      WHERE s.layout = src AND d.queue_id = qid), '(not dead-lettered)')
$$;
CREATE FUNCTION pg_temp.dead(src text) RETURNS text LANGUAGE sql AS $$
    SELECT coalesce(string_agg(d.queue_id::text, ',' ORDER BY d.queue_id), '')
      FROM cm.dead_letter d JOIN cm.source s USING (source_id) WHERE s.layout = src
$$;
-- what PostgreSQL's uuid type makes of a text, NULL when it refuses it
CREATE FUNCTION pg_temp.uuid_or_null(t text) RETURNS uuid LANGUAGE plpgsql AS $$
BEGIN
    RETURN t::uuid;
EXCEPTION WHEN invalid_text_representation THEN
    RETURN NULL;
END
$$;

SELECT cm_set_tier_values(1, 1000000, 1050000);
INSERT INTO user_portfolios (accountid,
        tier1_allocation, tier2_allocation, tier3_allocation, total_allocation,
        tier1_value, tier2_value, tier3_value, total_value)
VALUES ('U1', 1000.00, 2000.00, 3000.00, 6000.00, 1000.00, 2000.00, 3000.00, 6000.00);
SELECT is((SELECT count(*)::int FROM cm_attach_queue('queue_server')), 2, 'the split layout is attached');
SELECT source_id AS inv FROM cm.source WHERE layout = 'investment' \gset
SELECT source_id AS wd FROM cm.source WHERE layout = 'withdrawal' \gset

-- 1. cm.try_uuid reads what uuid_in reads, and nothing else ------------------
SELECT is(
    (SELECT string_agg(format('%L: %s, uuid_in %s', t, coalesce(cm.try_uuid(t)::text, 'NULL'),
                              coalesce(pg_temp.uuid_or_null(t)::text, 'NULL')), '; ')
       FROM unnest(ARRAY[
            'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11',
            'a0EEbc99-9C0b-4ef8-bB6d-6bb9bd380A11', '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}',
            'a0eebc999c0b4ef8bb6d6bb9bd380a11', 'a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11',
            '{a0eebc99-9c0b4ef8-bb6d6bb9-bd380a11}', '{A0EEBC999C0B4EF8BB6D6BB9BD380A11}',
            'not-a-uuid', '', '-', '{}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1',
            'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a111', ' a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
            'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11 ', '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
            'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}', 'a0eebc99--9c0b-4ef8-bb6d-6bb9bd380a11',
            'a0eebc9-99c0b-4ef8-bb6d-6bb9bd380a11', '-a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
            'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11-', 'g0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
            '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11-}', 'a0eebc99:9c0b-4ef8-bb6d-6bb9bd380a11',
            '{{a0eebc999c0b4ef8bb6d6bb9bd380a11}}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11x'])
            AS s(t)
      WHERE cm.try_uuid(t) IS DISTINCT FROM pg_temp.uuid_or_null(t)),
    NULL,
    'cm.try_uuid accepts exactly the spellings uuid_in accepts, as the same uuid');
SELECT is(cm.try_uuid('A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11')::text, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
    'an upper-case uuid is the lower-case one');

-- 2. spellings, and claims in one batch ---------------------------------------
-- 1: upper case; 2: no hyphens; 3 and 4 claim one uuid in two spellings in
-- the same batch (4 is read first: its updated_at is older), the lowest
-- queue_id keeps it; 5: not a uuid; 6: created_at NULL.
SELECT pg_temp.queue_writable();
INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (1, 'U1', 100, 0, 0, 'BBBBBBBB-0000-4000-8000-000000000001', 'COMPLETED', now(), now()),
       (2, 'U1', 1, 1, 1, 'bbbbbbbb000040008000000000000002', 'PENDING', now(), now()),
       (3, 'U1', 3, 3, 3, 'bbbbbbbb-0000-4000-8000-000000000003', 'PENDING', now(), now()),
       (4, 'U1', 4, 4, 4, 'BBBBBBBB-0000-4000-8000-000000000003', 'COMPLETED', now(), now() - interval '1 minute'),
       (5, 'U1', 1, 1, 1, 'bbbbbbbb-0000-4000-8000-00000000000g', 'PENDING', now(), now()),
       (6, 'U1', 1, 1, 1, 'bbbbbbbb-0000-4000-8000-000000000006', 'PENDING', NULL, now() - interval '2 minutes');

SELECT is(pg_temp.sync(),
    'sources=2 rows_read=6 created=4 updated=0 completed_applied=1 compensated=0 dead_lettered=2',
    'cycle 1: four requests created, one completion applied, two rows dead-lettered');
SELECT is(pg_temp.tx('bbbbbbbb-0000-4000-8000-000000000001'), 'U1 INVEST 100.00 0.00 0.00=100.00 COMPLETED',
    'an upper-case uuid is applied');
SELECT is((SELECT id::text FROM portfolio_transactions WHERE tier1_change = 100),
    'bbbbbbbb-0000-4000-8000-000000000001', 'and stored in canonical form');
SELECT is(pg_temp.tx('bbbbbbbb-0000-4000-8000-000000000002'), 'U1 INVEST 1.00 1.00 1.00=3.00 PENDING',
    'a uuid without hyphens is applied');
SELECT is(pg_temp.tx('bbbbbbbb-0000-4000-8000-000000000003'), 'U1 INVEST 3.00 3.00 3.00=9.00 PENDING',
    'of two rows claiming one uuid in one batch, the lowest queue_id keeps it');
SELECT is(pg_temp.reason('investment', 4),
    format('uuid bbbbbbbb-0000-4000-8000-000000000003 is also used by source %s, queue_id 3, read in the same batch (the lowest queue_id keeps it)', :inv),
    'the other one is dead-lettered, naming the claim it collides with');
SELECT matches(pg_temp.reason('investment', 5), '^malformed uuid ''bbbbbbbb-0000-4000-8000-00000000000g''',
    'a text that is not a uuid is still dead-lettered');
SELECT is((SELECT created_at = updated_at FROM portfolio_transactions
            WHERE id = 'bbbbbbbb-0000-4000-8000-000000000006'), true,
    'a queue row without created_at becomes a transaction created at its updated_at');
SELECT is(pg_temp.ledger('bbbbbbbb-0000-4000-8000-000000000003'), 'INVEST PENDING applied=false factors=NULL,NULL,NULL',
    'the ledger holds the winning row''s version of the uuid');
-- 100.00 * 1.05
SELECT is(pg_temp.account('U1'), 'allocation 1000.00+2000.00+3000.00=6000.00 value 1050.00+2000.00+3000.00=6050.00',
    'only the upper-case completion touched the account');

-- 3. later claims of a uuid the ledger holds --------------------------------
-- 7: the uuid of 1, lower case, FAILED (it must not compensate 1);
-- 8: the uuid of 1 again, same updated_at and status as the ledger's version
--    (must be read and dead-lettered, not taken for a re-read of 1);
-- withdrawal 1: the uuid of investment 2, in canonical spelling.
INSERT INTO cm_remote.queue_server_investment_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (7, 'U1', 7, 7, 7, 'bbbbbbbb-0000-4000-8000-000000000001', 'FAILED', now(), now()),
       (8, 'U1', 8, 8, 8, 'Bbbbbbbb-0000-4000-8000-000000000001', 'COMPLETED', now(),
        (SELECT updated_at FROM cm.ledger WHERE uuid = 'bbbbbbbb-0000-4000-8000-000000000001'));
INSERT INTO cm_remote.queue_server_withdrawal_queue
        (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (1, 'U1', 1, 1, 1, 'bbbbbbbb-0000-4000-8000-000000000002', 'COMPLETED', now(), now());

SELECT is(pg_temp.sync(),
    'sources=2 rows_read=9 created=0 updated=0 completed_applied=0 compensated=0 dead_lettered=3',
    'cycle 2: the three later claims are dead-lettered, nothing is applied');
SELECT is(pg_temp.reason('investment', 7),
    format('uuid bbbbbbbb-0000-4000-8000-000000000001 is already used by source %s, queue_id 1 (INVEST)', :inv),
    'a later row of the same source with the same uuid is dead-lettered, naming the claim');
SELECT is(pg_temp.reason('investment', 8),
    format('uuid bbbbbbbb-0000-4000-8000-000000000001 is already used by source %s, queue_id 1 (INVEST)', :inv),
    'also when its updated_at and status equal the ledger''s version');
SELECT is(pg_temp.reason('withdrawal', 1),
    format('uuid bbbbbbbb-0000-4000-8000-000000000002 is already used by source %s, queue_id 2 (INVEST)', :inv),
    'a row of another source with the same uuid in another spelling is dead-lettered');
SELECT is(pg_temp.reason('investment', 4),
    format('uuid bbbbbbbb-0000-4000-8000-000000000003 is already used by source %s, queue_id 3 (INVEST)', :inv),
    'the loser of cycle 1, retried, now collides with the ledger''s claim');
SELECT is(pg_temp.tx('bbbbbbbb-0000-4000-8000-000000000001'), 'U1 INVEST 100.00 0.00 0.00=100.00 COMPLETED',
    'the first claim''s transaction is unchanged');
SELECT is(pg_temp.ledger('bbbbbbbb-0000-4000-8000-000000000001'), 'INVEST COMPLETED applied=true factors=1.05,1,1',
    'and so is its ledger entry');
SELECT is(pg_temp.account('U1'), 'allocation 1000.00+2000.00+3000.00=6000.00 value 1050.00+2000.00+3000.00=6050.00',
    'no later claim compensated or applied anything');
SELECT is(pg_temp.dead('investment'), '4,5,7,8', 'exactly the losing and malformed investments are dead letters');
SELECT is(pg_temp.dead('withdrawal'), '1', 'and the withdrawal');

SELECT is(pg_temp.sync(),
    'sources=2 rows_read=9 created=0 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'cycle 3 (re-run): nothing changes');
SELECT is((SELECT count(*)::int FROM cm.ledger), 4, 'the ledger has one row per claimed uuid');

-- 4. the first claim moves on; the dead letters stay --------------------------
UPDATE cm_remote.queue_server_investment_queue SET status = 'FAILED' WHERE queue_id = 1;
SELECT is(pg_temp.sync(),
    'sources=2 rows_read=9 created=0 updated=1 completed_applied=0 compensated=1 dead_lettered=0',
    'cycle 4: the owner of the uuid fails and is compensated');
SELECT is(pg_temp.account('U1'), 'allocation 1000.00+2000.00+3000.00=6000.00 value 1000.00+2000.00+3000.00=6000.00',
    'its completion is undone, once');
SELECT is(pg_temp.dead('investment'), '4,5,7,8', 'the later claims stay dead letters');

SELECT * FROM finish();
ROLLBACK;
