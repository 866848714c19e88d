"""Inter-token latency under admissions: chunked prefill vs whole prompts (a script, not a test).

    python -m server.bench_prefill [--budgets 64,8192] [--requests 96] [--repeats 2] [--dtype D]

For each token budget (`--max-num-batched-tokens`; the largest, above every prompt, stands
for whole-prompt prefill), starts qaa-serve as a child process and runs qaa-loadtest against
it: closed loop, --concurrency requests in flight, prompts of --input-len tokens, exactly
--output-len tokens each (EOS ignored), over --adapters synthetic adapters of all four
types. Budgets alternate over --repeats rounds, so drift hits each alike. Printed per run:
output tokens/s, mean and p99 TTFT, median time per output token (TPOT), p50/p99
inter-token latency (ITL, every gap between streamed tokens) and p99 ITL / median TPOT.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from server.bench import _port


def _serve(budget: int, args) -> tuple[subprocess.Popen, str]:
    port = _port()
    cmd = [sys.executable, "-m", "server.cli", "--port", str(port), "--adapter-dir", tempfile.mkdtemp(prefix="qaa-bp-"),
           "--max-running", str(args.concurrency), "--max-device-adapters", str(args.adapters),
           "--max-seq-len", str(args.max_seq_len), "--max-num-batched-tokens", str(budget), "--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            if proc.poll() is not None:
                raise SystemExit(f"qaa-serve did not start: {' '.join(cmd)}")
            time.sleep(0.2)


def _run(url: str, args, out: Path) -> dict:
    cmd = ["qaa-loadtest", "--url", url, "--adapters", str(args.adapters), "--popularity", "uniform",
           "--concurrency", str(args.concurrency), "--input-len", args.input_len, "--output-len", args.output_len,
           "--requests", str(args.requests), "--seed", "1", "--out", str(out), "--quiet"]
    subprocess.run([str(Path(sys.executable).with_name("qaa-loadtest")), *cmd[1:]], check=True,
                   stdout=subprocess.DEVNULL)
    (run,) = json.loads((out / "report.json").read_text())["runs"]
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--budgets", default="64,8192", help="--max-num-batched-tokens values to compare")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--input-len", default="32:512")
    ap.add_argument("--output-len", default="64:64")
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="qaa-bench-prefill-"))
    print(f"concurrency={args.concurrency} input_len={args.input_len} output_len={args.output_len} "
          f"requests={args.requests} adapters={args.adapters} dtype={args.dtype or 'auto'}", flush=True)
    for rep in range(args.repeats):
        for b in budgets:
            proc, url = _serve(b, args)
            try:
                r = _run(url, args, tmp / f"{b}-{rep}")
            finally:
                proc.terminate()
                proc.wait()
            itl, tpot, ttft = r["itl_s"], r["tpot_s"], r["ttft_s"]
            print(f"round={rep} budget={b:<5d} out_tok_s={r['output_throughput']:6.1f} ttft_mean_ms={1e3 * ttft['mean']:7.0f} "
                  f"ttft_p99_ms={1e3 * ttft['p99']:7.0f} tpot_p50_ms={1e3 * tpot['p50']:6.1f} "
                  f"itl_p50_ms={1e3 * itl['p50']:6.1f} itl_p99_ms={1e3 * itl['p99']:6.1f} "
                  f"itl_p99/tpot_p50={itl['p99'] / tpot['p50']:.2f} errors={r['errors']}", flush=True)


if __name__ == "__main__":
    main()
