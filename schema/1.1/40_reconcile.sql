/*
 * Reconciliation: prove that queue-db and user-portfolio-db agree, explain
 * every difference, and repair what can be repaired through the cycle.
 *
 * cm.ledger is the local image of the queue (one row per queue row, the
 * version last seen).  cm_reconcile() compares, per source:
 *
 *  1. queue <-> ledger remotely, by checksum: queue_id ranges (the queue's
 *     primary key, dense and indexed on both sides; the ledger gets an index
 *     on (source_id, queue_id) below) are split into 32 buckets; for each
 *     bucket both sides compute count(*) and sum() of a row hash built only
 *     from built-in immutable functions (hashint8extended, hashtextextended,
 *     interval_hash_extended, hash_numeric_extended, round, isfinite), so
 *     that postgres_fdw ships the aggregate to queue-db.  The hash covers
 *     queue_id, status, updated_at, the account and the amounts rounded to
 *     the scale of portfolio_transactions; the local side takes the first
 *     four from the ledger and the amounts from portfolio_transactions (abs,
 *     as the cycle writes withdrawals negative).  Only buckets whose
 *     checksums differ are split again; the rows of the smallest differing
 *     buckets (at most leaf_rows rows) are fetched and compared one by one.
 *  2. ledger <-> portfolio_transactions locally, by a plain join, for every
 *     ledger row not fetched in step 1.
 *
 * Only settled rows are compared: the checksums cover rows whose updated_at
 * is no later than the source's read position (watermark) when the run
 * starts.  A fetched row changed after it, or committed late but still
 * inside the next read's window, is in flight (counted, not a difference);
 * before a difference is recorded, its queue row is read again and the
 * ledger looked at again, and a row that moved meanwhile is in flight too.
 *
 * The hash functions are those of the server's major version and
 * architecture: queue-db and portfolio-db must run the same PostgreSQL major
 * version on the same architecture, or every range differs (nothing is
 * reported wrongly then, since rows are compared one by one, but every row
 * is fetched).  This version does not check it before a run.
 */

CREATE INDEX ledger_source_queue_id ON cm.ledger (source_id, queue_id);

CREATE TABLE cm.reconciliation_run (
    run_id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at      timestamptz,
    source_ids       integer[] NOT NULL,
    amount_tolerance numeric NOT NULL DEFAULT 0,
    rows_compared    bigint NOT NULL DEFAULT 0,
    differences      bigint NOT NULL DEFAULT 0,
    repaired         bigint NOT NULL DEFAULT 0,
    rows_fetched     bigint NOT NULL DEFAULT 0,
    in_flight        bigint NOT NULL DEFAULT 0,
    remote_queries   integer NOT NULL DEFAULT 0,
    duration_ms      double precision,
    run_by           name NOT NULL DEFAULT session_user
);
COMMENT ON TABLE cm.reconciliation_run IS 'one row per cm_reconcile() call: what was compared, how many differences, how many rows crossed the network';
COMMENT ON COLUMN cm.reconciliation_run.rows_compared IS 'queue rows covered by the comparison (settled rows: updated_at no later than the source''s read position)';
COMMENT ON COLUMN cm.reconciliation_run.rows_fetched IS 'queue rows that crossed the network (the rows of the smallest differing ranges, and the re-check of each difference)';
COMMENT ON COLUMN cm.reconciliation_run.in_flight IS 'rows changed after the read position or during the run, or inside the next read''s window: left to the cycle, not differences';
COMMENT ON COLUMN cm.reconciliation_run.remote_queries IS 'statements sent to queue-db (checksum levels, fetches, re-checks)';
REVOKE ALL ON cm.reconciliation_run FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('cm.reconciliation_run', '');
-- its identity sequence too, so that a restored database numbers its next run after the restored ones
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('cm.reconciliation_run', 'run_id')::pg_catalog.regclass, '');

CREATE TABLE cm.reconciliation_item (
    run_id          bigint NOT NULL REFERENCES cm.reconciliation_run ON DELETE CASCADE,
    source_id       integer NOT NULL,
    queue_id        bigint NOT NULL,
    uuid            text,
    accountid       text,
    kind            text NOT NULL CHECK (kind IN ('missing', 'orphan', 'status', 'amount',
                                                  'account', 'type', 'effect')),
    queue_value     text,
    portfolio_value text,
    diagnosis       text NOT NULL,
    amount_at_stake numeric,
    repairable      boolean NOT NULL,
    repaired        boolean NOT NULL DEFAULT false,
    PRIMARY KEY (run_id, source_id, queue_id, kind)
);
COMMENT ON TABLE cm.reconciliation_item IS 'one row per difference found by a reconciliation run, with its diagnosis; export with \copy (SELECT ...) TO ''x.csv'' CSV HEADER';
COMMENT ON COLUMN cm.reconciliation_item.kind IS 'missing (queue row not in portfolio_transactions; dead letters too), orphan (synced row whose queue row is gone), status, amount (beyond the tolerance), account, type, effect (the ledger''s applied flag disagrees with the queue status)';
COMMENT ON COLUMN cm.reconciliation_item.amount_at_stake IS 'money the difference concerns: the request''s total, or the difference of the totals for an amount';
COMMENT ON COLUMN cm.reconciliation_item.repairable IS 'whether cm_repair() can fix it through the cycle (orphans, dead letters and rows of disabled sources are only reported)';
REVOKE ALL ON cm.reconciliation_item FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('cm.reconciliation_item', '');

/* scratch: the queue rows a run fetched, and the ranges they came from */
CREATE UNLOGGED TABLE cm.reconcile_fetch (
    run_id           bigint NOT NULL,
    source_id        integer NOT NULL,
    queue_id         bigint NOT NULL,
    uuid             text,
    accountid        text,
    transaction_type text,
    tier_1           numeric,
    tier_2           numeric,
    tier_3           numeric,
    status           text,
    updated_at       timestamptz
);
COMMENT ON TABLE cm.reconcile_fetch IS 'scratch table of a running reconciliation: the queue rows fetched from the smallest differing ranges; emptied when the run ends';
REVOKE ALL ON cm.reconcile_fetch FROM PUBLIC;

CREATE UNLOGGED TABLE cm.reconcile_range (
    run_id    bigint NOT NULL,
    source_id integer NOT NULL,
    lo        bigint NOT NULL,
    hi        bigint NOT NULL
);
COMMENT ON TABLE cm.reconcile_range IS 'scratch table of a running reconciliation: the queue_id ranges whose rows were fetched; emptied when the run ends';
REVOKE ALL ON cm.reconcile_range FROM PUBLIC;

/*
 * The row hash, as SQL text over the given column expressions (the same
 * text for both sides, so that both sides normalise alike).
 */
CREATE FUNCTION cm.reconcile_hash_sql(queue_id text, status text, updated_at text, accountid text,
                                      tier_1 text, tier_2 text, tier_3 text,
                                      s1 integer, s2 integer, s3 integer)
    RETURNS text
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT format('hash_numeric_extended(round(%7$s, %10$s), hash_numeric_extended(round(%6$s, %9$s),'
                      ' hash_numeric_extended(round(%5$s, %8$s), hashtextextended(%4$s,'
                      ' CASE WHEN isfinite(%3$s) THEN interval_hash_extended(%3$s - ''2000-01-01 00:00:00+00''::timestamptz,'
                      ' hashtextextended(%2$s, hashint8extended(%1$s, 0))) END))))',
                      queue_id, status, updated_at, accountid, tier_1, tier_2, tier_3, s1, s2, s3)
    $$;
COMMENT ON FUNCTION cm.reconcile_hash_sql(text, text, text, text, text, text, text, integer, integer, integer) IS 'SQL text of the row hash of a reconciliation: built-in immutable functions only, so that postgres_fdw ships it';
REVOKE ALL ON FUNCTION cm.reconcile_hash_sql(text, text, text, text, text, text, text, integer, integer, integer) FROM PUBLIC;

/*
 * A condition on col that holds for the queue_ids of the given buckets
 * (bucket b: lo + b * width .. lo + (b + 1) * width - 1): a list of ranges,
 * neighbours merged, that an index on queue_id answers (on queue-db, its
 * primary key; here, the ledger's (source_id, queue_id)); for more than 64
 * ranges, the bucket arithmetic instead.
 */
CREATE FUNCTION cm.reconcile_ranges_sql(col text, lo bigint, width bigint, buckets bigint[])
    RETURNS text
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
        WITH b AS (SELECT DISTINCT u AS b FROM unnest(buckets) u),
             g AS (SELECT b, b - row_number() OVER (ORDER BY b) AS grp FROM b),
             r AS (SELECT lo + min(b) * width AS a, lo + (max(b) + 1) * width - 1 AS z FROM g GROUP BY grp)
        SELECT CASE WHEN (SELECT count(*) FROM r) <= 64
                    THEN '(' || (SELECT string_agg(format('%s BETWEEN %s AND %s', col, r.a, r.z), ' OR ' ORDER BY r.a) FROM r) || ')'
                    ELSE format('(%s::bigint - %s) / %s = ANY (%L::bigint[])', col, lo, width, buckets) END
    $$;
COMMENT ON FUNCTION cm.reconcile_ranges_sql(text, bigint, bigint, bigint[]) IS 'SQL condition of a reconciliation: the queue_ids of some buckets, as index ranges';
REVOKE ALL ON FUNCTION cm.reconcile_ranges_sql(text, bigint, bigint, bigint[]) FROM PUBLIC;

/* the foreign table of a source, its account column and its type expression */
CREATE FUNCTION cm.reconcile_source_sql(src cm.source, OUT ft text, OUT acct text, OUT typ text)
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT format('%I.%I', src.table_schema, src.table_name),
               format('q.%I', src.account_column),
               CASE src.layout WHEN 'unified' THEN 'q.transaction_type::text'
                               WHEN 'investment' THEN '''INVEST''::text'
                               ELSE '''WITHDRAW''::text' END
    $$;
COMMENT ON FUNCTION cm.reconcile_source_sql(cm.source) IS 'the foreign table, account column and transaction type expression of a source, for the statements of a reconciliation';
REVOKE ALL ON FUNCTION cm.reconcile_source_sql(cm.source) FROM PUBLIC;

/*
 * Compare one source; fills cm.reconciliation_item and returns the figures.
 * Called by cm_reconcile() only.
 */
CREATE FUNCTION cm.reconcile_source(run bigint, src cm.source, tolerance numeric, leaf_rows integer,
                                    OUT compared bigint, OUT fetched bigint, OUT in_flight bigint,
                                    OUT remote_queries integer)
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    ft        text;
    acct      text;
    typ       text;
    tx        regclass := cm.target_table('portfolio_transactions');
    s1        integer;
    s2        integer;
    s3        integer;
    horizon   timestamptz;       -- settled rows: updated_at <= horizon
    read_from timestamptz;       -- where the next read starts
    rhash     text;
    lhash     text;
    rlo       bigint;
    rhi       bigint;
    llo       bigint;
    lhi       bigint;
    lo        bigint;
    width     bigint;
    parents   bigint[];
    pwidth    bigint;
    split     bigint[];
    leaves    bigint[];
    n         bigint;
    disabled  text;
    moved     bigint;
    dead      bigint[];
BEGIN
    compared := 0; fetched := 0; in_flight := 0; remote_queries := 0;
    SELECT r.ft, r.acct, r.typ INTO ft, acct, typ FROM cm.reconcile_source_sql(src) r;
    IF to_regclass(ft) IS NULL THEN
        RAISE EXCEPTION 'the foreign table % of source % does not exist', ft, src.source_id
            USING ERRCODE = 'undefined_table',
                  HINT = 'Run SELECT cm_attach_queue(server) again, or disable the source (UPDATE cm.source SET enabled = false).';
    END IF;
    s1 := coalesce(cm.column_scale(tx, 'tier1_change'), 8);
    s2 := coalesce(cm.column_scale(tx, 'tier2_change'), 8);
    s3 := coalesce(cm.column_scale(tx, 'tier3_change'), 8);
    IF src.enabled THEN
        horizon := coalesce(src.watermark, '-infinity');
        SELECT s.next_read_from INTO read_from FROM @extschema@.cm_sources() s WHERE s.source_id = src.source_id;
        read_from := coalesce(read_from, '-infinity');
    ELSE
        -- the cycle does not read a disabled source: every row is settled
        horizon := 'infinity';
        read_from := 'infinity';
        disabled := 'source disabled: the sync cycle does not read it (UPDATE cm.source SET enabled = true)';
    END IF;

    rhash := cm.reconcile_hash_sql('q.queue_id', 'q.status', 'q.updated_at', acct,
                                   'q.tier_1', 'q.tier_2', 'q.tier_3', s1, s2, s3);
    lhash := cm.reconcile_hash_sql('l.queue_id', 'l.status', 'l.updated_at', 'l.accountid',
                                   'abs(p.tier1_change)', 'abs(p.tier2_change)', 'abs(p.tier3_change)', s1, s2, s3);

    -- the dead letters are reported from cm.dead_letter: left out of the checksums
    SELECT array_agg(d.queue_id ORDER BY d.queue_id) INTO dead FROM cm.dead_letter d WHERE d.source_id = src.source_id;

    -- the key range of both sides (one remote aggregate)
    EXECUTE format('SELECT min(q.queue_id), max(q.queue_id) FROM %s q WHERE q.updated_at <= %L::timestamptz',
                   ft, horizon) INTO rlo, rhi;
    remote_queries := remote_queries + 1;
    SELECT min(l.queue_id), max(l.queue_id) INTO llo, lhi
      FROM cm.ledger l WHERE l.source_id = src.source_id AND l.updated_at <= horizon;
    lo := least(rlo, llo);
    IF lo IS NOT NULL THEN
        width := 1;
        -- the first level has up to 1,024 buckets, each next one 32 per differing bucket
        WHILE width * 1024 < greatest(rhi, lhi) - lo + 1 LOOP
            width := width * 32;
        END LOOP;
        parents := NULL;
        pwidth := NULL;
        LOOP
            -- the checksum of each bucket of this level, inside the differing parents
            EXECUTE format(
                'WITH r AS (SELECT (q.queue_id::bigint - %2$s) / %3$s AS b, count(*) AS n, sum(%4$s) AS h'
                '             FROM %1$s q WHERE q.queue_id >= %2$s AND q.updated_at <= %6$L::timestamptz %5$s %12$s GROUP BY 1),'
                '     l AS (SELECT (l.queue_id - %2$s) / %3$s AS b, count(*) AS n, sum(%7$s) AS h'
                '             FROM cm.ledger l LEFT JOIN %8$s p ON p.id = l.uuid'
                '            WHERE l.source_id = %9$s AND l.queue_id >= %2$s AND l.updated_at <= %6$L::timestamptz %10$s %13$s GROUP BY 1)'
                ' SELECT coalesce(sum(r.n), 0)::bigint,'
                '        array_agg(coalesce(r.b, l.b)) FILTER (WHERE (r.h IS DISTINCT FROM l.h OR r.n IS DISTINCT FROM l.n)'
                '                                              AND (greatest(r.n, l.n) > %11$s AND %3$s > 1)),'
                '        array_agg(coalesce(r.b, l.b)) FILTER (WHERE (r.h IS DISTINCT FROM l.h OR r.n IS DISTINCT FROM l.n)'
                '                                              AND NOT (greatest(r.n, l.n) > %11$s AND %3$s > 1))'
                '   FROM r FULL JOIN l ON l.b = r.b',
                ft, lo, width, rhash,
                CASE WHEN parents IS NULL THEN ''
                     ELSE 'AND ' || cm.reconcile_ranges_sql('q.queue_id', lo, pwidth, parents) END,
                horizon, lhash, tx, src.source_id,
                CASE WHEN parents IS NULL THEN ''
                     ELSE 'AND ' || cm.reconcile_ranges_sql('l.queue_id', lo, pwidth, parents) END,
                leaf_rows,
                CASE WHEN dead IS NULL THEN '' ELSE format('AND q.queue_id::bigint <> ALL (%L::bigint[])', dead) END,
                CASE WHEN dead IS NULL THEN '' ELSE format('AND l.queue_id <> ALL (%L::bigint[])', dead) END)
              INTO n, split, leaves;
            remote_queries := remote_queries + 1;
            IF parents IS NULL THEN
                compared := n + coalesce(cardinality(dead), 0);
            END IF;
            IF leaves IS NOT NULL THEN
                -- the rows of the smallest differing ranges cross the network
                INSERT INTO cm.reconcile_range (run_id, source_id, lo, hi)
                SELECT run, src.source_id, lo + b * width, lo + (b + 1) * width - 1 FROM unnest(leaves) b;
                EXECUTE format(
                    'INSERT INTO cm.reconcile_fetch (run_id, source_id, queue_id, uuid, accountid, transaction_type,'
                    '                                tier_1, tier_2, tier_3, status, updated_at)'
                    ' SELECT %1$s, %2$s, q.queue_id, q.uuid, %3$s, %4$s, q.tier_1, q.tier_2, q.tier_3, q.status, q.updated_at'
                    '   FROM %5$s q WHERE %6$s',
                    run, src.source_id, acct, typ, ft, cm.reconcile_ranges_sql('q.queue_id', lo, width, leaves));
                GET DIAGNOSTICS n = ROW_COUNT;
                fetched := fetched + n;
                remote_queries := remote_queries + 1;
            END IF;
            EXIT WHEN split IS NULL;
            parents := split;
            pwidth := width;
            width := width / 32;
        END LOOP;
    END IF;

    -- rows fetched but changed after the read position, or inside the next read's window: in flight
    WITH f AS (
        SELECT f.queue_id FROM cm.reconcile_fetch f
          LEFT JOIN cm.ledger l ON l.source_id = f.source_id AND l.queue_id = f.queue_id
         WHERE f.run_id = run AND f.source_id = src.source_id
           AND NOT EXISTS (SELECT 1 FROM cm.dead_letter d WHERE d.source_id = f.source_id AND d.queue_id = f.queue_id)
           AND (f.updated_at IS NULL OR f.updated_at > horizon
                OR ((l.queue_id IS NULL OR (f.updated_at, f.status) IS DISTINCT FROM (l.updated_at, l.status))
                    AND f.updated_at >= read_from)))
    SELECT count(*) INTO n FROM f;
    in_flight := in_flight + n;

    -- fetched rows, one by one, against the ledger and portfolio_transactions
    EXECUTE format($q$
        INSERT INTO cm.reconciliation_item AS i (run_id, source_id, queue_id, uuid, accountid, kind,
                                                  queue_value, portfolio_value, diagnosis, amount_at_stake, repairable)
        SELECT %1$s, %2$s, k.queue_id, k.uuid, k.accountid, k.kind, k.qv, k.pv,
               coalesce(%6$L, k.diagnosis), k.stake, %6$L IS NULL AND k.kind <> 'orphan'
          FROM (
            SELECT j.*, v.*
              FROM (
                SELECT coalesce(f.queue_id, l.queue_id) AS queue_id, coalesce(f.uuid, l.uuid::text) AS uuid,
                       coalesce(f.accountid, l.accountid) AS accountid,
                       f.queue_id IS NOT NULL AS in_queue, l.uuid IS NOT NULL AS in_ledger, p.id IS NOT NULL AS in_portfolio,
                       f.status AS q_status, m.portfolio_status AS q_mapped, p.status AS p_status,
                       CASE upper(f.transaction_type) WHEN 'INVEST' THEN 'INVEST'
                            WHEN 'WITHDRAW' THEN 'WITHDRAWAL' WHEN 'WITHDRAWAL' THEN 'WITHDRAWAL' END AS q_kind,
                       p.transaction_type AS p_kind, f.accountid AS q_account, p.accountid AS p_account,
                       round(f.tier_1, %3$s) AS q1, round(f.tier_2, %4$s) AS q2, round(f.tier_3, %5$s) AS q3,
                       abs(p.tier1_change) AS p1, abs(p.tier2_change) AS p2, abs(p.tier3_change) AS p3,
                       abs(p.total_amount) AS pt, l.applied,
                       (f.updated_at, f.status) IS DISTINCT FROM (l.updated_at, l.status) AS behind,
                       p.updated_at > l.synced_at AS edited
                  FROM (SELECT * FROM cm.reconcile_fetch f WHERE f.run_id = %1$s AND f.source_id = %2$s) f
                  FULL JOIN (SELECT l.* FROM cm.ledger l JOIN cm.reconcile_range r
                                ON r.run_id = %1$s AND r.source_id = %2$s AND l.queue_id BETWEEN r.lo AND r.hi
                              WHERE l.source_id = %2$s AND l.updated_at <= %7$L::timestamptz) l
                    ON l.queue_id = f.queue_id
                  LEFT JOIN %9$s p ON p.id = coalesce(l.uuid, cm.try_uuid(f.uuid))
                  LEFT JOIN cm.status_map m ON m.queue_status = f.status
                 WHERE NOT EXISTS (SELECT 1 FROM cm.dead_letter d WHERE d.source_id = %2$s
                                      AND d.queue_id = coalesce(f.queue_id, l.queue_id))
                   AND (f.queue_id IS NULL
                        OR NOT (f.updated_at IS NULL OR f.updated_at > %7$L::timestamptz
                                OR ((l.uuid IS NULL OR (f.updated_at, f.status) IS DISTINCT FROM (l.updated_at, l.status))
                                    AND f.updated_at >= %8$L::timestamptz)))
              ) j,
              LATERAL (
                SELECT CASE
                         WHEN j.behind AND j.in_ledger THEN
                              'changed in queue-db behind the watermark: committed later than lookback_window allows (the ledger holds an older version) — widen consistency_manager.lookback_window'
                         WHEN j.behind THEN
                              'behind the watermark: committed later than lookback_window allows, so the cycle never read it — widen consistency_manager.lookback_window'
                         WHEN j.edited THEN
                              'edited in user-portfolio-db after it was synced (portfolio updated_at later than the ledger''s synced_at)'
                         ELSE 'differs from what the cycle wrote (changed in user-portfolio-db without updated_at)' END AS why
              ) w,
              LATERAL (VALUES
                ('orphan', NOT j.in_queue AND j.in_portfolio, NULL::text,
                 format('%%s %%s %%s', j.p_account, j.p_kind, j.p_status),
                 'queue row deleted after it was synced', j.pt),
                ('missing', j.in_queue AND NOT j.in_portfolio, format('%%s %%s %%s', j.q_account, j.q_kind, j.q_status), NULL,
                 CASE WHEN j.in_ledger AND NOT j.behind THEN 'deleted from user-portfolio-db after it was synced' ELSE w.why END,
                 j.q1 + j.q2 + j.q3),
                ('status', j.in_queue AND j.in_portfolio AND j.q_mapped IS DISTINCT FROM j.p_status,
                 format('%%s (%%s)', j.q_mapped, j.q_status), j.p_status, w.why, j.q1 + j.q2 + j.q3),
                ('amount', j.in_queue AND j.in_portfolio AND (abs(j.q1 - j.p1) > %10$L::numeric OR abs(j.q2 - j.p2) > %10$L::numeric
                            OR abs(j.q3 - j.p3) > %10$L::numeric OR abs(j.q1 + j.q2 + j.q3 - j.pt) > %10$L::numeric),
                 format('%%s+%%s+%%s=%%s', j.q1, j.q2, j.q3, j.q1 + j.q2 + j.q3),
                 format('%%s+%%s+%%s=%%s', j.p1, j.p2, j.p3, j.pt), w.why, abs(j.q1 + j.q2 + j.q3 - j.pt)),
                ('account', j.in_queue AND j.in_portfolio AND j.q_account IS DISTINCT FROM j.p_account::text,
                 j.q_account, j.p_account, w.why, j.q1 + j.q2 + j.q3),
                ('type', j.in_queue AND j.in_portfolio AND j.q_kind IS DISTINCT FROM j.p_kind::text,
                 j.q_kind, j.p_kind, w.why, j.q1 + j.q2 + j.q3),
                ('effect', j.in_queue AND j.in_ledger AND (j.q_status = 'COMPLETED') IS DISTINCT FROM j.applied,
                 format('status %%s', j.q_status), format('applied=%%s', j.applied),
                 CASE WHEN j.behind THEN w.why
                      WHEN j.applied THEN format('completion still applied while the queue says %%s: never compensated', j.q_status)
                      ELSE 'completion never applied to the account' END,
                 j.q1 + j.q2 + j.q3)
              ) v(kind, hit, qv, pv, diagnosis, stake)
             WHERE v.hit
          ) k
        ON CONFLICT DO NOTHING
        $q$, run, src.source_id, s1, s2, s3, disabled, horizon, read_from, tx, tolerance);

    -- the ledger rows not fetched, against portfolio_transactions (no network)
    EXECUTE format($q$
        INSERT INTO cm.reconciliation_item AS i (run_id, source_id, queue_id, uuid, accountid, kind,
                                                  queue_value, portfolio_value, diagnosis, amount_at_stake, repairable)
        SELECT %1$s, %2$s, l.queue_id, l.uuid::text, l.accountid, v.kind, v.qv, v.pv,
               coalesce(%3$L, v.diagnosis), abs(p.total_amount), %3$L IS NULL
          FROM (SELECT l.*, p.id AS p_id, p.status AS p_status, p.accountid AS p_accountid,
                       p.transaction_type AS p_type, p.total_amount AS p_total, p.updated_at AS p_updated_at,
                       m.portfolio_status
                  FROM cm.ledger l
                  LEFT JOIN %4$s p ON p.id = l.uuid
                  LEFT JOIN cm.status_map m ON m.queue_status = l.status
                 WHERE l.source_id = %2$s AND l.updated_at <= %5$L::timestamptz
                   -- one test per row; the few rows that differ are taken apart below
                   AND (p.id IS NULL OR m.portfolio_status IS DISTINCT FROM p.status
                        OR l.accountid IS DISTINCT FROM p.accountid::text
                        OR l.kind IS DISTINCT FROM p.transaction_type::text
                        OR (l.status = 'COMPLETED') IS DISTINCT FROM l.applied)
                 OFFSET 0) l,
          LATERAL (SELECT l.p_id AS id, l.p_status AS status, l.p_accountid AS accountid,
                          l.p_type AS transaction_type, l.p_total AS total_amount) p,
          LATERAL (SELECT l.portfolio_status) m,
          LATERAL (SELECT CASE WHEN l.p_updated_at > l.synced_at
                               THEN 'edited in user-portfolio-db after it was synced (portfolio updated_at later than the ledger''s synced_at)'
                               ELSE 'differs from what the cycle wrote (changed in user-portfolio-db without updated_at)' END AS why) w,
          LATERAL (VALUES
            ('missing', p.id IS NULL, format('%%s %%s %%s', l.accountid, l.kind, l.status), NULL::text,
             'deleted from user-portfolio-db after it was synced'),
            ('status', p.id IS NOT NULL AND m.portfolio_status IS DISTINCT FROM p.status,
             format('%%s (%%s)', m.portfolio_status, l.status), p.status::text, w.why),
            ('account', p.id IS NOT NULL AND l.accountid IS DISTINCT FROM p.accountid::text, l.accountid, p.accountid::text, w.why),
            ('type', p.id IS NOT NULL AND l.kind IS DISTINCT FROM p.transaction_type::text, l.kind, p.transaction_type::text, w.why),
            ('effect', (l.status = 'COMPLETED') IS DISTINCT FROM l.applied,
             format('status %%s', l.status), format('applied=%%s', l.applied),
             CASE WHEN l.applied THEN format('completion still applied while the queue says %%s: never compensated', l.status)
                  ELSE 'completion never applied to the account' END)
          ) v(kind, hit, qv, pv, diagnosis)
         WHERE v.hit
           AND NOT EXISTS (SELECT 1 FROM cm.dead_letter d WHERE d.source_id = %2$s AND d.queue_id = l.queue_id)
           AND NOT EXISTS (SELECT 1 FROM cm.reconcile_range r
                            WHERE r.run_id = %1$s AND r.source_id = %2$s AND l.queue_id BETWEEN r.lo AND r.hi)
        ON CONFLICT DO NOTHING
        $q$, run, src.source_id, disabled, tx, horizon);

    -- the dead letters: missing, with their reason
    INSERT INTO cm.reconciliation_item (run_id, source_id, queue_id, uuid, accountid, kind,
                                        queue_value, portfolio_value, diagnosis, amount_at_stake, repairable)
    SELECT run, d.source_id, d.queue_id, d.uuid, d.accountid, 'missing',
           format('%s %s %s', d.accountid, d.transaction_type, d.status), NULL,
           'dead-lettered: ' || d.reason, round(d.tier_1 + d.tier_2 + d.tier_3, 2), false
      FROM cm.dead_letter d
     WHERE d.source_id = src.source_id
    ON CONFLICT DO NOTHING;

    -- re-check: a difference whose queue row or ledger row moved since is in flight
    IF EXISTS (SELECT 1 FROM cm.reconciliation_item i
                WHERE i.run_id = run AND i.source_id = src.source_id AND i.repairable) THEN
        EXECUTE format(
            'WITH now_q AS MATERIALIZED (SELECT q.queue_id::bigint AS queue_id, q.status::text AS status, q.updated_at'
            '                              FROM %1$s q WHERE q.queue_id = ANY (%2$L::bigint[])),'
            ' moved AS (SELECT DISTINCT i.queue_id FROM cm.reconciliation_item i'
            '             LEFT JOIN cm.reconcile_fetch f ON f.run_id = i.run_id AND f.source_id = i.source_id AND f.queue_id = i.queue_id'
            '             LEFT JOIN now_q n ON n.queue_id = i.queue_id'
            '             LEFT JOIN cm.ledger l ON l.source_id = i.source_id AND l.queue_id = i.queue_id'
            '            WHERE i.run_id = %3$s AND i.source_id = %4$s AND i.repairable'
            '              AND (l.updated_at > %5$L::timestamptz'
            '                   OR (f.queue_id IS NOT NULL AND (n.updated_at, n.status) IS DISTINCT FROM (f.updated_at, f.status))'
            '                   OR (f.queue_id IS NULL AND n.queue_id IS NOT NULL'
            '                       AND (n.updated_at, n.status) IS DISTINCT FROM (l.updated_at, l.status)))),'
            ' gone AS (DELETE FROM cm.reconciliation_item i USING moved m'
            '           WHERE i.run_id = %3$s AND i.source_id = %4$s AND i.queue_id = m.queue_id RETURNING i.queue_id)'
            ' SELECT (SELECT count(*) FROM now_q), (SELECT count(DISTINCT queue_id) FROM gone)',
            ft,
            (SELECT array_agg(DISTINCT i.queue_id) FROM cm.reconciliation_item i
              WHERE i.run_id = run AND i.source_id = src.source_id AND i.repairable),
            run, src.source_id, horizon)
          INTO n, moved;
        fetched := fetched + n;
        in_flight := in_flight + moved;
        remote_queries := remote_queries + 1;
    END IF;
END
$$;
COMMENT ON FUNCTION cm.reconcile_source(bigint, cm.source, numeric, integer) IS 'compare one source''s queue table with the ledger (by checksum ranges on queue-db) and portfolio_transactions (locally); records the differences of the run';
REVOKE ALL ON FUNCTION cm.reconcile_source(bigint, cm.source, numeric, integer) FROM PUBLIC;

/*
 * cm_reconcile(): compare every enabled source (or the one named, enabled or
 * not), record the run and its differences, and with repair => true repair
 * them at once (cm_repair).
 */
CREATE FUNCTION @extschema@.cm_reconcile(source_id integer DEFAULT NULL,
                                         amount_tolerance numeric DEFAULT 0,
                                         repair boolean DEFAULT false,
        OUT run_id bigint, OUT rows_compared bigint, OUT differences bigint, OUT repaired bigint,
        OUT rows_fetched bigint, OUT duration_ms double precision)
    RETURNS record
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    src      cm.source;
    r        record;
    t0       timestamptz := clock_timestamp();
    fetched  bigint := 0;
    flight   bigint := 0;
    queries  integer := 0;
    ids      integer[];
BEGIN
    IF amount_tolerance IS NULL OR amount_tolerance < 0 OR amount_tolerance = 'NaN'::numeric THEN
        RAISE EXCEPTION 'amount_tolerance must be a number of 0 or more, not %', coalesce(amount_tolerance::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'It is compared with the difference of each tier and of the total, after rounding to the scale of portfolio_transactions; 0 means exact.';
    END IF;
    IF cm_reconcile.source_id IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM cm.source s WHERE s.source_id = cm_reconcile.source_id) THEN
        RAISE EXCEPTION 'source % does not exist', cm_reconcile.source_id
            USING ERRCODE = 'no_data_found',
                  HINT = 'See SELECT * FROM cm_sources();';
    END IF;
    SELECT coalesce(array_agg(s.source_id ORDER BY s.source_id), '{}') INTO ids
      FROM cm.source s
     WHERE CASE WHEN cm_reconcile.source_id IS NULL THEN s.enabled ELSE s.source_id = cm_reconcile.source_id END;
    INSERT INTO cm.reconciliation_run (source_ids, amount_tolerance)
    VALUES (ids, cm_reconcile.amount_tolerance)
    RETURNING reconciliation_run.run_id INTO run_id;

    FOR src IN SELECT * FROM cm.source s WHERE s.source_id = ANY (ids) ORDER BY s.source_id LOOP
        SELECT * INTO r FROM cm.reconcile_source(run_id, src, cm_reconcile.amount_tolerance, 256);
        rows_compared := coalesce(rows_compared, 0) + r.compared;
        fetched := fetched + r.fetched;
        flight := flight + r.in_flight;
        queries := queries + r.remote_queries;
    END LOOP;
    DELETE FROM cm.reconcile_fetch f WHERE f.run_id = cm_reconcile.run_id;
    DELETE FROM cm.reconcile_range g WHERE g.run_id = cm_reconcile.run_id;

    rows_compared := coalesce(rows_compared, 0);
    SELECT count(*) INTO differences FROM cm.reconciliation_item i WHERE i.run_id = cm_reconcile.run_id;
    rows_fetched := fetched;
    duration_ms := extract(epoch FROM clock_timestamp() - t0) * 1000;
    UPDATE cm.reconciliation_run x
       SET finished_at = clock_timestamp(), rows_compared = cm_reconcile.rows_compared,
           differences = cm_reconcile.differences, rows_fetched = fetched, in_flight = flight,
           remote_queries = queries, duration_ms = cm_reconcile.duration_ms
     WHERE x.run_id = cm_reconcile.run_id;
    repaired := 0;
    IF repair THEN
        repaired := @extschema@.cm_repair(run_id);
    END IF;
END
$$;
COMMENT ON FUNCTION @extschema@.cm_reconcile(integer, numeric, boolean) IS 'compare the queue tables (every enabled source, or the one named) with cm.ledger by checksums computed on queue-db and with portfolio_transactions locally; records the run (cm.reconciliation_run) and each difference with its diagnosis (cm.reconciliation_item); with repair => true, repairs them (cm_repair)';
REVOKE ALL ON FUNCTION @extschema@.cm_reconcile(integer, numeric, boolean) FROM PUBLIC;

/*
 * cm_repair(run_id): route every repairable, unrepaired item of a run
 * through the sync cycle.  Each such queue row is queued for another try as
 * the cycle retries a dead letter (cm.dead_letter, reason "reconciliation
 * run N: repair"), and its ledger entry forgets the version it saw
 * (updated_at = -infinity), so that the cycle's pass of the dead letters
 * reads the current queue row and applies it as a change: the transaction
 * row is overwritten from the queue, and the effect follows the ledger's
 * applied flag (applied once, or compensated), as for any change.  Then one
 * cycle runs, in this transaction.  A row the cycle refuses stays a dead
 * letter, with the cycle's reason, and its item stays unrepaired.
 */
CREATE FUNCTION @extschema@.cm_repair(run_id bigint)
    RETURNS bigint
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    n bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM cm.reconciliation_run x WHERE x.run_id = cm_repair.run_id) THEN
        RAISE EXCEPTION 'reconciliation run % does not exist', cm_repair.run_id
            USING ERRCODE = 'no_data_found',
                  HINT = 'See SELECT run_id, started_at, differences FROM cm.reconciliation_run ORDER BY run_id DESC;';
    END IF;
    CREATE TEMP TABLE IF NOT EXISTS pg_temp.cm_repair_rows (source_id integer, queue_id bigint, uuid text, accountid text)
        ON COMMIT DROP;
    TRUNCATE pg_temp.cm_repair_rows;
    INSERT INTO pg_temp.cm_repair_rows
    SELECT DISTINCT ON (i.source_id, i.queue_id) i.source_id, i.queue_id, i.uuid, i.accountid
      FROM cm.reconciliation_item i JOIN cm.source s ON s.source_id = i.source_id AND s.enabled
     WHERE i.run_id = cm_repair.run_id AND i.repairable AND NOT i.repaired
     ORDER BY i.source_id, i.queue_id;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    UPDATE cm.ledger l SET updated_at = '-infinity'
      FROM pg_temp.cm_repair_rows w
     WHERE l.source_id = w.source_id AND l.queue_id = w.queue_id;
    INSERT INTO cm.dead_letter (source_id, queue_id, uuid, accountid, reason)
    SELECT w.source_id, w.queue_id, w.uuid, w.accountid,
           format('reconciliation run %s: repair', cm_repair.run_id)
      FROM pg_temp.cm_repair_rows w
    ON CONFLICT DO NOTHING;
    PERFORM @extschema@.cm_sync_now();
    UPDATE cm.reconciliation_item i SET repaired = true
      FROM pg_temp.cm_repair_rows w
     WHERE i.run_id = cm_repair.run_id AND i.source_id = w.source_id AND i.queue_id = w.queue_id
       AND i.repairable AND NOT i.repaired
       AND NOT EXISTS (SELECT 1 FROM cm.dead_letter d WHERE d.source_id = w.source_id AND d.queue_id = w.queue_id);
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE cm.reconciliation_run x
       SET repaired = (SELECT count(*) FROM cm.reconciliation_item i WHERE i.run_id = x.run_id AND i.repaired)
     WHERE x.run_id = cm_repair.run_id;
    RETURN n;
END
$$;
COMMENT ON FUNCTION @extschema@.cm_repair(bigint) IS 'repair the differences of a reconciliation run through the sync cycle (exactly once: effects applied or compensated per the ledger); orphans, dead letters and rows of disabled sources are only reported; returns the number of items repaired, and a second call repairs nothing';
REVOKE ALL ON FUNCTION @extschema@.cm_repair(bigint) FROM PUBLIC;

CREATE FUNCTION @extschema@.cm_reconciliation_summary(run_id bigint)
    RETURNS TABLE (kind text, diagnosis text, items bigint, repaired bigint, amount_at_stake numeric)
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT i.kind, i.diagnosis, count(*), count(*) FILTER (WHERE i.repaired), sum(i.amount_at_stake)
          FROM cm.reconciliation_item i
         WHERE i.run_id = cm_reconciliation_summary.run_id
         GROUP BY i.kind, i.diagnosis
         ORDER BY i.kind, count(*) DESC, i.diagnosis
    $$;
COMMENT ON FUNCTION @extschema@.cm_reconciliation_summary(bigint) IS 'the differences of a reconciliation run by kind and diagnosis: how many, how many repaired, the money at stake; read-only, for pg_monitor';
REVOKE ALL ON FUNCTION @extschema@.cm_reconciliation_summary(bigint) FROM PUBLIC;

CREATE FUNCTION @extschema@.cm_reconciliation_report(run_id bigint)
    RETURNS text
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    x     cm.reconciliation_run;
    parts text;
BEGIN
    SELECT * INTO x FROM cm.reconciliation_run r WHERE r.run_id = cm_reconciliation_report.run_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'reconciliation run % does not exist', cm_reconciliation_report.run_id
            USING ERRCODE = 'no_data_found',
                  HINT = 'See SELECT run_id, started_at, differences FROM cm.reconciliation_run ORDER BY run_id DESC;';
    END IF;
    -- per kind, the diagnoses in short (up to their first colon or parenthesis)
    SELECT string_agg(format('%s %s (%s)', k.items, k.kind, k.why), '; ' ORDER BY k.kind)
      INTO parts
      FROM (SELECT d.kind, sum(d.items) AS items,
                   string_agg(format('%s %s', d.items, d.short), ', ' ORDER BY d.items DESC, d.short) AS why
              FROM (SELECT s.kind, btrim(split_part(split_part(s.diagnosis, ' (', 1), ':', 1)) AS short,
                           sum(s.items) AS items
                      FROM @extschema@.cm_reconciliation_summary(x.run_id) s GROUP BY 1, 2) d
             GROUP BY d.kind) k;
    RETURN format('Run %s: %s rows compared in %s s across %s source(s); %s.',
                  x.run_id, to_char(x.rows_compared, 'FM999,999,999,999,990'),
                  to_char(coalesce(x.duration_ms, 0) / 1000, 'FM999,999,990.00'),
                  cardinality(x.source_ids),
                  CASE WHEN x.differences = 0 THEN 'queue-db and user-portfolio-db agree'
                       ELSE format('%s difference(s): %s', x.differences, parts) END)
        || format(' %s queue row(s) crossed the network in %s remote statement(s).', x.rows_fetched, x.remote_queries)
        || CASE WHEN x.in_flight > 0
                THEN format(' %s row(s) were changing or not yet synced and were left to the cycle.', x.in_flight)
                ELSE '' END
        || CASE WHEN x.differences = 0 THEN ''
                WHEN x.repaired = 0 THEN ' Nothing repaired yet: SELECT cm_repair(' || x.run_id || ');'
                ELSE format(' %s repaired; %s left (orphans, dead letters and disabled sources are only reported).',
                            x.repaired, x.differences - x.repaired) END;
END
$$;
COMMENT ON FUNCTION @extschema@.cm_reconciliation_report(bigint) IS 'a short narrative of a reconciliation run, for a person: rows compared, time, differences by kind and diagnosis, rows fetched, what was repaired; read-only, for pg_monitor';
REVOKE ALL ON FUNCTION @extschema@.cm_reconciliation_report(bigint) FROM PUBLIC;

GRANT EXECUTE ON FUNCTION @extschema@.cm_reconciliation_summary(bigint),
                          @extschema@.cm_reconciliation_report(bigint) TO pg_monitor;
GRANT SELECT ON cm.reconciliation_run, cm.reconciliation_item TO pg_monitor;

/*
 * What cm_health() says of the last reconciliation run: its differences
 * that cm_repair() could repair and has not, as a problem (the databases
 * disagree); orphans and dead letters are not repeated here (dead letters
 * have their own report, cm_dead_letters()).
 */
CREATE FUNCTION cm.reconciliation_health()
    RETURNS text[]
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT coalesce(array_agg(format('reconciliation run %s (%s) found %s unrepaired difference(s) between queue-db and user-portfolio-db: see SELECT cm_reconciliation_report(%s); repair with SELECT cm_repair(%s)',
                                         x.run_id, x.started_at, u.n, x.run_id, x.run_id)), '{}')
          FROM (SELECT r.run_id, r.started_at FROM cm.reconciliation_run r
                 WHERE r.finished_at IS NOT NULL ORDER BY r.run_id DESC LIMIT 1) x,
               LATERAL (SELECT count(*) AS n FROM cm.reconciliation_item i
                         WHERE i.run_id = x.run_id AND i.repairable AND NOT i.repaired) u
         WHERE u.n > 0
    $$;
COMMENT ON FUNCTION cm.reconciliation_health() IS 'what cm_health() reports of the last reconciliation run: its repairable differences not repaired yet';
REVOKE ALL ON FUNCTION cm.reconciliation_health() FROM PUBLIC;

/* the last run, for a dashboard (pg_monitor) */
CREATE FUNCTION @extschema@.cm_last_reconciliation()
    RETURNS SETOF cm.reconciliation_run
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT * FROM cm.reconciliation_run ORDER BY run_id DESC LIMIT 1
    $$;
COMMENT ON FUNCTION @extschema@.cm_last_reconciliation() IS 'the last reconciliation run (the worker''s, every consistency_manager.reconcile_interval, or a manual one): when, what it compared, its differences and how many are repaired; read-only, for pg_monitor';
REVOKE ALL ON FUNCTION @extschema@.cm_last_reconciliation() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION @extschema@.cm_last_reconciliation() TO pg_monitor;
