"""`qaa-loadtest`: an S-LoRA/Punica-style multi-adapter workload against a running server.

    qaa-loadtest --url http://127.0.0.1:8000 --adapters 100 --types qaa,lora,sora,prefix \\
                 --alpha 1 --rate 4 --duration 60 --baseline --out loadtest-report
    qaa-loadtest --url URL --sweep-adapters 1,10,100,1000 --concurrency 16 --requests 96 --baseline

It uploads the adapters first (synthetic, or --from-dir), then runs the workload once per
adapter count (and once with the base model only for --baseline), and writes report.json,
report.md, requests.jsonl and PNG plots to --out. It only talks to --url.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from loadtest import client as http
from loadtest import report as rep
from loadtest.runner import run
from loadtest.synthetic import TYPES
from loadtest.uploads import AdapterSet, cleanup, prepare
from loadtest.workload import PATTERNS, Workload


def _range(text: str) -> tuple[int, int]:
    a, sep, b = text.partition(":")
    try:
        lo, hi = int(a), int(b if sep else a)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not A:B (two integers) or N") from None
    return lo, hi


def _types(text: str) -> dict[str, float]:
    out = {}
    for part in filter(None, text.split(",")):
        kind, _, w = part.partition(":")
        if kind not in TYPES:
            raise argparse.ArgumentTypeError(f"unknown adapter type {kind!r} (use {', '.join(TYPES)})")
        try:
            out[kind] = float(w) if w else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: the ratio after ':' must be a number") from None
        if out[kind] <= 0:
            raise argparse.ArgumentTypeError(f"{part!r}: the ratio must be > 0")
    if not out:
        raise argparse.ArgumentTypeError("give at least one adapter type")
    return out


def _counts(text: str) -> list[int]:
    try:
        xs = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not xs or any(x < 1 for x in xs):
        raise argparse.ArgumentTypeError("adapter counts must be >= 1")
    return xs


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    # a copy of engine.cli_parser's (loadtest imports nothing of the other packages):
    # "(default: X)" only for real defaults, and the description's line breaks kept
    def _get_help_string(self, action):
        text, d = action.help or "", action.default
        if "%(default)" in text or not action.option_strings or d is None or d is False or d == "" \
                or d is argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qaa-serve")
    except PackageNotFoundError:
        return "unknown"


def _positive(kind):
    def parse(text: str):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not x > 0 or x == float("inf"):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return x

    parse.__name__ = kind.__name__
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    ap = _Parser("qaa-loadtest", description=__doc__, formatter_class=_HelpFormatter)
    ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}", help="print the version and exit")
    ap.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--api-key", metavar="KEY", help="a tenant's key (the adapters are uploaded for that tenant)")
    a = ap.add_argument_group("adapters")
    a.add_argument("--adapters", type=int, default=10, metavar="N", help="synthetic adapters to create and spread requests over")
    a.add_argument("--sweep-adapters", type=_counts, metavar="LIST", help="run once per count, e.g. 1,10,100,1000")
    a.add_argument("--types", type=_types, default=",".join(TYPES), metavar="LIST",
                   help="adapter types and ratios, e.g. qaa,lora or qaa:2,lora:1 (equal when no ratio)")
    a.add_argument("--from-dir", type=Path, metavar="DIR", help="upload the adapter directories under DIR instead of synthetic ones")
    a.add_argument("--popularity", choices=PATTERNS, default="powerlaw",
                   help="powerlaw (with --alpha), or Punica's distinct|uniform|skewed|identical")
    a.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of adapter popularity")
    a.add_argument("--keep-adapters", action="store_true", help="leave uploaded adapters on the server")
    a.add_argument("--adapter-prefix", default="lt", metavar="PREFIX", help="prefix of the adapter ids this tool creates")
    w = ap.add_argument_group("load")
    w.add_argument("--rate", type=_positive(float), help="open loop: mean arrivals per second")
    w.add_argument("--cv", type=_positive(float), default=1.0, help="open loop: gamma arrivals' coefficient of variation (1 = Poisson)")
    w.add_argument("--concurrency", type=_positive(int), help="closed loop: requests in flight (default: 8 when no --rate)")
    w.add_argument("--input-len", type=_range, default="32:128", metavar="A:B", help="prompt tokens A:B (uniform)")
    w.add_argument("--output-len", type=_range, default="32:128", metavar="A:B", help="generated tokens A:B (uniform, EOS ignored)")
    w.add_argument("--duration", type=_positive(float), metavar="S", help="seconds of sending per run")
    w.add_argument("--requests", type=_positive(int), metavar="N", help="requests per run (default: 100 when no --duration)")
    w.add_argument("--seed", type=int, default=0, help="seed of the workload (arrivals, prompts, lengths, adapters)")
    w.add_argument("--baseline", action="store_true", help="also run the same workload on the base model only")
    w.add_argument("--slo-ttft", type=_positive(float), default=1.0, metavar="S", help="time-to-first-token SLO in seconds")
    w.add_argument("--request-timeout", type=_positive(float), default=300.0, metavar="S", help="seconds before a request counts as timed out")
    ap.add_argument("--out", type=Path, default="loadtest-report", metavar="DIR", help="where the report goes")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    args = ap.parse_args(argv)
    if args.rate is not None and args.concurrency is not None:
        ap.error("--rate (open loop) and --concurrency (closed loop) exclude each other")
    if args.duration is None and args.requests is None:
        args.requests = 100
    if args.adapters < 0:
        ap.error("--adapters must be >= 0")
    if args.from_dir is not None and not args.from_dir.is_dir():
        ap.error(f"--from-dir {args.from_dir}: not a directory")
    args.url = args.url.rstrip("/")
    if not args.url.startswith(("http://", "https://")):
        ap.error(f"--url {args.url!r} must start with http:// or https://")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    counts = args.sweep_adapters or ([args.adapters] if args.adapters else [])
    try:
        info = http.info(args.url, args.api_key)
        base = Workload(n_adapters=0, popularity=args.popularity, alpha=args.alpha, rate=args.rate, cv=args.cv,
                        concurrency=args.concurrency or 8, input_len=args.input_len, output_len=args.output_len,
                        requests=args.requests, duration=args.duration, seed=args.seed,
                        vocab_size=info["model_config"]["vocab_size"])
        longest = args.input_len[1] + args.output_len[1] + (30 if "prefix" in args.types else 0)
        if longest > info["max_total_tokens"]:
            raise ValueError(f"--input-len + --output-len (up to {longest} tokens with prefix adapters) exceed "
                             f"the server's max_total_tokens {info['max_total_tokens']}")
    except (ValueError, http.ServerError) as e:
        print(f"qaa-loadtest: error: {e}", file=sys.stderr)
        return 2
    aset = AdapterSet()
    try:
        prepare(aset, args.url, max(counts, default=0), args.types, info, args.seed, args.api_key,
                args.adapter_prefix, args.from_dir, show_progress=not args.quiet)
        asyncio.run(_warm(args, info))
        plan = ([("baseline", base)] if args.baseline or not counts else [])
        plan += [(f"adapters={n}", replace(base, n_adapters=n)) for n in counts]
        summaries, records = [], {}
        for label, w in plan:
            before = http.metrics(args.url, args.api_key)
            recs, wall = asyncio.run(run(w, args.url, aset.ids, info["model_id"], args.api_key, args.request_timeout,
                                         label, show_progress=not args.quiet))
            loads = rep.adapter_loads(before, http.metrics(args.url, args.api_key))
            summaries.append(rep.summarize(label, w.n_adapters, recs, wall, args.slo_ttft, aset.types, loads))
            records[label] = recs
        report = {"command": "qaa-loadtest " + shlex.join(argv), "url": args.url, "server": info,
                  "workload": {k: v for k, v in asdict(base).items() if k != "n_adapters"},
                  "types": args.types, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": summaries}
        paths = rep.write(args.out, report, records)
    except http.ServerError as e:
        print(f"qaa-loadtest: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nqaa-loadtest: interrupted", file=sys.stderr)
        return 130
    finally:
        if not args.keep_adapters:
            cleanup(args.url, aset, args.api_key)
    print(rep.markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


async def _warm(args, info) -> None:
    """One short request so the server's first-request costs are not in the first run."""
    import httpx

    async with httpx.AsyncClient() as c:
        await http.stream_completion(c, args.url, info["model_id"], http.Record(-1, None, 4, 2), [100, 101, 102, 103],
                                     time.perf_counter(), args.api_key, 60)


if __name__ == "__main__":
    sys.exit(main())
