"""Adapter affinity on Ray Serve (a script, not a test).

    python -m server.bench_fleet [--adapters 1000] [--warmup 200] [--requests 300] [--repeats 2]
        [--host-adapters 64[,128,...]] [--device-adapters 8[,...]] [--new-tokens 8] [--model PATH]

One local Ray cluster, 2 engine replicas (1 CPU each), one shared store holding --adapters
LoRA adapters. The same power-law workload (adapter rank k drawn with P(k) ∝ k^-alpha, fixed
seed; closed loop, --concurrency clients) runs through the ingress against a fresh
deployment per run, alternating; its first --warmup requests fill the caches (their loads are
printed as "cold"), the next --requests are measured:
  affinity   requests carry the adapter as Serve's multiplexed model id (@serve.multiplexed)
  plain      no id: Serve's default power-of-two-choices balancing, blind to adapters
Each pair of per-replica cache sizes (--host-adapters x --device-adapters, device <= host;
a replica reports as many ids to Serve as its host tier holds) is one configuration.
Printed per run and as medians: disk reads (host-tier misses), split into first uses (an
adapter the measured part uses and the warm-up did not: read once whatever the routing) and
repeat reads (the rest: what routing and cache sizes decide), device loads (device-tier
misses), all per 100 requests summed over both replicas; the adapters both replicas hold in
host memory at the end; client-side TTFT p50/p99 of streaming requests; and what a replay of
the same stream through ideal routing and LRU caches loads (server.fleet_replay).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import socket
import statistics
import tempfile
import time

import numpy as np


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_store(root: str, model_dir, n: int) -> None:
    """n LoRA adapters (rank 4 on q_proj/v_proj, random) written straight into the store."""
    import torch

    from adapters.files import to_bytes
    from adapters.lora import LoraConfig
    from adapters.registry import get_type
    from adapters.base import Adapter
    from engine.config import ModelConfig
    from server.store import Store

    shape = ModelConfig.from_dir(model_dir).shape()
    store = Store(root, shape, refresh_seconds=3600)
    t = get_type("lora")
    g = torch.Generator().manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    for i in range(n):
        tensors = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in t.init(cfg, shape, g).items()}
        store.put("default", f"ad-{i:04d}", *to_bytes(Adapter("lora", cfg, tensors, shape)))


def workload(n_adapters: int, n_requests: int, alpha: float, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    p = np.arange(1, n_adapters + 1, dtype=float) ** -alpha
    return [f"ad-{k:04d}" for k in rng.choice(n_adapters, size=n_requests, p=p / p.sum())]


def run_once(url: str, names: list[str], concurrency: int, new_tokens: int) -> list[float]:
    """Closed loop: TTFT of each streaming request (seconds)."""
    import httpx

    def one(c: httpx.Client, name: str) -> float:
        t0 = time.perf_counter()
        body = {"inputs": "Give three tips for staying healthy.",
                "parameters": {"adapter_id": name, "max_new_tokens": new_tokens, "ignore_eos": True}}
        ttft = None
        with c.stream("POST", url + "/generate_stream", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if ttft is None and line.startswith("data:"):
                    ttft = time.perf_counter() - t0
        return ttft

    it = iter(names)
    out = []

    def client():
        with httpx.Client(timeout=600) as c:
            for name in it:  # the iterator is shared: each client takes the next request
                out.append(one(c, name))

    with cf.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: client(), range(concurrency)))
    return out


def _ints(text: str) -> list[int]:
    """A comma-separated list of sizes (one value: no sweep)."""
    return [int(x) for x in text.split(",")]


def replica_stats(handle, replicas: int) -> dict:
    """{replica: (its adapter cache counters, the adapters in its host tier)}."""
    seen = {}
    for _ in range(200):
        name, counts, held = handle.stats.remote().result()
        seen[name] = counts, set(held)
        if len(seen) == replicas:
            return seen
    raise RuntimeError(f"reached {len(seen)} of {replicas} replicas")


def measure(url: str, app_args: dict, warm: list[str], names: list[str], a) -> dict:
    """One run on a fresh deployment: loads per 100 measured requests, overlap, TTFT."""
    from ray import serve

    from server.ray_app import build

    serve.run(build(app_args), name="bench", route_prefix="/")
    engine = serve.get_deployment_handle("Engine", app_name="bench")
    try:
        run_once(url, [None] * 4, 2, 1)  # base-model requests: connections and both replicas up
        start = replica_stats(engine, 2)
        run_once(url, warm, a.concurrency, a.new_tokens)
        before = replica_stats(engine, 2)
        ttft = run_once(url, names, a.concurrency, a.new_tokens)
        after = replica_stats(engine, 2)
    finally:
        serve.delete("bench")

    def delta(x, y, key):
        return sum(y[r][0][key] - x[r][0][key] for r in y)

    per100 = 100 / len(names)
    q = np.percentile(ttft, [50, 99])
    held = [h for _, h in after.values()]
    return {"cold": delta(start, before, "misses_host") * 100 / max(len(warm), 1),
            "disk": delta(before, after, "misses_host") * per100,
            "device": delta(before, after, "misses_device") * per100,
            "both": len(set.intersection(*held)), "p50": q[0], "p99": q[1]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="local checkpoint dir (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=300, help="measured requests per run")
    ap.add_argument("--warmup", type=int, default=200, help="requests per run before the measured ones")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--host-adapters", type=_ints, default=[64], help="host-tier adapters per replica (a list sweeps)")
    ap.add_argument("--device-adapters", type=_ints, default=[8], help="device-slot adapters per replica (a list sweeps)")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray import serve

    from engine.weights import resolve_model_dir
    from server.fleet_replay import replay

    model = resolve_model_dir(a.model)
    root = tempfile.mkdtemp(prefix="qaa-fleet-bench-")
    t0 = time.perf_counter()
    make_store(root, model, a.adapters)
    print(f"store: {a.adapters} adapters in {time.perf_counter() - t0:.0f} s", flush=True)
    stream = workload(a.adapters, a.warmup + a.requests, a.alpha)
    warm, names = stream[:a.warmup], stream[a.warmup:]
    print(f"workload: {a.warmup} warm-up + {a.requests} measured requests over {len(set(stream))} distinct adapters "
          f"(alpha {a.alpha}; {len(set(names))} in the measured part)", flush=True)
    floor = len(set(names) - set(warm)) * 100 / len(names)  # read from disk once whatever the routing
    print(f"floor: {floor:.1f} disk reads per 100 measured requests are first uses", flush=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}})
    port = _port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    configs = [(h, d) for h in a.host_adapters for d in a.device_adapters if d <= h]
    results = {c: {"affinity": [], "plain": []} for c in configs}
    t0 = time.perf_counter()
    try:
        for host, dev in configs:
            for rep in range(a.repeats):
                for mode in ("affinity", "plain"):
                    row = measure(url, {"model": str(model), "adapter_dir": root, "replicas": 2, "engine_num_cpus": 1,
                                        "max_running": a.concurrency, "max_host_adapters": host,
                                        "max_device_adapters": dev, "device": "cpu", "max_seq_len": 256,
                                        "affinity": mode == "affinity", "refresh_seconds": 3600}, warm, names, a)
                    results[host, dev][mode].append(row)
                    print(f"host {host:3d} device {dev:3d} run {rep + 1} {mode:8s}: cold disk {row['cold']:5.1f} | "
                          f"measured disk {row['disk']:5.1f} (repeat {row['disk'] - floor:5.1f})  device "
                          f"{row['device']:5.1f}  held by both {row['both']:3d}  TTFT p50 {row['p50'] * 1000:6.1f} ms  "
                          f"p99 {row['p99'] * 1000:6.1f} ms  [{time.perf_counter() - t0:.0f} s]", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    ideal = {(c, m): replay(stream, a.warmup, m == "affinity", c[1], c[0]) for c in configs
             for m in ("affinity", "plain")}
    print_table(results, ideal, floor)


def print_table(results: dict, ideal: dict, floor: float) -> None:
    """Medians per configuration and mode, then affinity / plain, as a markdown table."""
    print("\n| host / device per replica | routing | disk reads / 100 req | repeat reads / 100 req "
          "| device loads / 100 req | replay: disk, device | held by both | TTFT p50 | TTFT p99 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (host, dev), by_mode in results.items():
        med = {m: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for m, rows in by_mode.items()}
        for m, x in med.items():
            i = ideal[(host, dev), m]
            print(f"| {host} / {dev} | {m} | {x['disk']:.1f} | {x['disk'] - floor:.1f} | {x['device']:.1f} | "
                  f"{i.disk:.1f}, {i.device:.1f} | {x['both']:.0f} | {x['p50'] * 1000:.0f} ms | {x['p99'] * 1000:.0f} ms |")
        af, pl = med["affinity"], med["plain"]
        r = {k: af[k] / max(pl[k], 1e-9) for k in af}
        rep = (af["disk"] - floor) / max(pl["disk"] - floor, 1e-9)
        print(f"| {host} / {dev} | **affinity / plain** | **{r['disk']:.2f}** | **{rep:.2f}** | "
              f"**{r['device']:.2f}** | | | {r['p50']:.2f} | {r['p99']:.2f} |")
    print(f"\nfirst uses (in every disk-read count above): {floor:.1f} per 100 measured requests")


if __name__ == "__main__":
    main()
