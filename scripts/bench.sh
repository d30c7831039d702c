#!/usr/bin/env bash
# Runs the side-by-side benchmark of issue 6 (benches/passthrough.rs): direct, milvus-sidecar
# (authentication, permission check and recording on), milvus-sidecar with recording off, and
# nginx as a plain gRPC pass-through, in front of a fast fake Milvus and (when scripts/setup.sh
# has installed it) milvus-lite; then the record writer's throughput on a backlog.
#
#   scripts/bench.sh              the full run (3 rounds of 5 s per target and scenario)
#   scripts/bench.sh --quick      a smoke run (1 round of 1 s)
#   scripts/bench.sh --rounds 5 --secs 10 --scenarios search-c1,search-c32
#   scripts/bench.sh --isolate-postgres ...   PostgreSQL gives way to the calls (root only)
#
# Arguments go to the bench (see the comment at the top of benches/passthrough.rs), but for
# --isolate-postgres (or BENCH_ISOLATE_POSTGRES=1): for the run, the processes of the
# PostgreSQL server the bench records into go into a CPU cgroup marked idle, as if PostgreSQL
# had cores of its own, and back where they were when the bench ends. Why: see "PostgreSQL's
# bursts and the kernel's task groups" in the README.
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

# --isolate-postgres: PostgreSQL's processes in a CPU cgroup of their own marked idle
# (cpu.idle, as systemd's CPUWeight=idle sets it), so that a woken call preempts a PostgreSQL
# burst at once. A process's own SCHED_IDLE or nice value would not do: the kernel weighs
# each session's (autogroup's) or cgroup's processes against others' as one group.
ISOLATION_CGROUP=milvus-sidecar-bench-postgres
CPU_CGROUPS=""    # where the hierarchy with the cpu controller is mounted
CGROUP_V2=0
POSTMASTER=""
declare -A ISOLATED_FROM=()    # pid -> the cgroup it was in

find_cpu_cgroups() {
    CPU_CGROUPS="$(awk '$3 == "cgroup" && $4 ~ /(^|,)cpu(,|$)/ {print $2; exit}' /proc/mounts)"
    if [[ -z "$CPU_CGROUPS" ]]; then
        CPU_CGROUPS="$(awk '$3 == "cgroup2" {print $2; exit}' /proc/mounts)"
        CGROUP_V2=1
    fi
}

# The cgroup of PID in that hierarchy.
cgroup_of() {
    if ((CGROUP_V2)); then
        awk -F: '$1 == "0" {print $3}' "/proc/$1/cgroup"
    else
        awk -F: '$2 ~ /(^|,)cpu(,|$)/ {print $3}' "/proc/$1/cgroup"
    fi
}

isolate_postgres() {
    ((EUID == 0)) || die "--isolate-postgres moves PostgreSQL into a cgroup: run the bench as root"
    find_cpu_cgroups
    [[ -n "$CPU_CGROUPS" && -f "$CPU_CGROUPS/cpu.stat" ]] ||
        die "--isolate-postgres: no cgroup hierarchy with the cpu controller here"
    # The server's processes: the checkpointer (which lives as long as the server) is a child
    # of the postmaster, as is every other one.
    local checkpointer
    checkpointer="$("$(pg_tool psql)" "$DATABASE_URL" -X -At \
        -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'")"
    [[ -n "$checkpointer" && -r "/proc/$checkpointer/status" ]] ||
        die "--isolate-postgres: PostgreSQL's processes are not on this machine (checkpointer: '$checkpointer')"
    POSTMASTER="$(awk '/^PPid:/ {print $2}' "/proc/$checkpointer/status")"
    local dir="$CPU_CGROUPS/$ISOLATION_CGROUP"
    mkdir -p "$dir"
    echo 1 >"$dir/cpu.idle" 2>/dev/null || {
        rmdir "$dir"
        die "--isolate-postgres: $dir/cpu.idle cannot be set (Linux 5.15 or later, with the cpu controller enabled)"
    }
    trap restore_postgres EXIT
    # So that Ctrl-C and kill put PostgreSQL back too (through the EXIT trap).
    trap 'exit 130' INT
    trap 'exit 143' TERM
    # The backends it forks later start in the same cgroup. A child that ends meanwhile (an
    # autovacuum worker, say) is skipped.
    local pid children from
    mapfile -t children < <(pgrep -P "$POSTMASTER")
    for pid in "$POSTMASTER" "${children[@]}"; do
        from="$(cgroup_of "$pid" 2>/dev/null)" || continue
        echo "$pid" >"$dir/cgroup.procs" 2>/dev/null || continue
        ISOLATED_FROM[$pid]="$from"
    done
    [[ -n "${ISOLATED_FROM[$POSTMASTER]:-}" ]] || die "--isolate-postgres: could not move PostgreSQL (pid $POSTMASTER)"

    log "--isolate-postgres: PostgreSQL (postmaster $POSTMASTER and $((${#ISOLATED_FROM[@]} - 1)) other" \
        "processes, and the backends it forks) in the idle CPU cgroup $dir until the bench ends"
}

restore_postgres() {
    local dir="$CPU_CGROUPS/$ISOLATION_CGROUP" pid back
    while read -r pid; do
        # Each where it was; a backend forked meanwhile where the postmaster was.
        back="${ISOLATED_FROM[$pid]:-${ISOLATED_FROM[$POSTMASTER]}}"
        echo "$pid" >"$CPU_CGROUPS${back%/}/cgroup.procs" 2>/dev/null || true
    done <"$dir/cgroup.procs"
    rmdir "$dir" 2>/dev/null || warn "--isolate-postgres: $dir still holds processes, which stay at idle priority"
    log "--isolate-postgres: PostgreSQL back in its cgroup"
}

ARGS=()
ISOLATE="${BENCH_ISOLATE_POSTGRES:-0}"
for arg in "$@"; do
    if [[ "$arg" == --isolate-postgres ]]; then
        ISOLATE=1
    else
        ARGS+=("$arg")
    fi
done
[[ "$ISOLATE" != 1 ]] || isolate_postgres

log "cargo bench --bench passthrough -- ${ARGS[*]}"
cargo bench --bench passthrough -- "${ARGS[@]}"
