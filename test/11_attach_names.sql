-- 11_attach_names.sql -- the names of the foreign tables cm_attach_queue() creates.
--
-- cm_remote.<server>_[<schema>_]<table>, as long as that fits an identifier
-- (63 bytes, not characters); otherwise cut at a character boundary and
-- ended with _ and 8 hex digits of a hash, so that the tables of a server
-- with a long (multibyte) name stay apart.  A name that is taken gets the
-- hash too; a queue table attached before keeps its name.

BEGIN;
SET LOCAL client_min_messages = warning;

SELECT plan(14);

\ir lib/helpers.sql

-- a foreign server like queue_server, with a user mapping for the caller
CREATE FUNCTION pg_temp.server_like_queue_server(srv text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    opts text;
BEGIN
    SELECT string_agg(format('%I %L', split_part(o, '=', 1), substr(o, strpos(o, '=') + 1)), ', ')
      INTO opts
      FROM pg_foreign_server s, unnest(s.srvoptions) o
     WHERE s.srvname = 'queue_server';
    EXECUTE format('CREATE SERVER %I FOREIGN DATA WRAPPER postgres_fdw OPTIONS (%s)', srv, opts);
    EXECUTE format('CREATE USER MAPPING FOR CURRENT_USER SERVER %I OPTIONS (user %L)', srv, current_user);
END
$$;
-- the foreign tables of a server's sources, as 'layout=name' lines
CREATE FUNCTION pg_temp.tables_of(srv text) RETURNS text LANGUAGE sql AS $$
    SELECT string_agg(format('%s=%s', s.layout, s.table_name), ' ' ORDER BY s.source_id)
      FROM cm.source s WHERE s.server_name = srv
$$;

-- a server name of 63 bytes and 32 characters (31 two-byte ones); its
-- tables' names would be 80 bytes and more
SELECT repeat('ö', 31) || 'x' AS srv \gset
SELECT pg_temp.server_like_queue_server(:'srv');
SELECT is(octet_length(:'srv'), 63, 'the server''s name is 63 bytes long');

SELECT results_eq(format($$SELECT layout FROM cm_attach_queue(%L) ORDER BY source_id$$, :'srv'),
    $$VALUES ('investment'), ('withdrawal')$$,
    'a server with a long multibyte name is attached: both tables of the split layout');
SELECT results_eq(format($$SELECT layout FROM cm_attach_queue(%L, 'unified')$$, :'srv'),
    $$VALUES ('unified')$$, 'and its unified layout, from another schema');
SELECT matches(pg_temp.tables_of(:'srv'),
    '^investment=' || repeat('ö', 27) || '_[0-9a-f]{8} withdrawal=' || repeat('ö', 27) || '_[0-9a-f]{8} '
    'unified=' || repeat('ö', 27) || '_[0-9a-f]{8}$',
    'each name is cut at a character boundary to fit 63 bytes with a hash');
SELECT is((SELECT count(DISTINCT table_name)::int FROM cm.source WHERE server_name = :'srv'), 3,
    'the three names differ');
SELECT is((SELECT max(octet_length(c.relname))::int FROM pg_class c
            WHERE c.relnamespace = 'cm_remote'::regnamespace), 63,
    'no name in cm_remote is longer than 63 bytes');
SELECT results_eq(
    format($$SELECT s.layout, o.opt COLLATE "default"
               FROM cm.source s
               JOIN pg_foreign_table f ON f.ftrelid = format('cm_remote.%%I', s.table_name)::regclass
               CROSS JOIN LATERAL unnest(f.ftoptions) o(opt)
              WHERE s.server_name = %L AND o.opt LIKE 'table\_name=%%'
              ORDER BY s.source_id$$, :'srv'),
    $$VALUES ('investment', 'table_name=investment_queue'), ('withdrawal', 'table_name=withdrawal_queue'),
             ('unified', 'table_name=investment_withdrawal_queue')$$,
    'each source reads its own queue table');

SELECT pg_temp.tables_of(:'srv') AS before \gset
SELECT is((SELECT count(*)::int FROM cm_attach_queue(:'srv')) + (SELECT count(*)::int FROM cm_attach_queue(:'srv', 'unified')),
    3, 'attaching again is harmless');
SELECT is(pg_temp.tables_of(:'srv'), :'before', 'and keeps the names');

-- the foreign table is gone (a restore does not bring it back): it is
-- re-created under the name its source has
SELECT table_name AS inv_table FROM cm.source WHERE server_name = :'srv' AND layout = 'investment' \gset
ALTER EXTENSION consistency_manager DROP FOREIGN TABLE cm_remote.:"inv_table";
DROP FOREIGN TABLE cm_remote.:"inv_table";
SELECT is((SELECT count(*)::int FROM cm_attach_queue(:'srv')), 2, 'a dropped foreign table is attached again');
SELECT is(pg_temp.tables_of(:'srv'), :'before', 'under the name its source has');

-- synced through them
SELECT pg_temp.queue_writable();
INSERT INTO user_portfolios (accountid, tier1_allocation, tier2_allocation, tier3_allocation, total_allocation,
        tier1_value, tier2_value, tier3_value, total_value)
VALUES ('N1', 0, 0, 0, 0, 0, 0, 0, 0);
INSERT INTO cm_remote.:"inv_table" (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, updated_at)
VALUES (1, 'N1', 1, 1, 1, 'dddddddd-0000-4000-8000-000000000001', 'PENDING', now(), now());
SELECT is(pg_temp.sync(),
    'sources=3 rows_read=1 created=1 updated=0 completed_applied=0 compensated=0 dead_lettered=0',
    'a cycle reads the queue through them');

-- a short name that is taken already gets the hash too
SELECT pg_temp.server_like_queue_server('q');
CREATE FOREIGN TABLE cm_remote.q_investment_queue (x integer) SERVER queue_server;
SELECT is((SELECT count(*)::int FROM cm_attach_queue('q')), 2, 'a server whose table name is taken is attached');
SELECT matches(pg_temp.tables_of('q'), '^investment=q_investment_queue_[0-9a-f]{8} withdrawal=q_withdrawal_queue$',
    'the taken name gets a hash, the free one is as ever');

SELECT * FROM finish();
ROLLBACK;
