/*
 * Reconciliation: prove that queue-db and user-portfolio-db agree, explain
 * every difference, and repair what can be repaired through the cycle.
 *
 * cm_reconcile() compares the sources it covers without copying the queue
 * over the network and without joining cm.ledger with
 * portfolio_transactions (two tables of the queue's size):
 *
 *  1. The key space is the request's uuid, cut into buckets by a hash of
 *     its text (the low bits of hashtextextended(uuid, 0)): the one key that
 *     a queue row, its ledger entry and its portfolio_transactions row all
 *     carry, so that each side is aggregated on its own.  (queue_id ranges
 *     follow the queue's primary key, but portfolio_transactions has no
 *     queue_id: it would have to be joined with the ledger on every run.)
 *     There are about 256 rows a bucket (64 to 65,536 buckets, from the
 *     size of the ledger), so the rows of a differing bucket are few enough
 *     to fetch at once, without cutting it again.
 *  2. queue-db computes, per source and bucket, in one aggregate that
 *     postgres_fdw ships (only built-in immutable functions and operators,
 *     no CASE or coalesce, which PostgreSQL 15's postgres_fdw does not ship;
 *     check with EXPLAIN VERBOSE): count(*); the image hash, what
 *     portfolio_transactions holds of the row but its status (uuid, account,
 *     transaction type, each tier rounded to the scale of its column); and
 *     the version hash, (queue_id, raw status), what the ledger holds.
 *  3. Locally, per bucket: over portfolio_transactions, count(*), the image
 *     hash (absolute tier changes: withdrawals are written negative) and a
 *     hash of (uuid, status), against the queue tables; per source over
 *     cm.ledger, count(*) and the version hash against the queue table, the
 *     hash of (uuid, status mapped through cm.status_map) against
 *     portfolio_transactions' status hash, and whether an entry's applied
 *     flag disagrees with its status.  A status is thus compared queue to
 *     ledger raw, on queue-db's side, and ledger to portfolio mapped,
 *     locally: queue-db never maps a status.  When rows of other sources (or
 *     of the application) make more than one bucket in 16 differ,
 *     portfolio_transactions is aggregated again, restricted to the rows the
 *     ledger says came from the sources compared.
 *     The checksums of every side are computed by one statement whose
 *     remote aggregates run on queue-db while the local ones run here
 *     (cm.reconcile_sums_sql()).
 *  4. The rows of the differing buckets are fetched (one remote statement
 *     per source) and compared one by one with their ledger entries and
 *     portfolio_transactions rows, which gives each difference its kind and
 *     diagnosis.  Ledger entries of those buckets whose queue row is gone
 *     (an orphan's) are looked for in the ledger only when the fetched rows
 *     found fewer entries than its checksums counted.
 *
 * A bucket's hashes are combined with bit_xor, which postgres_fdw ships and
 * which keeps a plain bigint state: queue-db's planner takes the number of
 * buckets for the number of rows (the hash of a unique column), and with
 * sum()'s internal state it found the hash table too large for work_mem
 * (64MB in the benchmark) and sorted the whole table instead of hashing it
 * into a few thousand buckets, twice as slow.  Every
 * row hash includes the row's identity (uuid or queue_id), so two rows never
 * cancel out but by a 64-bit collision, and count(*) is compared too.  The
 * hashes are strict: a NULL column makes the row's hash NULL; the row still
 * counts, and a NULL on the local side makes its bucket differ.
 *
 * No timestamp enters a hash (so no precision or time zone needs to agree);
 * numbers are rounded to the target scale, and hash_numeric_extended ignores
 * trailing zeros.  A uuid spelled another way in the queue (upper case,
 * braces) lands in another bucket than its portfolio row: both buckets then
 * differ and the row is compared one by one, and found equal.  The
 * checksums only choose what to fetch: what is reported is always decided
 * row by row.
 *
 * Only settled rows are compared: the checksums cover queue rows whose
 * updated_at is no later than the source's read position (watermark) when
 * the run starts.  A fetched row changed after it, or committed late but
 * still inside the next read's window, is in flight (counted, not a
 * difference); before a difference is recorded, its queue row is read again
 * and the ledger looked at again, and a row that moved meanwhile is in
 * flight too.
 *
 * The hash functions are those of the server's major version and
 * architecture: queue-db and portfolio-db must run the same PostgreSQL major
 * version on the same architecture, or every bucket differs (nothing is
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
COMMENT ON COLUMN cm.reconciliation_run.rows_fetched IS 'queue rows that crossed the network (the rows of the differing buckets, and the re-check of each difference)';
COMMENT ON COLUMN cm.reconciliation_run.in_flight IS 'rows changed after the read position or during the run, or inside the next read''s window: left to the cycle, not differences';
COMMENT ON COLUMN cm.reconciliation_run.remote_queries IS 'statements sent to queue-db (checksums, fetches, re-checks)';
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

/* scratch: the queue rows a run fetched */
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
COMMENT ON TABLE cm.reconcile_fetch IS 'scratch table of a running reconciliation: the queue rows fetched from the differing buckets; emptied when the run ends';
REVOKE ALL ON cm.reconcile_fetch FROM PUBLIC;

CREATE UNLOGGED TABLE cm.reconcile_key (
    run_id    bigint NOT NULL,
    source_id integer NOT NULL,
    queue_id  bigint NOT NULL
);
COMMENT ON TABLE cm.reconcile_key IS 'scratch table of a running reconciliation: the ledger entries compared one by one (those of the differing buckets, and those whose applied flag disagrees with their status); emptied when the run ends';
REVOKE ALL ON cm.reconcile_key FROM PUBLIC;

CREATE UNLOGGED TABLE cm.reconcile_sum (
    run_id    bigint NOT NULL,
    side      text NOT NULL CHECK (side IN ('queue', 'ledger', 'portfolio')),
    source_id integer NOT NULL,
    bucket    bigint NOT NULL,
    n         bigint NOT NULL,
    image     bigint,
    version   bigint,
    status    bigint,
    bad       boolean NOT NULL DEFAULT false
);
COMMENT ON TABLE cm.reconcile_sum IS 'scratch table of a running reconciliation: the checksums per bucket of the queue tables and of the ledger (per source) and of portfolio_transactions (source 0); emptied when the run ends';
REVOKE ALL ON cm.reconcile_sum FROM PUBLIC;

/*
 * The SQL text of the hashes of a reconciliation, over the given column
 * expressions (the same text for every side, so that every side normalises
 * alike): built-in immutable functions only, so that postgres_fdw ships
 * them.  The hashes are strict: a NULL column makes the row's hash NULL
 * (postgres_fdw ships no coalesce and no CASE in PostgreSQL 15); the row
 * still counts, and a NULL on the local side makes its bucket differ.
 *
 * key: the hash of the uuid's text, as the queue spells it (the bucket is
 * its low bits; a uuid spelled in upper case or with braces lands in
 * another bucket than its portfolio row, so both differ and the row is
 * compared one by one, found equal).
 */
CREATE FUNCTION cm.reconcile_key_sql(uuid text)
    RETURNS text
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT format('hashtextextended(%s, 0)', uuid)
    $$;
COMMENT ON FUNCTION cm.reconcile_key_sql(text) IS 'SQL text of the key hash of a reconciliation (its low bits are the bucket): a built-in immutable function, so that postgres_fdw ships it';
REVOKE ALL ON FUNCTION cm.reconcile_key_sql(text) FROM PUBLIC;

/*
 * image: what portfolio_transactions holds of a row but its status: the
 * uuid (key), the account and the transaction type in one text (the type
 * of a split layout is a constant, and a constant alone as the argument of
 * hashtextextended is not shipped: its collation comes from no column),
 * and each tier rounded to the scale of its column.
 */
CREATE FUNCTION cm.reconcile_image_sql(key text, account_kind text, tier_1 text, tier_2 text, tier_3 text)
    RETURNS text
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT format('hash_numeric_extended(%5$s, hash_numeric_extended(%4$s, hash_numeric_extended(%3$s,'
                      ' hashtextextended(%2$s, %1$s))))',
                      key, account_kind, tier_1, tier_2, tier_3)
    $$;
COMMENT ON FUNCTION cm.reconcile_image_sql(text, text, text, text, text) IS 'SQL text of the image hash of a reconciliation (uuid, account, type and amounts of a row as portfolio_transactions holds them): built-in immutable functions only, so that postgres_fdw ships it';
REVOKE ALL ON FUNCTION cm.reconcile_image_sql(text, text, text, text, text) FROM PUBLIC;

/*
 * version: a row's queue_id and raw queue status, as the ledger holds them
 * (the status is compared in two steps: queue against ledger, raw, by this
 * hash; the ledger's status mapped through cm.status_map against
 * portfolio_transactions, locally: queue-db never maps a status).
 */
CREATE FUNCTION cm.reconcile_version_sql(queue_id text, status text)
    RETURNS text
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT format('hashtextextended(%2$s, hashint8extended(%1$s, 0))', queue_id, status)
    $$;
COMMENT ON FUNCTION cm.reconcile_version_sql(text, text) IS 'SQL text of the version hash of a reconciliation (queue_id and raw status, as the ledger holds them): built-in immutable functions only, so that postgres_fdw ships it';
REVOKE ALL ON FUNCTION cm.reconcile_version_sql(text, text) FROM PUBLIC;

/* the transaction type of a queue row as portfolio_transactions spells it, appended to the account (shipped) */
CREATE FUNCTION cm.reconcile_account_kind_sql(src cm.source)
    RETURNS text
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
        -- unified: '|TYPE|' through one replace() per spelling (postgres_fdw ships no CASE)
        SELECT format('(q.%I::text || %s)', src.account_column,
                      CASE src.layout
                          WHEN 'unified' THEN
                              'replace(replace(replace((''|'' || upper(q.transaction_type::text) || ''|''),'
                              ' ''|INVEST|'', ''#INVEST#''), ''|WITHDRAW|'', ''#WITHDRAWAL#''), ''|WITHDRAWAL|'', ''#WITHDRAWAL#'')'
                          WHEN 'investment' THEN '''#INVEST#''::text'
                          ELSE '''#WITHDRAWAL#''::text' END)
    $$;
COMMENT ON FUNCTION cm.reconcile_account_kind_sql(cm.source) IS 'SQL text that postgres_fdw ships: a queue row''s account followed by its transaction type as portfolio_transactions spells it (''#INVEST#'', ''#WITHDRAWAL#'')';
REVOKE ALL ON FUNCTION cm.reconcile_account_kind_sql(cm.source) FROM PUBLIC;

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
 * The checksums of every side are computed by one statement, so that
 * queue-db's work overlaps the local work: an Append whose first members
 * are the sources' checksum statements (one remote aggregate each) and whose
 * last are the aggregates of portfolio_transactions and of cm.ledger.  The
 * foreign tables that cm_attach_queue() creates are async_capable, so
 * postgres_fdw sends each remote aggregate when the Append starts and reads
 * its result once the local aggregates are done (EXPLAIN shows "Async
 * Foreign Scan"; a foreign table without the option is read in turn, which
 * costs time, not correctness).  The members of an Append have the same
 * columns, (t, n, a, b), and t tells them apart: its bits 0-15 are the
 * bucket, 16-46 the source, 47 whether a ledger entry of the bucket has an
 * applied flag that disagrees with its status, and 48-49 the side (1
 * queue, 2 ledger, 3 portfolio).  A remote member computes its t on
 * queue-db, in its GROUP BY: a projection above a foreign scan would keep
 * it from running asynchronously.
 */
CREATE FUNCTION cm.reconcile_tag(side integer, source_id integer)
    RETURNS bigint
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
    AS $$ SELECT (side::bigint << 48) | (source_id::bigint << 16) $$;
COMMENT ON FUNCTION cm.reconcile_tag(integer, integer) IS 'the high bits of a bucket number in the checksum statement of a reconciliation: side (1 queue, 2 ledger, 3 portfolio) and source';
REVOKE ALL ON FUNCTION cm.reconcile_tag(integer, integer) FROM PUBLIC;

/*
 * The checksum statement of a source on queue-db: per bucket, count(*),
 * the image hash and the version hash of its settled rows, dead letters
 * left out; with a tag, the bucket number carries it (computed on
 * queue-db).  Its text is what cm_reconcile() runs (and what a test
 * EXPLAINs).
 */
CREATE FUNCTION cm.reconcile_queue_sql(src cm.source, mask bigint, horizon timestamptz, dead bigint[], tag bigint DEFAULT 0)
    RETURNS text
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    tx  regclass := cm.target_table('portfolio_transactions');
    key text := cm.reconcile_key_sql('q.uuid::text');
BEGIN
    RETURN format('SELECT %1$s & %2$s%8$s AS t, count(*) AS n, bit_xor(%3$s) AS a, bit_xor(%4$s) AS b'
                  '  FROM %5$s q WHERE q.updated_at <= %6$L::timestamptz %7$s GROUP BY 1',
                  key, mask,
                  cm.reconcile_image_sql(key, cm.reconcile_account_kind_sql(src),
                                         format('round(q.tier_1, %s)', coalesce(cm.column_scale(tx, 'tier1_change'), 8)),
                                         format('round(q.tier_2, %s)', coalesce(cm.column_scale(tx, 'tier2_change'), 8)),
                                         format('round(q.tier_3, %s)', coalesce(cm.column_scale(tx, 'tier3_change'), 8))),
                  cm.reconcile_version_sql('q.queue_id::bigint', 'q.status::text'),
                  (SELECT r.ft FROM cm.reconcile_source_sql(src) r), horizon,
                  CASE WHEN dead IS NULL THEN '' ELSE format('AND q.queue_id::bigint <> ALL (%L::bigint[])', dead) END,
                  CASE WHEN tag = 0 THEN '' ELSE format(' | %s', tag) END);
END
$$;
COMMENT ON FUNCTION cm.reconcile_queue_sql(cm.source, bigint, timestamptz, bigint[], bigint) IS 'the checksum statement of a reconciliation on a source''s foreign table (per bucket: count, image hash, version hash), which postgres_fdw ships to queue-db whole';
REVOKE ALL ON FUNCTION cm.reconcile_queue_sql(cm.source, bigint, timestamptz, bigint[], bigint) FROM PUBLIC;

/* the read position of a source: settled rows end at horizon, the next read starts at read_from */
CREATE FUNCTION cm.reconcile_horizon(src cm.source, OUT horizon timestamptz, OUT read_from timestamptz)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
BEGIN
    IF src.enabled THEN
        horizon := coalesce(src.watermark, '-infinity');
        SELECT s.next_read_from INTO read_from FROM @extschema@.cm_sources() s WHERE s.source_id = src.source_id;
        read_from := coalesce(read_from, '-infinity');
    ELSE
        -- the cycle does not read a disabled source: every row is settled
        horizon := 'infinity';
        read_from := 'infinity';
    END IF;
END
$$;
COMMENT ON FUNCTION cm.reconcile_horizon(cm.source) IS 'where the settled rows of a source end for a reconciliation (its read position), and where its next read starts';
REVOKE ALL ON FUNCTION cm.reconcile_horizon(cm.source) FROM PUBLIC;

/*
 * The settled ledger entries of the sources compared, as a FROM item l
 * with k, the key hash of each entry: no later than its source's read
 * position, dead letters left out.
 */
CREATE FUNCTION cm.reconcile_ledger_from(srcs cm.source[], horizons timestamptz[])
    RETURNS text
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    ids   integer[] := '{}';
    whens text := '';
    i     integer;
BEGIN
    FOR i IN 1 .. cardinality(srcs) LOOP
        ids := ids || srcs[i].source_id;
        whens := whens || format(' WHEN %s THEN %L::timestamptz', srcs[i].source_id, horizons[i]);
    END LOOP;
    -- only the columns used: the ledger's rows are wide (factors, amounts)
    RETURN format('(SELECT %s AS k, l.source_id, l.queue_id, l.status, l.applied FROM cm.ledger l'
                  '  WHERE l.source_id = ANY (%L::integer[]) AND l.updated_at <= CASE l.source_id%s END %s OFFSET 0) l',
                  cm.reconcile_key_sql('l.uuid::text'), ids, whens,
                  CASE WHEN EXISTS (SELECT 1 FROM cm.dead_letter d WHERE d.source_id = ANY (ids))
                       THEN 'AND NOT EXISTS (SELECT 1 FROM cm.dead_letter d WHERE d.source_id = l.source_id AND d.queue_id = l.queue_id)'
                       ELSE '' END);
END
$$;
COMMENT ON FUNCTION cm.reconcile_ledger_from(cm.source[], timestamptz[]) IS 'the settled ledger entries of the sources a reconciliation compares, with their key hash, as a FROM item';
REVOKE ALL ON FUNCTION cm.reconcile_ledger_from(cm.source[], timestamptz[]) FROM PUBLIC;

/*
 * The portfolio_transactions rows a reconciliation compares (all, or with
 * restrict those the ledger says came from the sources), dead letters of
 * the sources left out, as an aggregate per bucket: t (tagged with side 3),
 * count(*), the image hash (NULL when a row's is), the hash of (key, status).
 */
CREATE FUNCTION cm.reconcile_portfolio_sql(ids integer[], mask bigint, restrict boolean)
    RETURNS text
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    dead uuid[];
BEGIN
    SELECT array_agg(u) INTO dead
      FROM (SELECT cm.try_uuid(d.uuid) AS u FROM cm.dead_letter d WHERE d.source_id = ANY (ids)) d
     WHERE u IS NOT NULL;
    RETURN format('SELECT (p.k & %1$s) | %2$s AS t, count(*) AS n,'
                  '       CASE WHEN count(p.image) = count(*) THEN bit_xor(p.image) END AS a, bit_xor(p.status) AS b'
                  '  FROM (SELECT p.k, %3$s AS image, hashtextextended(p.status::text, p.k) AS status'
                  '          FROM (SELECT %4$s AS k, p.accountid, p.transaction_type, p.tier1_change, p.tier2_change,'
                  '                       p.tier3_change, p.status FROM %5$s p WHERE true %6$s %7$s OFFSET 0) p) p'
                  ' GROUP BY p.k & %1$s',
                  mask, cm.reconcile_tag(3, 0),
                  cm.reconcile_image_sql('p.k', '(p.accountid::text || ''#'' || p.transaction_type::text || ''#'')',
                                         'abs(p.tier1_change)', 'abs(p.tier2_change)', 'abs(p.tier3_change)'),
                  cm.reconcile_key_sql('p.id::text'), cm.target_table('portfolio_transactions'),
                  CASE WHEN dead IS NULL THEN '' ELSE format('AND p.id <> ALL (%L::uuid[])', dead) END,
                  CASE WHEN restrict
                       THEN format('AND EXISTS (SELECT 1 FROM cm.ledger l WHERE l.uuid = p.id AND l.source_id = ANY (%L::integer[]))', ids)
                       ELSE '' END);
END
$$;
COMMENT ON FUNCTION cm.reconcile_portfolio_sql(integer[], bigint, boolean) IS 'the checksums per bucket of portfolio_transactions in a reconciliation (count, image hash, status hash), as a statement';
REVOKE ALL ON FUNCTION cm.reconcile_portfolio_sql(integer[], bigint, boolean) FROM PUBLIC;

/*
 * Step 1: the checksum statement of a run: every source's on queue-db, and
 * portfolio_transactions' and the ledger's (per source: count(*), the
 * version hash, the hash of (key, status mapped through cm.status_map),
 * and whether an entry's applied flag disagrees with its status), into
 * cm.reconcile_sum.  Its text is what cm_reconcile() runs (and what a test
 * EXPLAINs).
 */
CREATE FUNCTION cm.reconcile_sums_sql(run bigint, srcs cm.source[], mask bigint, horizons timestamptz[])
    RETURNS text
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    parts text[] := '{}';
    dead  bigint[];
    map   text;
    i     integer;
BEGIN
    FOR i IN 1 .. cardinality(srcs) LOOP
        SELECT array_agg(d.queue_id ORDER BY d.queue_id) INTO dead FROM cm.dead_letter d WHERE d.source_id = srcs[i].source_id;
        parts := parts || cm.reconcile_queue_sql(srcs[i], mask, horizons[i], dead, cm.reconcile_tag(1, srcs[i].source_id));
    END LOOP;
    SELECT coalesce(format('CASE l.status %s END', string_agg(format('WHEN %L THEN %L', m.queue_status, m.portfolio_status), ' '
                                                              ORDER BY m.queue_status)),
                    'NULL::text')
      INTO map FROM cm.status_map m;
    parts := parts || format(
        'SELECT (l.k & %1$s) | %2$s | (l.source_id::bigint << 16) | CASE WHEN bool_or(l.bad) THEN %3$s ELSE 0 END AS t,'
        '       count(*) AS n, bit_xor(l.version) AS a, bit_xor(l.status) AS b'
        '  FROM (SELECT l.source_id, l.k, (l.status = ''COMPLETED'') IS DISTINCT FROM l.applied AS bad,'
        '               %4$s AS version, hashtextextended(%5$s, l.k) AS status FROM %6$s) l'
        ' GROUP BY l.source_id, l.k & %1$s',
        mask, cm.reconcile_tag(2, 0), 1::bigint << 47,
        cm.reconcile_version_sql('l.queue_id', 'l.status'), map, cm.reconcile_ledger_from(srcs, horizons));
    parts := parts || cm.reconcile_portfolio_sql((SELECT array_agg(s.source_id) FROM unnest(srcs) s), mask, false);
    RETURN format('INSERT INTO cm.reconcile_sum (run_id, side, source_id, bucket, n, image, version, status, bad)'
                  ' SELECT %1$s, (ARRAY[''queue'', ''ledger'', ''portfolio''])[s.t >> 48], (s.t >> 16) & 2147483647, s.t & 65535, s.n,'
                  '        CASE WHEN s.t >> 48 <> 2 THEN s.a END,'
                  '        CASE s.t >> 48 WHEN 1 THEN s.b WHEN 2 THEN s.a END,'
                  '        CASE WHEN s.t >> 48 <> 1 THEN s.b END,'
                  '        (s.t >> 47) & 1 = 1'
                  '   FROM (%2$s) s',
                  run, array_to_string(parts, ' UNION ALL '));
END
$$;
COMMENT ON FUNCTION cm.reconcile_sums_sql(bigint, cm.source[], bigint, timestamptz[]) IS 'the checksum statement of a reconciliation run: per bucket, each source''s on queue-db (run asynchronously), portfolio_transactions'' and the ledger''s, into cm.reconcile_sum';
REVOKE ALL ON FUNCTION cm.reconcile_sums_sql(bigint, cm.source[], bigint, timestamptz[]) FROM PUBLIC;

/*
 * The buckets whose count or image differ between the queue tables and
 * portfolio_transactions (or whose portfolio image holds a NULL).
 */
CREATE FUNCTION cm.reconcile_image_differ(run bigint)
    RETURNS bigint[]
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
    SELECT array_agg(coalesce(q.bucket, p.bucket) ORDER BY 1)
      FROM (SELECT s.bucket, sum(s.n) AS n, bit_xor(s.image) AS image FROM cm.reconcile_sum s
             WHERE s.run_id = run AND s.side = 'queue' GROUP BY s.bucket) q
      FULL JOIN (SELECT s.bucket, s.n, s.image FROM cm.reconcile_sum s
                  WHERE s.run_id = run AND s.side = 'portfolio') p ON p.bucket = q.bucket
     WHERE (q.n, q.image) IS DISTINCT FROM (p.n, p.image) OR (p.bucket IS NOT NULL AND p.image IS NULL)
$$;
COMMENT ON FUNCTION cm.reconcile_image_differ(bigint) IS 'the buckets of a reconciliation run whose count or image differ between the queue tables and portfolio_transactions';
REVOKE ALL ON FUNCTION cm.reconcile_image_differ(bigint) FROM PUBLIC;

/*
 * portfolio_transactions' checksums again, restricted to the rows the
 * ledger says came from the sources (rows of other sources or of the
 * application made many buckets differ); returns the buckets that differ.
 */
CREATE FUNCTION cm.reconcile_portfolio_restricted(run bigint, ids integer[], mask bigint)
    RETURNS bigint[]
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
    AS $$
BEGIN
    DELETE FROM cm.reconcile_sum s WHERE s.run_id = run AND s.side = 'portfolio';
    EXECUTE format('INSERT INTO cm.reconcile_sum (run_id, side, source_id, bucket, n, image, status)'
                   ' SELECT %s, ''portfolio'', 0, s.t & 65535, s.n, s.a, s.b FROM (%s) s',
                   run, cm.reconcile_portfolio_sql(ids, mask, true));
    RETURN cm.reconcile_image_differ(run);
END
$$;
COMMENT ON FUNCTION cm.reconcile_portfolio_restricted(bigint, integer[], bigint) IS 'the checksums per bucket of the portfolio_transactions rows the ledger says came from the sources, into cm.reconcile_sum; returns the buckets that differ from the queue tables';
REVOKE ALL ON FUNCTION cm.reconcile_portfolio_restricted(bigint, integer[], bigint) FROM PUBLIC;

/*
 * The ledger entries of a source's fetched buckets whose queue row was not
 * fetched (deleted in queue-db, an orphan's) are compared one by one too,
 * into cm.reconcile_key.  The ledger's checksums counted the entries of
 * each bucket: when the entries found through the fetched rows (by key)
 * are as many, there is none, and the ledger is not read again.  Returns
 * whether it was.
 */
CREATE FUNCTION cm.reconcile_ledger_gone(run bigint, src cm.source, mask bigint, buckets bigint[], horizon timestamptz)
    RETURNS boolean
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    expected bigint;
    found    bigint;
BEGIN
    SELECT coalesce(sum(s.n), 0) INTO expected FROM cm.reconcile_sum s
     WHERE s.run_id = run AND s.side = 'ledger' AND s.source_id = src.source_id AND s.bucket = ANY (buckets);
    EXECUTE format('SELECT count(*) FROM cm.reconcile_fetch f'
                   '  JOIN cm.ledger l ON l.source_id = f.source_id AND l.queue_id = f.queue_id'
                   ' WHERE f.run_id = %1$s AND f.source_id = %2$s AND l.updated_at <= %3$L::timestamptz'
                   '   AND (%4$s & %5$s) = ANY (%6$L::bigint[])'
                   '   AND NOT EXISTS (SELECT 1 FROM cm.dead_letter d WHERE d.source_id = l.source_id AND d.queue_id = l.queue_id)',
                   run, src.source_id, horizon, cm.reconcile_key_sql('l.uuid::text'), mask, buckets)
      INTO found;
    -- (more than counted: the cycle wrote meanwhile; read the ledger)
    IF found = expected THEN
        RETURN false;
    END IF;
    EXECUTE format('INSERT INTO cm.reconcile_key (run_id, source_id, queue_id)'
                   ' SELECT %s, l.source_id, l.queue_id FROM %s WHERE (l.k & %s) = ANY (%L::bigint[])',
                   run, cm.reconcile_ledger_from(ARRAY[src], ARRAY[horizon]), mask, buckets);
    RETURN true;
END
$$;
COMMENT ON FUNCTION cm.reconcile_ledger_gone(bigint, cm.source, bigint, bigint[], timestamptz) IS 'the ledger entries of a source''s fetched buckets whose queue row is gone, into cm.reconcile_key (the ledger is read again only when its checksums count more entries than the fetched rows found)';
REVOKE ALL ON FUNCTION cm.reconcile_ledger_gone(bigint, cm.source, bigint, bigint[], timestamptz) FROM PUBLIC;

/*
 * Step 4 for one source: the rows of the differing buckets (those given,
 * and those where the ledger's count or versions differ from the queue's,
 * or an applied flag disagrees) are fetched and compared one by one with
 * the ledger and portfolio_transactions; fills cm.reconciliation_item and
 * returns the figures.  Called by cm_reconcile() only.
 */
CREATE FUNCTION cm.reconcile_source(run bigint, src cm.source, tolerance numeric, mask bigint,
                                    differing bigint[], horizon timestamptz, read_from timestamptz,
                                    OUT fetched bigint, OUT in_flight bigint, OUT remote_queries integer)
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
    buckets   bigint[];
    n         bigint;
    disabled  text;
    moved     bigint;
BEGIN
    fetched := 0; in_flight := 0; remote_queries := 0;
    SELECT r.ft, r.acct, r.typ INTO ft, acct, typ FROM cm.reconcile_source_sql(src) r;
    s1 := coalesce(cm.column_scale(tx, 'tier1_change'), 8);
    s2 := coalesce(cm.column_scale(tx, 'tier2_change'), 8);
    s3 := coalesce(cm.column_scale(tx, 'tier3_change'), 8);
    IF NOT src.enabled THEN
        disabled := 'source disabled: the sync cycle does not read it (UPDATE cm.source SET enabled = true)';
    END IF;

    SELECT array_agg(DISTINCT b ORDER BY b) INTO buckets
      FROM (SELECT unnest(coalesce(differing, '{}')) AS b
            UNION ALL
            SELECT coalesce(q.bucket, l.bucket)
              FROM (SELECT s.* FROM cm.reconcile_sum s
                     WHERE s.run_id = run AND s.side = 'queue' AND s.source_id = src.source_id) q
              FULL JOIN (SELECT s.* FROM cm.reconcile_sum s
                          WHERE s.run_id = run AND s.side = 'ledger' AND s.source_id = src.source_id) l
                ON l.bucket = q.bucket
             WHERE (q.n, q.version) IS DISTINCT FROM (l.n, l.version) OR l.bad) d;

    IF buckets IS NOT NULL THEN
        -- the rows of the differing buckets cross the network
        EXECUTE format(
            'INSERT INTO cm.reconcile_fetch (run_id, source_id, queue_id, uuid, accountid, transaction_type,'
            '                                tier_1, tier_2, tier_3, status, updated_at)'
            ' SELECT %1$s, %2$s, q.queue_id, q.uuid, %3$s, %4$s, q.tier_1, q.tier_2, q.tier_3, q.status, q.updated_at'
            '   FROM %5$s q WHERE (%6$s & %7$s) = ANY (%8$L::bigint[])',
            run, src.source_id, acct, typ, ft, cm.reconcile_key_sql('q.uuid::text'), mask, buckets);
        GET DIAGNOSTICS n = ROW_COUNT;
        fetched := fetched + n;
        remote_queries := remote_queries + 1;
        INSERT INTO cm.reconcile_key (run_id, source_id, queue_id)
        SELECT run, src.source_id, f.queue_id FROM cm.reconcile_fetch f
         WHERE f.run_id = run AND f.source_id = src.source_id;
        PERFORM cm.reconcile_ledger_gone(run, src, mask, buckets, horizon);
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
                  FULL JOIN (SELECT l.* FROM cm.ledger l
                              WHERE l.source_id = %2$s AND l.updated_at <= %7$L::timestamptz
                                AND l.queue_id IN (SELECT k.queue_id FROM cm.reconcile_key k
                                                    WHERE k.run_id = %1$s AND k.source_id = %2$s)) l
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
COMMENT ON FUNCTION cm.reconcile_source(bigint, cm.source, numeric, bigint, bigint[], timestamptz, timestamptz) IS 'compare one source: its ledger''s checksums against the queue''s (locally), then the rows of the differing buckets one by one (fetched from queue-db) against the ledger and portfolio_transactions; records the differences of the run';
REVOKE ALL ON FUNCTION cm.reconcile_source(bigint, cm.source, numeric, bigint, bigint[], timestamptz, timestamptz) FROM PUBLIC;

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
    srcs     cm.source[];
    r        record;
    t0       timestamptz := clock_timestamp();
    fetched  bigint := 0;
    flight   bigint := 0;
    queries  integer := 0;
    ids      integer[];
    horizons timestamptz[] := '{}';
    reads    timestamptz[] := '{}';
    mask     bigint;
    differ   bigint[];
    ft       text;
    i        integer;
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

    -- the sources as they are now: each one's read position is taken once
    SELECT coalesce(array_agg(s ORDER BY s.source_id), '{}') INTO srcs FROM cm.source s WHERE s.source_id = ANY (ids);
    -- about 256 rows a bucket, 64 to 65,536 buckets, from the size of the
    -- ledger and of portfolio_transactions (the live rows the statistics
    -- count, when no ANALYZE has set reltuples yet)
    SELECT (1::bigint << least(16, greatest(6, ceil(log(2, greatest(max(greatest(c.reltuples, pg_catalog.pg_stat_get_live_tuples(c.oid))), 1)::numeric / 256))::integer))) - 1
      INTO mask
      FROM pg_catalog.pg_class c
     WHERE c.oid IN ('cm.ledger'::regclass, cm.target_table('portfolio_transactions'));
    FOR i IN 1 .. cardinality(srcs) LOOP
        SELECT * INTO r FROM cm.reconcile_horizon(srcs[i]);
        horizons := horizons || r.horizon;
        reads := reads || r.read_from;
        ft := (SELECT x.ft FROM cm.reconcile_source_sql(srcs[i]) x);
        IF to_regclass(ft) IS NULL THEN
            RAISE EXCEPTION 'the foreign table % of source % does not exist', ft, srcs[i].source_id
                USING ERRCODE = 'undefined_table',
                      HINT = 'Run SELECT cm_attach_queue(server) again, or disable the source (UPDATE cm.source SET enabled = false).';
        END IF;
    END LOOP;
    rows_compared := 0;
    IF cardinality(srcs) > 0 THEN
        -- every side's checksums at once: queue-db's overlap the local ones
        EXECUTE cm.reconcile_sums_sql(cm_reconcile.run_id, srcs, mask, horizons);
        queries := queries + cardinality(srcs);
        -- the queue rows covered, dead letters counted in
        SELECT coalesce(sum(s.n), 0) INTO rows_compared FROM cm.reconcile_sum s
         WHERE s.run_id = cm_reconcile.run_id AND s.side = 'queue';
        rows_compared := rows_compared + (SELECT count(*) FROM cm.dead_letter d WHERE d.source_id = ANY (ids));
        differ := cm.reconcile_image_differ(cm_reconcile.run_id);
        -- rows of other sources or of the application make many buckets
        -- differ: compare only the rows the ledger says came from these sources
        IF cardinality(differ) > greatest(8, (mask + 1) / 16) THEN
            differ := cm.reconcile_portfolio_restricted(cm_reconcile.run_id, ids, mask);
        END IF;
        -- the statuses: the ledger's, mapped, against portfolio_transactions'
        SELECT array_agg(DISTINCT b) INTO differ
          FROM (SELECT unnest(differ) AS b
                UNION ALL
                SELECT coalesce(l.bucket, p.bucket)
                  FROM (SELECT s.bucket, bit_xor(s.status) AS status FROM cm.reconcile_sum s
                         WHERE s.run_id = cm_reconcile.run_id AND s.side = 'ledger' GROUP BY s.bucket) l
                  FULL JOIN (SELECT s.bucket, s.status FROM cm.reconcile_sum s
                              WHERE s.run_id = cm_reconcile.run_id AND s.side = 'portfolio') p ON p.bucket = l.bucket
                 WHERE l.status IS DISTINCT FROM p.status) d;
    END IF;
    FOR i IN 1 .. cardinality(srcs) LOOP
        SELECT * INTO r FROM cm.reconcile_source(cm_reconcile.run_id, srcs[i], cm_reconcile.amount_tolerance, mask,
                                                 differ, horizons[i], reads[i]);
        fetched := fetched + r.fetched;
        flight := flight + r.in_flight;
        queries := queries + r.remote_queries;
    END LOOP;
    DELETE FROM cm.reconcile_fetch f WHERE f.run_id = cm_reconcile.run_id;
    DELETE FROM cm.reconcile_key k WHERE k.run_id = cm_reconcile.run_id;
    DELETE FROM cm.reconcile_sum k WHERE k.run_id = cm_reconcile.run_id;

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
COMMENT ON FUNCTION @extschema@.cm_reconcile(integer, numeric, boolean) IS 'compare the queue tables (every enabled source, or the one named) with portfolio_transactions and cm.ledger by checksums per uuid bucket, computed on queue-db and locally, then the rows of the differing buckets one by one; records the run (cm.reconciliation_run) and each difference with its diagnosis (cm.reconciliation_item); with repair => true, repairs them (cm_repair)';
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
