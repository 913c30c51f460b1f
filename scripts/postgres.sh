#!/usr/bin/env bash
# A throwaway PostgreSQL server for tests (CI: a clean Debian 12 machine, as root).
#
#   scripts/postgres.sh install          install Debian's postgresql when no initdb is found (apt; needs root)
#   scripts/postgres.sh start DIR PORT   initdb DIR (first time only), start it on 127.0.0.1:PORT, make role and
#                                        database `mua`; prints postgresql+psycopg://mua:secret-pw@127.0.0.1:PORT/mua
#   scripts/postgres.sh stop DIR         stop the server of DIR (nothing to do when it is not running)
#   scripts/postgres.sh url PORT         print the URL only
#
# The server runs as an unprivileged user: the caller, or `postgres` (made by the package) when called as root; DIR
# then belongs to that user and every parent of DIR must be searchable by it (pytest's /tmp/pytest-of-root is not:
# use a directory made by `mktemp -d`). Authentication: 127.0.0.1 requires a password (scram-sha-256) for every
# user; the unix socket in DIR trusts every user, superuser `postgres` included:
#   psql -h DIR -p PORT -U postgres
# Every command is idempotent, quiet on success, and exits non-zero with a message on stderr on failure.
# PG_LIB (default /usr/lib/postgresql) is where the versions' bin/ folders are looked for.
set -euo pipefail

readonly PG_USER=mua PG_PASSWORD=secret-pw PG_DB=mua SUPERUSER=postgres
readonly SYSTEM_USER=postgres # the unprivileged user the server runs as when this script runs as root

die() {
    echo "postgres.sh: $*" >&2
    exit 1
}

usage() {
    die "usage: $0 install | start DIR PORT | stop DIR | url PORT"
}

# The newest /usr/lib/postgresql/*/bin that has initdb, else the directory of an initdb on PATH.
find_bindir() {
    local best
    local f
    best=$(for f in "${PG_LIB:-/usr/lib/postgresql}"/*/bin/initdb; do
        if [[ -x $f ]]; then echo "$f"; fi
    done | sort -V | tail -n1)
    [[ -n $best ]] || best=$(command -v initdb 2>/dev/null) || return 1
    dirname "$(readlink -f "$best")"
}

cmd_install() {
    find_bindir >/dev/null && return 0
    local sudo=()
    if [[ $EUID -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 || die "PostgreSQL is not installed and installing it needs root (or sudo)"
        sudo=(sudo -n)
    fi
    command -v apt-get >/dev/null 2>&1 || die "PostgreSQL is not installed and there is no apt-get to install it"
    local log
    log=$(mktemp)
    # Debian's package makes and starts a cluster `main` on port 5432 unless told not to; tests make their own.
    "${sudo[@]}" mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" | "${sudo[@]}" tee /etc/postgresql-common/createcluster.d/mua-tests.conf \
        >/dev/null
    if ! { "${sudo[@]}" apt-get update -qq &&
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql; } \
        >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        rm -f "$log"
        die "apt-get could not install postgresql (log above)"
    fi
    rm -f "$log"
    find_bindir >/dev/null || die "postgresql installed, but no initdb under ${PG_LIB:-/usr/lib/postgresql}/*/bin"
}

# Runs a command as the server's user, from / (the caller's directory may not be readable by that user).
as_owner() {
    if [[ $EUID -eq 0 ]]; then
        (cd / && runuser -u "$SYSTEM_USER" -- "$@")
    else
        (cd / && "$@")
    fi
}

check_port() {
    [[ $1 =~ ^[0-9]+$ ]] && ((1024 <= $1 && $1 <= 65535)) || die "PORT must be a number in 1024..65535, got '$1'"
}

url() {
    echo "postgresql+psycopg://$PG_USER:$PG_PASSWORD@127.0.0.1:$1/$PG_DB"
}

# Absolute path of DIR without requiring it to exist.
absdir() {
    case $1 in
    /*) echo "${1%/}" ;;
    *) echo "$PWD/${1%/}" ;;
    esac
}

cmd_start() {
    local dir port bindir
    dir=$(absdir "$1")
    port=$2
    check_port "$port"
    [[ $dir != *[\'\"\\\ ]* ]] || die "DIR must not contain quotes, backslashes or spaces: $dir"
    # the socket path is DIR/.s.PGSQL.PORT and must fit in sun_path (107 bytes)
    ((${#dir} + 18 <= 107)) || die "DIR is too long for a unix socket path (${#dir} chars, at most 89): $dir"
    bindir=$(find_bindir) || die "no initdb found: run '$0 install' first"

    if [[ $EUID -eq 0 ]]; then
        id -u "$SYSTEM_USER" >/dev/null 2>&1 || die "running as root needs the system user '$SYSTEM_USER'"
    fi
    mkdir -p "$dir"
    if [[ ! -f $dir/PG_VERSION ]] && [[ -n $(ls -A "$dir") ]]; then
        die "DIR is neither empty nor a PostgreSQL data directory: $dir"
    fi
    if [[ $EUID -eq 0 ]] && [[ $(stat -c %U "$dir") != "$SYSTEM_USER" ]]; then
        [[ -f $dir/PG_VERSION ]] && die "data directory $dir belongs to $(stat -c %U "$dir"), not $SYSTEM_USER"
        chown "$SYSTEM_USER:" "$dir"
    fi
    chmod 700 "$dir"
    as_owner test -w "$dir" ||
        die "user $(as_owner id -un) cannot write $dir (a parent directory is not searchable by it?" \
            "pytest's /tmp/pytest-of-root is mode 700; use a directory made by mktemp -d)"

    if [[ ! -f $dir/PG_VERSION ]]; then
        local out
        # C locale: a minimal Debian has no other locales
        if ! out=$(as_owner "$bindir/initdb" -D "$dir" -U "$SUPERUSER" -E UTF8 --locale=C --no-sync \
            --auth-local=trust --auth-host=scram-sha-256 2>&1); then
            echo "$out" >&2
            die "initdb $dir failed"
        fi
        as_owner sh -c "cat > '$dir/pg_hba.conf'" <<EOF
# written by scripts/postgres.sh: the socket (inside this directory) trusts every user; TCP needs a password
local all all trust
host  all all 127.0.0.1/32 scram-sha-256
EOF
        as_owner sh -c "echo \"include_if_exists 'mua-tests.conf'\" >> '$dir/postgresql.conf'"
    fi
    if as_owner "$bindir/pg_ctl" status -D "$dir" >/dev/null 2>&1; then
        local running
        running=$(sed -n 4p "$dir/postmaster.pid")
        [[ $running == "$port" ]] || die "the server of $dir already runs on port $running, not $port: stop it first"
    else
        # Written at every start, so that a second start with another PORT takes it. Durability is not needed by tests.
        as_owner sh -c "cat > '$dir/mua-tests.conf'" <<EOF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
max_connections = 200
password_encryption = 'scram-sha-256'
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
        if ! as_owner "$bindir/pg_ctl" start -D "$dir" -l "$dir/server.log" -w -t 60 -s >/dev/null 2>&1; then
            tail -n 20 "$dir/server.log" >&2 2>/dev/null || true
            die "pg_ctl start failed for $dir on 127.0.0.1:$port (server log above: $dir/server.log)"
        fi
    fi

    local sql out
    sql="SELECT 'CREATE ROLE $PG_USER' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER')\\gexec
ALTER ROLE $PG_USER LOGIN CREATEDB PASSWORD '$PG_PASSWORD';
SELECT 'CREATE DATABASE $PG_DB OWNER $PG_USER'
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$PG_DB')\\gexec"
    if ! out=$(echo "$sql" | as_owner "$bindir/psql" -h "$dir" -p "$port" -U "$SUPERUSER" -d postgres -X -q \
        -v ON_ERROR_STOP=1 2>&1); then
        echo "$out" >&2
        die "could not create role and database '$PG_USER' on $dir"
    fi
    url "$port"
}

cmd_stop() {
    local dir bindir
    dir=$(absdir "$1")
    [[ -f $dir/postmaster.pid ]] || return 0
    bindir=$(find_bindir) || die "no pg_ctl found"
    as_owner "$bindir/pg_ctl" status -D "$dir" >/dev/null 2>&1 || return 0
    as_owner "$bindir/pg_ctl" stop -D "$dir" -m fast -w -t 60 -s || die "pg_ctl stop failed for $dir"
}

case ${1:-} in
install)
    (($# == 1)) || usage
    cmd_install
    ;;
start)
    (($# == 3)) || usage
    cmd_start "$2" "$3"
    ;;
stop)
    (($# == 2)) || usage
    cmd_stop "$2"
    ;;
url)
    (($# == 2)) || usage
    check_port "$2"
    url "$2"
    ;;
*) usage ;;
esac
