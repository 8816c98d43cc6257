-- bench/sql/queue_setup.sql -- run in queue-db after test/fixtures/queue_db.sql.
--
-- bench_generate() appends a generated workload to a split-layout queue
-- table: historical requests whose updated_at lies between 1 hour and 30
-- days ago (so the cycle's 2-minute look-back window covers none of them),
-- 85 % COMPLETED, 5 % FAILED, 5 % CANCELLED, 5 % PROCESSING, for accounts
-- A000000001 .. A<accounts>.  The uuids are md5 hashes of the table kind and
-- a running number and the random generator is seeded from the table size,
-- so the same sizes give the same workload on every run.

CREATE FUNCTION bench_generate(p_table regclass, p_kind text, p_n bigint, p_accounts integer)
    RETURNS bigint
    LANGUAGE plpgsql AS $$
DECLARE
    have bigint;
    added bigint;
BEGIN
    EXECUTE format('SELECT count(*) FROM %s', p_table) INTO have;
    PERFORM setseed(((have % 1000003) / 1000003.0) * CASE p_kind WHEN 'inv' THEN 1 ELSE -1 END);
    EXECUTE format($q$
        INSERT INTO %s (account_number, tier_1, tier_2, tier_3, uuid, status,
                        created_at, updated_at, processed_at)
        SELECT 'A' || lpad((1 + floor(random() * $3))::int::text, 9, '0'),
               round((1 + random() * 4999)::numeric, 8),
               round((1 + random() * 4999)::numeric, 8),
               round((1 + random() * 4999)::numeric, 8),
               md5($4 || '-' || ($1 + g))::uuid::text,
               s.status,
               s.u - random() * interval '10 minutes',
               s.u,
               CASE WHEN s.status <> 'PROCESSING' THEN s.u END
          FROM generate_series(1, $2) g,
               LATERAL (SELECT CASE WHEN r < 0.85 THEN 'COMPLETED'
                                    WHEN r < 0.90 THEN 'FAILED'
                                    WHEN r < 0.95 THEN 'CANCELLED'
                                    ELSE 'PROCESSING' END AS status,
                               now() - interval '1 hour' - rr * interval '30 days' AS u
                          FROM (SELECT random() + 0 * g AS r, random() + 0 * g AS rr) z) s
        $q$, p_table)
    USING have, p_n, p_accounts, p_kind;
    GET DIAGNOSTICS added = ROW_COUNT;
    RETURN added;
END
$$;

-- Bring both queue tables to a total of p_total rows, 60 % investments and
-- 40 % withdrawals, then refresh the planner's statistics.
CREATE FUNCTION bench_grow(p_total bigint, p_accounts integer) RETURNS bigint
    LANGUAGE plpgsql AS $$
DECLARE
    inv bigint := (SELECT count(*) FROM investment_queue);
    wd bigint := (SELECT count(*) FROM withdrawal_queue);
    want_inv bigint := round(p_total * 0.6);
    n bigint := 0;
BEGIN
    IF want_inv > inv THEN
        n := n + bench_generate('investment_queue', 'inv', want_inv - inv, p_accounts);
    END IF;
    IF p_total - want_inv > wd THEN
        n := n + bench_generate('withdrawal_queue', 'wd', p_total - want_inv - wd, p_accounts);
    END IF;
    RETURN n;
END
$$;
