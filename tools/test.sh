#!/usr/bin/env bash
# tools/test.sh -- build consistency_manager and run every test suite:
#   pg_regress (sql/, expected/) against a temporary instance it starts itself,
#   pgTAP (test/*.sql) with pg_prove against a throw-away cluster,
#   PostgreSQL TAP tests (t/*.pl) with PostgreSQL::Test::Cluster.
# Installs the Debian packages it needs.  Run it as root (CI) or as a user
# with sudo.  Exits non-zero when any suite fails.
#
#   bash tools/test.sh              every suite
#   bash tools/test.sh regress      one suite (regress, pgtap or tap)
#   CM_TAP="t/050_x.pl" bash tools/test.sh tap     some TAP files only
#   CM_PGTAP="test/06_x.sql" bash tools/test.sh pgtap     some pgTAP files only

source "$(dirname "${BASH_SOURCE[0]}")/cluster.sh"

suites=${*:-regress pgtap tap}
cm_install_packages prometheus-postgres-exporter   # t/080 runs the real exporter

WORK=$(cm_workdir)
# The suites run servers from a private copy of PostgreSQL with this
# checkout installed into it (never a stale or foreign system install).
cm_pg_tree "$WORK/pg"
cm_build_install "$WORK/pg"
PGBIN=$(cm_tree_bin "$WORK/pg")
export PATH="$PGBIN:$PATH"
# the suites run as the postgres user, which may not read the checkout
cp -r "$CM_ROOT/sql" "$CM_ROOT/expected" "$CM_ROOT/test" "$CM_ROOT/t" "$WORK/"
cp -r "$CM_ROOT/monitoring" "$WORK/"   # the Prometheus query file t/080 serves
cp "$CM_ROOT/README.md" "$WORK/"       # t/130 runs its install section as written
[ "$(id -u)" = 0 ] && chown -R postgres: "$WORK"

PGXS_DIR=$(dirname "$($PGBIN/pg_config --pgxs)")/../..
passed=0
failed=0
failures=()
tests_total=0   # individual tests, counted from each runner's summary
tests_failed=0
CLUSTER=""
cleanup() {
    [ -n "$CLUSTER" ] && cm_stop_cluster "$CLUSTER"
    if [ $failed -eq 0 ] && [ -z "${CM_KEEP:-}" ]; then rm -rf "$WORK"; else echo "(test files kept in $WORK)"; fi
}
trap cleanup EXIT

run_regress() {
    local tests port
    tests=$(cd "$WORK/sql" && ls *.sql | sed 's/\.sql$//' | sort | tr '\n' ' ')
    port=$(cm_free_port)
    echo "== pg_regress: $tests"
    if (cd "$WORK" && as_pg "$PGXS_DIR/src/test/regress/pg_regress" \
            --temp-instance="$WORK/regress_instance" \
            --temp-config="$WORK/test/regress.conf" \
            --inputdir="$WORK" --outputdir="$WORK" \
            --host=127.0.0.1 --port="$port" \
            --bindir="$PGBIN" $tests) 2>&1 | tee "$WORK/regress.log"; [ "${PIPESTATUS[0]}" = 0 ]; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1)); failures+=(pg_regress)
        [ -f "$WORK/regression.diffs" ] && cat "$WORK/regression.diffs"
    fi
    count_tests "$(grep -c '^test ' "$WORK/regress.log" || true)" \
                "$(grep -c '^test .*FAILED' "$WORK/regress.log" || true)"
}

# count_tests TOTAL FAILED: add one runner's figures to the summary
count_tests() {
    tests_total=$((tests_total + ${1:-0}))
    tests_failed=$((tests_failed + ${2:-0}))
}

# the figures of a prove/pg_prove run, from its output
count_prove() {
    local total bad
    total=$( (grep -o 'Tests=[0-9]*' "$1" || true) | tail -1 | cut -d= -f2)
    bad=$( (grep -o 'Failed [0-9]*/[0-9]* subtests' "$1" || true) | awk -F'[ /]' '{s += $2} END {print s + 0}')
    count_tests "${total:-0}" "${bad:-0}"
}

run_pgtap() {
    local port
    port=$(cm_free_port)
    CLUSTER="$WORK/pgtap"
    as_pg mkdir -p "$CLUSTER"
    echo "== pgTAP: cluster on 127.0.0.1:$port"
    cm_start_cluster "$CLUSTER" "$port" \
        "shared_preload_libraries = 'consistency_manager'" \
        "consistency_manager.database = 'portfolio'" \
        "consistency_manager.enabled = off"
    local psql="psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p $port -U postgres"
    as_pg $psql -d postgres -c "CREATE DATABASE queue" -c "CREATE DATABASE portfolio"
    as_pg $psql -d queue -f "$WORK/test/fixtures/queue_db.sql"
    as_pg $psql -d portfolio -f "$WORK/test/fixtures/portfolio_db.sql" \
        -c "CREATE EXTENSION pgtap" \
        -c "CREATE EXTENSION consistency_manager CASCADE" \
        -c "CREATE SERVER queue_server FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host '127.0.0.1', port '$port', dbname 'queue')" \
        -c "CREATE USER MAPPING FOR postgres SERVER queue_server OPTIONS (user 'postgres')"
    if (cd "$WORK" && as_pg pg_prove ${PGPROVE_OPTS:-} -h 127.0.0.1 -p "$port" -U postgres -d portfolio ${CM_PGTAP:-test/*.sql}) \
            2>&1 | tee "$WORK/pgtap.out"; [ "${PIPESTATUS[0]}" = 0 ]; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1)); failures+=(pgTAP)
    fi
    count_prove "$WORK/pgtap.out"
    cm_stop_cluster "$CLUSTER"
    CLUSTER=""
}

# The released 1.0 (a commit of this repository's history), which the
# upgrade tests run first and then upgrade in place.
CM_RELEASE_1_0=d82d954

run_tap() {
    echo "== TAP: t/*.pl"
    as_pg mkdir -p "$WORK/tap"
    # the old release in a tree of its own; the new build is in $WORK/pg
    cm_release_tree "$WORK/pg-1.0" "$CM_RELEASE_1_0"
    if (cd "$WORK" && as_pg env PERL5LIB="$PGXS_DIR/src/test/perl:$WORK/t" \
            TESTDIR="$WORK/tap" PG_REGRESS="$PGXS_DIR/src/test/regress/pg_regress" \
            CM_FIXTURES="$WORK/test/fixtures" CM_README="$WORK/README.md" \
            CM_PG_TREE="$WORK/pg" CM_RELEASE_1_0_TREE="$WORK/pg-1.0" \
            prove --timer ${CM_TAP:-t/*.pl}) 2>&1 | tee "$WORK/tap.out"; [ "${PIPESTATUS[0]}" = 0 ]; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1)); failures+=(TAP)
        for f in "$WORK"/tap/tmp_check/log/regress_log_*; do
            [ -f "$f" ] && { echo "--- $f (last 60 lines)"; tail -60 "$f"; }
        done
    fi
    count_prove "$WORK/tap.out"
}

for s in $suites; do
    case $s in
        regress) run_regress ;;
        pgtap) run_pgtap ;;
        tap) run_tap ;;
        *) echo "unknown suite $s (regress, pgtap, tap)" >&2; exit 2 ;;
    esac
done

echo
[ $failed -gt 0 ] && echo "failed suites: ${failures[*]}"
echo "($passed suites passed, $failed failed)"
echo "tests: $((tests_total - tests_failed)) passed, $tests_failed failed"
[ $failed -eq 0 ]
