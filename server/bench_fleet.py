"""Adapter affinity on Ray Serve (a script, not a test).

    python -m server.bench_fleet [--adapters 1000] [--requests 300] [--repeats 2] [--model PATH]

One local Ray cluster, 2 engine replicas (1 CPU each), one shared store holding --adapters
LoRA adapters. The same power-law workload (adapter rank k drawn with P(k) ∝ k^-alpha, fixed
seed; closed loop, --concurrency clients) runs through the ingress against a fresh
deployment per run, alternating; its first --warmup requests fill the caches (their loads are
printed as "cold"), the next --requests are measured:
  affinity   requests carry the adapter as Serve's multiplexed model id (@serve.multiplexed)
  plain      no id: Serve's default power-of-two-choices balancing, blind to adapters
Printed per run and as medians: disk reads (host-tier misses) and device loads (device-tier
misses) per 100 requests, summed over both replicas, and client-side TTFT p50/p99 of
streaming requests. The replicas' host tier and Serve's per-replica model count are both
--host-adapters, so what a replica reports holding is what it holds.
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


def replica_stats(handle, replicas: int) -> dict:
    seen = {}
    for _ in range(200):
        name, stats = handle.stats.remote().result()
        seen[name] = stats
        if len(seen) == replicas:
            return seen
    raise RuntimeError(f"reached {len(seen)} of {replicas} replicas")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="local checkpoint dir (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=300, help="measured requests per run")
    ap.add_argument("--warmup", type=int, default=200, help="requests per run before the measured ones")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--host-adapters", type=int, default=64, help="host-tier adapters per replica")
    ap.add_argument("--device-adapters", type=int, default=8, help="device-slot adapters per replica")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["QAA_RAY_ADAPTERS_PER_REPLICA"] = str(a.host_adapters)
    import ray
    from ray import serve

    from engine.weights import resolve_model_dir
    from server.ray_app import build

    model = resolve_model_dir(a.model)
    root = tempfile.mkdtemp(prefix="qaa-fleet-bench-")
    t0 = time.perf_counter()
    make_store(root, model, a.adapters)
    print(f"store: {a.adapters} adapters in {time.perf_counter() - t0:.0f} s", flush=True)
    stream = workload(a.adapters, a.warmup + a.requests, a.alpha)
    warm, names = stream[:a.warmup], stream[a.warmup:]
    print(f"workload: {a.warmup} warm-up + {a.requests} measured requests over {len(set(stream))} distinct adapters "
          f"(alpha {a.alpha}; {len(set(names))} in the measured part)", flush=True)
    first_use = len(set(names) - set(warm))  # read from disk once whatever the routing
    print(f"floor: {first_use * 100 / len(names):.1f} disk reads per 100 measured requests are first uses", flush=True)
    env = {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "QAA_RAY_ADAPTERS_PER_REPLICA": str(a.host_adapters)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    port = _port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    results = {"affinity": [], "plain": []}
    try:
        for rep in range(a.repeats):
            for mode in ("affinity", "plain"):
                app = build({"model": str(model), "adapter_dir": root, "replicas": 2, "engine_num_cpus": 1,
                             "max_running": a.concurrency, "max_host_adapters": a.host_adapters,
                             "max_device_adapters": a.device_adapters, "device": "cpu", "max_seq_len": 256,
                             "affinity": mode == "affinity", "refresh_seconds": 3600})
                serve.run(app, name="bench", route_prefix="/")
                engine = serve.get_deployment_handle("Engine", app_name="bench")
                run_once(url, [None] * 4, 2, 1)  # base-model requests: connections and both replicas up
                start = replica_stats(engine, 2)
                run_once(url, warm, a.concurrency, a.new_tokens)
                before = replica_stats(engine, 2)
                cold = sum(before[r]["misses_host"] - start[r]["misses_host"] for r in before) * 100 / max(len(warm), 1)
                ttft = run_once(url, names, a.concurrency, a.new_tokens)
                after = replica_stats(engine, 2)
                d = {k: sum(after[r][k] - before[r][k] for r in after) for k in next(iter(after.values()))}
                per100 = 100 / len(names)
                q = np.percentile(ttft, [50, 99])
                row = {"disk": d["misses_host"] * per100, "device": d["misses_device"] * per100,
                       "p50": q[0], "p99": q[1]}
                results[mode].append(row)
                print(f"run {rep + 1} {mode:8s}: cold disk reads/100 req {cold:5.1f} | measured: disk reads/100 req "
                      f"{row['disk']:6.1f}  device loads/100 req "
                      f"{row['device']:6.1f}  TTFT p50 {row['p50'] * 1000:7.1f} ms  p99 {row['p99'] * 1000:7.1f} ms",
                      flush=True)
                serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    med = {m: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for m, rows in results.items()}
    aff, pl = med["affinity"], med["plain"]
    print(f"median  affinity: disk {aff['disk']:.1f}  device {aff['device']:.1f}  p50 {aff['p50'] * 1000:.1f} ms  "
          f"p99 {aff['p99'] * 1000:.1f} ms")
    print(f"median  plain   : disk {pl['disk']:.1f}  device {pl['device']:.1f}  p50 {pl['p50'] * 1000:.1f} ms  "
          f"p99 {pl['p99'] * 1000:.1f} ms")
    print(f"affinity / plain: disk reads {aff['disk'] / max(pl['disk'], 1e-9):.2f}  device loads "
          f"{aff['device'] / max(pl['device'], 1e-9):.2f}  TTFT p50 {aff['p50'] / pl['p50']:.2f}  p99 {aff['p99'] / pl['p99']:.2f}")


if __name__ == "__main__":
    main()
