#!/usr/bin/env bash
# Instructions per forwarded call, counted by valgrind's callgrind, for the sidecar with
# recording and authentication on (`sidecar`), the sidecar forwarding alone
# (`sidecar-norec`) and nginx, each under the load of benches/passthrough.rs in front of its
# fake Milvus.
#
#   scripts/bench-instructions.sh                         search-c1 and search-c32
#   scripts/bench-instructions.sh --scenarios search-c32 --window 10 --targets sidecar-norec
#   BENCH_SIDECAR_BIN=/other/build/milvus-sidecar scripts/bench-instructions.sh
#
# The timings of scripts/bench.sh move by 20 % and more from run to run on a shared 2-core
# VM; these counts do not depend on what else the machine does (the same build counts the
# same within about 1 %), so they tell apart changes of a few per cent. They count
# user-space instructions of every thread of the process (the record writer's included):
# no kernel time, no cache misses, no PostgreSQL. The process runs about 50 times slower
# under valgrind, so concurrency 32 batches less than it does at full speed.
#
# A sidecar's count covers a window of --window seconds (15) in the middle of its run,
# divided by the calls its /metrics counted in that window. nginx's worker, which
# callgrind_control cannot reach (it is forked, not started), is counted over its whole life
# and divided by the calls of its run (req/s x the run's seconds, plus 1 s of warm-up):
# within about 2 %.
#
# BENCH_CALLGRIND_KEEP=DIR copies each sidecar's counts of its window there
# (<target>-<scenario>.callgrind), for callgrind_annotate.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

SCENARIOS="search-c1,search-c32"
TARGETS="sidecar-norec,sidecar,nginx"
WINDOW=15
while (($#)); do
    case "$1" in
        --scenarios) SCENARIOS="$2"; shift 2 ;;
        --targets) TARGETS="$2"; shift 2 ;;
        --window) WINDOW="$2"; shift 2 ;;
        *) die "unknown argument: $1 (see the comment at the top of $0)" ;;
    esac
done

command -v valgrind >/dev/null || apt_install valgrind
command -v callgrind_control >/dev/null || die "valgrind is installed but callgrind_control is missing"
if [[ "${BENCH_SKIP_SETUP:-0}" != 1 ]]; then
    scripts/setup.sh
fi
NGINX_BIN="${BENCH_NGINX_BIN:-$(command -v nginx || echo /usr/sbin/nginx)}"
if [[ "$TARGETS" == *nginx* && ! -x "$NGINX_BIN" ]]; then
    apt_install nginx-light || apt_install nginx
    NGINX_BIN=/usr/sbin/nginx
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/milvus-sidecar-instructions.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

log "building the sidecar and the bench"
cargo build --release --bin milvus-sidecar
cargo bench --bench passthrough --no-run
REAL_SIDECAR="${BENCH_SIDECAR_BIN:-$REPO_ROOT/target/release/milvus-sidecar}"

# The wrappers the bench starts instead of the binaries.
cat >"$WORK/sidecar" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$WORK/cg.%p --log-file=$WORK/vg.%p.log "$REAL_SIDECAR" "\$@"
EOF
cat >"$WORK/nginx" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$WORK/cg.%p --log-file=$WORK/vg.%p.log "$NGINX_BIN" "\$@"
EOF
chmod +x "$WORK/sidecar" "$WORK/nginx"

# DATABASE_URL as given, else a fresh database on the PostgreSQL of ensure_postgres.
GIVEN_DATABASE_URL="${DATABASE_URL:-}"
unset DATABASE_URL
RUN_DATABASE_URL=""

# The Ir total of a callgrind output file.
total_ir() { awk '/^(summary|totals):/ {print $2; exit}' "$1"; }

# The calls a sidecar has counted so far (its admin address is on its command line). A
# sidecar that is gone leaves its bench's log ($2) as the reason.
calls_of() {
    local admin
    admin="$(tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline" | grep -oP -- '--admin-listen \K\S+' || true)"
    [[ -n "$admin" ]] || { cat "$2" >&2; die "the sidecar under callgrind (pid $1) is gone; its bench's output is above"; }
    "$(_lib_python)" -c 'import sys, urllib.request
text = urllib.request.urlopen("http://" + sys.argv[1] + "/metrics", timeout=5).read().decode()
print(int(sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith("milvus_sidecar_calls_total{"))))' "$admin"
}

# run_bench TARGET SCENARIO SECS LOG: the bench with the wrappers, in the background.
run_bench() {
    local target="$1" scenario="$2" secs="$3" out="$4"
    DATABASE_URL="$RUN_DATABASE_URL" BENCH_SIDECAR_BIN="$WORK/sidecar" BENCH_NGINX_BIN="$WORK/nginx" \
        BENCH_NGINX_WORKERS=1 BENCH_STARTUP_SECS=300 \
        cargo bench --bench passthrough -- --targets "direct,$target" --scenarios "$scenario" \
        --secs "$secs" --warmup 1 --rounds 1 --writer-calls 0 >"$out" 2>&1 &
    BENCH_PID=$!
}

measure_sidecar() {
    local target="$1" scenario="$2" out="$WORK/$1-$2.log" pid="" a b n1 n2 ir
    RUN_DATABASE_URL="$GIVEN_DATABASE_URL"
    if [[ "$target" == sidecar && -z "$GIVEN_DATABASE_URL" ]]; then
        ensure_postgres
        drop_database milvus_sidecar_instructions
        create_database milvus_sidecar_instructions
        RUN_DATABASE_URL="$(database_url milvus_sidecar_instructions)"
    fi
    run_bench "$target" "$scenario" $((WINDOW + 40)) "$out"
    for _ in $(seq 1 600); do
        pid="$(grep -oP "^\s+$target\s+\S+ \(pid \K[0-9]+" "$out" | head -1 || true)"
        [[ -n "$pid" ]] && break
        kill -0 "$BENCH_PID" 2>/dev/null || { cat "$out"; die "the bench ended before starting $target"; }
        sleep 1
    done
    # The load reaches this target once the direct run is over: wait for calls to flow.
    for _ in $(seq 1 600); do
        a="$(calls_of "$pid" "$out")"
        sleep 1
        b="$(calls_of "$pid" "$out")"
        ((b - a > 20)) && break
    done
    sleep 3
    callgrind_control -d "$pid" >/dev/null 2>&1
    n1="$(calls_of "$pid" "$out")"
    sleep "$WINDOW"
    callgrind_control -d "$pid" >/dev/null 2>&1
    n2="$(calls_of "$pid" "$out")"
    wait "$BENCH_PID" || { cat "$out"; die "the bench failed"; }
    ir="$(total_ir "$WORK/cg.$pid.2")"
    if [[ -n "${BENCH_CALLGRIND_KEEP:-}" ]]; then
        mkdir -p "$BENCH_CALLGRIND_KEEP"
        cp "$WORK/cg.$pid.2" "$BENCH_CALLGRIND_KEEP/$target-$scenario.callgrind"
    fi
    RESULT="$((ir / (n2 - n1)))"
    printf '  %-14s %-11s %8d instructions per call (%d calls in %d s)\n' "$target" "$scenario" "$RESULT" \
        $((n2 - n1)) "$WINDOW"
}

measure_nginx() {
    local scenario="$1" out="$WORK/nginx-$1.log" secs=$((WINDOW + 20)) worker ir rps
    run_bench nginx "$scenario" "$secs" "$out"
    wait "$BENCH_PID" || { cat "$out"; die "the bench failed"; }
    # The worker is the nginx process that served the calls: the largest count.
    worker=""
    ir=0
    for f in "$WORK"/cg.*; do
        grep -q "^cmd:.*$NGINX_BIN" "$f" || continue
        local n
        n="$(total_ir "$f")"
        if ((n > ir)); then
            ir="$n"
            worker="$f"
        fi
    done
    [[ -n "$worker" ]] || die "no callgrind output of nginx in $WORK"
    rps="$(grep -A2 'concurrency' "$out" | awk '/req\/s/ {print $NF; exit}')"
    RESULT="$(awk -v ir="$ir" -v rps="$rps" -v s="$secs" 'BEGIN {printf "%d", ir / (rps * (s + 1))}')"
    printf '  %-14s %-11s %8d instructions per call (%s req/s over %d s)\n' nginx "$scenario" "$RESULT" "$rps" "$secs"
    rm -f "$WORK"/cg.*
}

log "instructions per call, user space (callgrind); sidecar: $REAL_SIDECAR, nginx: $NGINX_BIN"
IFS=, read -ra scenarios <<<"$SCENARIOS"
IFS=, read -ra targets <<<"$TARGETS"
for scenario in "${scenarios[@]}"; do
    for target in "${targets[@]}"; do
        case "$target" in
            sidecar | sidecar-norec) measure_sidecar "$target" "$scenario" ;;
            nginx) measure_nginx "$scenario" ;;
            *) die "unknown target: $target (sidecar, sidecar-norec, nginx)" ;;
        esac
    done
done
