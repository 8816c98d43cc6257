#!/usr/bin/env bash
# bench/run.sh -- the benchmark harness of consistency_manager (make bench).
#
# Builds a throw-away PostgreSQL 15 cluster with queue-db ("queue") and
# user-portfolio-db ("portfolio") joined by postgres_fdw over 127.0.0.1,
# loads a generated workload and measures, each as the median of several
# runs with min and max:
#   1. catch-up: cm_sync_now() over 100k and 1M unsynced rows, next to the
#      bare INSERT ... SELECT ... ON CONFLICT over the same foreign tables (a)
#      and over local copies of them (b);
#   2. the row-at-a-time Python service it replaces (bench/legacy_sync.py),
#      connection per row and commit per row, on 5k rows;
#   3. an incremental cycle (1k changed rows) in queues of 100k and 1M rows
#      (10M with BENCH_FULL=1);
#   4. an idle cycle;
#   5. commit-to-visible latency with the worker (1 s interval, and cm_wake());
#   6. the worker's RSS after 100, 10k idle and 10k busy cycles;
#   7. beside the application: a 200k catch-up alone and under an
#      application load (pgbench, single-row UPDATEs of random accounts),
#      with the application's UPDATE latency (p50/p99/max) during the
#      catch-up and without it;
#   8. after a catch-up: the cycle right after a 100k catch-up (generated
#      rows, and rows inserted in one queue-db transaction, so sharing one
#      updated_at) against an idle cycle, in a session that has run cycles
#      before, as the worker's has, back to back and paced by the worker's
#      1 s polling: rows read and time;
#   9. poison rows: a 100k catch-up with 1 and with 100 rows that a CHECK of
#      portfolio_transactions refuses, against the same catch-up clean; the
#      dead letters are checked after every run;
#  10. sustained load: a queue-db writer committing small transactions for
#      a minute at a few rates, the worker polling every second: the
#      commit-to-visible lag of every row (commit timestamps of both sides)
#      and the rows each cycle re-reads;
#  11. bounded cycles: a 1M catch-up (20k quick) in one cycle against the
#      same in cycles of max_rows_per_cycle rows per source (the default,
#      100k; 5k quick), each committed (CALL cm_catch_up());
#  12. reconciliation: cm_reconcile() over a synced 1M-row queue (20k
#      quick; 10M too with BENCH_FULL) with 0 and 10 differences, against
#      the plain full compare (FULL JOIN over the foreign tables).
#  13. the event journal: a 100k catch-up with consistency_manager.events on
#      and off, alternating, and idle cycles with it on.
#  14. a large backlog (10M rows with BENCH_FULL; only with BENCH_FULL or
#      BENCH_ONLY=backlog, 1M then, 50k quick) caught up by the worker alone in
#      bounded cycles, its progress sampled as an operator sees it.
#  15. the journal under retention (only with BENCH_ONLY=retention): a writer
#      for 5 minutes (1 quick), event_retention 30 s, the journal's size sampled.
# Prints a table, and writes bench/results/latest.json and latest.md.
#
#   bash bench/run.sh                  default run (about 20 minutes on 2 cores)
#   BENCH_FULL=1 bash bench/run.sh     incremental at 10M rows too (+15-20 min)
#   BENCH_QUICK=1 bash bench/run.sh    small sizes, a smoke test (about 2 min)
#   BENCH_ONLY=catchup ...             only the catch-up and incremental phases (1, 3, 4) at both sizes
#   BENCH_ONLY=beside ...              only phase 7 (beside the application);
#                                      also after, poison, sustained,
#                                      bounded, reconcile, events, backlog, retention (phases 8-15), or several:
#                                      BENCH_ONLY=after,poison
#   CM_SKIP_BUILD=1 ...                use the installed build
#   CM_KEEP=1 ...                      keep the cluster directory afterwards
#
# Timing is psql's \timing (client round trip of one statement, its commit
# included unless said otherwise) and /usr/bin/time -v for the Python
# baseline.  Nothing here asserts on time; bench/report.py compares the
# figures with the performance targets it states and says which hold.

source "$(dirname "${BASH_SOURCE[0]}")/../tools/cluster.sh"

BENCH=$CM_ROOT/bench
RESULTS=${BENCH_RESULTS:-$BENCH/results}

# ---------------------------------------------------------------- sizes
if [ -n "${BENCH_QUICK:-}" ]; then
    MODE=quick
    ACCOUNTS=1000
    LEGACY_ROWS=500;   LEGACY_RUNS=3; LEGACY_CONN_RUNS=2
    CATCHUP_SIZES="5000 20000"; CATCHUP_RUNS="3 3"
    INCR_SIZES="5000 20000"; INCR_RUNS=3; INCR_CHANGED=100
    IDLE_RUNS=20
    LAT_N=10
    MEM_FIRST=100; MEM_IDLE=500; MEM_BUSY=500; MEM_BUDGET=60
    BESIDE_SIZE=40000
    NEW_SIZE=20000; AFTER_RUNS=3; AFTER_IDLE=10; AFTER_WARM=8; AFTER_PAUSE=1
    POISON_RUNS=2; POISON_COUNTS="1 100"
    SUSTAIN_SECS=10; SUSTAIN_RATES="200 500 max"
    BOUNDED_SIZE=20000; BOUNDED_RUNS=2; BOUNDED_LIMIT=5000
    RECON_SIZES="20000"; RECON_RUNS=2
    BACKLOG_SIZE=50000; BACKLOG_SAMPLE=2; BACKLOG_LIMIT=5000
    RET_RATE=100; RET_SECS=60; RET_KEEP=10s; RET_SAMPLE=10
    EVENTS_RUNS=2
elif [ -n "${BENCH_FULL:-}" ]; then
    MODE=full
else
    MODE=default
fi
if [ "$MODE" != quick ]; then
    ACCOUNTS=10000
    LEGACY_ROWS=5000;  LEGACY_RUNS=3; LEGACY_CONN_RUNS=${BENCH_LEGACY_CONN_RUNS:-2}
    CATCHUP_SIZES="100000 1000000"; CATCHUP_RUNS="5 3"
    INCR_SIZES="100000 1000000"; INCR_RUNS=5; INCR_CHANGED=1000
    [ "$MODE" = full ] && INCR_SIZES="100000 1000000 10000000"
    IDLE_RUNS=50
    LAT_N=50
    MEM_FIRST=100; MEM_IDLE=10000; MEM_BUSY=10000; MEM_BUDGET=${BENCH_MEM_BUDGET:-240}
    BESIDE_SIZE=200000
    NEW_SIZE=100000; AFTER_RUNS=5; AFTER_IDLE=20; AFTER_WARM=8; AFTER_PAUSE=1
    POISON_RUNS=3; POISON_COUNTS="1 100"
    SUSTAIN_SECS=${BENCH_SUSTAIN_SECS:-45}; SUSTAIN_RATES=${BENCH_SUSTAIN_RATES:-"200 500 max"}
    BOUNDED_SIZE=1000000; BOUNDED_RUNS=2; BOUNDED_LIMIT=100000
    RECON_SIZES="1000000"; RECON_RUNS=3
    [ "$MODE" = full ] && RECON_SIZES="1000000 10000000"
    BACKLOG_SIZE=1000000; BACKLOG_SAMPLE=10
    RET_RATE=200; RET_SECS=300; RET_KEEP=30s; RET_SAMPLE=20
    [ "$MODE" = full ] && BACKLOG_SIZE=10000000
    EVENTS_RUNS=${BENCH_EVENTS_RUNS:-3}
fi
ONLY=${BENCH_ONLY:-}
for p in ${ONLY//,/ }; do
    case $p in catchup|beside|after|poison|sustained|bounded|reconcile|events|backlog|retention) ;; *) echo "BENCH_ONLY: unknown phase \"$p\" (catchup, beside, after, poison, sustained, bounded, reconcile, events, backlog, retention)" >&2; exit 1 ;; esac
done
only() { [[ ",$ONLY," == *",$1,"* ]]; }
# a run of some phases writes beside the full run's results, not over them
[ -n "$ONLY" ] && [ -z "${BENCH_RESULTS:-}" ] && RESULTS=$BENCH/results/${ONLY//,/-}

cm_install_packages python3-psycopg2 time

WORK=$(cm_workdir)
# the build goes into a private copy of PostgreSQL under the work directory
# (as the tests do), never into the system's; CM_SKIP_BUILD runs the
# system's installed build as found
if [ -z "${CM_SKIP_BUILD:-}" ]; then
    cm_pg_tree "$WORK/pg"
    cm_build_install "$WORK/pg"
    [ "$(id -u)" = 0 ] && chown -R postgres: "$WORK/pg"
    PGBIN=$(cm_tree_bin "$WORK/pg")
    export PATH="$PGBIN:$PATH"
fi
PORT=$(cm_free_port)
RAW=$WORK/raw.jsonl
: > "$RAW"
T_START=$(date +%s)
cleanup() {
    cm_stop_cluster "$WORK"
    if [ -z "${CM_KEEP:-}" ]; then rm -rf "$WORK"; else echo "(cluster kept in $WORK)"; fi
}
trap cleanup EXIT

PSQL=(psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres)
q()  { "${PSQL[@]}" -d queue "$@"; }
pf() { "${PSQL[@]}" -d portfolio "$@"; }
val() { local db=$1; shift; "${PSQL[@]}" -d "$db" -At "$@"; }
say() { printf '== [%4ds] %s\n' $(( $(date +%s) - T_START )) "$*"; }

# timed DB SQL: run SQL in one psql call with \timing; print the duration
# in ms of the last statement that reported one (the measured one goes last)
timed() {
    local db=$1 sql=$2 out
    out=$("${PSQL[@]}" -d "$db" -At -c '\timing on' -c "$sql")
    printf '%s\n' "$out" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | tail -1
}

# baseline INV WD: time bench/sql/baseline_upsert.sql over these two tables
baseline() {
    "${PSQL[@]}" -d portfolio -At -v inv="$1" -v wd="$2" -c '\timing on' -f "$BENCH/sql/baseline_upsert.sql" |
        sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | tail -1
}

# record KEY SIZE ROWS EXTRA_JSON SAMPLE... -- append one figure to the raw file
record() {
    local key=$1 size=$2 rows=$3 extra=$4
    shift 4
    local samples s
    for s in "$@"; do [[ $s =~ ^[0-9.]+$ || $s == \{* ]] || { echo "record $key: bad sample \"$s\" in: $*" >&2; exit 1; }; done
    [ $# -gt 0 ] || { echo "record $key: no samples" >&2; exit 1; }
    samples=$(IFS=,; echo "$*")
    echo "{\"key\":\"$key\",\"size\":$size,\"rows\":$rows,\"extra\":$extra,\"samples\":[$samples]}" >> "$RAW"
}

queue_rows() { val queue -c "SELECT (SELECT count(*) FROM investment_queue) + (SELECT count(*) FROM withdrawal_queue)"; }

grow_queue() {
    local total=$1 t0=$SECONDS
    val queue -c "SELECT bench_grow($total, $ACCOUNTS)" >/dev/null
    q -c "VACUUM ANALYZE investment_queue, withdrawal_queue"
    say "queue-db now holds $(queue_rows) rows (generated in $((SECONDS - t0)) s)"
}

reset_portfolio() {
    pf -c "CALL bench.reset()" -c "VACUUM ANALYZE user_portfolios, portfolio_transactions, cm.ledger" -c "CHECKPOINT"
}

# sync_once -> "rows_read created updated applied dead_lettered ms"
sync_once() {
    "${PSQL[@]}" -d portfolio -At -F ' ' -c '\timing on' \
        -c "SELECT rows_read, created, updated, completed_applied, dead_lettered FROM cm_sync_now(keep_connections => true)" |
        awk '/^Time:/ {t=$2} !/^Time:/ {r=$0} END {print r, t}'
}

# ---------------------------------------------------------------- cluster
say "cluster in $WORK on 127.0.0.1:$PORT (mode $MODE)"
as_pg mkdir -p "$WORK"
CONF=("shared_preload_libraries = 'consistency_manager'"
      "consistency_manager.database = 'portfolio'"
      "consistency_manager.enabled = off"
      "consistency_manager.max_rows_per_cycle = 0"
      "shared_buffers = 1GB"
      "work_mem = 64MB"
      "maintenance_work_mem = 512MB"
      "max_wal_size = 16GB"
      "checkpoint_timeout = 30min"
      "log_min_messages = warning"
      "track_commit_timestamp = on")
cm_start_cluster "$WORK" "$PORT" "${CONF[@]}"
"${PSQL[@]}" -d postgres -c "CREATE DATABASE queue" -c "CREATE DATABASE portfolio"
q -f "$CM_ROOT/test/fixtures/queue_db.sql" -f "$BENCH/sql/queue_setup.sql"
pf -f "$CM_ROOT/test/fixtures/portfolio_db.sql" -v port="$PORT" -v accounts="$ACCOUNTS" \
   -f "$BENCH/sql/portfolio_setup.sql" >/dev/null

# ---------------------------------------------------------------- 2. legacy
# The same rows three ways, each from an empty portfolio: the cycle, the
# per-row-commit service, the connection-per-row service.  Twice: with the
# benchmark's fast settings (fsync = off), and with the durability a bank
# deploys (fsync = on, synchronous_commit = on) for every contender.
legacy() {
    local mode=$1 out secs
    out=$(/usr/bin/time -v /usr/bin/python3 "$BENCH/legacy_sync.py" --mode "$mode" --port "$PORT" 2>&1)
    [ "$(printf '%s\n' "$out" | head -1)" = "$N" ] || { echo "legacy $mode: $out" >&2; exit 1; }
    secs=$(printf '%s\n' "$out" | awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' |
           awk -F: '{s=0; for (i=1;i<=NF;i++) s=s*60+$i; printf "%.1f\n", s*1000}')
    echo "$secs"
}
legacy_phase() {   # legacy_phase fast|durable
    local durability=$1 r
    if [ "$durability" = durable ]; then
        pf -c "ALTER SYSTEM SET fsync = on" -c "ALTER SYSTEM SET synchronous_commit = on" -c "SELECT pg_reload_conf()" >/dev/null
        sleep 1
    fi
    say "legacy ($durability: fsync = $(val portfolio -c 'SHOW fsync'), synchronous_commit = $(val portfolio -c 'SHOW synchronous_commit')): $LEGACY_ROWS rows, cycle vs row-at-a-time Python"
    local c_ms=() b_ms=() a_ms=()
    for r in $(seq 1 "$LEGACY_RUNS"); do
        reset_portfolio
        set -- $(sync_once); [ "$1" = "$N" ] || { echo "cycle read $1 of $N rows" >&2; exit 1; }
        c_ms+=("$6")
        reset_portfolio
        b_ms+=("$(legacy commit-per-row)")
        if [ "$r" -le "$LEGACY_CONN_RUNS" ]; then
            reset_portfolio
            a_ms+=("$(legacy conn-per-row)")
        fi
        say "  run $r: cycle ${c_ms[-1]} ms, commit-per-row ${b_ms[-1]} ms, conn-per-row ${a_ms[-1]:-} ms"
    done
    record legacy.cycle "$N" "$N" "{\"durability\":\"$durability\"}" "${c_ms[@]}"
    record legacy.commit_per_row "$N" "$N" "{\"durability\":\"$durability\"}" "${b_ms[@]}"
    record legacy.conn_per_row "$N" "$N" "{\"durability\":\"$durability\"}" "${a_ms[@]}"
    if [ "$durability" = durable ]; then
        pf -c "ALTER SYSTEM RESET fsync" -c "ALTER SYSTEM RESET synchronous_commit" -c "SELECT pg_reload_conf()" >/dev/null
        sleep 1
    fi
}
if [ -z "$ONLY" ]; then
grow_queue "$LEGACY_ROWS"
N=$(queue_rows)
legacy_phase fast
legacy_phase durable
fi

# ---------------------------------------------------------------- 1. catch-up
catchup() {
    local size=$1 runs=$2 n
    say "catch-up: $size rows, $runs runs of each"
    grow_queue "$size"
    n=$(queue_rows)
    pf -c "SET client_min_messages = warning" \
       -c "DROP TABLE IF EXISTS bench.local_investment_queue, bench.local_withdrawal_queue" \
       -c "CREATE TABLE bench.local_investment_queue AS SELECT * FROM cm_remote.queue_server_investment_queue" \
       -c "CREATE TABLE bench.local_withdrawal_queue AS SELECT * FROM cm_remote.queue_server_withdrawal_queue" \
       -c "ANALYZE bench.local_investment_queue, bench.local_withdrawal_queue"
    local fdw=() loc=() cyc=() srv=() r
    for r in $(seq 1 "$runs"); do
        # the cycle runs last so that the portfolio is left synced
        reset_portfolio
        fdw+=("$(baseline cm_remote.queue_server_investment_queue cm_remote.queue_server_withdrawal_queue)")
        reset_portfolio
        loc+=("$(baseline bench.local_investment_queue bench.local_withdrawal_queue)")
        reset_portfolio
        set -- $(sync_once)
        [ "$1" = "$n" ] && [ "$2" = "$n" ] || { echo "cycle read $1, created $2 of $n rows" >&2; exit 1; }
        cyc+=("$6")
        say "  run $r: cycle ${cyc[-1]} ms, fdw upsert ${fdw[-1]} ms, local upsert ${loc[-1]} ms"
    done
    record catchup.cycle "$size" "$n" '{}' "${cyc[@]}"
    record catchup.fdw_upsert "$size" "$n" '{}' "${fdw[@]}"
    record catchup.local_upsert "$size" "$n" '{}' "${loc[@]}"
    pf -c "DROP TABLE bench.local_investment_queue, bench.local_withdrawal_queue"
}

# ---------------------------------------------------------------- 3+4. incremental, idle
# Starts from a portfolio in sync with the queue.  The benchmark's own
# earlier changes (updated "now" by the phases before) are moved back a day
# in queue-db, with its triggers off, so that what the cycle reads after its
# read position holds only what this phase changes, whatever ran just before.  Then
# one "tick" per queue table (a row touched now) is synced, as in any
# steady state where the newest change sits inside the window; the idle
# cycle re-reads those two rows.  The 1k changes (PROCESSING -> COMPLETED,
# now) are then read by each measured cycle, which runs in a transaction
# that is rolled back, so every run sees the same 1k rows (its commit is
# not in the time).
incremental() {
    local size=$1 n
    say "incremental: $INCR_CHANGED changed rows in $size"
    if [ "$(queue_rows)" -lt "$size" ]; then
        grow_queue "$size"
        n=$(queue_rows)
        say "  catch-up of the base ($n rows, one cycle)"
        reset_portfolio
        set -- $(sync_once)
        [ "$1" = "$n" ] || { echo "cycle read $1 of $n rows" >&2; exit 1; }
        record catchup.base_sync "$size" "$n" '{}' "$6"
        say "  base synced in $6 ms"
    fi
    n=$(queue_rows)
    q -c "SET session_replication_role = replica" \
      -c "UPDATE investment_queue SET updated_at = updated_at - interval '1 day' WHERE updated_at > now() - interval '1 hour'" \
      -c "UPDATE withdrawal_queue SET updated_at = updated_at - interval '1 day' WHERE updated_at > now() - interval '1 hour'"
    q -c "UPDATE investment_queue SET processed_at = processed_at WHERE queue_id = (SELECT min(queue_id) FROM investment_queue WHERE status = 'COMPLETED')" \
      -c "UPDATE withdrawal_queue SET processed_at = processed_at WHERE queue_id = (SELECT min(queue_id) FROM withdrawal_queue WHERE status = 'COMPLETED')"
    sync_once >/dev/null

    # 4. idle: nothing changed since the last cycle
    local idle=() srv=() i out cmds=(-c '\timing on')
    for i in $(seq 1 "$IDLE_RUNS"); do
        cmds+=(-c "SELECT rows_read, created + updated, duration_ms FROM cm_sync_now(keep_connections => true)")
    done
    out=$("${PSQL[@]}" -d portfolio -At "${cmds[@]}")
    mapfile -t idle < <(printf '%s\n' "$out" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p')
    mapfile -t srv < <(printf '%s\n' "$out" | grep -v '^Time:' | awk -F'|' '{print $3}')
    printf '%s\n' "$out" | grep -v '^Time:' | awk -F'|' '$2 != 0 {print "idle cycle changed something: " $0; exit 1}' >&2
    record idle.cycle "$size" "$n" "{\"server_ms\":[$(IFS=,; echo "${srv[*]}")],\"rows_read\":$(printf '%s\n' "$out" | grep -v '^Time:' | head -1 | cut -d'|' -f1)}" "${idle[@]}"
    say "  idle: median of $IDLE_RUNS: $(printf '%s\n' "${idle[@]}" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}') ms"

    # 3. incremental
    local half=$((INCR_CHANGED / 2))
    q -c "UPDATE investment_queue SET status = 'COMPLETED', processed_at = now() WHERE queue_id IN (SELECT queue_id FROM investment_queue WHERE status = 'PROCESSING' ORDER BY queue_id LIMIT $half)" \
      -c "UPDATE withdrawal_queue SET status = 'COMPLETED', processed_at = now() WHERE queue_id IN (SELECT queue_id FROM withdrawal_queue WHERE status = 'PROCESSING' ORDER BY queue_id LIMIT $((INCR_CHANGED - half)))"
    # Both the cycle and the bare upsert run in one session each, as the
    # worker's cycles do: two runs to warm it (the connection to queue-db,
    # the catalog and plan caches), then INCR_RUNS measured.  Each runs in a
    # transaction that is rolled back, so every run reads the same changes.
    local inc=() rr="" cmds=(-c '\timing on') times
    for i in $(seq 1 $((INCR_RUNS + 2))); do
        cmds+=(-c 'BEGIN' -c "SELECT rows_read, updated, completed_applied FROM cm_sync_now(keep_connections => true)" -c 'ROLLBACK')
    done
    out=$("${PSQL[@]}" -d portfolio -At -F ' ' "${cmds[@]}")
    printf '%s\n' "$out" | grep -v '^Time:' | awk -v n="$INCR_CHANGED" '$3 != n {print "incremental cycle applied " $3 ", not " n; exit 1}' >&2 || exit 1
    rr=$(printf '%s\n' "$out" | grep -v '^Time:' | tail -1 | cut -d' ' -f1)
    mapfile -t times < <(printf '%s\n' "$out" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p')
    for i in $(seq 2 $((INCR_RUNS + 1))); do inc+=("${times[$((3 * i + 1))]}"); done
    record incremental.cycle "$size" "$n" "{\"changed\":$INCR_CHANGED,\"rows_read\":$rr,\"session\":\"warm\"}" "${inc[@]}"
    say "  incremental: ${inc[*]} ms (reads $rr rows)"
    # the bare upsert of the same changed rows (and the two ticks): the rows
    # changed in the last hour, the bound a literal so that postgres_fdw
    # sends it to queue-db
    local cut bare=()
    cut=$(val queue -c "SELECT now() - interval '1 hour'")
    cmds=(-c '\timing on')
    for i in $(seq 1 $((INCR_RUNS + 2))); do
        cmds+=(-c 'BEGIN' -f "$BENCH/sql/baseline_upsert.sql" -c 'ROLLBACK')
    done
    out=$("${PSQL[@]}" -d portfolio -At \
          -v inv="(SELECT * FROM cm_remote.queue_server_investment_queue WHERE updated_at > '$cut'::timestamptz) i" \
          -v wd="(SELECT * FROM cm_remote.queue_server_withdrawal_queue WHERE updated_at > '$cut'::timestamptz) w" \
          "${cmds[@]}")
    mapfile -t times < <(printf '%s\n' "$out" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p')
    for i in $(seq 2 $((INCR_RUNS + 1))); do bare+=("${times[$((3 * i + 1))]}"); done
    record incremental.bare_upsert "$size" "$n" "{\"changed\":$INCR_CHANGED}" "${bare[@]}"
    say "  bare incremental upsert of the same rows: ${bare[*]} ms"
    sync_once >/dev/null     # apply them for good: the portfolio is in sync again
}

# ---------------------------------------------------------------- 5+6. worker
worker_pid() { val portfolio -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'consistency_manager'"; }
rss() {   # rss LABEL CYCLES -> one JSON object
    local pid st
    pid=$(worker_pid)
    st=/proc/$pid/status
    printf '{"label":"%s","cycles":%s,"pid":%s,"vm_rss_kb":%s,"rss_anon_kb":%s,"rss_file_kb":%s,"rss_shmem_kb":%s}' \
        "$1" "$2" "$pid" "$(awk '/^VmRSS:/ {print $2}' "$st")" "$(awk '/^RssAnon:/ {print $2}' "$st")" \
        "$(awk '/^RssFile:/ {print $2}' "$st")" "$(awk '/^RssShmem:/ {print $2}' "$st")"
}
# worker_on: the worker on, polling every second
worker_on() {
    pf -c "ALTER SYSTEM SET consistency_manager.enabled = on" \
       -c "ALTER SYSTEM SET consistency_manager.polling_interval = '1s'" -c "SELECT pg_reload_conf()" >/dev/null
    # the worker picks the new interval up after its next wait; wake it until
    # it has run a cycle under the new settings
    local i c0
    c0=$(val portfolio -c "SELECT coalesce(cycles, 0) FROM cm_stats()")
    for i in $(seq 1 100); do
        val portfolio -c "SELECT cm_wake()" >/dev/null
        sleep 0.2
        [ "$(val portfolio -c "SELECT cycles > $c0 + 1 FROM cm_stats() WHERE worker_state = 'idle'")" = t ] && break
    done
}
worker_off() {
    pf -c "ALTER SYSTEM SET consistency_manager.enabled = off" \
       -c "ALTER SYSTEM RESET consistency_manager.polling_interval" -c "SELECT pg_reload_conf()" >/dev/null
    sleep 1
}

worker_phase() {
    say "worker: latency ($LAT_N requests per case) and memory"
    worker_on
    pf -c "TRUNCATE bench.latency" \
       -c "CALL bench.latency_stream('interval', $LAT_N, false, 1.0, 30)" \
       -c "CALL bench.latency_stream('wake', $LAT_N, true, 0.05, 30)"
    local c
    for c in interval wake; do
        record "latency.$c" 0 "$LAT_N" "{\"polling_interval_ms\":1000,\"lost\":$(val portfolio -c "SELECT count(*) FILTER (WHERE ms IS NULL) FROM bench.latency WHERE run = '$c'")}" \
            $(val portfolio -c "SELECT ms FROM bench.latency WHERE run = '$c' AND ms IS NOT NULL ORDER BY seq")
    done
    say "  latency p50/p99 ms: $(val portfolio -c "SELECT string_agg(format('%s %s/%s', run, round(p[1]::numeric, 1), round(p[2]::numeric, 1)), ', ') FROM (SELECT run, percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY ms) p FROM bench.latency GROUP BY run) s")"

    # memory: cycles driven by cm_wake(); the timer is slowed down so that
    # every cycle counted is one the harness asked for
    pf -c "ALTER SYSTEM SET consistency_manager.polling_interval = '10s'" -c "SELECT pg_reload_conf()" >/dev/null
    local m=() d w t0 total=0 rew=()
    val portfolio -c "SELECT cm_wake()" >/dev/null; sleep 1
    IFS='|' read -r d w < <(val portfolio -c "CALL bench.drive_cycles($MEM_FIRST, false, 0, $MEM_BUDGET)")
    total=$((total + d)); m+=("$(rss first "$total")"); rew+=("$w")
    t0=$SECONDS
    IFS='|' read -r d w < <(val portfolio -c "CALL bench.drive_cycles($MEM_IDLE, false, 0, $MEM_BUDGET)")
    total=$((total + d)); m+=("$(rss idle "$total")"); rew+=("$w")
    say "  $d idle cycles in $((SECONDS - t0)) s ($w wakes repeated)"
    t0=$SECONDS
    IFS='|' read -r d w < <(val portfolio -c "CALL bench.drive_cycles($MEM_BUSY, true, 10, $MEM_BUDGET)")
    total=$((total + d)); m+=("$(rss busy "$total")"); rew+=("$w")
    say "  $d busy cycles in $((SECONDS - t0)) s ($w wakes repeated)"
    echo "{\"key\":\"worker.rss\",\"size\":0,\"rows\":0,\"extra\":{\"asked\":[$MEM_FIRST,$MEM_IDLE,$MEM_BUSY],\"budget_s\":$MEM_BUDGET,\"rewakes\":[$(IFS=,; echo "${rew[*]}")]},\"samples\":[$(IFS=,; echo "${m[*]}")]}" >> "$RAW"
    say "  RSS: ${m[*]}"
    worker_off
    sync_once >/dev/null
}

# ---------------------------------------------------------------- 7. beside the application
# The application updates single accounts (random, two clients, 500
# transactions per second in all: a busy application that leaves the
# cycle some CPU on a 2-core machine) while a catch-up of BESIDE_SIZE rows
# runs; pgbench logs every transaction
# (-l), and the latencies of those that ended during the catch-up are the
# figure.  The same catch-up alone is the baseline.
beside_phase() {
    local size=$1 n alone loaded t0 t1 dur
    say "beside the application: $size-row catch-up, alone and under an application load"
    grow_queue "$size"
    n=$(queue_rows)
    reset_portfolio
    set -- $(sync_once); [ "$2" = "$n" ] || { echo "catch-up created $2 of $n rows" >&2; exit 1; }
    alone=$6
    reset_portfolio
    cat > "$WORK/app.sql" <<'SQL'
\set a random(0, :accounts - 1)
UPDATE user_portfolios SET tier1_value = tier1_value + 1, total_value = total_value + 1
 WHERE accountid = 'A' || lpad(:a::text, 9, '0');
SQL
    dur=$(python3 -c "print(int($alone / 1000 * 2.5) + 8)")
    rm -f "$WORK"/beside.*
    (cd "$WORK" && pgbench -n -h 127.0.0.1 -p "$PORT" -U postgres -c 2 -j 1 -R 500 -T "$dur" -l --log-prefix=beside \
        -D accounts="$ACCOUNTS" -f app.sql portfolio > pgbench.out 2>&1) &
    local pgb=$!
    sleep 3
    t0=$(date +%s.%N)
    set -- $(sync_once)
    t1=$(date +%s.%N)
    local created=$2
    loaded=$6
    wait $pgb || { cat "$WORK/pgbench.out" >&2; exit 1; }
    # latency (ms) of the application's transactions during and outside the catch-up
    local during outside
    during=$(cat "$WORK"/beside.* | awk -v a="$t0" -v b="$t1" '($5 + $6 / 1e6) >= a && ($5 + $6 / 1e6) <= b {print $3 / 1000}' | sort -n)
    outside=$(cat "$WORK"/beside.* | awk -v a="$t0" -v b="$t1" '($5 + $6 / 1e6) < a || ($5 + $6 / 1e6) > b {print $3 / 1000}' | sort -n)
    pct() { printf '%s\n' "$1" | awk -v p="$2" '{v[NR]=$1} END {if (NR == 0) {print 0; exit} i=int(NR*p); if (i < 1) i=1; if (i > NR) i=NR; print v[i]}'; }
    local lost=$(( created == n ? 0 : 1 ))
    record beside.catchup_alone "$size" "$n" '{}' "$alone"
    record beside.catchup_loaded "$size" "$n" "{\"cycles_lost\":$lost,\"created\":$created}" "$loaded"
    record beside.app_update_during "$size" "$(printf '%s\n' "$during" | grep -c .)" \
        "{\"p50_ms\":$(pct "$during" 0.5),\"p99_ms\":$(pct "$during" 0.99),\"max_ms\":$(pct "$during" 1)}" \
        "$(pct "$during" 0.99)"
    record beside.app_update_outside "$size" "$(printf '%s\n' "$outside" | grep -c .)" \
        "{\"p50_ms\":$(pct "$outside" 0.5),\"p99_ms\":$(pct "$outside" 0.99),\"max_ms\":$(pct "$outside" 1)}" \
        "$(pct "$outside" 0.99)"
    say "  catch-up alone $alone ms, under load $loaded ms (created $created of $n);" \
        "application UPDATE during it p50/p99/max $(pct "$during" 0.5)/$(pct "$during" 0.99)/$(pct "$during" 1) ms," \
        "outside it $(pct "$outside" 0.5)/$(pct "$outside" 0.99)/$(pct "$outside" 1) ms"
}

# ---------------------------------------------------------------- 8. after a catch-up
# The cycle right after a catch-up must read nothing (its read position is
# the key of the last row read, however many rows share one updated_at) and
# cost what an idle cycle costs.  Each run: an empty portfolio, then in ONE
# psql session (so every cycle but the catch-up reuses its connection to
# queue-db): the catch-up, the cycle right after it, and AFTER_IDLE idle
# cycles.  Two workloads: the generated one (updated_at spread over 30
# days), and the same rows inserted again in one queue-db transaction, so
# that all of them share that transaction's updated_at (queue-db's rows are
# put back as they were afterwards).
#
# The session first runs AFTER_WARM cycles and then empties the portfolio
# (bench.reset()) before the catch-up, as the worker's long-lived session
# would have: a session's first cycles cost more than the later ones
# (catalog caches, the plan cache's first five custom plans; about 5 ms for
# the second cycle of a session against 3 ms from the eighth on, with
# nothing to read), and without them the cycle after the catch-up, the
# session's second, would be measured against idle cycles that are its
# eighth and later.
#
# Each workload runs twice: back to back (each cycle right after the one
# before), and paced as the worker runs them, AFTER_PAUSE seconds (its
# polling interval, 1 s) of sleep before each cycle, the catch-up's next one
# included.  Back to back, every idle cycle finds the CPU caches warm from
# the one before, while the cycle after the catch-up finds them full of the
# catch-up's data; paced, every cycle starts after a pause, as it does in
# the worker.
# cycles_in_session N [WARM [PAUSE]] -> one line per cycle: "rows_read changed server_ms client_ms"
# (WARM cycles first, then the portfolio emptied; neither is reported; with
# PAUSE, that many seconds of sleep before each reported cycle)
cycles_in_session() {
    local n=$1 warm=${2:-0} pause=${3:-0} i cmds=(-c '\timing on') out
    if [ "$warm" -gt 0 ]; then
        for i in $(seq 1 "$warm"); do
            cmds+=(-c "SELECT 1 FROM cm_sync_now(keep_connections => true)")
        done
        cmds+=(-c "CALL bench.reset()" -c "VACUUM ANALYZE user_portfolios, portfolio_transactions, cm.ledger" -c "CHECKPOINT")
        cmds+=(-c '\timing off' -c "SELECT 'warm'" -c '\timing on')
    fi
    for i in $(seq 1 "$n"); do
        [ "$pause" != 0 ] && cmds+=(-c '\timing off' -c '\o /dev/null' -c "SELECT pg_sleep($pause)" -c '\o' -c '\timing on')
        cmds+=(-c "SELECT rows_read, created + updated + dead_lettered, duration_ms FROM cm_sync_now(keep_connections => true)")
    done
    out=$("${PSQL[@]}" -d portfolio -At "${cmds[@]}")
    [ "$warm" -gt 0 ] && out=$(printf '%s\n' "$out" | sed '1,/^warm$/d')
    paste -d'|' <(printf '%s\n' "$out" | grep -v '^Time:') \
                 <(printf '%s\n' "$out" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p') | tr '|' ' '
}
requeue_one_transaction() {   # requeue_one_transaction now|saved
    local ts=now
    [ "$1" = saved ] && ts=updated_at
    q -c "BEGIN" \
      -c "DELETE FROM investment_queue" \
      -c "INSERT INTO investment_queue SELECT queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, $( [ "$ts" = now ] && echo 'now()' || echo updated_at ), processed_at FROM bench_saved_investment" \
      -c "DELETE FROM withdrawal_queue" \
      -c "INSERT INTO withdrawal_queue SELECT queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, created_at, $( [ "$ts" = now ] && echo 'now()' || echo updated_at ), processed_at FROM bench_saved_withdrawal" \
      -c "COMMIT" -c "VACUUM ANALYZE investment_queue, withdrawal_queue"
}
after_phase() {
    local size=$1 n variant r line pause
    say "after a catch-up: $size rows, $AFTER_RUNS runs per workload and pace, $AFTER_IDLE idle cycles each"
    [ "$(queue_rows)" -ge "$size" ] || grow_queue "$size"
    n=$(queue_rows)
    q -c "SET client_min_messages = warning" \
      -c "DROP TABLE IF EXISTS bench_saved_investment, bench_saved_withdrawal" \
      -c "CREATE TABLE bench_saved_investment AS SELECT * FROM investment_queue" \
      -c "CREATE TABLE bench_saved_withdrawal AS SELECT * FROM withdrawal_queue"
    for variant in one_transaction generated; do
        [ "$variant" = one_transaction ] && requeue_one_transaction now
        [ "$variant" = generated ] && requeue_one_transaction saved
        local stamps
        stamps=$(val queue -c "SELECT count(DISTINCT updated_at) FROM (SELECT updated_at FROM investment_queue UNION ALL SELECT updated_at FROM withdrawal_queue) u")
        for pause in 0 "$AFTER_PAUSE"; do
        local cu=() af=() afs=() afr=() idl=() ids=() idr=()
        for r in $(seq 1 "$AFTER_RUNS"); do
            mapfile -t lines < <(cycles_in_session $((AFTER_IDLE + 2)) "$AFTER_WARM" "$pause")
            set -- ${lines[0]}
            [ "$1" = "$n" ] && [ "$2" = "$n" ] || { echo "after ($variant): catch-up read $1, changed $2 of $n rows" >&2; exit 1; }
            cu+=("$4")
            set -- ${lines[1]}
            afr+=("$1"); afs+=("$3"); af+=("$4")
            for line in "${lines[@]:2}"; do
                set -- $line
                idr+=("$1"); ids+=("$3"); idl+=("$4")
            done
            say "  $variant, ${pause} s before each cycle, run $r: catch-up ${cu[-1]} ms; next cycle read ${afr[-1]} rows in ${af[-1]} ms (server ${afs[-1]} ms); idle median $(printf '%s\n' "${idl[@]: -$AFTER_IDLE}" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}') ms"
        done
        record after.catchup "$size" "$n" "{\"variant\":\"$variant\",\"pause\":$pause,\"updated_at_values\":$stamps}" "${cu[@]}"
        record after.next_cycle "$size" "$n" "{\"variant\":\"$variant\",\"pause\":$pause,\"rows_read\":[$(IFS=,; echo "${afr[*]}")],\"server_ms\":[$(IFS=,; echo "${afs[*]}")]}" "${af[@]}"
        record after.idle_cycle "$size" "$n" "{\"variant\":\"$variant\",\"pause\":$pause,\"rows_read\":[$(IFS=,; echo "${idr[*]}")],\"server_ms\":[$(IFS=,; echo "${ids[*]}")]}" "${idl[@]}"
        done
    done
    q -c "DROP TABLE bench_saved_investment, bench_saved_withdrawal"
}

# ---------------------------------------------------------------- 9. poison rows
# A rule of the application's that the cycle does not model: a CHECK on
# portfolio_transactions refusing a tier-3 amount of 7,777.77 (the generated
# amounts are at most 5,000).  The poison rows are queue rows whose tier_3 is
# set to that amount in place (session_replication_role = replica, so that
# their updated_at stays), spread evenly over the read order: with 100 of
# them every 10k-row page of a 100k catch-up holds 10.  Each run: an empty
# portfolio, one catch-up (a case whose first run took over a minute runs
# once); then the dead letters are checked: exactly the
# poison rows, each with the CHECK's name in its reason, none of them in
# portfolio_transactions, every other row applied.  The clean catch-up runs
# with the CHECK in place too.  The CHECK is dropped afterwards and the
# queue rows put back.
poison_phase() {
    local size=$1 n maxp=0 p r
    for p in $POISON_COUNTS; do [ "$p" -gt "$maxp" ] && maxp=$p; done
    say "poison rows: $size-row catch-up clean and with $POISON_COUNTS poison rows, $POISON_RUNS runs each"
    [ "$(queue_rows)" -ge "$size" ] || grow_queue "$size"
    n=$(queue_rows)
    q -c "SET client_min_messages = warning" -c "DROP TABLE IF EXISTS bench_poison" \
      -c "CREATE TABLE bench_poison AS
          SELECT row_number() OVER (ORDER BY updated_at, queue_id, kind) AS pick, kind, queue_id, uuid, tier_3, false AS active
            FROM (SELECT kind, queue_id, uuid, tier_3, updated_at,
                         row_number() OVER (ORDER BY updated_at, queue_id, kind) AS rn, count(*) OVER () AS total
                    FROM (SELECT 'inv' AS kind, queue_id, uuid, tier_3, updated_at FROM investment_queue
                          UNION ALL
                          SELECT 'wd', queue_id, uuid, tier_3, updated_at FROM withdrawal_queue) a) b
           WHERE (rn - 1) % (total / $maxp) = (total / $maxp) / 2
           ORDER BY rn LIMIT $maxp"
    pf -c "ALTER TABLE portfolio_transactions ADD CONSTRAINT bench_poison CHECK (abs(tier3_change) <> 7777.77)"
    local verify="WITH p AS (SELECT s.source_id, t.queue_id, t.uuid
                      FROM dblink(format('host=127.0.0.1 port=%s dbname=queue user=postgres', current_setting('port')),
                                  'SELECT kind, queue_id, uuid FROM bench_poison WHERE active') AS t(kind text, queue_id bigint, uuid text)
                      JOIN cm.source s ON s.layout = CASE t.kind WHEN 'inv' THEN 'investment' ELSE 'withdrawal' END)
          SELECT (SELECT count(*) FROM p), (SELECT count(*) FROM cm.dead_letter),
                 (SELECT count(*) FROM cm.dead_letter d JOIN p USING (source_id, queue_id) WHERE d.reason LIKE '%bench_poison%'),
                 (SELECT count(*) FROM portfolio_transactions),
                 (SELECT count(*) FROM portfolio_transactions t JOIN p ON t.id = p.uuid::uuid)"
    local -A ms=() checks=()
    for r in $(seq 1 "$POISON_RUNS"); do
        # the clean catch-up last, so that the portfolio is left in sync
        for p in $POISON_COUNTS 0; do
            # a case whose first run took more than a minute runs once
            if [ "$r" -gt 1 ] && [ "$p" -gt 0 ] && [ "$(echo "${ms[$p]}" | awk '{print ($1 > 60000)}')" = 1 ]; then
                continue
            fi
            q -c "UPDATE bench_poison SET active = (pick - 1) % greatest($maxp / greatest($p, 1), 1) = ($maxp / greatest($p, 1)) / 2 AND $p > 0" \
              -c "SET session_replication_role = replica" \
              -c "UPDATE investment_queue q SET tier_3 = CASE WHEN p.active THEN 7777.77 ELSE p.tier_3 END FROM bench_poison p WHERE p.kind = 'inv' AND q.queue_id = p.queue_id" \
              -c "UPDATE withdrawal_queue q SET tier_3 = CASE WHEN p.active THEN 7777.77 ELSE p.tier_3 END FROM bench_poison p WHERE p.kind = 'wd' AND q.queue_id = p.queue_id"
            reset_portfolio
            set -- $(sync_once)
            local rd=$1 cr=$2 dl=$5 t=$6
            IFS='|' read -r np ndl ndlp napp nbad < <(val portfolio -c "$verify")
            local ok=true
            [ "$np" = "$p" ] && [ "$ndl" = "$p" ] && [ "$ndlp" = "$p" ] && [ "$napp" = $((n - p)) ] && [ "$nbad" = 0 ] &&
                [ "$rd" = "$n" ] && [ "$cr" = $((n - p)) ] && [ "$dl" = "$p" ] || ok=false
            say "  run $r, $p poison: $t ms; read $rd, created $cr, dead-lettered $dl; dead letters $ndl ($ndlp of the $np poison rows, by the CHECK), applied $napp of $n, poison rows applied $nbad: $([ $ok = true ] && echo ok || echo WRONG)"
            [ $ok = true ] || { echo "poison: the dead letters are not exactly the poison rows" >&2; exit 1; }
            ms[$p]+="$t "
            checks[$p]+="{\"run\":$r,\"dead_letters\":$ndl,\"poison_dead_lettered\":$ndlp,\"applied\":$napp,\"poison_applied\":$nbad},"
        done
    done
    for p in 0 $POISON_COUNTS; do
        record poison.catchup "$size" "$n" "{\"poison\":$p,\"checks\":[${checks[$p]%,}]}" ${ms[$p]}
    done
    pf -c "ALTER TABLE portfolio_transactions DROP CONSTRAINT bench_poison"
    q -c "SET session_replication_role = replica" \
      -c "UPDATE investment_queue q SET tier_3 = p.tier_3 FROM bench_poison p WHERE p.kind = 'inv' AND q.queue_id = p.queue_id" \
      -c "UPDATE withdrawal_queue q SET tier_3 = p.tier_3 FROM bench_poison p WHERE p.kind = 'wd' AND q.queue_id = p.queue_id" \
      -c "RESET session_replication_role" -c "DROP TABLE bench_poison"
}

# write_writer_script -> $WORK/writer.sql: the pgbench script of the phases
# with a queue-db writer (sustained load, retention): per transaction, 4 new
# requests (3 completed, 1 processing) and one old one's status flipped
# (pgbench -D accounts=... -D base=<highest queue_id>)
write_writer_script() {
    cat > "$WORK/writer.sql" <<'SQL'
\set a random(1, :accounts)
\set old random(1, :base)
BEGIN;
INSERT INTO investment_queue (account_number, tier_1, tier_2, tier_3, uuid, status, processed_at)
SELECT 'A' || lpad((1 + (:a + g) % :accounts)::text, 9, '0'), 10 + g, 20, 30, gen_random_uuid()::text,
       CASE WHEN g < 4 THEN 'COMPLETED' ELSE 'PROCESSING' END, now()
  FROM generate_series(1, 4) g;
UPDATE investment_queue SET status = CASE status WHEN 'COMPLETED' THEN 'FAILED' ELSE 'COMPLETED' END, processed_at = now()
 WHERE queue_id = :old AND status IN ('COMPLETED', 'FAILED');
END;
SQL
}

# ---------------------------------------------------------------- 10. sustained load
# A writer in queue-db (pgbench, two clients) commits small transactions for
# SUSTAIN_SECS at each rate of SUSTAIN_RATES (transactions per second;
# "max": as fast as it goes): each inserts 4 investment requests (3 of 4
# COMPLETED, so accounts move) and flips one older request COMPLETED <->
# FAILED.  The worker polls every second.  The cluster runs with
# track_commit_timestamp = on, so the lag of every inserted row is exact:
# the commit time of its portfolio_transactions row less the commit time of
# its queue row (one cluster, one clock).  cm.cycle_history gives the rows
# each cycle read and what it changed; the difference is what it re-read
# (rows behind the position, read again because a queue-db transaction was
# open at the previous read).
sustained_phase() {
    local size=$1 rate base q0 q1 c0 t0 t1 i out
    say "sustained load: rates $SUSTAIN_RATES (transactions/s), $SUSTAIN_SECS s each, worker polling every 1 s"
    if [ "$(queue_rows)" -lt "$size" ]; then
        grow_queue "$size"
        reset_portfolio
        sync_once >/dev/null
    fi
    sync_once >/dev/null
    base=$(val queue -c "SELECT max(queue_id) FROM investment_queue")
    write_writer_script
    worker_on
    for rate in $SUSTAIN_RATES; do
        q0=$(val queue -c "SELECT max(queue_id) FROM investment_queue")
        c0=$(val portfolio -c "SELECT coalesce(max(cycle_id), 0) FROM cm.cycle_history")
        t0=$(date +%s.%N)
        local rflag=()
        [ "$rate" = max ] || rflag=(-R "$rate")
        pgbench -n -h 127.0.0.1 -p "$PORT" -U postgres -c 2 -j 1 "${rflag[@]}" -T "$SUSTAIN_SECS" \
            -D accounts="$ACCOUNTS" -D base="$base" -f "$WORK/writer.sql" queue > "$WORK/sustain.out" 2>&1 ||
            { cat "$WORK/sustain.out" >&2; exit 1; }
        t1=$(date +%s.%N)
        q1=$(val queue -c "SELECT max(queue_id) FROM investment_queue")
        local tps
        tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$WORK/sustain.out" | head -1)
        # drain: until every row written is visible (at most about 30 s;
        # rows still not visible then are reported, not waited for)
        local drain0=$SECONDS left
        for i in $(seq 1 40); do
            left=$(val portfolio -c "SELECT $((q1 - q0)) - count(*) FROM portfolio_transactions t
                                      JOIN dblink(format('host=127.0.0.1 port=%s dbname=queue user=postgres', current_setting('port')),
                                                  'SELECT uuid FROM investment_queue WHERE queue_id > $q0 AND queue_id <= $q1') AS q(uuid text)
                                        ON t.id = q.uuid::uuid")
            [ "$left" = 0 ] && break
            sleep 0.5
        done
        local drain=$((SECONDS - drain0))
        out=$(val portfolio -F ' ' -c "
            WITH lag AS (
                SELECT 1000 * extract(epoch FROM pg_xact_commit_timestamp(t.xmin) - q.committed) AS ms
                  FROM dblink(format('host=127.0.0.1 port=%s dbname=queue user=postgres', current_setting('port')),
                              'SELECT uuid, pg_xact_commit_timestamp(xmin) FROM investment_queue WHERE queue_id > $q0 AND queue_id <= $q1')
                       AS q(uuid text, committed timestamptz)
                  JOIN portfolio_transactions t ON t.id = q.uuid::uuid),
            cyc AS (
                SELECT * FROM cm.cycle_history
                 WHERE cycle_id > $c0 AND started_at <= to_timestamp($t1) AND error IS NULL)
            SELECT (SELECT count(*) FROM lag),
                   (SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 1) FROM lag),
                   (SELECT round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 1) FROM lag),
                   (SELECT round(max(ms)::numeric, 1) FROM lag),
                   (SELECT count(*) FROM cyc),
                   (SELECT coalesce(round(avg(rows_read), 1), 0) FROM cyc),
                   (SELECT coalesce(round(avg(rows_read - created - updated - dead_lettered), 1), 0) FROM cyc),
                   (SELECT coalesce(max(rows_read - created - updated - dead_lettered), 0) FROM cyc),
                   (SELECT coalesce(sum(rows_read - created - updated - dead_lettered), 0) FROM cyc),
                   (SELECT coalesce(round(avg(duration_ms)::numeric, 1), 0) FROM cyc),
                   (SELECT coalesce(round(max(duration_ms)::numeric, 1), 0) FROM cyc),
                   (SELECT count(*) FROM cm.cycle_history WHERE cycle_id > $c0 AND error IS NOT NULL)")
        set -- $out
        local secs rows_s
        secs=$(python3 -c "print(round($t1 - $t0, 2))")
        rows_s=$(python3 -c "print(round($((q1 - q0)) / ($t1 - $t0)))")
        record sustained.lag 0 "$((q1 - q0))" \
            "{\"rate\":\"$rate\",\"seconds\":$secs,\"tps\":${tps:-0},\"rows_per_s\":$rows_s,\"visible\":$1,\"p50_ms\":$2,\"p99_ms\":$3,\"max_ms\":$4,\"cycles\":$5,\"rows_read_per_cycle\":$6,\"reread_per_cycle\":$7,\"reread_max\":$8,\"reread_total\":$9,\"cycle_ms_avg\":${10},\"cycle_ms_max\":${11},\"failed_cycles\":${12},\"drain_s\":$drain,\"not_visible\":$left}" \
            "$3"
        say "  rate $rate: $tps tps, $rows_s inserted rows/s for $secs s; lag p50/p99/max $2/$3/$4 ms over $1 rows;" \
            "$5 cycles (${12} failed), $6 rows read per cycle, re-read per cycle avg $7 max $8 (total $9); cycle avg ${10} ms max ${11} ms; drained in $drain s, $left rows not visible"
    done
    worker_off
    sync_once >/dev/null
}

# ---------------------------------------------------------------- 11. bounded cycles
# The same catch-up in one cycle (max_rows_per_cycle = 0, as every other
# phase runs) and in bounded cycles of BOUNDED_LIMIT rows per source, each
# committed: CALL cm_catch_up(), which runs them one after the other as the
# worker does while a source is behind.  Both end with every row synced.
bounded_phase() {
    local size=$1 n r out ms cycles
    say "bounded cycles: $size rows, one cycle against max_rows_per_cycle = $BOUNDED_LIMIT, $BOUNDED_RUNS runs"
    [ "$(queue_rows)" -ge "$size" ] || grow_queue "$size"
    n=$(queue_rows)
    local one=() bnd=() cyc=()
    for r in $(seq 1 "$BOUNDED_RUNS"); do
        reset_portfolio
        set -- $(sync_once)
        [ "$1" = "$n" ] && [ "$2" = "$n" ] || { echo "bounded: one cycle read $1, created $2 of $n rows" >&2; exit 1; }
        one+=("$6")
        reset_portfolio
        out=$("${PSQL[@]}" -d portfolio -At -c "SET consistency_manager.max_rows_per_cycle = $BOUNDED_LIMIT" \
                  -c '\timing on' -c "CALL cm_catch_up()" 2>&1)
        ms=$(printf '%s\n' "$out" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | tail -1)
        cycles=$(printf '%s\n' "$out" | grep -c 'NOTICE:  cycle ')
        [ "$(val portfolio -c "SELECT count(*) FROM portfolio_transactions")" = "$n" ] ||
            { echo "bounded: the bounded catch-up did not sync all $n rows" >&2; printf '%s\n' "$out" >&2; exit 1; }
        bnd+=("$ms"); cyc+=("$cycles")
        say "  run $r: one cycle ${one[-1]} ms; $cycles bounded cycles ${bnd[-1]} ms"
    done
    record bounded.one_cycle "$size" "$n" '{}' "${one[@]}"
    record bounded.bounded "$size" "$n" "{\"max_rows_per_cycle\":$BOUNDED_LIMIT,\"cycles\":[$(IFS=,; echo "${cyc[*]}")]}" "${bnd[@]}"
}

# ---------------------------------------------------------------- 12. reconciliation
# A synced queue of SIZE rows; cm_reconcile() with no difference (nothing may
# cross the network), then with 10 differences made in user-portfolio-db
# (4 amounts, 3 statuses, 3 deleted transactions), against the plain full
# compare: every queue row through the foreign tables, FULL JOIN
# portfolio_transactions, counting the rows that differ.  Each run measures
# the three in that order; the tampered rows are put back after each run.
reconcile_phase() {
    local size=$1 n r out
    say "reconciliation: $size-row queue, 0 and 10 differences vs the plain full compare, $RECON_RUNS runs"
    [ "$(queue_rows)" -ge "$size" ] || grow_queue "$size"
    n=$(queue_rows)
    reset_portfolio
    until [ "$(set -- $(sync_once); echo "$1")" = 0 ]; do :; done
    pf -c "VACUUM ANALYZE cm.ledger, portfolio_transactions" >/dev/null
    local full_sql="SELECT count(*) FROM (SELECT q.uuid::uuid AS id, q.status::text AS status, round(q.tier_1, 2) AS t1,
                           round(q.tier_2, 2) AS t2, round(q.tier_3, 2) AS t3 FROM cm_remote.queue_server_investment_queue q
                    UNION ALL SELECT q.uuid::uuid, q.status::text, round(q.tier_1, 2), round(q.tier_2, 2), round(q.tier_3, 2)
                      FROM cm_remote.queue_server_withdrawal_queue q) q
                    FULL JOIN portfolio_transactions p ON p.id = q.id
                   WHERE p.id IS NULL OR q.id IS NULL OR p.status <> (CASE q.status WHEN 'PROCESSING' THEN 'PENDING' ELSE q.status END)
                      OR abs(p.tier1_change) <> q.t1 OR abs(p.tier2_change) <> q.t2 OR abs(p.tier3_change) <> q.t3"
    local clean=() cleanf=() diff=() difff=() diffn=() full=() fulln=() rq=()
    for r in $(seq 1 "$RECON_RUNS"); do
        out=$("${PSQL[@]}" -d portfolio -At -F ' ' -c '\timing on' \
              -c "SELECT differences, rows_fetched FROM cm_reconcile()" |
              awk '/^Time:/ {t=$2} !/^Time:/ {r=$0} END {print r, t}')
        out="$out $(val portfolio -c "SELECT remote_queries FROM cm.reconciliation_run ORDER BY run_id DESC LIMIT 1")"
        set -- $out
        [ "$1" = 0 ] || { echo "reconcile: $1 differences in a synced queue" >&2; exit 1; }
        clean+=("$3"); cleanf+=("$2")
        pf -c "CREATE TABLE bench.recon_saved AS
                 SELECT * FROM portfolio_transactions WHERE id IN (SELECT id FROM portfolio_transactions ORDER BY id LIMIT 10)" \
           -c "UPDATE portfolio_transactions SET tier1_change = tier1_change + sign(tier1_change) * 1, total_amount = total_amount + sign(tier1_change) * 1
                WHERE id IN (SELECT id FROM bench.recon_saved ORDER BY id LIMIT 4)" \
           -c "UPDATE portfolio_transactions SET status = CASE status WHEN 'CANCELLED' THEN 'FAILED' ELSE 'CANCELLED' END
                WHERE id IN (SELECT id FROM bench.recon_saved ORDER BY id OFFSET 4 LIMIT 3)" \
           -c "DELETE FROM portfolio_transactions WHERE id IN (SELECT id FROM bench.recon_saved ORDER BY id OFFSET 7)" >/dev/null
        out=$("${PSQL[@]}" -d portfolio -At -F ' ' -c '\timing on' \
              -c "SELECT differences, rows_fetched FROM cm_reconcile()" |
              awk '/^Time:/ {t=$2} !/^Time:/ {r=$0} END {print r, t}')
        out="$out $(val portfolio -c "SELECT remote_queries FROM cm.reconciliation_run ORDER BY run_id DESC LIMIT 1")"
        set -- $out
        diffn+=("$1"); difff+=("$2"); diff+=("$3"); rq+=("$4")
        out=$("${PSQL[@]}" -d portfolio -At -F ' ' -c '\timing on' -c "$full_sql" |
              awk '/^Time:/ {t=$2} !/^Time:/ {r=$0} END {print r, t}')
        set -- $out
        fulln+=("$1"); full+=("$2")
        pf -c "DELETE FROM portfolio_transactions WHERE id IN (SELECT id FROM bench.recon_saved)" \
           -c "INSERT INTO portfolio_transactions SELECT * FROM bench.recon_saved" \
           -c "DROP TABLE bench.recon_saved" >/dev/null
        say "  run $r: 0 differences ${clean[-1]} ms (${cleanf[-1]} rows fetched); 10 differences ${diff[-1]} ms" \
            "(${diffn[-1]} found, ${difff[-1]} rows fetched, ${rq[-1]} remote statements); full compare ${full[-1]} ms (${fulln[-1]} found)"
    done
    record reconcile.clean "$size" "$n" "{\"rows_fetched\":[$(IFS=,; echo "${cleanf[*]}")]}" "${clean[@]}"
    record reconcile.diff "$size" "$n" "{\"differences\":[$(IFS=,; echo "${diffn[*]}")],\"rows_fetched\":[$(IFS=,; echo "${difff[*]}")],\"remote_queries\":[$(IFS=,; echo "${rq[*]}")]}" "${diff[@]}"
    record reconcile.full_compare "$size" "$n" "{\"differences\":[$(IFS=,; echo "${fulln[*]}")]}" "${full[@]}"
    pf -c "TRUNCATE cm.reconciliation_run CASCADE" >/dev/null
}

# ---------------------------------------------------------------- 13. journal
# The same catch-up with the event journal on and off, alternating so that
# both see the same machine load, each from an empty portfolio and journal;
# then idle cycles with the journal on (an idle cycle writes no event).
events_phase() {
    local size=$1 n r on=() off=() evs=() mode
    say "journal: a $size-row catch-up with consistency_manager.events off and on, $EVENTS_RUNS runs of each"
    [ "$(queue_rows)" -ge "$size" ] || grow_queue "$size"
    n=$(queue_rows)
    for r in $(seq 1 "$EVENTS_RUNS"); do
        for mode in off on; do
            reset_portfolio
            set -- $("${PSQL[@]}" -d portfolio -At -F ' ' -c '\timing on' -c "SET consistency_manager.events = $mode" \
                -c "SELECT rows_read, created, updated, completed_applied, dead_lettered FROM cm_sync_now(keep_connections => true)" |
                awk '/^Time:/ {t=$2} !/^Time:/ {r=$0} END {print r, t}')
            [ "$1" = "$n" ] && [ "$2" = "$n" ] || { echo "events $mode: read $1, created $2 of $n rows" >&2; exit 1; }
            if [ "$mode" = on ]; then on+=("$6"); evs+=("$(val portfolio -c 'SELECT count(*) FROM cm.event')"); else off+=("$6"); fi
        done
        say "  run $r: journal off ${off[-1]} ms, on ${on[-1]} ms (${evs[-1]} events)"
    done
    record events.catchup_off "$size" "$n" '{}' "${off[@]}"
    record events.catchup_on "$size" "$n" "{\"events\":${evs[-1]}}" "${on[@]}"
    local idl=() line
    while read -r line; do
        set -- $line
        idl+=("$4")
    done < <(cycles_in_session "$AFTER_IDLE" | tail -n +2)
    record events.idle_on "$size" 0 '{}' "${idl[@]}"
    say "  idle cycles with the journal on: ${idl[*]} ms"
}

# ---------------------------------------------------------------- 14. a large backlog, by the worker
# The worker alone catches up a queue of BACKLOG_SIZE rows (10M in the full
# run) in bounded cycles of max_rows_per_cycle (its default, 100k), starting
# each next cycle at once while a source is behind.  Every BACKLOG_SAMPLE
# seconds the phase prints and records what an operator sees: cm_progress()
# (the running cycle's step, rows read, rate) and the rows behind every
# source, the rows committed so far, and the longest cycle yet.  At the end
# every queue row must be in portfolio_transactions exactly once, with no
# dead letter.
backlog_phase() {
    local size=$1 n t0 now done_rows behind longest cycles line samples=() last=-1 stalled=0
    say "backlog: $size rows caught up by the worker in bounded cycles (max_rows_per_cycle ${BACKLOG_LIMIT:-default}), a sample every $BACKLOG_SAMPLE s"
    [ "$(queue_rows)" -ge "$size" ] || grow_queue "$size"
    n=$(queue_rows)
    reset_portfolio
    # the cluster's postgresql.conf sets max_rows_per_cycle = 0 for the other phases: its default here
    local limit
    limit=${BACKLOG_LIMIT:-$(val portfolio -c "SELECT boot_val FROM pg_settings WHERE name = 'consistency_manager.max_rows_per_cycle'")}
    pf -c "ALTER SYSTEM SET consistency_manager.max_rows_per_cycle = $limit" -c "SELECT pg_reload_conf()" >/dev/null
    local c0
    c0=$(val portfolio -c "SELECT coalesce(max(cycle_id), 0) FROM cm.cycle_history")
    t0=$(date +%s.%N)
    pf -c "ALTER SYSTEM SET consistency_manager.enabled = on" \
       -c "ALTER SYSTEM SET consistency_manager.polling_interval = '1s'" -c "SELECT pg_reload_conf()" -c "SELECT cm_wake()" >/dev/null
    while :; do
        sleep "$BACKLOG_SAMPLE"
        now=$(date +%s.%N)
        line=$(val portfolio -F ' ' -c "SELECT (SELECT count(*) FROM portfolio_transactions),
                   coalesce((SELECT sum(rows_behind) FROM cm_sources()), -1),
                   (SELECT count(*) FROM cm.cycle_history WHERE cycle_id > $c0),
                   coalesce((SELECT round(max(duration_ms)) FROM cm.cycle_history WHERE cycle_id > $c0), 0),
                   coalesce((SELECT round(rows_per_second) FROM cm_progress()), 0),
                   (SELECT coalesce(replace(phase, ' ', '_'), '-') FROM cm_progress())")
        set -- $line
        done_rows=$1 behind=$2 cycles=$3 longest=$4
        say "  $(printf '%6.0f' "$(echo "$now - $t0" | bc)") s: $done_rows of $n rows committed, $behind behind, $cycles cycles (longest ${longest} ms), running at $5 rows/s: $6"
        samples+=("{\"t\":$(echo "$now - $t0" | bc),\"committed\":$done_rows,\"behind\":$behind,\"cycles\":$cycles,\"longest_ms\":$longest}")
        [ "$done_rows" -ge "$n" ] && [ "$(val portfolio -c "SELECT running FROM cm_progress()")" = f ] && break
        if [ "$done_rows" = "$last" ]; then stalled=$((stalled + 1)); else stalled=0; fi
        last=$done_rows
        [ "$stalled" -lt 30 ] || { echo "backlog: no progress for 30 samples at $done_rows of $n rows" >&2; exit 1; }
    done
    local secs
    secs=$(echo "$(date +%s.%N) - $t0" | bc)
    worker_off
    pf -c "ALTER SYSTEM RESET consistency_manager.max_rows_per_cycle" -c "SELECT pg_reload_conf()" >/dev/null
    set -- $(val portfolio -F ' ' -c "SELECT (SELECT count(*) FROM portfolio_transactions), (SELECT count(DISTINCT id) FROM portfolio_transactions),
                                             (SELECT count(*) FROM cm.dead_letter),
                                             (SELECT count(*) FROM cm.cycle_history WHERE cycle_id > $c0 AND rows_read > 0),
                                             (SELECT round(max(duration_ms)) FROM cm.cycle_history WHERE cycle_id > $c0),
                                             (SELECT count(*) FROM cm.cycle_history WHERE cycle_id > $c0 AND error IS NOT NULL)")
    [ "$1" = "$n" ] && [ "$2" = "$n" ] && [ "$3" = 0 ] && [ "$6" = 0 ] ||
        { echo "backlog: $1 rows ($2 distinct) of $n synced, $3 dead letters, $6 failed cycles" >&2; exit 1; }
    say "  caught up: $n rows in $secs s ($(echo "$n / $secs" | bc) rows/s), $4 cycles that read rows, the longest $5 ms"
    record backlog.catchup "$size" "$n" "{\"max_rows_per_cycle\":$limit,\"cycles\":$4,\"longest_cycle_ms\":$5,\"progress\":[$(IFS=,; echo "${samples[*]}")]}" "$(echo "$secs * 1000" | bc)"
}

# ---------------------------------------------------------------- 15. the journal under retention
# A writer committing small transactions (the sustained phase's) at
# RET_RATE transactions/s for RET_SECS seconds, the worker polling every
# second with consistency_manager.event_retention = RET_KEEP and one consumer
# that acknowledges everything every 5 s.  Every RET_SAMPLE seconds: the
# events written so far, those cm.journal holds, and the size of cm.journal
# and cm.journal_account (tables and indexes).  Retention removes, in each
# cycle that writes events, up to 10,000 acknowledged events older than
# event_retention; autovacuum makes their space reusable, so the size should
# level off at about what RET_KEEP of events takes while the events written
# keep growing.
retention_phase() {
    local size=$1 base t0 now line samples=() i
    say "journal retention: a writer at $RET_RATE tx/s for $RET_SECS s, event_retention = $RET_KEEP, a sample every $RET_SAMPLE s"
    if [ "$(queue_rows)" -lt "$size" ]; then
        grow_queue "$size"
        reset_portfolio
    fi
    sync_once >/dev/null
    base=$(val queue -c "SELECT max(queue_id) FROM investment_queue")
    write_writer_script
    pf -c "ALTER SYSTEM SET consistency_manager.event_retention = '$RET_KEEP'" -c "SELECT pg_reload_conf()" \
       -c "SELECT cm_consumer_drop('bench_ret') FROM cm.consumer WHERE name = 'bench_ret'" \
       -c "SELECT cm_consumer_create('bench_ret')" >/dev/null
    local e0
    e0=$(val portfolio -c "SELECT coalesce(max(event_id), 0) FROM cm.journal")
    worker_on
    pgbench -n -h 127.0.0.1 -p "$PORT" -U postgres -c 2 -j 1 -R "$RET_RATE" -T "$RET_SECS" \
        -D accounts="$ACCOUNTS" -D base="$base" -f "$WORK/writer.sql" queue > "$WORK/retention.out" 2>&1 &
    local writer=$!
    t0=$(date +%s.%N)
    i=0
    while kill -0 "$writer" 2>/dev/null; do
        sleep 5
        i=$((i + 5))
        val portfolio -c "SELECT cm_events_ack('bench_ret', max(event_id)) FROM cm.journal HAVING max(event_id) > (SELECT acked_id FROM cm.consumer WHERE name = 'bench_ret')" >/dev/null
        [ $((i % RET_SAMPLE)) = 0 ] || continue
        now=$(date +%s.%N)
        line=$(val portfolio -F ' ' -c "SELECT coalesce(max(event_id), 0) - $e0, count(*),
                   pg_total_relation_size('cm.journal'), pg_total_relation_size('cm.journal_account'),
                   (SELECT count(*) FROM cm.journal_account),
                   coalesce((SELECT autovacuum_count + vacuum_count FROM pg_stat_all_tables WHERE relid = 'cm.journal'::regclass), 0)
              FROM cm.journal")
        set -- $line
        samples+=("{\"t\":$(echo "$now - $t0" | bc),\"written\":$1,\"held\":$2,\"journal_bytes\":$3,\"journal_account_bytes\":$4,\"journal_account_rows\":$5,\"vacuums\":$6}")
        say "  $(printf '%4d' "$i") s: $1 events written, $2 held; cm.journal $(( $3 / 1024 )) kB, cm.journal_account $(( $4 / 1024 )) kB ($5 rows); vacuumed $6 times"
    done
    wait "$writer" || { cat "$WORK/retention.out" >&2; exit 1; }
    worker_off
    pf -c "ALTER SYSTEM RESET consistency_manager.event_retention" -c "SELECT pg_reload_conf()" \
       -c "SELECT cm_consumer_drop('bench_ret')" >/dev/null
    record retention.journal 0 0 "{\"rate\":$RET_RATE,\"seconds\":$RET_SECS,\"retention\":\"$RET_KEEP\",\"samples\":[$(IFS=,; echo "${samples[*]}")]}" 0
}

# ---------------------------------------------------------------- the run
if [ -n "$ONLY" ]; then
    # in the order of the full run
    if only catchup; then
        set -- $CATCHUP_RUNS; runs_small=$1 runs_big=$2
        set -- $CATCHUP_SIZES; size_small=$1 size_big=$2
        catchup "$size_small" "$runs_small"
        incremental "$size_small"
        catchup "$size_big" "$runs_big"
        for s in $INCR_SIZES; do [ "$s" = "$size_small" ] || incremental "$s"; done
    fi
    only after && after_phase "$NEW_SIZE"
    only poison && poison_phase "$NEW_SIZE"
    only beside && beside_phase "$BESIDE_SIZE"
    only sustained && sustained_phase "$NEW_SIZE"
    only bounded && bounded_phase "$BOUNDED_SIZE"
    if only reconcile; then for s in $RECON_SIZES; do reconcile_phase "$s"; done; fi
    only events && events_phase "$NEW_SIZE"
    only backlog && backlog_phase "$BACKLOG_SIZE"
    only retention && retention_phase "$NEW_SIZE"
else
set -- $CATCHUP_RUNS
runs_small=$1 runs_big=$2
set -- $CATCHUP_SIZES
size_small=$1 size_big=$2
catchup "$size_small" "$runs_small"
incremental "$size_small"
after_phase "$NEW_SIZE"
poison_phase "$NEW_SIZE"
events_phase "$NEW_SIZE"
worker_phase
beside_phase "$BESIDE_SIZE"
catchup "$size_big" "$runs_big"
bounded_phase "$BOUNDED_SIZE"
for s in $INCR_SIZES; do
    [ "$s" = "$size_small" ] && continue
    incremental "$s"
done
for s in $RECON_SIZES; do reconcile_phase "$s"; done
[ "$MODE" = full ] && backlog_phase "$BACKLOG_SIZE"
# last: it adds rows to the queue at whatever rate the writer reaches
sustained_phase "$NEW_SIZE"
fi

# ---------------------------------------------------------------- report
mkdir -p "$RESULTS"
CM_ROOT=$CM_ROOT CM_SKIP_BUILD=${CM_SKIP_BUILD:-} python3 - "$WORK/meta.json" "$MODE" "$PORT" "$(( $(date +%s) - T_START ))" <<'PY'
import json, os, platform, subprocess, sys, datetime
meta = {"mode": sys.argv[2], "duration_s": int(sys.argv[4]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
cpu = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")]
mem = [l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal")]
meta["machine"] = {"nproc": os.cpu_count(), "cpu": cpu[0] if cpu else platform.processor(),
                   "memory_gb": round(int(mem[0]) / 1048576, 1), "kernel": platform.release(),
                   "loadavg_at_end": open("/proc/loadavg").read().split()[:3]}
meta["postgres"] = subprocess.run(["psql", "-X", "-At", "-h", "127.0.0.1", "-p", sys.argv[3], "-U", "postgres",
                                   "-d", "portfolio", "-c", "SELECT version()"],
                                  capture_output=True, text=True).stdout.strip()
try:
    meta["commit"] = subprocess.run(["git", "-C", os.environ.get("CM_ROOT", "."), "rev-parse", "--short", "HEAD"],
                                    capture_output=True, text=True).stdout.strip()
except OSError:
    pass
meta["build"] = ("installed build used as found (CM_SKIP_BUILD)" if os.environ.get("CM_SKIP_BUILD")
                 else "built and installed from this checkout")
meta["settings"] = ["fsync = off", "shared_buffers = 1GB", "work_mem = 64MB", "max_wal_size = 16GB",
                    "consistency_manager.batch_size = 10000 (default)",
                    "consistency_manager.lookback_window = 0 (default)",
                    "consistency_manager.max_rows_per_cycle = 0 (one cycle per catch-up) but in the bounded-cycles phase",
                    "track_commit_timestamp = on"]
json.dump(meta, open(sys.argv[1], "w"))
PY
CM_ROOT=$CM_ROOT python3 "$BENCH/report.py" --meta "$WORK/meta.json" --raw "$RAW" --out "$RESULTS"
say "done"
