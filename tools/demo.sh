#!/usr/bin/env bash
# tools/demo.sh -- the main job, end to end, on a throw-away cluster:
# queue-db and user-portfolio-db in one PostgreSQL 15 cluster joined by
# postgres_fdw over 127.0.0.1, the consistency_manager worker syncing sample
# requests on its own while they move through their statuses for about a
# minute, and at the end what it did.  Stops its cluster when done.
#
#   bash tools/demo.sh            (as root, or as a user with sudo)
#   DEMO_SECONDS=20 bash tools/demo.sh    a shorter run

source "$(dirname "${BASH_SOURCE[0]}")/cluster.sh"

DEMO_SECONDS=${DEMO_SECONDS:-60}
cm_install_packages
[ -n "${CM_SKIP_BUILD:-}" ] || cm_build_install

WORK=$(cm_workdir)
cp -r "$CM_ROOT/test/fixtures" "$WORK/"
[ "$(id -u)" = 0 ] && chown -R postgres: "$WORK"
PORT=$(cm_free_port)
trap '[ -n "${DEMO_LOG:-}" ] && cat "$WORK/server.log"; cm_stop_cluster "$WORK"; rm -rf "$WORK"' EXIT

echo "== starting a throw-away cluster on 127.0.0.1:$PORT"
cm_start_cluster "$WORK" "$PORT"

q()  { as_pg psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres -d queue "$@"; }
pf() { as_pg psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres -d portfolio "$@"; }
show() { echo; echo "-- $1"; shift; pf -P pager=off -c "$@"; }

as_pg psql -X -q -h 127.0.0.1 -p "$PORT" -U postgres -d postgres \
    -c "CREATE DATABASE queue" -c "CREATE DATABASE portfolio"
q -f "$WORK/fixtures/queue_db.sql"
pf -f "$WORK/fixtures/portfolio_db.sql"

echo "== postgresql.conf: preload consistency_manager for the portfolio database, restart"
{
    echo "shared_preload_libraries = 'consistency_manager'"
    echo "consistency_manager.database = 'portfolio'"
    echo "consistency_manager.polling_interval = '2s'"
} | as_pg tee -a "$WORK/data/postgresql.conf"
as_pg pg_ctl -D "$WORK/data" -l "$WORK/server.log" -w restart >/dev/null

echo "== user-portfolio-db: CREATE EXTENSION, a foreign server for queue-db, cm_attach_queue()"
pf <<SQL
INSERT INTO user_portfolios (accountid, tier1_allocation, tier2_allocation, tier3_allocation, total_allocation,
                             tier1_value, tier2_value, tier3_value, total_value)
SELECT 'ACC' || lpad(i::text, 3, '0'), 1000, 2000, 500, 3500, 1000, 2000, 500, 3500
  FROM generate_series(1, 8) i;
CREATE EXTENSION consistency_manager CASCADE;
CREATE SERVER queue_server FOREIGN DATA WRAPPER postgres_fdw
    OPTIONS (host '127.0.0.1', port '$PORT', dbname 'queue');
CREATE USER MAPPING FOR postgres SERVER queue_server OPTIONS (user 'postgres');
SELECT * FROM cm_attach_queue('queue_server');
-- a consumer of the event journal, reading from its start
SELECT cm_consumer_create('demo', true);
-- markets moved: tier 1 +5 %, tier 2 -2 %, tier 3 +10 %
SELECT cm_set_tier_values(1, 1000000, 1050000);
SELECT cm_set_tier_values(2, 2000000, 1960000);
SELECT cm_set_tier_values(3, 500000, 550000);
SQL
show "tier deltas" "SELECT * FROM cm_tier_deltas()"
show "portfolios before" "SELECT accountid, tier1_value, tier2_value, tier3_value, total_value, total_allocation FROM user_portfolios ORDER BY 1 LIMIT 4"

echo
echo "== for ${DEMO_SECONDS}s the order services move requests in queue-db; the worker syncs on its own"
end=$((SECONDS + DEMO_SECONDS))
round=0
while [ $SECONDS -lt $end ]; do
    round=$((round + 1))
    q <<SQL
-- new requests arrive
INSERT INTO investment_queue (account_number, tier_1, tier_2, tier_3, uuid, status)
SELECT 'ACC' || lpad((1 + (random() * 7)::int)::text, 3, '0'), 100, 50, 25, gen_random_uuid(), 'PENDING'
  FROM generate_series(1, 3);
INSERT INTO withdrawal_queue (account_number, tier_1, tier_2, tier_3, uuid, status)
SELECT 'ACC' || lpad((1 + (random() * 7)::int)::text, 3, '0'), 10, 10, 10, gen_random_uuid(), 'PENDING';
-- and move on through their statuses
UPDATE investment_queue SET status = 'PROCESSING' WHERE status = 'PENDING' AND queue_id % 2 = $((round % 2));
UPDATE investment_queue SET status = CASE WHEN queue_id % 7 = 0 THEN 'FAILED' ELSE 'COMPLETED' END,
       processed_at = now()
 WHERE status = 'PROCESSING' AND created_at < now() - interval '3 seconds';
UPDATE withdrawal_queue SET status = CASE WHEN queue_id % 5 = 0 THEN 'CANCELLED' ELSE 'COMPLETED' END,
       processed_at = now()
 WHERE status = 'PENDING' AND created_at < now() - interval '4 seconds';
SQL
    if [ $round -eq 5 ]; then
        echo "   (round 5: a request for an account that has no portfolio, and a completed one reversed)"
        q -c "INSERT INTO investment_queue (account_number, tier_1, tier_2, tier_3, uuid, status)
              VALUES ('NOBODY', 1, 1, 1, gen_random_uuid(), 'COMPLETED')" \
          -c "UPDATE investment_queue SET status = 'CANCELLED'
               WHERE queue_id = (SELECT min(queue_id) FROM investment_queue WHERE status = 'COMPLETED')"
    fi
    if [ $round -eq 3 ]; then
        show "the worker in pg_stat_activity" "SELECT pid, backend_type, application_name, state, query FROM pg_stat_activity WHERE backend_type = 'consistency_manager'"
    fi
    sleep 2
done

echo
echo "== waiting for the worker to catch up"
for _ in $(seq 1 30); do
    pending=$(pf -At -c "SELECT count(*) FROM (SELECT * FROM cm_sources()) s WHERE s.lag > interval '0'")
    [ "$pending" = 0 ] && break
    pf -c "SELECT cm_wake()" >/dev/null
    sleep 1
done

show "what the worker did: cm_stats()" "SELECT cycles, rows_read, created, updated, completed_applied, compensated, dead_lettered, errors, worker_state FROM cm_stats()"
show "cycles that changed something (cm.cycle_history)" "SELECT count(*) AS cycles, sum(created) AS created, sum(updated) AS updated, sum(completed_applied) AS applied, sum(compensated) AS compensated, sum(dead_lettered) AS dead_lettered FROM cm.cycle_history"
show "sources" "SELECT source_id, foreign_table, watermark, lag, dead_letters FROM cm_sources()"
show "dead letters" "SELECT source_id, queue_id, accountid, status, reason FROM cm.dead_letter"
show "queue-db and portfolio agree (requests by status on both sides; a dead letter is the difference)" "
WITH queue AS (SELECT coalesce(m.portfolio_status, q.status) AS status, count(*) AS n
                 FROM (SELECT status FROM cm_remote.queue_server_investment_queue
                       UNION ALL SELECT status FROM cm_remote.queue_server_withdrawal_queue) q
                 LEFT JOIN cm.status_map m ON m.queue_status = q.status GROUP BY 1),
     portfolio AS (SELECT status, count(*) AS n FROM portfolio_transactions GROUP BY 1),
     dead AS (SELECT coalesce(m.portfolio_status, d.status) AS status, count(*) AS n
                FROM cm.dead_letter d LEFT JOIN cm.status_map m ON m.queue_status = d.status GROUP BY 1)
SELECT status, queue.n AS \"queue-db\", portfolio.n AS portfolio, coalesce(dead.n, 0) AS dead_letters,
       coalesce(queue.n, 0) = coalesce(portfolio.n, 0) + coalesce(dead.n, 0) AS agree
  FROM queue FULL JOIN portfolio USING (status) FULL JOIN dead USING (status) ORDER BY 1"
show "portfolios after" "SELECT accountid, tier1_value, tier2_value, tier3_value, total_value, total_allocation FROM user_portfolios ORDER BY 1 LIMIT 4"
show "what moved ACC001: cm_account_history('ACC001')" "SELECT event_id, event_type, uuid, policy, before->>'tier1_value' AS tier1_before, after->>'tier1_value' AS tier1_after, before->>'total_value' AS total_before, after->>'total_value' AS total_after FROM cm_account_history('ACC001')"
show "a consumer reads the journal: cm_events('demo', 5)" "SELECT event_id, event_type, accountid, uuid, payload->'queue_row'->>'status' AS queue_status FROM cm_events('demo', 5)"
show "and acknowledges what it read: cm_events_ack, cm_consumers()" "SELECT cm_events_ack('demo', (SELECT max(event_id) FROM cm_events('demo', 5))); SELECT name, acked_id, last_event_id, lag_events FROM cm_consumers()"
show "every account equals the after of its last event: cm_verify_accounts()" "SELECT count(*) AS accounts_changed_outside_the_cycle FROM cm_verify_accounts()"
show "health" "SELECT * FROM cm_health()"
echo
echo "== done; stopping the cluster"
