#!/usr/bin/env bash
# A throw-away PostgreSQL server for fedq's tests and benchmark, from the
# machine's own packages (Debian: apt-get install postgresql).
#
#   scripts/pg-test-server.sh start DIR   # initdb in DIR, serve on 127.0.0.1:<free port>,
#                                         # print the connection URL on stdout
#   scripts/pg-test-server.sh stop DIR    # stop it (DIR can then be deleted)
#   scripts/pg-test-server.sh ensure      # start (or reuse) one shared server in
#                                         # ${TMPDIR:-/tmp}/fedq-pg-test-$UID, print its URL
#
# Trust authentication on loopback only; fsync off: test data, nothing else.
# Run as root, the server runs as the `postgres` OS user (initdb refuses root).
set -euo pipefail

bindir() {
    if [ -n "${FEDQ_PG_BINDIR:-}" ]; then echo "$FEDQ_PG_BINDIR"; return; fi
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -z "$d" ] && command -v pg_config >/dev/null; then d=$(pg_config --bindir); fi
    if [ -z "$d" ] || [ ! -x "$d/initdb" ]; then
        echo "pg-test-server: PostgreSQL server binaries (initdb, pg_ctl) not found; install them, e.g. 'apt-get install postgresql' (or set FEDQ_PG_BINDIR)" >&2
        exit 3
    fi
    echo "$d"
}

# Runs a command as the server's owner.
as_owner() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

free_port() {
    local p
    for _ in $(seq 1 200); do
        p=$(( 20000 + RANDOM % 40000 ))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
    done
    echo "pg-test-server: no free port found" >&2
    exit 1
}

start() {
    local dir=$1 bin port
    bin=$(bindir)
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [ "$(id -u)" = 0 ]; then
        chown postgres: "$dir"
        if ! runuser -u postgres -- test -x "$dir"; then
            echo "pg-test-server: the postgres user cannot reach $dir; use a directory whose parents are world-searchable (chmod 755)" >&2
            exit 1
        fi
    fi
    as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-locale >"$dir/initdb.log" 2>&1 ||
        { cat "$dir/initdb.log" >&2; exit 1; }
    port=$(free_port)
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
        start >/dev/null 9>&- || { cat "$dir/server.log" >&2; exit 1; }
    echo "$port" >"$dir/port"
    echo "postgres://postgres@127.0.0.1:$port/postgres"
}

stop() {
    local dir=$1 bin
    bin=$(bindir)
    if [ -f "$dir/data/postmaster.pid" ]; then
        as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    fi
}

ensure() {
    local dir="${TMPDIR:-/tmp}/fedq-pg-test-$(id -u)" bin
    bin=$(bindir)
    mkdir -p "$(dirname "$dir")"
    # The server must not inherit the lock (fd 9): pg_ctl runs with it closed.
    exec 9>"$dir.lock"
    flock -w 300 9 || { echo "pg-test-server: $dir.lock is held by another start" >&2; exit 1; }
    if [ -f "$dir/port" ] && as_owner "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        echo "postgres://postgres@127.0.0.1:$(cat "$dir/port")/postgres"
        return
    fi
    rm -rf "$dir"
    start "$dir"
}

case "${1:-}" in
    start) start "${2:?usage: $0 start DIR}" ;;
    stop) stop "${2:?usage: $0 stop DIR}" ;;
    ensure) ensure ;;
    *) echo "usage: $0 start DIR | stop DIR | ensure" >&2; exit 2 ;;
esac
