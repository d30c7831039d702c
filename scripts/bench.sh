#!/usr/bin/env bash
# Runs the side-by-side benchmark of issue 6 (benches/passthrough.rs): direct, milvus-sidecar
# (authentication, permission check and recording on), milvus-sidecar with recording off, and
# nginx as a plain gRPC pass-through, in front of a fast fake Milvus and (when scripts/setup.sh
# has installed it) milvus-lite; then the record writer's throughput on a backlog.
#
#   scripts/bench.sh              the full run (3 rounds of 5 s per target and scenario)
#   scripts/bench.sh --quick      a smoke run (1 round of 1 s)
#   scripts/bench.sh --rounds 5 --secs 10 --scenarios search-c1,search-c32
#
# Arguments go to the bench (see the comment at the top of benches/passthrough.rs).
# It installs Debian's nginx (nginx-light, else nginx) when no nginx binary is found — the bench
# starts it itself, as the current user with a config file of its own, never as a service; runs
# scripts/setup.sh (Rust check, .venv with milvus-lite, PostgreSQL: see ensure_postgres in
# lib.sh) unless BENCH_SKIP_SETUP=1; creates a fresh database BENCH_DATABASE
# (milvus_sidecar_bench, dropped first) on that PostgreSQL for the sidecar to record into —
# or uses DATABASE_URL as given when it is set; and runs `cargo bench --bench passthrough`.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

BENCH_DATABASE="${BENCH_DATABASE:-milvus_sidecar_bench}"

# Prints the nginx binary the bench will use, installing Debian's package when there is none.
ensure_nginx() {
    local bin
    for bin in "${BENCH_NGINX_BIN:-}" "$(command -v nginx || true)" /usr/sbin/nginx; do
        if [[ -n "$bin" && -x "$bin" ]]; then
            printf '%s\n' "$bin"
            return 0
        fi
    done
    # nginx-light has grpc_pass and http2 and little else; fall back to the full package.
    apt_install nginx-light >&2 || apt_install nginx >&2
    # Debian's postinst may start the system service (where an init system runs); the bench
    # needs none of it, and never touches it.
    [[ -x /usr/sbin/nginx ]] || die "nginx was installed but /usr/sbin/nginx is missing"
    printf '%s\n' /usr/sbin/nginx
}

BENCH_NGINX_BIN="$(ensure_nginx)"
export BENCH_NGINX_BIN
log "nginx: $BENCH_NGINX_BIN ($("$BENCH_NGINX_BIN" -v 2>&1))"

if [[ "${BENCH_SKIP_SETUP:-0}" != 1 ]]; then
    scripts/setup.sh
fi
if [[ -x "$MILVUS_LITE_BIN" ]]; then
    export MILVUS_LITE_BIN
else
    warn "no milvus-lite at $MILVUS_LITE_BIN: the milvus-lite scenario is skipped (run scripts/setup.sh)"
fi

if [[ -z "${DATABASE_URL:-}" ]]; then
    ensure_postgres
    log "PostgreSQL: $PG_SOURCE; fresh database $BENCH_DATABASE"
    drop_database "$BENCH_DATABASE"
    create_database "$BENCH_DATABASE"
    DATABASE_URL="$(database_url "$BENCH_DATABASE")"
    export DATABASE_URL
else
    log "PostgreSQL: DATABASE_URL as given ($(pg_url_for_display "$DATABASE_URL"))"
fi

log "cargo bench --bench passthrough -- $*"
exec cargo bench --bench passthrough -- "$@"
