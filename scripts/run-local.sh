#!/usr/bin/env bash
# Runs the whole thing locally: PostgreSQL, milvus-lite, the sidecar in front of it recording
# into PostgreSQL, and a pymilvus quick start that goes through the sidecar; then shows the
# sidecar's log of those calls and the rows it wrote.
#
#   scripts/run-local.sh           run, show, stop milvus-lite and the sidecar
#   scripts/run-local.sh --keep    leave milvus-lite and the sidecar running afterwards
#   scripts/run-local.sh --stop    stop a stack left running by --keep (and the throwaway
#                                  PostgreSQL cluster in .stack/pg, if one runs)
#
# Everything lives in .stack/ (milvus-lite data, logs, spill file, pid files, and the
# throwaway PostgreSQL cluster when no other server is found).
# PostgreSQL: DATABASE_URL when set (the sidecar records into that very database), else
# database milvus_metadata (created if missing) on the server ensure_postgres finds or starts
# (scripts/lib.sh): 127.0.0.1:5432, else a throwaway cluster in .stack/pg.
# Environment: MILVUS_PORT (19530), SIDECAR_PORT (19538), SIDECAR_ADMIN_PORT (9531),
# DATABASE_URL, SIDECAR_DATABASE (milvus_metadata), MILVUS_SIDECAR_ROOT_PASSWORD (Milvus:
# the password of the admin `root` the sidecar creates in a fresh database), MILVUS_TOKEN
# (root:<that password>: the user:password the quick start calls as),
# RUST_LOG (default info,milvus_sidecar::call=debug: one log line per forwarded call).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

MILVUS_PORT="${MILVUS_PORT:-19530}"
SIDECAR_PORT="${SIDECAR_PORT:-19538}"
SIDECAR_ADMIN_PORT="${SIDECAR_ADMIN_PORT:-9531}"
SIDECAR_DATABASE="${SIDECAR_DATABASE:-milvus_metadata}"
# The sidecar checks every caller against the users in its database; on a fresh database it
# creates the admin `root` with MILVUS_SIDECAR_ROOT_PASSWORD (default Milvus, as Milvus does).
export MILVUS_TOKEN="${MILVUS_TOKEN:-root:${MILVUS_SIDECAR_ROOT_PASSWORD:-Milvus}}"
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

# psql on the sidecar's database, aligned output, no pager.
psql_sidecar() {
    "$(pg_tool psql)" "$SIDECAR_DATABASE_URL" -X -q -P pager=off -v ON_ERROR_STOP=1 "$@"
}

# Print what the sidecar wrote during this run (rows since $1, a timestamp).
show_recorded_rows() {
    local since="$1" calls="$2" deadline=$((SECONDS + 10)) rows
    # Rows are written asynchronously (batches every ~20 ms): wait for one per logged call.
    while true; do
        rows="$(psql_sidecar -At -v since="$since" <<'SQL'
SELECT count(*) FROM performance_metrics WHERE recorded_at >= :'since'
SQL
)"
        if ((rows >= calls)) || ((SECONDS >= deadline)); then
            break
        fi
        sleep 0.2
    done
    log "the sidecar wrote $rows performance_metrics rows for the $calls calls; by operation:"
    psql_sidecar -v since="$since" <<'SQL' | sed 's/^/    /'
SELECT operation_type, count(*) AS calls, count(*) FILTER (WHERE NOT success) AS failed,
       round(avg(duration_ms)::numeric, 2) AS avg_ms, round(max(duration_ms)::numeric, 2) AS max_ms
FROM performance_metrics WHERE recorded_at >= :'since'
GROUP BY operation_type ORDER BY min(recorded_at);
SQL
    log "query_logs (one row per search or query):"
    psql_sidecar -v since="$since" <<'SQL' | sed 's/^/    /'
SELECT q.executed_at::time(3) AS at, q.username, c.collection_name, q.query_type, q.nq, q.top_k,
       q.result_count, q.filter_expression, round(q.duration_ms::numeric, 2) AS ms, q.success
FROM query_logs q LEFT JOIN collections c ON c.id = q.collection_id
WHERE q.executed_at >= :'since' ORDER BY q.executed_at;
SQL
    log "audit_logs (every state change):"
    psql_sidecar -v since="$since" <<'SQL' | sed 's/^/    /'
SELECT occurred_at::time(3) AS at, username, action, resource_type, resource_id, success,
       host(ip_address) AS ip
FROM audit_logs WHERE occurred_at >= :'since' ORDER BY occurred_at;
SQL
}

KEEP=0
case "${1:-}" in
"") ;;
--keep) KEEP=1 ;;
--stop)
    stop_kept_stack
    stop_stack_postgres
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

ensure_postgres >/dev/null
if [[ -n "${DATABASE_URL:-}" ]]; then
    SIDECAR_DATABASE_URL="$DATABASE_URL"
    log "PostgreSQL: recording into DATABASE_URL ($(pg_url_for_display "$DATABASE_URL"))"
else
    create_database "$SIDECAR_DATABASE"
    SIDECAR_DATABASE_URL="$(database_url "$SIDECAR_DATABASE")"
    log "PostgreSQL: $PG_SOURCE; recording into database $SIDECAR_DATABASE ($(pg_url_for_display "$SIDECAR_DATABASE_URL"))"
fi

install_cleanup_trap
if ((KEEP)); then
    LIB_DETACH="nohup" # survive the terminal closing after this script exits
fi

mkdir -p "$STACK_DIR"
log "starting milvus-lite on 127.0.0.1:$MILVUS_PORT (data in .stack/milvus-data, log .stack/milvus-lite.log)"
start_milvus_lite "$STACK_DIR/milvus-data" "$MILVUS_PORT" "$STACK_DIR/milvus-lite.log"
log "milvus-lite is up (pid $MILVUS_LITE_PID)"

log "starting the sidecar on 127.0.0.1:$SIDECAR_PORT, admin on 127.0.0.1:$SIDECAR_ADMIN_PORT (log .stack/sidecar.log)"
start_sidecar "$SIDECAR_PORT" "$MILVUS_PORT" "$SIDECAR_ADMIN_PORT" "$STACK_DIR/sidecar.log" \
    "$SIDECAR_DATABASE_URL" "$STACK_DIR/sidecar-spill"
log "sidecar is up (pid $SIDECAR_PID); /readyz answers $(http_status "http://127.0.0.1:$SIDECAR_ADMIN_PORT/readyz")"

log "running scripts/quickstart.py through the sidecar (as user ${MILVUS_TOKEN%%:*})"
echo
calls_before="$(grep -c 'milvus_sidecar::call' "$STACK_DIR/sidecar.log" || true)"
since="$(psql_sidecar -At -c 'SELECT now()')"
"$VENV_PYTHON" scripts/quickstart.py "http://127.0.0.1:$SIDECAR_PORT"
echo

calls="$(grep -c 'milvus_sidecar::call' "$STACK_DIR/sidecar.log" || true)"
log "the sidecar logged $calls forwarded calls; the last lines of .stack/sidecar.log:"
tail -n 25 "$STACK_DIR/sidecar.log" | sed 's/^/    /'
echo
show_recorded_rows "$since" $((calls - calls_before))
echo

if ((KEEP)); then
    printf '%s milvus-lite %s\n%s milvus-sidecar %s\n' \
        "$MILVUS_LITE_PID" "$MILVUS_LITE_BIN" "$SIDECAR_PID" "$SIDECAR_BIN" >"$PID_FILE"
    forget_pids # the EXIT trap now leaves them running
    cat <<EOF
The stack is still running:
  sidecar     127.0.0.1:$SIDECAR_PORT   (pid $SIDECAR_PID)   MilvusClient(uri="http://127.0.0.1:$SIDECAR_PORT", token="${MILVUS_TOKEN%%:*}:...")
  admin       http://127.0.0.1:$SIDECAR_ADMIN_PORT/healthz  and  /readyz
  milvus-lite 127.0.0.1:$MILVUS_PORT   (pid $MILVUS_LITE_PID)   direct, bypassing the sidecar
  logs        .stack/sidecar.log  .stack/milvus-lite.log
  records     $(pg_url_for_display "$SIDECAR_DATABASE_URL")   ($PG_SOURCE)
Try:   MILVUS_TOKEN='${MILVUS_TOKEN%%:*}:...' .venv/bin/python scripts/quickstart.py http://127.0.0.1:$SIDECAR_PORT
       psql '$(pg_url_for_display "$SIDECAR_DATABASE_URL")' -c 'SELECT * FROM query_logs'
Stop:  scripts/run-local.sh --stop
EOF
else
    log "stopping the stack"
    cleanup_all
    log "done"
fi
