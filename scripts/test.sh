#!/usr/bin/env bash
# Runs every test: the deployment manifests and dashboard (scripts/validate-deploy.sh),
# formatting, lints, the release build, the Rust tests and the pymilvus end-to-end tests
# (tests/e2e) against milvus-lite, PostgreSQL and the built sidecar.
#
#   scripts/test.sh [extra pytest args...]
#
# PostgreSQL comes from ensure_postgres (lib.sh: DATABASE_URL, else 127.0.0.1:5432, else a
# throwaway cluster in .stack/pg). Both cargo test and pytest get TEST_DATABASE_URL: an admin
# URL of a server on which tests create, and drop, databases of their own. Set
# TEST_DATABASE_URL yourself to point the tests somewhere else.
#
# Every step runs even when an earlier one failed (except e2e, which needs the release build); a
# summary closes the output. Exits non-zero if any step failed or was skipped.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

export MILVUS_LITE_BIN="$REPO_ROOT/.venv/bin/milvus-lite"
export SIDECAR_BIN="$REPO_ROOT/target/release/milvus-sidecar"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

SUMMARY=()
FAILED=0

# step NAME COMMAND...: run it, time it, record PASS/FAIL.
step() {
    local name="$1" start status=0
    shift
    printf '\n==> %s: %s\n' "$name" "$*"
    start=$SECONDS
    "$@" || status=$?
    if ((status == 0)); then
        SUMMARY+=("$(printf 'PASS  %-12s %4ss' "$name" $((SECONDS - start)))")
    else
        SUMMARY+=("$(printf 'FAIL  %-12s %4ss  (exit %s)' "$name" $((SECONDS - start)) "$status")")
        FAILED=1
    fi
    return "$status"
}

skip() {
    SUMMARY+=("$(printf 'SKIP  %-12s        (%s)' "$1" "$2")")
    FAILED=1
}

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
# shellcheck disable=SC2317  # called indirectly, through step
run_pytest() {
    local status=0
    "$VENV_PYTHON" -m pytest tests/e2e "$@" || status=$?
    if ((status == 5)); then
        echo "pytest collected no tests: treating that as a failure" >&2
    fi
    return "$status"
}

summary() {
    printf '\n==> summary\n'
    printf '    %s\n' "${SUMMARY[@]}"
    if ((FAILED)); then
        printf 'test.sh: FAILED\n'
    else
        printf 'test.sh: every step passed\n'
    fi
}

# shellcheck disable=SC2317  # called indirectly, through step
postgres_for_tests() {
    # First in a subshell: a failure there (die) must not end this script before its summary.
    (ensure_postgres) || return 1
    ensure_postgres
    export TEST_DATABASE_URL="${TEST_DATABASE_URL:-$PG_ADMIN_URL}"
    echo "TEST_DATABASE_URL=$(pg_url_for_display "$TEST_DATABASE_URL") ($PG_SOURCE)"
}

if ! step setup scripts/setup.sh; then
    summary
    exit 1
fi
HAVE_PG=1
step postgres postgres_for_tests || HAVE_PG=0
step deploy scripts/validate-deploy.sh || true
step fmt cargo fmt --check || true
step clippy cargo clippy --all-targets -- -D warnings || true
if step build cargo build --release; then
    step cargo-test cargo test || true
    if ((HAVE_PG)); then
        step e2e run_pytest "$@" || true
    else
        skip e2e "needs PostgreSQL"
    fi
else
    step cargo-test cargo test || true
    skip e2e "needs the release build"
fi

summary
exit "$FAILED"
