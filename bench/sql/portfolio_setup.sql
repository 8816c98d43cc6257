-- bench/sql/portfolio_setup.sql -- run in user-portfolio-db after
-- test/fixtures/portfolio_db.sql, with psql variables port and accounts.
--
-- The extension, the loopback postgres_fdw server, the attached queue, tier
-- values with non-zero deltas, the accounts, and the helpers of the
-- benchmark in schema bench.

CREATE EXTENSION consistency_manager CASCADE;
CREATE EXTENSION dblink;
CREATE SERVER queue_server FOREIGN DATA WRAPPER postgres_fdw
    OPTIONS (host '127.0.0.1', port :'port', dbname 'queue');
CREATE USER MAPPING FOR postgres SERVER queue_server OPTIONS (user 'postgres');
SELECT source_id, foreign_table, layout FROM cm_attach_queue('queue_server');

-- small deltas (+0.1 %, -0.05 %, +0.02 %): non-zero, so every completion
-- does the tier math, yet ten million completions over 10k accounts stay
-- far inside numeric(15,2)
SELECT cm_set_tier_values(1, 1000000, 1001000);
SELECT cm_set_tier_values(2, 2000000, 1999000);
SELECT cm_set_tier_values(3,  500000,  500100);

SELECT setseed(0.5);
INSERT INTO user_portfolios (accountid, tier1_allocation, tier2_allocation, tier3_allocation,
                             total_allocation, tier1_value, tier2_value, tier3_value, total_value)
SELECT accountid, a1, a2, a3, a1 + a2 + a3, v1, v2, v3, v1 + v2 + v3
  FROM (SELECT 'A' || lpad(i::text, 9, '0') AS accountid,
               round((10000 + random() * 90000)::numeric, 2) AS a1,
               round((10000 + random() * 90000)::numeric, 2) AS a2,
               round((10000 + random() * 90000)::numeric, 2) AS a3,
               round((10000 + random() * 90000)::numeric, 2) AS v1,
               round((10000 + random() * 90000)::numeric, 2) AS v2,
               round((10000 + random() * 90000)::numeric, 2) AS v3
          FROM generate_series(1, :accounts) i) s;

CREATE SCHEMA bench;
CREATE TABLE bench.portfolios_orig AS SELECT * FROM user_portfolios;

/* Put user-portfolio-db back to "nothing synced yet". */
CREATE PROCEDURE bench.reset() LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE portfolio_transactions, user_portfolios, cm.ledger, cm.dead_letter, cm.batch, cm.journal;
    INSERT INTO user_portfolios SELECT * FROM bench.portfolios_orig;
    UPDATE cm.source SET watermark = NULL, watermark_id = NULL, read_horizon = NULL,
                         oldest_open_xact = NULL, horizon_visible = NULL, last_synced_at = NULL;
END
$$;

/* One cycle, as a row of numbers. */
CREATE VIEW bench.sync AS SELECT * FROM cm_sync_now();

/*
 * Stream of requests for the latency figure: each is committed in queue-db
 * (through dblink, so it commits at once), then user-portfolio-db is polled
 * every millisecond until the row shows; the times go to bench.latency.
 * p_gap: a random pause of up to that many seconds before each request, so
 * that requests fall at random points of the polling interval.
 */
CREATE TABLE bench.latency (run text, seq integer, ms double precision);

CREATE PROCEDURE bench.latency_stream(p_run text, p_n integer, p_wake boolean, p_gap double precision,
                                      p_timeout double precision)
    LANGUAGE plpgsql AS $$
DECLARE
    u uuid;
    t0 timestamptz;
    seen boolean;
BEGIN
    PERFORM dblink_connect('bench_lat', format('host=127.0.0.1 port=%s dbname=queue user=postgres',
                                               current_setting('port')));
    FOR i IN 1..p_n LOOP
        PERFORM pg_sleep(random() * p_gap);
        u := md5(p_run || '-' || i || '-' || clock_timestamp())::uuid;
        PERFORM dblink_exec('bench_lat', format(
            'INSERT INTO investment_queue (account_number, tier_1, tier_2, tier_3, uuid, status, processed_at)'
            ' VALUES (%L, 10, 20, 30, %L, ''COMPLETED'', now())',
            'A' || lpad((1 + i % 1000)::text, 9, '0'), u));
        t0 := clock_timestamp();
        IF p_wake THEN
            PERFORM cm_wake();
        END IF;
        LOOP
            SELECT EXISTS (SELECT 1 FROM portfolio_transactions WHERE id = u) INTO seen;
            EXIT WHEN seen OR clock_timestamp() - t0 > make_interval(secs => p_timeout);
            PERFORM pg_sleep(0.001);
        END LOOP;
        INSERT INTO bench.latency
        VALUES (p_run, i, CASE WHEN seen THEN 1000 * extract(epoch FROM clock_timestamp() - t0) END);
        COMMIT;
    END LOOP;
    PERFORM dblink_disconnect('bench_lat');
END
$$;

/*
 * Drive the worker through p_n cycles by cm_wake(), waiting for each to end
 * (cm_stats().cycles moves).  Busy cycles first change p_rows requests in
 * queue-db (COMPLETED <-> FAILED on a pool of 200 investments, so each busy
 * cycle applies or compensates tier math).  Stops early after p_budget
 * seconds; returns the number of cycles driven, and how many times a wake
 * had to be repeated because no cycle followed it within 50 ms.  A wake that
 * reaches the worker while its cycle still talks to queue-db is lost
 * (postgres_fdw resets the latch while it waits for the remote), so each
 * wake is sent only once the worker has left its cycle.
 */
CREATE PROCEDURE bench.drive_cycles(p_n integer, p_busy boolean, p_rows integer, p_budget double precision,
                                    INOUT driven integer DEFAULT 0, INOUT rewakes integer DEFAULT 0)
    LANGUAGE plpgsql AS $$
DECLARE
    c0 bigint;
    t_end timestamptz := clock_timestamp() + make_interval(secs => p_budget);
    pool bigint[];
    k integer := 0;
    t_wake timestamptz;
BEGIN
    PERFORM dblink_connect('bench_drv', format('host=127.0.0.1 port=%s dbname=queue user=postgres',
                                               current_setting('port')));
    SELECT array_agg(queue_id ORDER BY queue_id) INTO pool
      FROM dblink('bench_drv', 'SELECT queue_id FROM investment_queue WHERE status IN (''COMPLETED'', ''FAILED'') ORDER BY queue_id LIMIT 200')
           AS t(queue_id bigint);
    driven := 0;
    rewakes := 0;
    WHILE driven < p_n AND clock_timestamp() < t_end LOOP
        IF p_busy THEN
            PERFORM dblink_exec('bench_drv', format(
                'UPDATE investment_queue SET status = CASE status WHEN ''COMPLETED'' THEN ''FAILED'' ELSE ''COMPLETED'' END'
                ' WHERE queue_id = ANY (%L)',
                (SELECT array_agg(pool[1 + (k * p_rows + j) % cardinality(pool)]) FROM generate_series(0, p_rows - 1) j)));
            k := k + 1;
        END IF;
        SELECT cycles INTO c0 FROM cm_stats();
        PERFORM cm_wake();
        t_wake := clock_timestamp();
        WHILE (SELECT cycles FROM cm_stats()) = c0 LOOP
            PERFORM pg_sleep(0.0002);
            IF clock_timestamp() - t_wake > interval '50 ms' THEN
                PERFORM cm_wake();
                t_wake := clock_timestamp();
                rewakes := rewakes + 1;
            END IF;
            EXIT WHEN clock_timestamp() > t_end + interval '30 seconds';
        END LOOP;
        -- the counters move before the cycle's transaction ends; the next
        -- wake waits until the worker is back to its latch
        WHILE (SELECT worker_state FROM cm_stats()) = 'running a cycle' LOOP
            PERFORM pg_sleep(0.0002);
            EXIT WHEN clock_timestamp() > t_end + interval '30 seconds';
        END LOOP;
        driven := driven + 1;
        IF driven % 100 = 0 THEN
            COMMIT;
        END IF;
    END LOOP;
    PERFORM dblink_disconnect('bench_drv');
END
$$;
