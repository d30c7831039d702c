#!/usr/bin/env bash
# Installs what building and testing milvus-sidecar needs on a fresh machine, and nothing
# that is already there. Safe to run again: a second run only checks and prints.
#
#   - checks the Rust toolchain (cargo, rustfmt, clippy), and openssl (installed if missing);
#   - creates .venv/ (Python >= 3.10) with pinned pymilvus, milvus-lite, pytest and psycopg;
#   - makes sure a PostgreSQL server is there (see ensure_postgres in lib.sh): DATABASE_URL
#     when set, else the server on 127.0.0.1:5432 when it lets `postgres` in, else a throwaway
#     cluster in .stack/pg (installing Debian's postgresql package first when needed), and
#     prints its admin URL.
#
# Environment: PYTHON (interpreter used to create .venv; default python3.11, else python3),
# DATABASE_URL, PG_PROBE_HOST/PG_PROBE_PORT (127.0.0.1:5432), PG_STACK_DIR (.stack/pg),
# PG_STACK_PORT (55432).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

# The one place these versions are pinned. milvus-lite imports pymilvus, so both are needed.
PY_PACKAGES=(
    "pymilvus==3.0.2"
    "milvus-lite==3.2.2"
    "pytest==9.2.0"
    "psycopg[binary]==3.3.9"
)

DONE=()

check_rust() {
    command -v cargo >/dev/null || die "cargo not found: install the Rust toolchain (rustup) first"
    cargo fmt --version >/dev/null 2>&1 || die "rustfmt missing: rustup component add rustfmt"
    cargo clippy --version >/dev/null 2>&1 || die "clippy missing: rustup component add clippy"
    DONE+=("rust: $(cargo --version | cut -d' ' -f1-2), rustfmt and clippy present")
    # The allocator (tikv-jemalloc-sys) is built from C source with cc and make.
    local missing=()
    command -v cc >/dev/null || missing+=(gcc)
    command -v make >/dev/null || missing+=(make)
    if ((${#missing[@]})); then
        apt_install "${missing[@]}"
    fi
    DONE+=("C build tools for jemalloc: $(cc --version | sed -n 1p), $(make --version | sed -n 1p)")
}

pick_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.11 python3; do
        [[ -n "$candidate" ]] || continue
        if command -v "$candidate" >/dev/null &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    die "no Python >= 3.10 found (set PYTHON=/path/to/python3)"
}

setup_venv() {
    if [[ -x "$VENV_PYTHON" ]] && "$VENV_PYTHON" -c 'import sys' 2>/dev/null; then
        DONE+=("venv: $VENV_DIR exists ($("$VENV_PYTHON" --version 2>&1))")
    else
        local python
        python="$(pick_python)"
        rm -rf "$VENV_DIR"
        "$python" -m venv "$VENV_DIR" ||
            die "could not create $VENV_DIR with $python (on Debian's own python: apt-get install python3-venv)"
        DONE+=("venv: created $VENV_DIR with $("$VENV_PYTHON" --version 2>&1)")
    fi

    if pinned_installed "${PY_PACKAGES[@]}"; then
        DONE+=("python packages: already installed (${PY_PACKAGES[*]})")
        return 0
    fi

    log "installing ${PY_PACKAGES[*]} into $VENV_DIR"
    local pip_log="$VENV_DIR/pip-install.log"
    if ! "$VENV_PYTHON" -m pip install --disable-pip-version-check --no-input \
        "${PY_PACKAGES[@]}" >"$pip_log" 2>&1; then
        show_log_tail "$pip_log" 30
        die "pip install failed (full log: $pip_log)"
    fi
    DONE+=("python packages: installed ${PY_PACKAGES[*]}")
}

# A PostgreSQL server the sidecar and the tests can use (ensure_postgres in lib.sh).
setup_postgres() {
    ensure_postgres
    DONE+=("postgresql: $PG_SOURCE; admin URL $(pg_url_for_display "$PG_ADMIN_URL")")
}

# The TLS end-to-end test makes its certificates with the openssl command.
check_openssl() {
    if ! command -v openssl >/dev/null; then
        apt_install openssl
    fi
    DONE+=("openssl: $(openssl version | cut -d' ' -f1-2)")
}

check_rust
check_openssl
setup_venv
setup_postgres

log "setup done:"
printf '    %s\n' "${DONE[@]}"
