"""The deployment files agree with the server and with each other: the dashboard's PromQL
names only what /metrics exposes, the compose file, the Prometheus config and Grafana's
provisioning point at the right services, ports and paths, and the Dockerfile lints clean."""

import json
import re
import subprocess
import sys
from pathlib import Path

import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DASHBOARD = ROOT / "deploy" / "grafana" / "qaa-serve.json"
SCRAPE_LABELS = {"instance", "job"}  # added by Prometheus at scrape time
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exposition(text: str) -> dict[str, set[str]]:
    """Series names a scrape of this text yields -> their label names."""
    out = {}
    for f in text_string_to_metric_families(text):
        for suffix in SUFFIXES.get(f.type, ("",)):
            out.setdefault(f.name + suffix, set())
        for s in f.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def queries(dash: dict) -> list[str]:
    def panels(ps):
        for p in ps:
            yield p
            yield from panels(p.get("panels", []))

    return [t["expr"] for p in panels(dash["panels"]) for t in p.get("targets", [])]


def walk(node):
    yield node
    for attr in ("expr", "lhs", "rhs", "vector_selector", "param"):
        child = getattr(node, attr, None)
        if child is not None and hasattr(child, "prettify"):
            yield from walk(child)
    for a in getattr(node, "args", None) or []:
        yield from walk(a)


def selectors(node):
    return [n for n in walk(node) if type(n).__name__ == "VectorSelector"]


def test_every_dashboard_query_names_only_exposed_metrics_and_labels(served):
    exposed = exposition(served.metrics)
    assert "qaa_time_to_first_token_seconds_bucket" in exposed and "qaa_requests_total" in exposed
    dash = json.loads(DASHBOARD.read_text())
    exprs = queries(dash)
    assert len(exprs) >= 20
    used = set()
    for expr in exprs:
        ast = promql_parser.parse(expr.replace("$__rate_interval", "1m").replace("$instance", ".*"))
        for vs in selectors(ast):
            assert vs.name in exposed, f"{vs.name} (in {expr}) is not in /metrics"
            used.add(vs.name)
            for m in vs.matchers.matchers:
                assert m.name in exposed[vs.name] | SCRAPE_LABELS, f"{vs.name} has no label {m.name}"
        for agg in (n for n in walk(ast) if type(n).__name__ == "AggregateExpr" and n.modifier is not None):
            labels = set().union(*(exposed[v.name] for v in selectors(agg.expr))) | SCRAPE_LABELS
            assert set(agg.modifier.labels) <= labels, f"by {agg.modifier.labels} in {expr}"
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            metric, label = re.fullmatch(r"label_values\((\w+), *(\w+)\)", var["definition"]).groups()
            assert metric in exposed and label in exposed[metric] | SCRAPE_LABELS
    # what the issue asks the dashboard to show: outcomes, the four latencies, tokens in and
    # out, running/waiting, KV use, adapter loads and cache hits/misses by tier
    must = {"qaa_requests_total", "qaa_time_to_first_token_seconds_bucket", "qaa_inter_token_latency_seconds_bucket",
            "qaa_e2e_request_latency_seconds_bucket", "qaa_queue_time_seconds_bucket", "qaa_prompt_tokens_total",
            "qaa_generation_tokens_total", "qaa_requests_running", "qaa_requests_waiting", "qaa_kv_cache_usage_ratio",
            "qaa_adapter_load_seconds_count", "qaa_adapter_cache_hits_total", "qaa_adapter_cache_misses_total"}
    assert must <= used, must - used


def test_dashboard_panels_use_the_datasource_variable_and_do_not_overlap():
    dash = json.loads(DASHBOARD.read_text())
    assert [v["name"] for v in dash["templating"]["list"]][0] == "datasource"
    cells = set()
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        g = p["gridPos"]
        here = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert g["x"] + g["w"] <= 24 and not here & cells, p["title"]
        cells |= here


def _port(spec: str) -> tuple[int, int]:
    host, container = spec.split(":")[-2:]
    return int(host), int(container)


def test_compose_prometheus_and_grafana_point_at_each_other(served):
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    svc = compose["services"]
    assert set(svc) == {"qaa-serve", "prometheus", "grafana"}
    # qaa-serve: built from the repository's Dockerfile, listening where the image listens
    q = svc["qaa-serve"]
    assert (DOCKER / q["build"]["context"] / q["build"]["dockerfile"]).resolve() == ROOT / "Dockerfile"
    docker = (ROOT / "Dockerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (.*)$", docker, re.M).group(1))
    port = int(entry[entry.index("--port") + 1])
    assert re.search(rf"^EXPOSE {port}$", docker, re.M)
    assert [_port(p) for p in q["ports"]] == [(port, port)]
    # its keys file comes as a compose secret, mounted where its command reads it, and the
    # example keys file is one the server accepts
    (secret,) = q["secrets"]
    assert q["command"][q["command"].index("--api-keys") + 1] == f"/run/secrets/{secret}"
    assert compose["secrets"][secret]["file"] == "./keys.json"
    from server.auth import Auth

    assert Auth.from_file(DOCKER / "keys.example.json").enabled
    from server.cli import parse_args

    drain = parse_args(q["command"]).drain_seconds  # the drain runs before the engine's kill
    assert int(q["stop_grace_period"].rstrip("s")) > drain and q["stop_signal"] == "SIGTERM"
    # Prometheus scrapes qaa-serve's /metrics by service name and port
    prom = svc["prometheus"]
    mounts = dict(v.split(":")[:2] for v in prom["volumes"] if v.startswith("."))
    config_path = next(a.split("=", 1)[1] for a in prom["command"] if a.startswith("--config.file="))
    assert mounts["./prometheus.yml"] == config_path
    cfg = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (job,) = cfg["scrape_configs"]
    (target,) = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert target == f"qaa-serve:{port}" and job.get("metrics_path", "/metrics") == "/metrics"
    assert served.metrics.startswith("# HELP")  # what the fixture read from /metrics: an exposition
    # Grafana: the data source is that Prometheus, the dashboard folder is mounted where the
    # provider reads it, and the file there is the dashboard
    graf = svc["grafana"]
    gm = dict(v.split(":")[:2] for v in graf["volumes"] if v.startswith("."))
    prov = DOCKER / "grafana" / "provisioning"
    assert gm["./grafana/provisioning"] == "/etc/grafana/provisioning" and prov.is_dir()
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())["datasources"]
    prom_port = _port(prom["ports"][0])[1]
    assert ds["type"] == "prometheus" and ds["url"] == f"http://prometheus:{prom_port}"
    (provider,) = yaml.safe_load((prov / "dashboards" / "qaa-serve.yaml").read_text())["providers"]
    assert gm["../grafana"] == provider["options"]["path"]
    assert (DOCKER / "../grafana" / DASHBOARD.name).resolve() == DASHBOARD
    home = graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


def test_dockerfile_lints_clean_and_has_the_production_shape():
    hadolint = Path(sys.executable).with_name("hadolint")
    r = subprocess.run([str(hadolint), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    d = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=[\w./:-]+@sha256:[0-9a-f]{64}$", d, re.M)  # pinned by digest
    assert len(re.findall(r"^FROM \$\{BASE\} AS \w+$", d, re.M)) == 2  # build + runtime
    runtime = d[d.index("AS runtime"):]
    assert "gcc" not in runtime and re.search(r"^USER [1-9]\d*:[1-9]\d*$", runtime, re.M)  # no compiler, not root
    assert re.search(r"^HEALTHCHECK .*/health", runtime, re.M | re.S) and "STOPSIGNAL SIGTERM" in runtime
    build = d[:d.index("AS runtime")]
    assert build.index("pip install -r") < build.index("COPY adapters")  # dependencies before the source
    assert "library()" in build and "default_model_dir()" in build  # kernels and model at build time
    # the build context is exactly what the build stage copies (no venv, store or caches)
    lines = [x for x in (ROOT / ".dockerignore").read_text().splitlines() if x and not x.startswith("#")]
    copied = {src for args in re.findall(r"^COPY (?!--from)(.+) \S+$", build, re.M) for src in args.split()}
    assert lines[0] == "*" and {x[1:].rstrip("/") for x in lines if x.startswith("!")} == copied


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_adapter_directories_are_readable_by_other_users(tmp_path, umask):
    import os

    from adapters.files import stage_dir

    old = os.umask(umask)
    try:
        d = stage_dir(tmp_path, {"a.json": b"{}", "b.bin": b"x"}, ".t-")
    finally:
        os.umask(old)
    assert d.stat().st_mode & 0o777 == 0o755
    assert {f.name: f.stat().st_mode & 0o777 for f in d.iterdir()} == {"a.json": 0o644, "b.bin": 0o644}
