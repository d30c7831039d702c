# shellcheck shell=bash
# Helpers shared by the scripts in this folder. Source it, do not run it:
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#   install_cleanup_trap          # SIGTERM everything started below on exit, error or Ctrl-C
#   start_milvus_lite "$dir" "$port" "$log"
#   start_sidecar "$listen_port" "$milvus_port" "$admin_port" "$log"
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

# start_sidecar LISTEN_PORT MILVUS_PORT ADMIN_PORT LOG: start the sidecar on 127.0.0.1 in front
# of milvus on 127.0.0.1:MILVUS_PORT and wait for its /healthz; sets SIDECAR_PID.
# RUST_LOG is passed through as set by the caller.
start_sidecar() {
    local port="$1" milvus_port="$2" admin_port="$3" logfile="$4"
    [[ -x "$SIDECAR_BIN" ]] || die "sidecar binary not found at $SIDECAR_BIN (run cargo build --release)"
    local p
    for p in "$port" "$admin_port"; do
        if port_open 127.0.0.1 "$p"; then
            die "port $p on 127.0.0.1 is already in use; cannot start the sidecar there"
        fi
    done
    mkdir -p "$(dirname "$logfile")"
    # shellcheck disable=SC2086
    $LIB_DETACH "$SIDECAR_BIN" serve \
        --listen "127.0.0.1:$port" \
        --upstream "http://127.0.0.1:$milvus_port" \
        --admin-listen "127.0.0.1:$admin_port" \
        >"$logfile" 2>&1 </dev/null &
    SIDECAR_PID=$!
    register_pid "$SIDECAR_PID" milvus-sidecar
    wait_for_http milvus-sidecar "$SIDECAR_PID" "http://127.0.0.1:$admin_port/healthz" \
        "$SIDECAR_START_TIMEOUT" "$logfile"
}
