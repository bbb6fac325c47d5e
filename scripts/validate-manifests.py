#!/usr/bin/env python3
"""Validates rendered Kubernetes objects offline, then checks what a schema cannot see.

Usage: validate-manifests.py KUBERNETES_VERSION NAME=RENDERED.yaml...

1. Schema: every object against the Kubernetes OpenAPI schema of that version (the PyPI package
   kubernetes-validate, strict: unknown fields are errors). Objects of tessera's own CRDs
   (manifests/crds) are checked against the CRD's openAPIV3Schema. Kinds of third-party CRDs whose
   schemas are not vendored are listed in SKIPPED with the reason; any other kind fails.
2. Consistency: the KubeSchedulerConfiguration in the scheduler ConfigMap (profile, extender,
   Lease) agrees with the containers' flags; ServiceAccounts, Roles, Services and ServiceMonitors
   refer to things that exist; tessera's containers run non-root with read-only root filesystems
   (the node agent's exceptions are the documented ones); every PodDisruptionBudget selects a
   workload and lets a drain evict at least one of its pods.
"""

import copy
import glob
import os
import sys
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# Third-party CRD kinds: their schemas are not part of Kubernetes and are not vendored here.
SKIPPED = {
    ("monitoring.coreos.com", "ServiceMonitor"): "Prometheus Operator CRD; port names are checked below",
    ("monitoring.coreos.com", "PodMonitor"): "Prometheus Operator CRD",
    ("monitoring.coreos.com", "PrometheusRule"): "Prometheus Operator CRD; metric names are checked by check-dashboards.sh",
    ("keda.sh", "ScaledObject"): "KEDA CRD",
    ("scheduling.x-k8s.io", "PodGroup"): "scheduler-plugins CRD; tessera-api parses it (PodGroupSpec)",
}

# tessera's workloads: (kind, name) -> what a container may need beyond the restricted baseline.
NODE_AGENT = ("DaemonSet", "tessera-mig-manager")

errors = []


def fail(where, msg):
    errors.append(f"{where}: {msg}")


def group_of(api_version):
    return api_version.split("/")[0] if "/" in api_version else ""


def nullable_to_jsonschema(schema):
    """OpenAPI v3 `nullable: true` becomes a JSON Schema type union; x-kubernetes-* are ignored."""
    if isinstance(schema, dict):
        out = {k: nullable_to_jsonschema(v) for k, v in schema.items()}
        if out.pop("nullable", False) and "type" in out:
            out["type"] = [out["type"], "null"]
        if out.get("x-kubernetes-int-or-string"):
            out.pop("type", None)
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        return out
    if isinstance(schema, list):
        return [nullable_to_jsonschema(v) for v in schema]
    return schema


def crd_schemas(objects):
    """(group, version, kind) -> openAPIV3Schema, from manifests/crds and any rendered CRD."""
    crds = list(objects)
    for path in sorted(glob.glob(os.path.join(ROOT, "manifests", "crds", "*.yaml"))):
        with open(path) as f:
            crds.extend(d for d in yaml.safe_load_all(f) if d)
    out = {}
    for c in crds:
        if c.get("kind") != "CustomResourceDefinition":
            continue
        spec = c["spec"]
        for v in spec["versions"]:
            schema = v.get("schema", {}).get("openAPIV3Schema")
            if schema:
                out[(spec["group"], v["name"], spec["names"]["kind"])] = nullable_to_jsonschema(schema)
    return out


def validate_schema(name, objects, version, crds):
    counts = {"schema": 0, "crd": 0, "skipped": 0}
    for o in objects:
        kind, api = o.get("kind"), o.get("apiVersion", "")
        where = f"{name}: {kind}/{o.get('metadata', {}).get('name')}"
        if not kind or not api or not o.get("metadata", {}).get("name"):
            fail(where, "apiVersion, kind and metadata.name are required")
            continue
        try:
            kubernetes_validate.validate(o, version, strict=True)
            counts["schema"] += 1
            continue
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.absolute_path) or "(object)"
            fail(where, f"{path}: {e.message}")
            continue
        except kubernetes_validate.SchemaNotFoundError:
            pass
        group, _, ver = api.rpartition("/")
        schema = crds.get((group, ver, kind))
        if schema is not None:
            body = copy.deepcopy(o)
            # The CRD schema covers spec/status; metadata is the API server's.
            body.pop("metadata", None)
            try:
                jsonschema.Draft202012Validator(schema).validate(body)
                counts["crd"] += 1
            except jsonschema.ValidationError as e:
                path = ".".join(str(p) for p in e.absolute_path) or "(object)"
                fail(where, f"{path}: {e.message}")
            continue
        reason = SKIPPED.get((group_of(api), kind))
        if reason is None:
            fail(where, f"no schema for {api} {kind} in Kubernetes {version} or manifests/crds, and not in SKIPPED")
            continue
        print(f"  skipped (no schema offline: {reason}): {kind}/{o['metadata']['name']}")
        counts["skipped"] += 1
    return counts


def pod_spec(o):
    kind = o["kind"]
    if kind == "Pod":
        return o["spec"]
    if kind in ("Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job"):
        return o["spec"]["template"]["spec"]
    if kind == "CronJob":
        return o["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def pod_labels(o):
    if o["kind"] == "Pod":
        return o["metadata"].get("labels", {})
    if o["kind"] == "CronJob":
        return o["spec"]["jobTemplate"]["spec"]["template"]["metadata"].get("labels", {})
    return o["spec"]["template"].get("metadata", {}).get("labels", {})


def flags(container):
    """--name=value flags of a container's command and args."""
    out = {}
    for a in container.get("command", []) + container.get("args", []):
        if a.startswith("--") and "=" in a:
            k, v = a[2:].split("=", 1)
            out[k] = v
    return out


def by_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def check_scheduler(name, objects):
    """The KubeSchedulerConfiguration agrees with itself, DESIGN §2 and the containers' flags."""
    deps = [o for o in by_kind(objects, "Deployment") if o["metadata"]["name"] == "tessera-scheduler"]
    if not deps:
        return
    dep = deps[0]
    where = f"{name}: Deployment/tessera-scheduler"
    spec = pod_spec(dep)
    containers = {c["name"]: c for c in spec["containers"]}
    ks, ext = containers.get("kube-scheduler"), containers.get("tessera-scheduler")
    if not ks or not ext:
        fail(where, "needs containers kube-scheduler and tessera-scheduler")
        return
    config_path = flags(ks).get("config")
    if not config_path:
        fail(where, "kube-scheduler has no --config=")
        return
    mount = next((m for m in ks.get("volumeMounts", []) if config_path.startswith(m["mountPath"].rstrip("/") + "/")), None)
    vol = mount and next((v for v in spec.get("volumes", []) if v["name"] == mount["name"]), None)
    cm_name = vol and vol.get("configMap", {}).get("name")
    cms = [o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"] == cm_name]
    if not cms:
        fail(where, f"--config={config_path} is not on a mounted ConfigMap that this render contains")
        return
    key = os.path.basename(config_path)
    raw = cms[0].get("data", {}).get(key)
    if raw is None:
        fail(where, f"ConfigMap {cm_name} has no key {key}")
        return
    cfg = yaml.safe_load(raw)
    w = f"{name}: ConfigMap/{cm_name}[{key}]"
    known = {"apiVersion", "kind", "leaderElection", "percentageOfNodesToScore", "profiles", "extenders",
             "parallelism", "clientConnection", "podInitialBackoffSeconds", "podMaxBackoffSeconds",
             "delayCacheUntilActive", "featureGates", "healthzBindAddress", "metricsBindAddress",
             "enableProfiling", "enableContentionProfiling"}
    for k in set(cfg) - known:
        fail(w, f"unknown top-level field {k!r}")
    if cfg.get("apiVersion") != "kubescheduler.config.k8s.io/v1" or cfg.get("kind") != "KubeSchedulerConfiguration":
        fail(w, "must be kubescheduler.config.k8s.io/v1 KubeSchedulerConfiguration")
    if cfg.get("percentageOfNodesToScore") != 100:
        fail(w, "percentageOfNodesToScore must be 100 (bin-packing sees every feasible node)")
    if [p.get("schedulerName") for p in cfg.get("profiles", [])] != ["tessera"]:
        fail(w, "exactly one profile, schedulerName: tessera")
    le = cfg.get("leaderElection", {})
    ns = dep["metadata"]["namespace"]
    ext_flags = flags(ext)
    if le.get("leaderElect") is not True:
        fail(w, "leaderElection.leaderElect must be true")
    if le.get("resourceName") in (None, "kube-scheduler") or le.get("resourceNamespace") != ns:
        fail(w, f"leaderElection needs its own resourceName and resourceNamespace {ns} (not kube-system/kube-scheduler)")
    if ext_flags.get("lease-name", "tessera-scheduler") != le.get("resourceName"):
        fail(w, f"tessera-scheduler --lease-name differs from leaderElection.resourceName {le.get('resourceName')}")
    lease_ns = ext_flags.get("lease-namespace", "tessera-system")
    if lease_ns not in (ns, "$(POD_NAMESPACE)"):
        fail(w, f"tessera-scheduler --lease-namespace {lease_ns} is not {ns}")
    exts = cfg.get("extenders", [])
    if len(exts) != 1:
        fail(w, "exactly one extender")
        return
    e = exts[0]
    ext_known = {"urlPrefix", "filterVerb", "preemptVerb", "prioritizeVerb", "weight", "bindVerb", "enableHTTPS",
                 "tlsConfig", "httpTimeout", "nodeCacheCapable", "managedResources", "ignorable"}
    for k in set(e) - ext_known:
        fail(w, f"unknown extender field {k!r}")
    want = {"filterVerb": "filter", "prioritizeVerb": "prioritize", "bindVerb": "bind", "preemptVerb": "preempt"}
    for k, v in want.items():
        if e.get(k) != v:
            fail(w, f"extender {k} must be {v!r}")
    if e.get("nodeCacheCapable") is not True:
        fail(w, "extender nodeCacheCapable must be true")
    if not isinstance(e.get("weight"), int) or e["weight"] < 1:
        fail(w, "extender weight must be a positive integer")
    url = urlparse(e.get("urlPrefix", ""))
    listen = ext_flags.get("listen", "127.0.0.1:8888")
    if url.hostname != "127.0.0.1" or f"{url.hostname}:{url.port}" != listen:
        fail(w, f"extender urlPrefix {e.get('urlPrefix')} must be the loopback --listen of tessera-scheduler ({listen})")
    read_listen = ext_flags.get("read-listen", "0.0.0.0:8889")
    if not read_listen.startswith("127.") and ext_flags.get("read-auth", "kubernetes") != "kubernetes":
        fail(where, f"--read-listen {read_listen} is reachable from the pod network; it needs --read-auth=kubernetes")
    elif not read_listen.startswith("127."):
        sa = spec.get("serviceAccountName", "default")
        delegated = [b for b in by_kind(objects, "ClusterRoleBinding") if b["roleRef"]["name"] == "system:auth-delegator"
                     and any(s.get("kind") == "ServiceAccount" and s.get("name") == sa and s.get("namespace") == ns
                             for s in b.get("subjects", []))]
        if not delegated:
            fail(where, f"--read-auth=kubernetes needs ServiceAccount {ns}/{sa} bound to ClusterRole system:auth-delegator")
    mr = {m["name"]: m for m in e.get("managedResources", [])}
    if mr.get("tessera.dev/gpu", {}).get("ignoredByScheduler") is not True:
        fail(w, "managedResources needs tessera.dev/gpu with ignoredByScheduler: true")
    if "nvidia.com/gpu" not in mr:
        fail(w, "managedResources needs nvidia.com/gpu")
    for n in mr:
        if "*" in n:
            fail(w, f"managedResources takes exact names, not {n}")


def check_security(name, objects):
    for o in objects:
        spec = pod_spec(o)
        if spec is None or o["metadata"].get("namespace") != "tessera-system":
            continue
        key = (o["kind"], o["metadata"]["name"])
        psc = spec.get("securityContext", {})
        for c in spec["containers"] + spec.get("initContainers", []):
            where = f"{name}: {o['kind']}/{o['metadata']['name']} container {c['name']}"
            sc = c.get("securityContext", {})
            if sc.get("readOnlyRootFilesystem") is not True:
                fail(where, "readOnlyRootFilesystem must be true")
            if key == NODE_AGENT:
                continue
            if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
                fail(where, "must run as non-root")
            if sc.get("allowPrivilegeEscalation") is not False:
                fail(where, "allowPrivilegeEscalation must be false")
            if sc.get("privileged"):
                fail(where, "must not be privileged")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                fail(where, "must drop ALL capabilities")
        if key == NODE_AGENT:
            where = f"{name}: DaemonSet/tessera-mig-manager"
            paths = {v.get("hostPath", {}).get("path") for v in spec.get("volumes", [])}
            if "/var/lib/kubelet/device-plugins" not in paths:
                fail(where, "needs the hostPath /var/lib/kubelet/device-plugins (kubelet device-plugin socket)")
            terms = spec.get("affinity", {}).get("nodeAffinity", {}).get(
                "requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", [])
            if not terms and not spec.get("nodeSelector"):
                fail(where, "must be restricted to GPU nodes (nodeAffinity or nodeSelector)")
            env = {e["name"] for c in spec["containers"] for e in c.get("env", [])}
            if "NODE_NAME" not in env:
                fail(where, "needs NODE_NAME from the downward API")


def check_references(name, objects):
    sas = {(o["metadata"].get("namespace"), o["metadata"]["name"]) for o in by_kind(objects, "ServiceAccount")}
    roles = {(o["metadata"].get("namespace"), o["metadata"]["name"]) for o in by_kind(objects, "Role")}
    croles = {o["metadata"]["name"] for o in by_kind(objects, "ClusterRole")}
    ours = {o["metadata"]["namespace"] for o in objects if o["kind"] == "ServiceAccount"}
    for o in objects:
        spec = pod_spec(o)
        ns = o["metadata"].get("namespace")
        if spec is not None and ns in ours:
            sa = spec.get("serviceAccountName", "default")
            if (ns, sa) not in sas:
                fail(f"{name}: {o['kind']}/{o['metadata']['name']}", f"ServiceAccount {ns}/{sa} is not in the render")
    for o in by_kind(objects, "RoleBinding") + by_kind(objects, "ClusterRoleBinding"):
        where = f"{name}: {o['kind']}/{o['metadata']['name']}"
        ref = o["roleRef"]
        if ref["kind"] == "ClusterRole":
            if not ref["name"].startswith("system:") and ref["name"] not in croles:
                fail(where, f"ClusterRole {ref['name']} is not in the render")
        elif (o["metadata"]["namespace"], ref["name"]) not in roles and o["metadata"]["namespace"] != "kube-system":
            fail(where, f"Role {o['metadata']['namespace']}/{ref['name']} is not in the render")
        for s in o.get("subjects", []):
            if s["kind"] == "ServiceAccount" and (s.get("namespace"), s["name"]) not in sas:
                fail(where, f"subject ServiceAccount {s.get('namespace')}/{s['name']} is not in the render")
    auth = [o for o in by_kind(objects, "RoleBinding") if o["roleRef"]["name"] == "extension-apiserver-authentication-reader"]
    for o in auth:
        if o["metadata"]["namespace"] != "kube-system":
            fail(f"{name}: RoleBinding/{o['metadata']['name']}", "binds extension-apiserver-authentication-reader, which lives in kube-system")
    workloads = [o for o in objects if pod_spec(o) is not None]
    services = by_kind(objects, "Service")
    for s in services:
        where = f"{name}: Service/{s['metadata']['name']}"
        sel = s["spec"].get("selector", {})
        matching = [w for w in workloads if w["metadata"].get("namespace") == s["metadata"].get("namespace")
                    and sel and all(pod_labels(w).get(k) == v for k, v in sel.items())]
        if not matching:
            fail(where, f"selector {sel} matches no pod template in the render")
            continue
        ports = {p.get("name") for w in matching for c in pod_spec(w)["containers"] for p in c.get("ports", [])}
        nums = {p.get("containerPort") for w in matching for c in pod_spec(w)["containers"] for p in c.get("ports", [])}
        for p in s["spec"]["ports"]:
            t = p.get("targetPort", p["port"])
            if (isinstance(t, str) and t not in ports) or (isinstance(t, int) and t not in nums):
                fail(where, f"targetPort {t} is not a container port of the selected pods")
    for m in by_kind(objects, "ServiceMonitor"):
        where = f"{name}: ServiceMonitor/{m['metadata']['name']}"
        sel = m["spec"]["selector"].get("matchLabels", {})
        svc = [s for s in services if s["metadata"].get("namespace") == m["metadata"]["namespace"]
               and all(s["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())]
        if not svc:
            fail(where, f"selector {sel} matches no Service in the render")
            continue
        names = {p.get("name") for s in svc for p in s["spec"]["ports"]}
        for ep in m["spec"]["endpoints"]:
            if ep.get("port") not in names:
                fail(where, f"endpoint port {ep.get('port')} is not a port name of {[s['metadata']['name'] for s in svc]}")
    for m in by_kind(objects, "PodMonitor"):
        where = f"{name}: PodMonitor/{m['metadata']['name']}"
        sel = m["spec"]["selector"].get("matchLabels", {})
        pods = [w for w in workloads if all(pod_labels(w).get(k) == v for k, v in sel.items())]
        if not pods:
            fail(where, f"selector {sel} matches no pod template in the render")
        names = {p.get("name") for w in pods for c in pod_spec(w)["containers"] for p in c.get("ports", [])}
        for ep in m["spec"]["podMetricsEndpoints"]:
            if pods and ep.get("port") not in names:
                fail(where, f"port {ep.get('port')} is not a container port name of the selected pods")


def selects(selector, labels):
    """Whether a LabelSelector (matchLabels and matchExpressions) selects these labels."""
    if not selector:
        return False
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def check_disruption_budgets(name, objects):
    """A PodDisruptionBudget must select pods and must let a drain evict one of them: a budget
    that allows no disruption blocks every node drain and cluster upgrade."""
    workloads = [o for o in objects if pod_spec(o) is not None]
    for pdb in by_kind(objects, "PodDisruptionBudget"):
        where = f"{name}: PodDisruptionBudget/{pdb['metadata']['name']}"
        spec = pdb.get("spec", {})
        ns = pdb["metadata"].get("namespace", "default")
        matched = [w for w in workloads if w["metadata"].get("namespace", "default") == ns
                   and selects(spec.get("selector"), pod_labels(w))]
        if not matched:
            fail(where, f"selector {spec.get('selector')} matches no pod template in the render")
            continue
        blocks = "blocks every voluntary disruption: node drains and upgrades cannot evict any pod"
        max_u, min_a = spec.get("maxUnavailable"), spec.get("minAvailable")
        if max_u is not None and str(max_u).strip() in ("0", "0%"):
            fail(where, f"maxUnavailable {max_u} {blocks}")
        if min_a is not None and str(min_a).strip() == "100%":
            fail(where, f"minAvailable 100% {blocks}")
        if isinstance(min_a, int):
            counts = [w["spec"].get("replicas", 1) for w in matched if w["kind"] in ("Deployment", "StatefulSet", "ReplicaSet")]
            if len(counts) == len(matched) and min_a >= sum(counts):
                fail(where, f"minAvailable {min_a} with {sum(counts)} replica(s) {blocks}; use maxUnavailable: 1")


def main():
    version, renders = sys.argv[1], sys.argv[2:]
    loaded = []
    for arg in renders:
        name, path = arg.split("=", 1)
        with open(path) as f:
            loaded.append((name, [d for d in yaml.safe_load_all(f) if d]))
    for name, objects in loaded:
        crds = crd_schemas(objects)
        counts = validate_schema(name, objects, version, crds)
        for check in (check_scheduler, check_security, check_references, check_disruption_budgets):
            try:
                check(name, objects)
            except (KeyError, TypeError, AttributeError) as e:
                # A malformed object the schema step has reported already; say where the check stopped.
                fail(name, f"{check.__name__} could not read an object: {type(e).__name__} {e}")
        print(f"{name}: {len(objects)} objects; {counts['schema']} against Kubernetes {version}, "
              f"{counts['crd']} against tessera CRDs, {counts['skipped']} skipped")
    for e in errors:
        print(f"ERROR {e}")
    if errors:
        print(f"{len(errors)} problem(s)")
        sys.exit(1)


if __name__ == "__main__":
    main()
