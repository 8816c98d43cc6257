# tools/cluster.sh -- sourced by the demo, test and bench scripts.
#
# Installs what is missing from Debian, builds and installs the extension,
# and runs throw-away PostgreSQL 15 clusters as the postgres user (initdb
# refuses root) on a free port of 127.0.0.1 only.

set -euo pipefail

CM_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PGBIN=/usr/lib/postgresql/15/bin
export PATH="$PGBIN:$PATH"

# run a command as the postgres user when we are root, as ourselves otherwise
as_pg() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- env PATH="$PATH" "$@"
    else
        "$@"
    fi
}

# install the Debian packages that are missing (only as root)
cm_install_packages() {
    local want=(postgresql-15 postgresql-server-dev-15 postgresql-15-pgtap
                libtap-parser-sourcehandler-pgtap-perl libipc-run-perl make gcc "$@")
    local missing=()
    for p in "${want[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    local real=("${missing[@]}")
    if [ ${#real[@]} -gt 0 ]; then
        if [ "$(id -u)" != 0 ]; then
            echo "missing Debian packages: ${real[*]} (run as root to install them)" >&2
            exit 1
        fi
        echo "== installing ${real[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${real[@]}" >/dev/null
    fi
}

# cm_build_install [TREE [SRC]]: build with warnings as errors and install
# into the PostgreSQL 15 tree, or into TREE, a private copy of it made by
# cm_pg_tree (the tests use one, so they never run a stale system install
# and two checkouts can test side by side).  SRC defaults to this checkout.
cm_build_install() {
    local tree=${1:-} src=${2:-$CM_ROOT}
    echo "== building consistency_manager${tree:+ into $tree}"
    make -C "$src" -s clean >/dev/null
    make -C "$src" -s PG_CONFIG=$PGBIN/pg_config COPT='-Wall -Wextra -Werror' >/dev/null
    if [ -n "$tree" ]; then
        make -C "$src" -s PG_CONFIG=$PGBIN/pg_config DESTDIR="$tree" install >/dev/null
    elif [ "$(id -u)" = 0 ]; then
        make -C "$src" -s PG_CONFIG=$PGBIN/pg_config install >/dev/null
    else
        sudo make -C "$src" -s PG_CONFIG=$PGBIN/pg_config install >/dev/null
    fi
}

# cm_pg_tree TREE: a private copy of the PostgreSQL 15 installation under
# TREE (TREE/usr/lib/postgresql/15/bin, .../lib, TREE/usr/share/postgresql/15).
# PostgreSQL finds its share and lib directories relative to its binaries,
# so servers started from TREE load the libraries and scripts installed
# there.  Prints nothing; the binaries are in "$(cm_tree_bin TREE)".
cm_pg_tree() {
    local tree=$1
    mkdir -p "$tree/usr/lib/postgresql" "$tree/usr/share/postgresql"
    cp -a /usr/lib/postgresql/15 "$tree/usr/lib/postgresql/"
    cp -a /usr/share/postgresql/15 "$tree/usr/share/postgresql/"
}

cm_tree_bin() { echo "$1/usr/lib/postgresql/15/bin"; }

# cm_release_tree TREE COMMIT: a private PostgreSQL tree (cm_pg_tree) with
# the extension as released at COMMIT built and installed into it, owned by
# the postgres user, so that an upgrade test can run a node of the old
# release and then copy a newer build's files into the tree (a package
# upgrade).  COMMIT must be in this repository's history: a shallow clone
# does not have it, and the upgrade tests cannot run without it.
cm_release_tree() {
    local tree=$1 commit=$2 src
    if ! git -C "$CM_ROOT" cat-file -e "$commit^{commit}" 2>/dev/null; then
        echo "ERROR: commit $commit (a released version the upgrade tests start from) is not in the history of $CM_ROOT" >&2
        echo "HINT: fetch the full history (git fetch --unshallow), or clone without --depth" >&2
        return 1
    fi
    src=$(mktemp -d /tmp/consistency_manager-release.XXXXXX)
    git -C "$CM_ROOT" archive "$commit" | tar -x -C "$src"
    cm_pg_tree "$tree"
    # built against the system's pg_config: a private tree's one reports
    # paths inside that tree, which DESTDIR would then prefix a second time
    local PGBIN=/usr/lib/postgresql/15/bin
    echo "== release $commit:"
    cm_build_install "$tree" "$src"
    rm -rf "$src"
    if [ "$(id -u)" = 0 ]; then chown -R postgres: "$tree"; fi
}

# a directory the postgres user can write to
cm_workdir() {
    local d
    d=$(mktemp -d /tmp/consistency_manager.XXXXXX)
    chmod 755 "$d"
    [ "$(id -u)" = 0 ] && chown postgres: "$d"
    echo "$d"
}

# a TCP port nobody listens on
cm_free_port() {
    python3 - <<'PY' 2>/dev/null || echo $(( 20000 + RANDOM % 20000 ))
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()
PY
}

# cm_start_cluster DIR PORT [extra postgresql.conf lines...]
cm_start_cluster() {
    local dir=$1 port=$2
    shift 2
    as_pg initdb -D "$dir/data" -U postgres -A trust --no-sync >/dev/null
    {
        echo "listen_addresses = '127.0.0.1'"
        echo "port = $port"
        echo "unix_socket_directories = '$dir'"
        echo "fsync = off"
        echo "max_worker_processes = 16"
        for line in "$@"; do echo "$line"; done
    } | as_pg tee -a "$dir/data/postgresql.conf" >/dev/null
    as_pg pg_ctl -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
}

cm_stop_cluster() {
    local dir=$1
    [ -f "$dir/data/postmaster.pid" ] && as_pg pg_ctl -D "$dir/data" -m fast -w stop >/dev/null || true
}
