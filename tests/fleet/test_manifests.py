"""deploy/ validated offline: core Kubernetes kinds against kubernetes-validate's published
schemas (strict: unknown fields fail), the InferencePool and ServiceMonitor against their
projects' CRDs (vendored under tests/fleet/schemas), the endpoint picker's config against the
Inference Extension's documented plugin types, the Ray Serve config against Serve's own
schema; and the pieces against each other and against the server they deploy."""

import copy
import os
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = Path(__file__).parent / "schemas"
K8S_VERSION = "1.37.0"
CRDS = {("inference.networking.k8s.io/v1", "InferencePool"): "inference.networking.k8s.io_inferencepools.yaml",
        ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml"}
# The endpoint picker's plugin types (Inference Extension docs: site-src/guides/epp-configuration/config-text.md)
EPP_PLUGIN_TYPES = {"lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer",
                    "running-requests-size-scorer", "max-score-picker", "random-picker", "weighted-random-picker",
                    "single-profile-handler", "metrics-data-source", "core-metrics-extractor"}
# What the picker reads from each pod by default (its options.go), all from our /metrics
EPP_METRICS = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
               "vllm:lora_requests_info")


def docs() -> list[dict]:
    out = []
    for f in sorted(K8S.glob("*.yaml")):
        out += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return out


def find(kind: str, name: str | None = None) -> dict:
    (d,) = [d for d in docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return d


def _strict(schema):
    """A CRD's structural schema as JSON Schema that, like the API server's pruning, admits
    no field it does not declare."""
    if isinstance(schema, dict):
        s = {k: _strict(v) for k, v in schema.items()}
        if s.get("type") == "object" and "properties" in s and "additionalProperties" not in s \
                and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
        return s
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def validate(doc: dict) -> None:
    crd = CRDS.get((doc["apiVersion"], doc["kind"]))
    if crd is None:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        return
    spec = yaml.safe_load((SCHEMAS / crd).read_text())["spec"]
    version = doc["apiVersion"].split("/")[1]
    (v,) = [v for v in spec["versions"] if v["name"] == version]
    schema = _strict(v["schema"]["openAPIV3Schema"])
    jsonschema.validate(doc, schema, cls=jsonschema.Draft7Validator)
    assert 0 < len(doc["metadata"]["name"]) <= 253


def test_every_manifest_validates():
    kinds = [d["kind"] for d in docs()]
    for want in ("Deployment", "Service", "PersistentVolumeClaim", "InferencePool", "ServiceMonitor", "ConfigMap"):
        assert want in kinds
    for d in docs():
        validate(d)


BROKEN = [
    ("unknown field in a Deployment", "Deployment", "qaa-serve", lambda d: d["spec"].update(replica=2)),
    ("probe port as a wrong type", "Deployment", "qaa-serve",
     lambda d: d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"].update(port=[1])),
    ("InferencePool without targetPorts", "InferencePool", None, lambda d: d["spec"].pop("targetPorts")),
    ("InferencePool unknown failure mode", "InferencePool", None,
     lambda d: d["spec"]["endpointPickerRef"].update(failureMode="Sometimes")),
    ("ServiceMonitor misspelt field", "ServiceMonitor", None, lambda d: d["spec"]["endpoints"][0].update(paht="/m")),
]


@pytest.mark.parametrize("why, kind, name, breaks", BROKEN, ids=[b[0] for b in BROKEN])
def test_the_validators_reject_broken_manifests(why, kind, name, breaks):
    d = copy.deepcopy(find(kind, name))
    breaks(d)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate(d)


def test_endpoint_picker_config_enables_lora_affinity():
    cfg = yaml.safe_load(find("ConfigMap", "qaa-serve-epp")["data"]["epp-config.yaml"])
    assert (cfg["apiVersion"], cfg["kind"]) == ("inference.networking.x-k8s.io/v1alpha1", "EndpointPickerConfig")
    names = {p.get("name", p["type"]): p["type"] for p in cfg["plugins"]}
    assert set(names.values()) <= EPP_PLUGIN_TYPES
    (profile,) = cfg["schedulingProfiles"]
    refs = {p["pluginRef"]: p.get("weight", 1) for p in profile["plugins"]}
    assert set(refs) <= set(names)
    assert names.get("lora-affinity-scorer") == "lora-affinity-scorer" and refs["lora-affinity-scorer"] > 0
    epp = find("Deployment", "qaa-serve-epp")["spec"]["template"]["spec"]
    args = epp["containers"][0]["args"]
    mount = epp["containers"][0]["volumeMounts"][0]["mountPath"]
    assert args[args.index("--config-file") + 1] == f"{mount}/epp-config.yaml"
    assert args[args.index("--pool-name") + 1] == find("InferencePool")["metadata"]["name"]


def test_pieces_fit_together_and_the_server():
    """Selectors, ports, volume, probes and metrics name what the server really has."""
    from prometheus_client import generate_latest

    from server.cli import parse_args
    from server.metrics import Metrics

    dep = find("Deployment", "qaa-serve")
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    (c,) = pod["spec"]["containers"]
    args = parse_args(c["args"])  # the server accepts its arguments
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
    assert args.port == port and args.host == "0.0.0.0" and args.api_keys  # a non-loopback server needs keys
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    svc, pool, mon = find("Service", "qaa-serve"), find("InferencePool"), find("ServiceMonitor")
    assert svc["spec"]["selector"].items() <= labels.items()
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [port]
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert mon["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    epp_svc = find("Service", pool["spec"]["endpointPickerRef"]["name"])
    assert pool["spec"]["endpointPickerRef"]["port"]["number"] in {p["port"] for p in epp_svc["spec"]["ports"]}
    # the adapter store is the shared volume, mounted where --adapter-dir points
    pvc = find("PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    (vol,) = [v for v in pod["spec"]["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]]
    assert {"name": vol["name"], "mountPath": args.adapter_dir} in c["volumeMounts"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > args.drain_seconds
    # probes and scrape path are routes of the real app; the metrics the picker reads exist
    paths = {c[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert paths == {"/health/ready", "/health/live"}
    assert mon["spec"]["endpoints"][0]["path"] == "/metrics"
    text = generate_latest(Metrics().registry).decode()
    for name in EPP_METRICS:
        assert f"\n{name}{{" in text or f"\n{name} " in text, name


def test_probe_routes_exist_in_the_app(tiny_dir, tmp_path):
    from server.cli import build, parse_args

    app = build(parse_args(["--model", str(tiny_dir), "--adapter-dir", str(tmp_path), "--device", "cpu",
                            "--max-seq-len", "64"]))
    routes = {r.path for r in app.routes}
    assert {"/health/ready", "/health/live", "/metrics"} <= routes


def test_ray_serve_config():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray.serve.schema import ServeDeploySchema

    from server.cli import parse_args
    from server.ray_app import RAY_ONLY, _argv, build

    raw = yaml.safe_load((ROOT / "deploy" / "ray" / "config.yaml").read_text())
    cfg = ServeDeploySchema.model_validate(raw)
    (app,) = cfg.applications
    assert app.import_path == "server.ray_app:build"
    args = parse_args(_argv(app.args))  # every non-Ray arg is a qaa-serve option
    assert set(app.args) - set(RAY_ONLY) <= set(vars(args))
    graph = build(app.args)
    engine = graph._bound_deployment.init_args[0]._bound_deployment  # the Engine the ingress is bound to
    assert engine.num_replicas == app.args["replicas"]
    assert engine.max_ongoing_requests == app.args["max_running"]
