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
#      catch-up and without it.
# Prints a table, and writes bench/results/latest.json and latest.md.
#
#   bash bench/run.sh                  default run (about 20 minutes on 2 cores)
#   BENCH_FULL=1 bash bench/run.sh     incremental at 10M rows too (+15-20 min)
#   BENCH_QUICK=1 bash bench/run.sh    small sizes, a smoke test (about 2 min)
#   BENCH_ONLY=beside ...              only phase 7 (beside the application)
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
fi

cm_install_packages python3-psycopg2 time
[ -n "${CM_SKIP_BUILD:-}" ] || cm_build_install

WORK=$(cm_workdir)
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
      "shared_buffers = 1GB"
      "work_mem = 64MB"
      "maintenance_work_mem = 512MB"
      "max_wal_size = 16GB"
      "checkpoint_timeout = 30min"
      "log_min_messages = warning")
cm_start_cluster "$WORK" "$PORT" "${CONF[@]}"
"${PSQL[@]}" -d postgres -c "CREATE DATABASE queue" -c "CREATE DATABASE portfolio"
q -f "$CM_ROOT/test/fixtures/queue_db.sql" -f "$BENCH/sql/queue_setup.sql"
pf -f "$CM_ROOT/test/fixtures/portfolio_db.sql" -v port="$PORT" -v accounts="$ACCOUNTS" \
   -f "$BENCH/sql/portfolio_setup.sql" >/dev/null

# ---------------------------------------------------------------- 2. legacy
# The same rows three ways, each from an empty portfolio: the cycle, the
# per-row-commit service, the connection-per-row service.
if [ "${BENCH_ONLY:-}" != beside ]; then
say "legacy: $LEGACY_ROWS rows, cycle vs row-at-a-time Python"
grow_queue "$LEGACY_ROWS"
N=$(queue_rows)
legacy() {
    local mode=$1 out secs
    out=$(/usr/bin/time -v /usr/bin/python3 "$BENCH/legacy_sync.py" --mode "$mode" --port "$PORT" 2>&1)
    [ "$(printf '%s\n' "$out" | head -1)" = "$N" ] || { echo "legacy $mode: $out" >&2; exit 1; }
    secs=$(printf '%s\n' "$out" | awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' |
           awk -F: '{s=0; for (i=1;i<=NF;i++) s=s*60+$i; printf "%.1f\n", s*1000}')
    echo "$secs"
}
c_ms=(); b_ms=(); a_ms=()
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
record legacy.cycle "$N" "$N" '{}' "${c_ms[@]}"
record legacy.commit_per_row "$N" "$N" '{}' "${b_ms[@]}"
record legacy.conn_per_row "$N" "$N" '{}' "${a_ms[@]}"
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
# in queue-db, with its triggers off, so that the look-back window of the
# cycle holds only what this phase changes, whatever ran just before.  Then
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
    local inc=() rr=""
    for i in $(seq 1 "$INCR_RUNS"); do
        out=$("${PSQL[@]}" -d portfolio -At -F ' ' -c '\timing on' -c 'BEGIN' \
              -c "SELECT rows_read, updated, completed_applied FROM cm_sync_now(keep_connections => true)" -c 'ROLLBACK')
        set -- $(printf '%s\n' "$out" | grep -v '^Time:')
        [ "$3" = "$INCR_CHANGED" ] || { echo "incremental cycle applied $3, not $INCR_CHANGED: $out" >&2; exit 1; }
        rr=$1
        inc+=("$(printf '%s\n' "$out" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | sed -n 2p)")
    done
    record incremental.cycle "$size" "$n" "{\"changed\":$INCR_CHANGED,\"rows_read\":$rr}" "${inc[@]}"
    say "  incremental: ${inc[*]} ms (reads $rr rows)"
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
worker_phase() {
    say "worker: latency ($LAT_N requests per case) and memory"
    pf -c "ALTER SYSTEM SET consistency_manager.enabled = on" \
       -c "ALTER SYSTEM SET consistency_manager.polling_interval = '1s'" -c "SELECT pg_reload_conf()" >/dev/null
    # the worker picks the new interval up after its next wait; wake it until
    # it has run a cycle under the new settings
    local i c0
    c0=$(val portfolio -c "SELECT cycles FROM cm_stats()")
    for i in $(seq 1 100); do
        val portfolio -c "SELECT cm_wake()" >/dev/null
        sleep 0.2
        [ "$(val portfolio -c "SELECT cycles > $c0 + 1 FROM cm_stats() WHERE worker_state = 'idle'")" = t ] && break
    done
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
    pf -c "ALTER SYSTEM SET consistency_manager.enabled = off" \
       -c "ALTER SYSTEM RESET consistency_manager.polling_interval" -c "SELECT pg_reload_conf()" >/dev/null
    sleep 1
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

# ---------------------------------------------------------------- the run
if [ "${BENCH_ONLY:-}" = beside ]; then
    beside_phase "$BESIDE_SIZE"
else
set -- $CATCHUP_RUNS
runs_small=$1 runs_big=$2
set -- $CATCHUP_SIZES
size_small=$1 size_big=$2
catchup "$size_small" "$runs_small"
incremental "$size_small"
worker_phase
beside_phase "$BESIDE_SIZE"
catchup "$size_big" "$runs_big"
for s in $INCR_SIZES; do
    [ "$s" = "$size_small" ] && continue
    incremental "$s"
done
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
                    "consistency_manager.lookback_window = 2min (default)"]
json.dump(meta, open(sys.argv[1], "w"))
PY
CM_ROOT=$CM_ROOT python3 "$BENCH/report.py" --meta "$WORK/meta.json" --raw "$RAW" --out "$RESULTS"
say "done"
