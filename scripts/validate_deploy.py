"""Validates deploy/: the kustomize overlays, every manifest, and the Grafana dashboard.

Run through scripts/validate-deploy.sh, which installs the pinned tools into .venv first:

    scripts/validate-deploy.sh

What it checks (each line of output says which it did):
  1. every raw manifest under deploy/k8s parses, has apiVersion, kind and metadata.name;
  2. core Kubernetes objects against the Kubernetes JSON schemas of kubernetes-validate, in
     strict mode (unknown fields are errors), for each version in K8S_VERSIONS;
  3. CRDs (CloudNativePG Cluster, ServiceMonitor, ArgoCD Application) against the small schemas
     in deploy/k8s/schemas/ (required structure and the fields we set; not the operators' full
     CRDs, which no registry here ships);
  4. each overlay rendered with kustomize (`--kustomize CMD`), every rendered object as in 2/3,
     and the wiring: the partial milvus-proxy Deployment merged into a stand-in proxy
     Deployment (deploy/k8s/testdata) and validated whole, replicas, Services' selectors and
     target ports, the ServiceMonitor's Service, probes, secrets referenced;
  5. the dashboard JSON parses, uses the ${DS_PROMETHEUS} input, its queries parse as PromQL
     (promql-parser), and it names only exported metrics.

Exits 1 with every problem listed when anything fails.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

import jsonschema
import kubernetes_validate
import promql_parser
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
DASHBOARD = REPO / "deploy" / "grafana" / "milvus-sidecar.json"
sys.path.insert(0, str(REPO / "deploy" / "grafana"))
import dashboard_metrics  # noqa: E402

OVERLAYS = {"dev": 1, "staging": 2, "prod": 3}  # overlay -> proxy (and sidecar) replicas
NAMESPACE = "milvus"
SIDECAR = "milvus-sidecar"
PARTIAL_ANNOTATION = "milvus-sidecar.io/partial"
PART_OF = ("app.kubernetes.io/part-of", "milvus-sidecar")
PROXY_FIXTURE = K8S / "testdata" / "milvus-proxy.yaml"
# Secrets an overlay uses without generating them: CloudNativePG creates pg-app; in prod the
# operator creates the bootstrap secret by hand (deploy/README.md).
EXTERNAL_SECRETS = {
    "dev": set(),
    "staging": {"pg-app"},
    "prod": {"pg-app", "milvus-sidecar-bootstrap"},
}

KUSTOMIZE_KINDS = {
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
    ("kustomize.config.k8s.io/v1alpha1", "Component"),
}
CRD_SCHEMAS = {
    ("postgresql.cnpg.io/v1", "Cluster"): "cnpg-cluster-v1.schema.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-v1.schema.json",
    ("argoproj.io/v1alpha1", "Application"): "argocd-application-v1alpha1.schema.json",
}



class Checks:
    """Collects results: `ok` lines are printed as they come, failures again at the end."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.counts = {"core": 0, "crd": 0, "kustomize": 0}

    def ok(self, msg: str) -> None:
        print(f"  ok    {msg}")

    def note(self, msg: str) -> None:
        print(f"  note  {msg}")

    def fail(self, msg: str) -> None:
        print(f"  FAIL  {msg}")
        self.failures.append(msg)

    def expect(self, cond: bool, msg: str) -> bool:
        if cond:
            self.ok(msg)
        else:
            self.fail(msg)
        return cond


# ------------------------------------------------------------------------ object validation


def load_docs(text: str, where: str, checks: Checks) -> list[dict]:
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        checks.fail(f"{where}: not valid YAML: {e}")
        return []
    for d in docs:
        if not isinstance(d, dict):
            checks.fail(f"{where}: a document is not a mapping")
    return [d for d in docs if isinstance(d, dict)]


def ident(doc: dict) -> str:
    meta = doc.get("metadata") or {}
    return f"{doc.get('kind')}/{meta.get('name')}"


def crd_schema(key: tuple[str, str]) -> dict:
    return json.loads((K8S / "schemas" / CRD_SCHEMAS[key]).read_text())


def validate_object(doc: dict, where: str, versions: list[str], checks: Checks) -> None:
    """One object: envelope, then the Kubernetes schemas or our CRD schema."""
    api, kind = doc.get("apiVersion"), doc.get("kind")
    name = (doc.get("metadata") or {}).get("name")
    if not (isinstance(api, str) and isinstance(kind, str) and isinstance(name, str) and name):
        checks.fail(f"{where}: object without apiVersion, kind and metadata.name: {str(doc)[:120]}")
        return
    label = f"{where}: {kind}/{name}"
    if (api, kind) in KUSTOMIZE_KINDS:
        return  # checked by rendering
    if (api, kind) in CRD_SCHEMAS:
        errors = sorted(
            jsonschema.Draft202012Validator(crd_schema((api, kind))).iter_errors(doc), key=lambda e: list(e.path)
        )
        if errors:
            for e in errors:
                checks.fail(f"{label} ({CRD_SCHEMAS[(api, kind)]}): {'.'.join(map(str, e.path)) or '.'}: {e.message}")
        else:
            checks.counts["crd"] += 1
            checks.ok(f"{label} against deploy/k8s/schemas/{CRD_SCHEMAS[(api, kind)]}")
        return
    if (doc.get("metadata") or {}).get("annotations", {}).get(PARTIAL_ANNOTATION):
        checks.note(f"{label}: partial (merged into the existing proxy Deployment); validated after the merge")
        return
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            checks.fail(f"{label}: no Kubernetes {version} schema for {api} {kind} (a CRD? add a schema)")
            return
        except kubernetes_validate.ValidationError as e:
            path = ".".join(map(str, e.path)) or "."
            checks.fail(f"{label}: Kubernetes {version} schema (strict): {path}: {e.message}")
            return
    checks.counts["core"] += 1
    checks.ok(f"{label} against the Kubernetes {', '.join(versions)} schemas (strict)")


def validate_raw(versions: list[str], checks: Checks) -> None:
    print(f"\n==> raw manifests under {K8S.relative_to(REPO)}")
    files = sorted(p for p in K8S.rglob("*.yaml") if p.is_file())
    for path in files:
        rel = str(path.relative_to(REPO))
        docs = load_docs(path.read_text(), rel, checks)
        if not docs:
            checks.fail(f"{rel}: no YAML document")
        for doc in docs:
            if path.name == "kustomization.yaml":
                checks.counts["kustomize"] += 1
                checks.expect(
                    (doc.get("apiVersion"), doc.get("kind")) in KUSTOMIZE_KINDS,
                    f"{rel}: {doc.get('kind')} ({doc.get('apiVersion')})",
                )
                continue
            validate_object(doc, rel, versions, checks)


# ---------------------------------------------------------------------------- kustomize


def render(kustomize: list[str], directory: Path) -> str:
    proc = subprocess.run([*kustomize, str(directory)], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}")
    return proc.stdout


def merge_into_fixture(kustomize: list[str], partial: dict) -> dict:
    """The proxy Deployment as it is once the partial one is merged into it: a strategic
    merge, as server-side apply does (containers and volumes merge by name)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        proxy = yaml.safe_load(PROXY_FIXTURE.read_text())
        proxy["metadata"]["name"] = partial["metadata"]["name"]  # however the overlay names it
        proxy["metadata"]["namespace"] = partial["metadata"].get("namespace")
        (tmp / "proxy.yaml").write_text(yaml.safe_dump(proxy))
        (tmp / "sidecar.yaml").write_text(yaml.safe_dump(partial))
        (tmp / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            "resources: [proxy.yaml]\npatches: [{path: sidecar.yaml}]\n"
        )
        docs = list(yaml.safe_load_all(render(kustomize, tmp)))
    return docs[0]


def containers(pod_spec: dict) -> dict[str, dict]:
    return {c["name"]: c for c in pod_spec.get("containers", [])}


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def check_overlay(name: str, docs: list[dict], kustomize: list[str], versions: list[str], checks: Checks) -> None:
    where = f"overlays/{name}"
    by_id = {(d.get("kind"), (d.get("metadata") or {}).get("name")): d for d in docs}
    for doc in docs:
        validate_object(doc, where, versions, checks)

    wrong_ns = [ident(d) for d in docs if (d.get("metadata") or {}).get("namespace") != NAMESPACE]
    checks.expect(not wrong_ns, f"{where}: every object in namespace {NAMESPACE}" + (f" (not: {wrong_ns})" if wrong_ns else ""))

    partials = [d for d in docs if d.get("kind") == "Deployment"
                and PARTIAL_ANNOTATION in ((d.get("metadata") or {}).get("annotations") or {})]
    if not checks.expect(len(partials) == 1, f"{where}: has one partial proxy Deployment ({PARTIAL_ANNOTATION})"):
        return
    partial = partials[0]
    proxy_name = partial["metadata"]["name"]
    # Uninstalling deletes by this label (deploy/README.md): it must name everything the
    # overlay creates, and never the proxy Deployment it only joins.
    unlabelled = [ident(d) for d in docs if d is not partial
                  and ((d.get("metadata") or {}).get("labels") or {}).get(PART_OF[0]) != PART_OF[1]]
    checks.expect(not unlabelled, f"{where}: every object it creates has label {PART_OF[0]}={PART_OF[1]}"
                  + (f" (not: {unlabelled})" if unlabelled else ""))
    checks.expect(PART_OF[0] not in ((partial["metadata"].get("labels")) or {}),
                  f"{where}: the proxy Deployment {proxy_name} does not carry {PART_OF[0]} (uninstall must not select it)")
    checks.expect(
        partial["spec"].get("replicas") == OVERLAYS[name],
        f"{where}: {proxy_name} replicas = {partial['spec'].get('replicas')} (want {OVERLAYS[name]})",
    )

    # The partial merged into a proxy Deployment like the Milvus chart's, validated whole.
    try:
        merged = merge_into_fixture(kustomize, partial)
    except RuntimeError as e:
        checks.fail(f"{where}: merging {proxy_name} into {PROXY_FIXTURE.relative_to(REPO)} failed: {e}")
        return
    merged["metadata"].get("annotations", {}).pop(PARTIAL_ANNOTATION, None)
    validate_object(merged, f"{where} (merged into testdata/milvus-proxy.yaml)", versions, checks)
    pod = merged["spec"]["template"]["spec"]
    cs = containers(pod)
    checks.expect(
        set(cs) == {"proxy", SIDECAR},
        f"{where}: merged proxy pod has containers proxy and {SIDECAR} (has {sorted(cs)})",
    )
    sidecar = cs.get(SIDECAR)
    if sidecar is None:
        return
    env = env_of(sidecar)
    for var, want in {
        "MILVUS_SIDECAR_UPSTREAM": "http://127.0.0.1:19530",
        "MILVUS_SIDECAR_LISTEN": "0.0.0.0:19538",
        "MILVUS_SIDECAR_ADMIN_LISTEN": "0.0.0.0:9531",
        "MILVUS_SIDECAR_LOG_FORMAT": "json",
        "MILVUS_SIDECAR_PLAINTEXT": "true",
    }.items():
        got = env.get(var, {}).get("value")
        checks.expect(got == want, f"{where}: sidecar {var}={got!r} (want {want!r})")
    for var in ("DATABASE_URL", "MILVUS_SIDECAR_ROOT_PASSWORD"):
        checks.expect("secretKeyRef" in env.get(var, {}).get("valueFrom", {}), f"{where}: sidecar {var} from a Secret")
    ports = {p["name"]: p["containerPort"] for c in cs.values() for p in c.get("ports", [])}
    checks.expect(ports.get("sidecar-grpc") == 19538 and ports.get("sidecar-admin") == 9531,
                  f"{where}: sidecar ports sidecar-grpc=19538, sidecar-admin=9531")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = sidecar.get(probe, {}).get("httpGet", {})
        port = ports.get(get.get("port"), get.get("port"))
        checks.expect(get.get("path") == path and port == 9531, f"{where}: sidecar {probe} GET {path} on 9531")
    checks.expect(bool(sidecar.get("resources", {}).get("requests")) and bool(sidecar.get("resources", {}).get("limits")),
                  f"{where}: sidecar has resource requests and limits")
    volumes = {v["name"] for v in pod.get("volumes", [])}
    missing_vols = [m["name"] for c in cs.values() for m in c.get("volumeMounts", []) if m["name"] not in volumes]
    checks.expect(not missing_vols, f"{where}: every volumeMount has its volume" + (f" (missing {missing_vols})" if missing_vols else ""))

    # Services in front of the proxy pods: selectors match the pods, target ports exist.
    pod_labels = merged["spec"]["template"]["metadata"]["labels"]
    for (kind, svc_name), svc in by_id.items():
        if kind != "Service":
            continue
        sel = svc["spec"].get("selector", {})
        if not sel or not all(pod_labels.get(k) == v for k, v in sel.items()):
            continue
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            resolved = ports.get(target, target)
            checks.expect(resolved in ports.values(),
                          f"{where}: Service {svc_name} port {p['port']} -> {target} ({resolved}) is a proxy pod port")
    grpc = by_id.get(("Service", "milvus-proxy"))
    if checks.expect(grpc is not None, f"{where}: has Service milvus-proxy"):
        sel = grpc["spec"].get("selector", {})
        checks.expect(all(pod_labels.get(k) == v for k, v in sel.items()),
                      f"{where}: Service milvus-proxy selects the proxy pods")
        p19530 = [p for p in grpc["spec"]["ports"] if p["port"] == 19530]
        checks.expect(bool(p19530) and ports.get(p19530[0].get("targetPort")) == 19538,
                      f"{where}: Service milvus-proxy 19530 -> sidecar 19538")

    # PostgreSQL keeps off the proxy's nodes where it can: its batch bursts would share the
    # proxy's cores. The term must select the proxy pods as the Milvus chart labels them.
    for (kind, pg_name), pg in by_id.items():
        if kind == "StatefulSet":
            affinity = pg["spec"]["template"]["spec"].get("affinity", {}).get("podAntiAffinity", {})
        elif kind == "Cluster":
            affinity = (pg["spec"].get("affinity") or {}).get("additionalPodAntiAffinity", {})
        else:
            continue
        terms = [t.get("podAffinityTerm", {}) for t in affinity.get("preferredDuringSchedulingIgnoredDuringExecution", [])]
        avoids_proxy = any(
            t.get("topologyKey") == "kubernetes.io/hostname"
            and (want := (t.get("labelSelector") or {}).get("matchLabels"))
            and all(pod_labels.get(k) == v for k, v in want.items())
            for t in terms
        )
        checks.expect(avoids_proxy, f"{where}: {kind} {pg_name} prefers nodes without the proxy pods")

    # The ServiceMonitor finds a Service with its port.
    for (kind, sm_name), sm in by_id.items():
        if kind != "ServiceMonitor":
            continue
        want = sm["spec"]["selector"].get("matchLabels", {})
        svcs = [s for (k, _), s in by_id.items() if k == "Service"
                and all((s["metadata"].get("labels") or {}).get(a) == b for a, b in want.items())]
        names = {p.get("name") for s in svcs for p in s["spec"]["ports"]}
        missing = [e.get("port") for e in sm["spec"]["endpoints"] if e.get("port") not in names]
        checks.expect(bool(svcs) and not missing,
                      f"{where}: ServiceMonitor {sm_name} selects {[s['metadata']['name'] for s in svcs]} with port(s) "
                      f"{[e.get('port') for e in sm['spec']['endpoints']]}")

    # Every secret referenced is rendered here with that key, or known to come from elsewhere.
    secrets = {}
    for d in docs:
        if d.get("kind") == "Secret":
            keys = set(d.get("data") or {}) | set(d.get("stringData") or {})
            secrets[d["metadata"]["name"]] = (keys, d)
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                refs.add((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]))
            if "secret" in node and isinstance(node["secret"], dict) and "secretName" in node["secret"]:
                refs.add((node["secret"]["secretName"], None))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(docs)
    for secret, key in sorted(refs, key=str):
        if secret in secrets:
            checks.expect(key is None or key in secrets[secret][0], f"{where}: secret {secret} has key {key}")
        else:
            base = secret
            checks.expect(base in EXTERNAL_SECRETS[name],
                          f"{where}: secret {secret} (key {key}) " +
                          ("comes from outside this overlay (expected)" if base in EXTERNAL_SECRETS[name]
                           else "is neither rendered nor expected from outside"))
    if name == "prod":
        checks.expect(not secrets, f"{where}: renders no Secret (credentials come from CNPG and the operator)")
    for secret, (keys, d) in secrets.items():
        decoded = {k: base64.b64decode(v).decode(errors="replace") for k, v in (d.get("data") or {}).items()}
        if {"uri", "username", "password", "dbname"} <= set(decoded):
            # A hand-made pg-app must agree with itself: PostgreSQL is set up from username,
            # password and dbname; the sidecar connects with uri.
            u = urlsplit(decoded["uri"])
            checks.expect(
                (unquote(u.username or ""), unquote(u.password or ""), u.path.lstrip("/"))
                == (decoded["username"], decoded["password"], decoded["dbname"]),
                f"{where}: secret {secret}: uri has the same username, password and dbname as its other keys",
            )
        values = list(decoded.values())
        if any("CHANGE-ME" in v for v in values):
            checks.note(f"{where}: secret {secret} holds placeholder values (CHANGE-ME): replace them before real use")


def validate_overlays(kustomize: list[str], versions: list[str], checks: Checks) -> None:
    for name in OVERLAYS:
        print(f"\n==> overlay {name}: {' '.join(kustomize)} deploy/k8s/overlays/{name}")
        try:
            text = render(kustomize, K8S / "overlays" / name)
        except RuntimeError as e:
            checks.fail(f"overlays/{name}: kustomize failed: {e}")
            continue
        docs = load_docs(text, f"overlays/{name}", checks)
        checks.ok(f"overlays/{name}: rendered {len(docs)} objects: " + ", ".join(ident(d) for d in docs))
        check_overlay(name, docs, kustomize, versions, checks)


# ---------------------------------------------------------------------------- dashboard


def validate_dashboard(path: Path, checks: Checks) -> dict | None:
    print(f"\n==> dashboard {path}")
    try:
        dash = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        checks.fail(f"{path.name}: does not parse as JSON: {e}")
        return None
    checks.ok(f"{path.name}: parses as JSON ({len(dash.get('panels', []))} top-level panels)")
    inputs = {i.get("name"): i for i in dash.get("__inputs", [])}
    checks.expect(inputs.get("DS_PROMETHEUS", {}).get("pluginId") == "prometheus",
                  f"{path.name}: __inputs declares DS_PROMETHEUS (a Prometheus datasource)")

    panels = []

    def collect(ps):
        for p in ps:
            panels.append(p)
            collect(p.get("panels", []))

    collect(dash.get("panels", []))
    bad_ds = []
    for p in panels:
        if p.get("type") == "row":
            continue
        for holder in [p, *p.get("targets", [])]:
            ds = holder.get("datasource")
            if ds is not None and (not isinstance(ds, dict) or ds.get("uid") != "${DS_PROMETHEUS}"):
                bad_ds.append(p.get("title"))
    checks.expect(not bad_ds, f"{path.name}: every panel and target uses datasource ${{DS_PROMETHEUS}}"
                  + (f" (not: {sorted(set(bad_ds))})" if bad_ds else ""))
    no_expr = [p.get("title") for p in panels if p.get("type") != "row" and not any(t.get("expr") for t in p.get("targets", []))]
    checks.expect(not no_expr, f"{path.name}: every panel has a query" + (f" (not: {no_expr})" if no_expr else ""))
    ids = [p.get("id") for p in panels]
    checks.expect(len(ids) == len(set(ids)), f"{path.name}: panel ids are unique")

    # Every query parses as PromQL once Grafana's variables are given values.
    grafana_vars = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m", "$instance": ".*", "$method": ".*"}
    bad_promql = []
    queries = [q for q in dashboard_metrics._strings_with_promql(dash) if not q.startswith("label_values(")]
    for query in queries:
        text = query
        for var, value in grafana_vars.items():
            text = text.replace(var, value)
        try:
            promql_parser.parse(text)
        except Exception as e:  # the parser raises plain exceptions
            bad_promql.append(f"{query!r}: {e}")
    checks.expect(not bad_promql, f"{path.name}: all {len(queries)} queries parse as PromQL (promql-parser)"
                  + ("".join(f"\n        {b}" for b in bad_promql)))

    series = dashboard_metrics.series_names(dash)
    unknown = sorted(s for s in series if dashboard_metrics.family_name(s) not in dashboard_metrics.EXPORTED_METRICS)
    checks.expect(not unknown, f"{path.name}: names only exported metrics ({len(series)} series used)"
                  + (f"; unknown: {unknown}" if unknown else ""))
    suffixed = sorted(s for s in series if dashboard_metrics.family_name(s) != s
                      and dashboard_metrics.family_name(s) not in dashboard_metrics.HISTOGRAMS)
    checks.expect(not suffixed, f"{path.name}: _bucket/_sum/_count only on histograms"
                  + (f" (not: {suffixed})" if suffixed else ""))
    unused = sorted(dashboard_metrics.EXPORTED_METRICS - dashboard_metrics.family_names(dash))
    if unused:
        checks.note(f"{path.name}: exported but not shown: {unused}")
    return dash


# ---------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kustomize", help="render command, e.g. '.venv/bin/kubectl kustomize' (none: raw files only)")
    ap.add_argument("--k8s-versions", default=os.environ.get("K8S_VERSIONS", "1.30.0,1.37.0"),
                    help="Kubernetes versions to validate against (comma-separated; default 1.30.0,1.37.0)")
    ap.add_argument("--dashboard", default=str(DASHBOARD.relative_to(REPO)), help="the Grafana dashboard JSON")
    args = ap.parse_args()
    os.chdir(REPO)
    versions = [v.strip() for v in args.k8s_versions.split(",") if v.strip()]
    checks = Checks()

    validate_raw(versions, checks)
    if args.kustomize:
        validate_overlays(shlex.split(args.kustomize), versions, checks)
    else:
        print("\n==> overlays NOT RENDERED: no kustomize available. Validated instead: every raw manifest "
              "file above (schemas), not the overlays' patches, generated secrets or the proxy merge.")
    validate_dashboard(Path(args.dashboard), checks)

    c = checks.counts
    print(f"\n==> validated {c['core']} Kubernetes objects against the Kubernetes schemas, {c['crd']} custom "
          f"resources against deploy/k8s/schemas, {c['kustomize']} kustomizations"
          + ("" if args.kustomize else " (NOT rendered)"))
    if checks.failures:
        print(f"\nvalidate-deploy: {len(checks.failures)} problem(s):", file=sys.stderr)
        for f in checks.failures:
            print(f"  - {f}", file=sys.stderr)
        return 1
    print("validate-deploy: every check passed" + ("" if args.kustomize else " (overlays NOT rendered)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
