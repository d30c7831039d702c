#!/usr/bin/env bash
# Runs the whole thing locally: milvus-lite, the sidecar in front of it, and a pymilvus quick
# start that goes through the sidecar; then shows the sidecar's log of those calls.
#
#   scripts/run-local.sh           run, show, stop everything
#   scripts/run-local.sh --keep    leave milvus-lite and the sidecar running afterwards
#   scripts/run-local.sh --stop    stop a stack left running by --keep
#
# Everything lives in .stack/ (milvus-lite data, logs, pid files).
# Environment: MILVUS_PORT (19530), SIDECAR_PORT (19538), SIDECAR_ADMIN_PORT (9531),
# RUST_LOG (default info,milvus_sidecar::call=debug: one log line per forwarded call).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

MILVUS_PORT="${MILVUS_PORT:-19530}"
SIDECAR_PORT="${SIDECAR_PORT:-19538}"
SIDECAR_ADMIN_PORT="${SIDECAR_ADMIN_PORT:-9531}"
export RUST_LOG="${RUST_LOG:-info,milvus_sidecar::call=debug}"
STACK_DIR="$REPO_ROOT/.stack"
PID_FILE="$STACK_DIR/pids"

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

# Stop the processes recorded in .stack/pids by a --keep run, sidecar first.
stop_kept_stack() {
    if [[ ! -s "$PID_FILE" ]]; then
        log "no stack recorded in $PID_FILE; nothing to stop"
        return 0
    fi
    local pid name bin cmdline
    # Lines are "pid name binary", milvus-lite first; stop them in reverse order.
    while read -r pid name bin; do
        cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
        # Only signal a pid that still runs the binary we started (pids get reused).
        if [[ -n "$bin" && "$cmdline" == *"$bin"* ]]; then
            stop_pid "$pid" "$name" || true
            log "stopped $name (pid $pid)"
        else
            log "$name (pid $pid) is not running"
        fi
    done < <(tac "$PID_FILE")
    rm -f "$PID_FILE"
}

KEEP=0
case "${1:-}" in
"") ;;
--keep) KEEP=1 ;;
--stop)
    stop_kept_stack
    exit 0
    ;;
-h | --help)
    usage
    exit 0
    ;;
*)
    usage >&2
    exit 2
    ;;
esac

if [[ -s "$PID_FILE" ]]; then
    die "a stack from 'run-local.sh --keep' may still be running ($PID_FILE); stop it with scripts/run-local.sh --stop"
fi

log "setup"
scripts/setup.sh

log "cargo build --release"
cargo build --release

install_cleanup_trap
if ((KEEP)); then
    LIB_DETACH="nohup" # survive the terminal closing after this script exits
fi

mkdir -p "$STACK_DIR"
log "starting milvus-lite on 127.0.0.1:$MILVUS_PORT (data in .stack/milvus-data, log .stack/milvus-lite.log)"
start_milvus_lite "$STACK_DIR/milvus-data" "$MILVUS_PORT" "$STACK_DIR/milvus-lite.log"
log "milvus-lite is up (pid $MILVUS_LITE_PID)"

log "starting the sidecar on 127.0.0.1:$SIDECAR_PORT, admin on 127.0.0.1:$SIDECAR_ADMIN_PORT (log .stack/sidecar.log)"
start_sidecar "$SIDECAR_PORT" "$MILVUS_PORT" "$SIDECAR_ADMIN_PORT" "$STACK_DIR/sidecar.log"
log "sidecar is up (pid $SIDECAR_PID); /readyz answers $(http_status "http://127.0.0.1:$SIDECAR_ADMIN_PORT/readyz")"

log "running scripts/quickstart.py through the sidecar"
echo
"$VENV_PYTHON" scripts/quickstart.py "http://127.0.0.1:$SIDECAR_PORT"
echo

calls="$(grep -c 'milvus_sidecar::call' "$STACK_DIR/sidecar.log" || true)"
log "the sidecar logged $calls forwarded calls; the last lines of .stack/sidecar.log:"
tail -n 25 "$STACK_DIR/sidecar.log" | sed 's/^/    /'
echo

if ((KEEP)); then
    printf '%s milvus-lite %s\n%s milvus-sidecar %s\n' \
        "$MILVUS_LITE_PID" "$MILVUS_LITE_BIN" "$SIDECAR_PID" "$SIDECAR_BIN" >"$PID_FILE"
    forget_pids # the EXIT trap now leaves them running
    cat <<EOF
The stack is still running:
  sidecar     127.0.0.1:$SIDECAR_PORT   (pid $SIDECAR_PID)   MilvusClient(uri="http://127.0.0.1:$SIDECAR_PORT")
  admin       http://127.0.0.1:$SIDECAR_ADMIN_PORT/healthz  and  /readyz
  milvus-lite 127.0.0.1:$MILVUS_PORT   (pid $MILVUS_LITE_PID)   direct, bypassing the sidecar
  logs        .stack/sidecar.log  .stack/milvus-lite.log
Try:   .venv/bin/python scripts/quickstart.py http://127.0.0.1:$SIDECAR_PORT
Stop:  scripts/run-local.sh --stop
EOF
else
    log "stopping the stack"
    cleanup_all
    log "done"
fi
