"""Serving throughput with many adapters (a script, not a test).

    python -m server.bench [--concurrency 8,32] [--new-tokens 32] [--repeats 5] [--model PATH]
                           [--dtype float32,bfloat16] [--device auto] [--compile]

Starts qaa-serve as a child process (loopback, a free port; a separate process so the load
generator's threads do not share its interpreter), uploads adapters over HTTP, and in one
run measures aggregate generated tokens/s of C concurrent streaming
requests:
  1. each request with a different adapter, types mixed (lora, sora, prefix, qaa), vs the
     same requests with no adapter: ratio = adapters / base;
  2. LoRA only: qaa-serve vs HF PEFT's mixed-adapter batch (`generate(adapter_names=...)`)
     on the same model, prompts and adapters, PEFT in the server's dtype: ratio = qaa-serve / PEFT.
Every request generates exactly --new-tokens tokens (EOS ignored on both sides). Each side
runs --repeats times, alternating; printed: the best of each side and their ratio, and the
median and range of the ratios of back-to-back pairs.
With several --dtype values, one server per dtype runs (idle while another is measured), the
loads alternate between them, and each dtype's throughput is also compared with the first's
(e.g. bf16 / fp32, mixed adapters and base). Without --dtype: the server's default (auto).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = [
    "Give three tips for staying healthy.", "What is the capital of France?", "Write a short poem about the sea.",
    "Explain how a transformer works.", "List five fruits.", "Translate 'good morning' into Spanish.",
    "Why is the sky blue?", "Describe the water cycle.",
]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _adapters(shape, kinds, count, seed=0):
    from adapters.base import Adapter
    from adapters.lora import LoraConfig
    from adapters.prefix import PrefixConfig
    from adapters.qaa import QAAConfig
    from adapters.registry import get_type
    from adapters.sora import SoraConfig

    configs = {"lora": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
               "sora": lambda: SoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
               "prefix": lambda: PrefixConfig(num_virtual_tokens=30),
               "qaa": lambda: QAAConfig(circuit_layers=2)}
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        cfg = configs[kind]()
        t = get_type(kind)
        t.check_config(cfg, shape)
        tensors = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in t.init(cfg, shape, g).items()}
        out.append(Adapter(kind, cfg, tensors, shape))
    return out


def _stream(client, url, body) -> int:
    n = 0
    with client.stream("POST", url + "/generate_stream", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and json.loads(line[5:])["token"] is not None:
                n += 1
    return n


def _paired(a: list[float], b: list[float]) -> str:
    """The ratios of runs made back to back: their median and range (this machine is noisy)."""
    r = sorted(x / y for x, y in zip(a, b))
    return f"paired_ratio_median={statistics.median(r):.2f} range={r[0]:.2f}-{r[-1]:.2f}"


def _load(url, names, new_tokens) -> float:
    """Aggregate tokens/s of len(names) concurrent streams. One pooled client, its connections
    opened before the clock starts: what is timed is the server, not the client's set-up
    (a fresh httpx client builds an SSL context: 25 ms of CPU here, on the cores the server uses)."""
    import httpx

    bodies = [{"inputs": PROMPTS[i % len(PROMPTS)], "parameters": {
        "adapter_id": n, "max_new_tokens": new_tokens, "ignore_eos": True}} for i, n in enumerate(names)]
    with httpx.Client(limits=httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))) as client, \
            cf.ThreadPoolExecutor(len(bodies)) as pool:
        # warm: every adapter's first load and every connection happen before the clock
        list(pool.map(lambda b: _stream(client, url, {**b, "parameters": {**b["parameters"], "max_new_tokens": 1}}), bodies))
        t0 = time.perf_counter()
        total = sum(pool.map(lambda b: _stream(client, url, b), bodies))
        return total / (time.perf_counter() - t0)


def _peft_tok_s(model_dir, adapter_dirs, new_tokens, dtype=torch.float32, device="cpu") -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    pm = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name="a0")
    for i, d in enumerate(adapter_dirs[1:], 1):
        pm.load_adapter(d, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapter_dirs))]
    enc = tok([PROMPTS[i % len(PROMPTS)] for i in range(len(names))], return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        pm.generate(**enc, adapter_names=names, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
        t0 = time.perf_counter()
        out = pm.generate(**enc, adapter_names=names, **kw)
    assert out.shape[1] - enc.input_ids.shape[1] == new_tokens
    return len(names) * new_tokens / (time.perf_counter() - t0)


def _start(args, port, store, max_c, dtype):
    """A qaa-serve child on `port` (dtype None: its default); returns (process, url) once healthy."""
    import os
    import subprocess
    import sys

    import httpx

    cmd = [sys.executable, "-m", "server.cli", "--port", str(port), "--adapter-dir", store,
           "--max-running", str(max_c), "--max-device-adapters", str(max_c), "--max-seq-len", "512"]
    if args.model:
        cmd += ["--model", args.model]
    if dtype:
        cmd += ["--dtype", dtype]
    cmd += ["--device", args.device] + (["--compile"] if args.compile else [])
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return server, url
        except httpx.HTTPError:
            if server.poll() is not None:
                raise SystemExit("qaa-serve did not start")
            time.sleep(0.2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--concurrency", default="8,32")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--types", default="lora,sora,prefix,qaa")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--repeats", type=int, default=5, help="alternating runs of each side (best and paired ratios printed)")
    ap.add_argument("--dtype", default=None, help="the server's --dtype; several, comma-separated, are compared "
                                                  "with the first (default: the server's own default)")
    ap.add_argument("--device", default="auto", help="qaa-serve's and PEFT's device")
    ap.add_argument("--compile", action="store_true", help="qaa-serve --compile (its warm-up happens before timing)")
    args = ap.parse_args(argv)
    conc = [int(c) for c in args.concurrency.split(",")]
    dtypes = args.dtype.split(",") if args.dtype else [None]
    servers = {}
    try:
        for dt in dtypes:  # one store each: a server's residency does not see another's uploads
            servers[dt] = _start(args, _port(), tempfile.mkdtemp(prefix="qaa-bench-"), max(conc), dt)
        _measure(args, conc, servers)
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait()


def _measure(args, conc, servers: dict):
    """Upload the adapters to every server {dtype: (process, url)}, then time them, alternating."""
    import httpx

    from adapters.files import CONFIG_NAME, WEIGHTS_NAME, save_dir, to_bytes
    from engine.config import ModelConfig
    from engine.engine import DTYPES
    from engine.weights import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    first_url = next(iter(servers.values()))[1]
    name = httpx.get(first_url + "/health").json()["model"]
    infos = {dt: httpx.get(url + "/info").json() for dt, (_, url) in servers.items()}
    served = {dt: i["model_dtype"] for dt, i in infos.items()}
    devices = {dt: i["model_device_type"] for dt, i in infos.items()}
    print(f"model={name} threads={torch.get_num_threads()} new_tokens={args.new_tokens} types={args.types} "
          f"dtypes={','.join(served.values())} device={next(iter(devices.values()))} compile={args.compile}")

    def upload(url, name, ad):
        cfg, weights = to_bytes(ad)
        files = {CONFIG_NAME: (CONFIG_NAME, io.BytesIO(cfg)), WEIGHTS_NAME: (WEIGHTS_NAME, io.BytesIO(weights))}
        r = httpx.put(f"{url}/v1/adapters/{name}", files=files, timeout=120)
        assert r.status_code in (200, 201), r.text

    shape = ModelConfig.from_dir(model_dir).shape()
    mixed = _adapters(shape, args.types.split(","), max(conc))
    loras = _adapters(shape, ["lora"], max(conc), seed=1)
    for _, url in servers.values():
        for i, ad in enumerate(mixed):
            upload(url, f"mixed-{i}", ad)
        for i, ad in enumerate(loras):
            upload(url, f"lora-{i}", ad)
    for c in conc:
        base = {dt: [] for dt in servers}
        with_ad = {dt: [] for dt in servers}
        for _ in range(args.repeats):  # alternate, so drift hits every side alike
            for dt, (_, url) in servers.items():
                base[dt].append(_load(url, [None] * c, args.new_tokens))
                with_ad[dt].append(_load(url, [f"mixed-{i}" for i in range(c)], args.new_tokens))
        ref = next(iter(servers))
        for dt in servers:
            print(f"concurrency={c:<3d} dtype={served[dt]:<8s} base_tok_s={max(base[dt]):7.1f} "
                  f"mixed_adapters_tok_s={max(with_ad[dt]):7.1f} ratio={max(with_ad[dt]) / max(base[dt]):.2f} "
                  f"{_paired(with_ad[dt], base[dt])}", flush=True)
        for dt in list(servers)[1:]:
            for what, runs in (("mixed_adapters", with_ad), ("base", base)):
                print(f"concurrency={c:<3d} {what} {served[dt]}/{served[ref]}="
                      f"{max(runs[dt]) / max(runs[ref]):.2f} {_paired(runs[dt], runs[ref])}", flush=True)
    if not args.no_peft:
        tmp = Path(tempfile.mkdtemp(prefix="qaa-bench-peft-"))
        dirs = [str(save_dir(ad, tmp / f"lora-{i}")) for i, ad in enumerate(loras)]
        for dt, (_, url) in servers.items():
            for c in conc:
                ours, peft = [], []
                for _ in range(args.repeats):
                    ours.append(_load(url, [f"lora-{i}" for i in range(c)], args.new_tokens))
                    peft.append(_peft_tok_s(model_dir, dirs[:c], args.new_tokens, DTYPES[served[dt]], devices[dt]))
                print(f"concurrency={c:<3d} dtype={served[dt]:<8s} lora_only qaa_serve_tok_s={max(ours):7.1f} "
                      f"peft_adapter_names_tok_s={max(peft):7.1f} ratio={max(ours) / max(peft):.2f} "
                      f"{_paired(ours, peft)}", flush=True)


if __name__ == "__main__":
    main()
