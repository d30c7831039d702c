#!/usr/bin/env bash
# Soak: mixed pymilvus traffic at a fixed rate through a recording sidecar to milvus-lite,
# with PostgreSQL cut off (through a relay) and milvus-lite restarted once each on the way;
# prints calls, failures by code inside/outside the outage windows, records expected vs
# found per table, and the sidecar's RSS and open fds over time. See scripts/soak.py.
#
#   scripts/soak.sh [--duration SECONDS] [--rate CALLS_PER_S] [--durable-records] [--keep] ...
#
# Installs what is missing (setup.sh), builds the release binary, finds PostgreSQL
# (ensure_postgres in lib.sh; the soak creates and drops a database of its own there).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

scripts/setup.sh >/dev/null
ensure_postgres
cargo build --release --quiet
export MILVUS_LITE_BIN SIDECAR_BIN
export TEST_DATABASE_URL="${TEST_DATABASE_URL:-$PG_ADMIN_URL}"
exec "$VENV_PYTHON" scripts/soak.py "$@"
