# shellcheck shell=bash
# Helpers shared by the scripts in this folder. Source it, do not run it:
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#   install_cleanup_trap          # SIGTERM everything started below on exit, error or Ctrl-C
#   start_milvus_lite "$dir" "$port" "$log"
#   start_sidecar "$listen_port" "$milvus_port" "$admin_port" "$log" ["$database_url" "$spill_dir"]
#   ensure_postgres; create_database NAME; database_url NAME     (PostgreSQL, see below)
#
# Every process started through these helpers is remembered; cleanup_all stops them in
# reverse start order (sidecar before milvus-lite, so the sidecar can drain) with SIGTERM,
# and with SIGKILL only if one is still alive after its grace period.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_DIR="${VENV_DIR:-$REPO_ROOT/.venv}"
VENV_PYTHON="$VENV_DIR/bin/python"
MILVUS_LITE_BIN="${MILVUS_LITE_BIN:-$VENV_DIR/bin/milvus-lite}"
SIDECAR_BIN="${SIDECAR_BIN:-$REPO_ROOT/target/release/milvus-sidecar}"

# Seconds to wait for a service to come up, and for one to exit after SIGTERM.
MILVUS_LITE_START_TIMEOUT="${MILVUS_LITE_START_TIMEOUT:-60}"
SIDECAR_START_TIMEOUT="${SIDECAR_START_TIMEOUT:-30}"
STOP_TIMEOUT="${STOP_TIMEOUT:-30}"

# "nohup" when processes must outlive the script (run-local.sh --keep), else empty.
LIB_DETACH="${LIB_DETACH:-}"

_LIB_PIDS=()
_LIB_NAMES=()

log() { printf '==> %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# A system Python for the helpers below (they run before or without the venv).
_lib_python() {
    if [[ -x "$VENV_PYTHON" ]]; then
        printf '%s' "$VENV_PYTHON"
    else
        command -v python3
    fi
}

# Print a TCP port that is free on 127.0.0.1 right now.
free_port() {
    "$(_lib_python)" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

# Succeeds when something accepts TCP connections on HOST:PORT.
port_open() {
    local host="$1" port="$2"
    "$(_lib_python)" -c 'import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=0.5).close()
except OSError:
    sys.exit(1)' "$host" "$port"
}

# Print the HTTP status of a GET on URL, or 000 when nothing answers.
http_status() {
    "$(_lib_python)" -c 'import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")' "$1"
}

# Print the last lines of a log file, indented, to stderr.
show_log_tail() {
    local file="$1" lines="${2:-40}"
    if [[ -s "$file" ]]; then
        printf -- '---- last %s lines of %s ----\n' "$lines" "$file" >&2
        tail -n "$lines" "$file" | sed 's/^/    /' >&2
        printf -- '---- end of %s ----\n' "$file" >&2
    else
        printf '(%s is empty or missing)\n' "$file" >&2
    fi
}

# Print the one-letter state (R, S, Z, ...) of PID from /proc, or nothing.
_proc_state() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
    stat="${stat##*) }"
    printf '%s' "${stat%% *}"
}

register_pid() {
    _LIB_PIDS+=("$1")
    _LIB_NAMES+=("$2")
}

# Forget every registered process without stopping it (run-local.sh --keep).
forget_pids() {
    _LIB_PIDS=()
    _LIB_NAMES=()
}

# stop_pid PID NAME [TIMEOUT]: SIGTERM, wait up to TIMEOUT seconds, then SIGKILL.
# Returns the process's exit status when it is our child, else 0 (or 137 when killed).
stop_pid() {
    local pid="$1" name="$2" timeout="${3:-$STOP_TIMEOUT}" waited=0 status=0
    if ! kill -0 "$pid" 2>/dev/null; then
        wait "$pid" 2>/dev/null || status=$?
        return "$status"
    fi
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do
        # A zombie child answers kill -0 until reaped; `wait` below reaps it.
        if [[ "$(_proc_state "$pid")" == Z ]]; then
            break
        fi
        if ((waited >= timeout * 10)); then
            warn "$name (pid $pid) still running ${timeout}s after SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
            return 137
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    wait "$pid" 2>/dev/null || status=$?
    # Not our child: `wait` fails with 127; the process is gone, which is what we wanted.
    if ((status == 127)); then
        status=0
    fi
    return "$status"
}

# Stop every registered process, newest first.
cleanup_all() {
    local i pid name status
    for ((i = ${#_LIB_PIDS[@]} - 1; i >= 0; i--)); do
        pid="${_LIB_PIDS[$i]}"
        name="${_LIB_NAMES[$i]}"
        status=0
        stop_pid "$pid" "$name" || status=$?
        if ((status == 0)); then
            log "stopped $name (pid $pid)"
        elif ((status == 143)); then
            log "stopped $name (pid $pid; it ended on SIGTERM without a handler)"
        else
            warn "$name (pid $pid) exited with status $status"
        fi
    done
    forget_pids
}

install_cleanup_trap() {
    trap 'cleanup_all' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# wait_for_port NAME PID HOST PORT TIMEOUT LOG: wait until HOST:PORT accepts connections.
wait_for_port() {
    local name="$1" pid="$2" host="$3" port="$4" timeout="$5" logfile="$6"
    local deadline=$((SECONDS + timeout))
    until port_open "$host" "$port"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            show_log_tail "$logfile"
            die "$name (pid $pid) exited before listening on $host:$port (log: $logfile)"
        fi
        if ((SECONDS >= deadline)); then
            show_log_tail "$logfile"
            die "$name (pid $pid) is not listening on $host:$port after ${timeout}s (log: $logfile)"
        fi
        sleep 0.1
    done
}

# wait_for_http NAME PID URL TIMEOUT LOG: wait until URL answers 200.
wait_for_http() {
    local name="$1" pid="$2" url="$3" timeout="$4" logfile="$5"
    local deadline=$((SECONDS + timeout)) code
    while true; do
        code="$(http_status "$url")"
        [[ "$code" == 200 ]] && return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            show_log_tail "$logfile"
            die "$name (pid $pid) exited before $url answered (log: $logfile)"
        fi
        if ((SECONDS >= deadline)); then
            show_log_tail "$logfile"
            die "$name: $url answered $code, not 200, after ${timeout}s (log: $logfile)"
        fi
        sleep 0.1
    done
}

# start_milvus_lite DATA_DIR PORT LOG: start milvus-lite on 127.0.0.1:PORT; sets MILVUS_LITE_PID.
start_milvus_lite() {
    local data_dir="$1" port="$2" logfile="$3"
    [[ -x "$MILVUS_LITE_BIN" ]] || die "milvus-lite not found at $MILVUS_LITE_BIN (run scripts/setup.sh)"
    if port_open 127.0.0.1 "$port"; then
        die "port $port on 127.0.0.1 is already in use; cannot start milvus-lite there"
    fi
    mkdir -p "$data_dir" "$(dirname "$logfile")"
    # $LIB_DETACH is either empty or "nohup": word splitting is intended.
    # shellcheck disable=SC2086
    $LIB_DETACH "$MILVUS_LITE_BIN" server --data-dir "$data_dir" --host 127.0.0.1 --port "$port" \
        >"$logfile" 2>&1 </dev/null &
    MILVUS_LITE_PID=$!
    register_pid "$MILVUS_LITE_PID" milvus-lite
    wait_for_port milvus-lite "$MILVUS_LITE_PID" 127.0.0.1 "$port" "$MILVUS_LITE_START_TIMEOUT" "$logfile"
}

# start_sidecar LISTEN_PORT MILVUS_PORT ADMIN_PORT LOG [DATABASE_URL SPILL_DIR]: start the
# sidecar on 127.0.0.1 in front of milvus on 127.0.0.1:MILVUS_PORT and wait for its /healthz;
# sets SIDECAR_PID. With DATABASE_URL it records there (migrating the database at start-up,
# spill file in SPILL_DIR); without, it runs with --no-recording. RUST_LOG is passed through
# as set by the caller.
start_sidecar() {
    local port="$1" milvus_port="$2" admin_port="$3" logfile="$4" database_url="${5:-}" spill_dir="${6:-}"
    [[ -x "$SIDECAR_BIN" ]] || die "sidecar binary not found at $SIDECAR_BIN (run cargo build --release)"
    local p
    for p in "$port" "$admin_port"; do
        if port_open 127.0.0.1 "$p"; then
            die "port $p on 127.0.0.1 is already in use; cannot start the sidecar there"
        fi
    done
    local recording=(--no-recording)
    if [[ -n "$database_url" ]]; then
        recording=(--database-url "$database_url" --spill-dir "${spill_dir:-$(dirname "$logfile")/sidecar-spill}")
    fi
    mkdir -p "$(dirname "$logfile")"
    # shellcheck disable=SC2086
    $LIB_DETACH "$SIDECAR_BIN" serve \
        --listen "127.0.0.1:$port" \
        --upstream "http://127.0.0.1:$milvus_port" \
        --admin-listen "127.0.0.1:$admin_port" \
        "${recording[@]}" \
        >"$logfile" 2>&1 </dev/null &
    SIDECAR_PID=$!
    register_pid "$SIDECAR_PID" milvus-sidecar
    wait_for_http milvus-sidecar "$SIDECAR_PID" "http://127.0.0.1:$admin_port/healthz" \
        "$SIDECAR_START_TIMEOUT" "$logfile"
}

# ---------------------------------------------------------------- PostgreSQL
#
#   ensure_postgres           find or start a PostgreSQL server; sets and exports PG_ADMIN_URL
#                             (a superuser/CREATEDB URL to a maintenance database) and PG_SOURCE
#   pg_admin_url              print that URL (runs ensure_postgres)
#   database_url NAME         the URL of database NAME on the same server
#   create_database NAME      create NAME unless it exists
#   drop_database NAME        drop NAME if it exists (closing its connections)
#   psql_admin ARGS...        psql on PG_ADMIN_URL, stopping at the first error
#   stop_stack_postgres       stop the throwaway cluster, if one runs
#
# Where the server comes from, first match wins:
#   1. DATABASE_URL, when set: used as given (its user needs CREATEDB for the tests);
#   2. a server answering on $PG_PROBE_HOST:$PG_PROBE_PORT (127.0.0.1:5432) that lets
#      `postgres` in without a password (trust auth, as on this project's machines);
#   3. a throwaway cluster in $PG_STACK_DIR (.stack/pg): initdb with trust auth, listening on
#      127.0.0.1:$PG_STACK_PORT (55432, or a free port when that one is taken), started with
#      pg_ctl as the `postgres` user when run as root. Debian's `postgresql` package is
#      installed first when no initdb exists under /usr/lib/postgresql/*/bin.

PG_PROBE_HOST="${PG_PROBE_HOST:-127.0.0.1}"
PG_PROBE_PORT="${PG_PROBE_PORT:-5432}"
PG_STACK_DIR="${PG_STACK_DIR:-$REPO_ROOT/.stack/pg}"
PG_STACK_PORT="${PG_STACK_PORT:-55432}"
PG_START_TIMEOUT="${PG_START_TIMEOUT:-60}"

_LIB_APT_UPDATED=0

# apt_install PACKAGE...: install Debian packages (apt-get update once per script run).
apt_install() {
    command -v apt-get >/dev/null || die "apt-get not found: install $* by hand"
    local sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || die "need root (or sudo) to install $*"
        sudo=(sudo)
    fi
    local apt_log="${TMPDIR:-/tmp}/milvus-sidecar-apt.log"
    if ((!_LIB_APT_UPDATED)); then
        log "apt-get update"
        "${sudo[@]}" apt-get update >"$apt_log" 2>&1 || {
            show_log_tail "$apt_log" 20
            die "apt-get update failed"
        }
        _LIB_APT_UPDATED=1
    fi
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends "$@" \
        >>"$apt_log" 2>&1 || {
        show_log_tail "$apt_log" 30
        die "apt-get install $* failed (log: $apt_log)"
    }
}

# Print the newest /usr/lib/postgresql/*/bin that has initdb; fail when there is none.
pg_bin_dir() {
    local dir
    while read -r dir; do
        if [[ -x "$dir/initdb" ]]; then
            printf '%s' "$dir"
            return 0
        fi
    done < <(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r)
    return 1
}

# Print the path of PostgreSQL tool NAME (psql, pg_isready, ...): PATH first, then pg_bin_dir.
pg_tool() {
    local dir
    if command -v "$1" >/dev/null; then
        command -v "$1"
    elif dir="$(pg_bin_dir)" && [[ -x "$dir/$1" ]]; then
        printf '%s' "$dir/$1"
    else
        return 1
    fi
}

# Make sure psql and pg_isready exist (Debian's postgresql-client when they do not).
ensure_pg_client() {
    if ! pg_tool psql >/dev/null || ! pg_tool pg_isready >/dev/null; then
        apt_install postgresql-client
    fi
}

# pg_answers HOST PORT: succeeds when a PostgreSQL server accepts connections there.
pg_answers() {
    local isready
    if isready="$(pg_tool pg_isready)"; then
        "$isready" -h "$1" -p "$2" -t 3 -q
    else
        port_open "$1" "$2"
    fi
}

# pg_can_admin URL: succeeds when URL logs in and its user may create databases.
pg_can_admin() {
    local out
    out="$("$(pg_tool psql)" "$1" -X -At -v ON_ERROR_STOP=1 \
        -c 'SELECT rolsuper OR rolcreatedb FROM pg_roles WHERE rolname = current_user' 2>/dev/null)" &&
        [[ "$out" == t ]]
}

# pg_url_with_db URL NAME: URL with its database replaced by NAME (URL or key=value form).
pg_url_with_db() {
    "$(_lib_python)" - "$1" "$2" <<'PY'
import sys
from urllib.parse import quote, urlsplit, urlunsplit
url, name = sys.argv[1], sys.argv[2]
if url.startswith(("postgres://", "postgresql://")):
    parts = urlsplit(url)
    print(urlunsplit(parts._replace(path="/" + quote(name, safe=""))))
else:  # key=value conninfo: a later key wins
    print(f"{url} dbname='{name}'")
PY
}

# Print a URL with its password masked, for messages.
pg_url_for_display() {
    printf '%s' "$1" | sed -E 's#(://[^:/@]*):[^@]*@#\1:***@#; s#(password=)[^ ]*#\1***#'
}

# The directory of the throwaway cluster. Run as root, the cluster runs as `postgres`, which
# must be able to reach the directory; when it cannot (a repo under /root, say), a directory
# in /tmp named after the repo is used instead.
_pg_stack_dir() {
    local existing="$PG_STACK_DIR"
    while [[ ! -d "$existing" ]]; do
        existing="$(dirname "$existing")"
    done
    if ((EUID == 0)) && ! runuser -u postgres -- test -x "$existing" 2>/dev/null; then
        printf '%s/milvus-sidecar-pg-%s' "${TMPDIR:-/tmp}" "$(printf '%s' "$REPO_ROOT" | cksum | cut -d' ' -f1)"
    else
        printf '%s' "$PG_STACK_DIR"
    fi
}

# Run a command as the cluster's owner (postgres when we are root), from inside its directory.
_pg_as_owner() {
    local dir="$1"
    shift
    if ((EUID == 0)); then
        (cd "$dir" && runuser -u postgres -- "$@")
    else
        (cd "$dir" && "$@")
    fi
}

# Start (or find running) the throwaway cluster; sets PG_ADMIN_URL.
start_stack_postgres() {
    local bindir dir port
    if ! bindir="$(pg_bin_dir)"; then
        apt_install postgresql
        bindir="$(pg_bin_dir)" || die "installed postgresql but found no initdb under /usr/lib/postgresql/*/bin"
    fi
    if ((EUID == 0)) && ! id -u postgres >/dev/null 2>&1; then
        log "creating the system user postgres (initdb refuses to run as root)"
        useradd --system --user-group --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin postgres
    fi
    dir="$(_pg_stack_dir)"
    mkdir -p "$dir"
    if ((EUID == 0)); then
        chown postgres: "$dir"
    fi
    chmod 700 "$dir"

    if [[ ! -s "$dir/data/PG_VERSION" ]]; then
        log "initdb: a throwaway PostgreSQL cluster in $dir/data (trust auth, superuser postgres)"
        rm -rf "$dir/data"
        _pg_as_owner "$dir" "$bindir/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-locale \
            >"$dir/initdb.log" 2>&1 || {
            show_log_tail "$dir/initdb.log" 30
            die "initdb failed (log: $dir/initdb.log)"
        }
    fi

    port="$(cat "$dir/port" 2>/dev/null || true)"
    if [[ -n "$port" ]] && _pg_as_owner "$dir" "$bindir/pg_ctl" -D "$dir/data" status >/dev/null 2>&1 &&
        pg_answers 127.0.0.1 "$port"; then
        PG_SOURCE="throwaway cluster in $dir (127.0.0.1:$port, already running)"
    else
        # Stale after a crash or reboot: pg_ctl start copes with a leftover postmaster.pid.
        port="$PG_STACK_PORT"
        if port_open 127.0.0.1 "$port"; then
            port="$(free_port)"
        fi
        printf '%s\n' "$port" >"$dir/port"
        log "starting the throwaway cluster on 127.0.0.1:$port (log $dir/postgres.log)"
        _pg_as_owner "$dir" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t "$PG_START_TIMEOUT" \
            -o "-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories='$dir'" start \
            >"$dir/pg_ctl.log" 2>&1 || {
            show_log_tail "$dir/postgres.log" 30
            die "pg_ctl start failed (logs: $dir/pg_ctl.log, $dir/postgres.log)"
        }
        PG_SOURCE="throwaway cluster in $dir (127.0.0.1:$port, started now)"
    fi
    PG_ADMIN_URL="postgresql://postgres@127.0.0.1:$port/postgres"
}

# Stop the throwaway cluster if it runs; a no-op otherwise.
stop_stack_postgres() {
    local bindir dir
    dir="$(_pg_stack_dir)"
    [[ -s "$dir/data/postmaster.pid" ]] || return 0
    bindir="$(pg_bin_dir)" || return 0
    if _pg_as_owner "$dir" "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1; then
        log "stopped the throwaway PostgreSQL cluster in $dir"
    fi
}

ensure_postgres() {
    ensure_pg_client
    if [[ -n "${DATABASE_URL:-}" ]]; then
        PG_ADMIN_URL="$DATABASE_URL"
        PG_SOURCE="DATABASE_URL"
        if ! "$(pg_tool psql)" "$PG_ADMIN_URL" -X -At -c 'SELECT 1' >/dev/null; then
            die "cannot connect with DATABASE_URL ($(pg_url_for_display "$DATABASE_URL"))"
        fi
        pg_can_admin "$PG_ADMIN_URL" ||
            warn "the DATABASE_URL user may not create databases: tests that need their own database will fail"
    elif pg_answers "$PG_PROBE_HOST" "$PG_PROBE_PORT" &&
        pg_can_admin "postgresql://postgres@$PG_PROBE_HOST:$PG_PROBE_PORT/postgres"; then
        PG_ADMIN_URL="postgresql://postgres@$PG_PROBE_HOST:$PG_PROBE_PORT/postgres"
        PG_SOURCE="server on $PG_PROBE_HOST:$PG_PROBE_PORT"
    else
        if pg_answers "$PG_PROBE_HOST" "$PG_PROBE_PORT"; then
            warn "a PostgreSQL server answers on $PG_PROBE_HOST:$PG_PROBE_PORT but user postgres cannot log in" \
                "without a password there; using a throwaway cluster instead (or set DATABASE_URL)"
        fi
        start_stack_postgres
    fi
    export PG_ADMIN_URL PG_SOURCE
}

pg_admin_url() {
    ensure_postgres >&2
    printf '%s\n' "$PG_ADMIN_URL"
}

database_url() {
    [[ -n "${PG_ADMIN_URL:-}" ]] || ensure_postgres
    pg_url_with_db "$PG_ADMIN_URL" "$1"
}

psql_admin() {
    [[ -n "${PG_ADMIN_URL:-}" ]] || ensure_postgres
    "$(pg_tool psql)" "$PG_ADMIN_URL" -X -q -v ON_ERROR_STOP=1 "$@"
}

create_database() {
    psql_admin -v db="$1" <<'SQL'
SELECT format('CREATE DATABASE %I', :'db')
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db') \gexec
SQL
}

drop_database() {
    psql_admin -v db="$1" <<'SQL'
DROP DATABASE IF EXISTS :"db" WITH (FORCE);
SQL
}

# Exit 0 only when every pinned `name==version` given is installed in .venv at exactly that
# version (`pkg[binary]` counts as pkg and pkg-binary, as psycopg[binary] installs both).
pinned_installed() {
    "$VENV_PYTHON" - "$@" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    names = [name]
    if name.endswith("[binary]"):
        base = name[: -len("[binary]")]
        names = [base, base + "-binary"]
    for name in names:
        try:
            if version(name) != want:
                sys.exit(1)
        except PackageNotFoundError:
            sys.exit(1)
EOF
}
