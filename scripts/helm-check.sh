#!/usr/bin/env bash
# Checks the Helm chart helm/fathom offline (no cluster, no helm binary):
#   scripts/helm-check.sh                  lint + render the default values and every variant in
#                                          helm/fathom/ci/*.yaml, validate each rendered manifest
#                                          against the Kubernetes schemas, cross-check selectors
#                                          and ports, yamllint the chart's values and CI files.
#   scripts/helm-check.sh render VARIANT   print {"values": merged values, "manifests": [...]}
#                                          as JSON; VARIANT is "default", a name in
#                                          helm/fathom/ci/ (without .yaml) or a values file path.
# Tools (helm-python-sdk: Helm v4 embedded; kubernetes-validate; yamllint) live in a venv outside
# the repository, ${FATHOM_TOOLS_VENV:-$HOME/.cache/fathom/tools-venv}, installed by
# scripts/deps.sh. Exit 3 when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${FATHOM_TOOLS_VENV:-$HOME/.cache/fathom/tools-venv}"
py="$venv/bin/python"
if ! "$py" -c 'import helm_python, kubernetes_validate, yamllint' >/dev/null 2>&1; then
  echo "helm-check: the chart tools (helm-python-sdk, kubernetes-validate, yamllint) are missing" \
    "from $venv: run scripts/deps.sh" >&2
  exit 3
fi
if [ "${1:-check}" = check ]; then
  start=$(date +%s%N)
  "$venv/bin/yamllint" --strict -c .yamllint .yamllint helm/fathom/Chart.yaml \
    helm/fathom/values.yaml helm/fathom/ci
  echo "helm-check: yamllint ok ($(( ($(date +%s%N) - start) / 1000000 )) ms)"
fi
exec "$py" - "$@" <<'PY'
import json
import pathlib
import sys
import time

import helm_python as helm
import kubernetes_validate
import yaml

CHART = pathlib.Path("helm/fathom")
KUBE_VERSION = "1.37.0"
RELEASE, NAMESPACE = "fathom", "fathom-ci"


def die(msg):
    print(f"helm-check: {msg}", file=sys.stderr)
    sys.exit(1)


def variant_values(variant):
    if variant == "default":
        return {}
    path = pathlib.Path(variant)
    if not path.exists():
        path = CHART / "ci" / f"{variant}.yaml"
    if not path.exists():
        die(f"no variant {variant!r}: neither a file nor {path}")
    return yaml.safe_load(path.read_text()) or {}


def render(chart, values):
    """The rendered manifests as a list of objects (NOTES.txt excluded)."""
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path in sorted(out):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(out[path]):
            if doc:
                doc.setdefault("metadata", {}).setdefault("annotations", {})
                docs.append(doc)
    return docs, out


def cross_check(docs):
    """Selectors select something, named ports exist: errors kubectl would not report."""
    errors = []
    pods = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    templates = {f'{d["kind"]}/{d["metadata"]["name"]}': d["spec"]["template"] for d in pods}
    services = [d for d in docs if d["kind"] == "Service"]

    def matches(selector, labels):
        return all(labels.get(k) == v for k, v in selector.items())

    for name, t in templates.items():
        ports = {p["name"] for c in t["spec"]["containers"] for p in c.get("ports", [])}
        for c in t["spec"]["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                p = c.get(probe) or {}
                for kind in ("tcpSocket", "httpGet"):
                    port = (p.get(kind) or {}).get("port")
                    if isinstance(port, str) and port not in ports:
                        errors.append(f"{name}: {probe} names port {port!r}, not declared")
    for s in services:
        sel = s["spec"].get("selector", {})
        targets = [t for t in templates.values() if matches(sel, t["metadata"]["labels"])]
        if not targets:
            errors.append(f'Service/{s["metadata"]["name"]}: selector {sel} selects no pod')
        for port in s["spec"]["ports"]:
            tp = port.get("targetPort")
            if isinstance(tp, str) and not any(
                tp == p["name"]
                for t in targets
                for c in t["spec"]["containers"]
                for p in c.get("ports", [])
            ):
                errors.append(f'Service/{s["metadata"]["name"]}: targetPort {tp!r} not on its pods')
    for d in docs:
        if d["kind"] == "ServiceMonitor":
            sel = d["spec"]["selector"]["matchLabels"]
            hit = [s for s in services if matches(sel, s["metadata"].get("labels", {}))]
            if not hit:
                errors.append(f'ServiceMonitor/{d["metadata"]["name"]}: selects no Service')
            for ep in d["spec"]["endpoints"]:
                if not any(p.get("name") == ep["port"] for s in hit for p in s["spec"]["ports"]):
                    errors.append(f'ServiceMonitor/{d["metadata"]["name"]}: no port {ep["port"]!r}')
        if d["kind"] == "PodDisruptionBudget":
            sel = d["spec"]["selector"]["matchLabels"]
            if not any(matches(sel, t["metadata"]["labels"]) for t in templates.values()):
                errors.append(f'PodDisruptionBudget/{d["metadata"]["name"]}: selects no pod')
    return errors


def check_variant(chart, variant):
    values = variant_values(variant)
    t0 = time.monotonic()
    report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE,
                       kube_version=f"v{KUBE_VERSION}")
    findings = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    if findings or report.get("errors"):
        for m in findings:
            print(f"  lint: {m}", file=sys.stderr)
        for e in report.get("errors") or []:
            print(f"  lint error: {e}", file=sys.stderr)
        die(f"{variant}: helm lint failed")
    t1 = time.monotonic()
    try:
        docs, _ = render(chart, values)
    except helm.HelmError as e:
        die(f"{variant}: render failed: {e}")
    t2 = time.monotonic()
    kinds = {}
    skipped = []
    for d in docs:
        kn = f'{d["kind"]}/{d["metadata"]["name"]}'
        try:
            kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            if d["apiVersion"].startswith("monitoring.coreos.com/"):
                skipped.append(kn)  # a CRD: checked by cross_check below
                continue
            die(f"{variant}: {kn}: no Kubernetes {KUBE_VERSION} schema for {d['apiVersion']}")
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            die(f"{variant}: {kn} is invalid at {path or '<root>'}: {e.message}")
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    errors = cross_check(docs)
    if errors:
        die(f"{variant}: " + "; ".join(errors))
    t3 = time.monotonic()
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    print(f"helm-check: {variant}: lint ok ({t1 - t0:.2f} s), rendered {len(docs)} objects "
          f"({t2 - t1:.2f} s), schema-valid for Kubernetes {KUBE_VERSION}: {summary} "
          f"({t3 - t2:.2f} s)")
    for kn in skipped:
        print(f"helm-check: {variant}: SKIP schema of {kn} (Prometheus Operator CRD, no schema "
              "offline); selector and port cross-checked")


def main(argv):
    cmd = argv[0] if argv else "check"
    with helm.Chart.load(str(CHART)) as chart:
        if cmd == "render":
            if len(argv) != 2:
                die("usage: helm-check.sh render VARIANT")
            values = variant_values(argv[1])
            try:
                docs, out = render(chart, values)
            except helm.HelmError as e:
                die(f"{argv[1]}: render failed: {e}")
            notes = next((v for k, v in out.items() if k.endswith("NOTES.txt")), "")
            json.dump({"values": chart.merge_values(values), "manifests": docs, "notes": notes},
                      sys.stdout)
            return
        if cmd != "check":
            die(f"unknown command {cmd!r} (check | render VARIANT)")
        variants = ["default"] + sorted(p.stem for p in (CHART / "ci").glob("*.yaml"))
        if len(variants) < 4:
            die(f"expected at least 3 variants in {CHART}/ci, found {variants[1:]}")
        for v in variants:
            check_variant(chart, v)


t = time.monotonic()
main(sys.argv[1:])
if not sys.argv[1:] or sys.argv[1] == "check":
    print(f"helm-check: ok ({time.monotonic() - t:.2f} s in Python)")
PY
