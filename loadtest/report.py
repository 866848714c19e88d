"""Summaries, the JSON and markdown report, and the plots.

Definitions (as vLLM's benchmark_serving and S-LoRA report them):
  throughput   completed requests / wall time; output tok/s = generated tokens of completed
               requests / wall time (wall = first send to last response)
  TTFT         first streamed token - send time
  TPOT         (last token - first token) / (output tokens - 1), per request
  e2e          last token - send time
  SLO          share of all requests sent whose first token came within --slo-ttft
               (failed requests count as misses)
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from loadtest.client import Record

PCTS = (50, 90, 99)
LOAD_METRICS = {"loads": "qaa_adapter_load_seconds_count", "hits": "qaa_adapter_cache_hits_total",
                "misses": "qaa_adapter_cache_misses_total"}


def percentiles(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"mean": None, **{f"p{p}": None for p in PCTS}}
    a = np.asarray(xs, dtype=np.float64)
    return {"mean": float(a.mean()), **{f"p{p}": float(np.percentile(a, p)) for p in PCTS}}


def adapter_loads(before: dict | None, after: dict | None) -> dict | None:
    """Per tier, how many adapter loads, cache hits and misses the server counted during the run."""
    if before is None or after is None:
        return None
    out = {}
    for what, name in LOAD_METRICS.items():
        out[what] = {"device": 0, "host": 0}
        for key, v in after.items():
            if key.startswith(name + "{"):
                tier = key[len(name) + 1:-1].removeprefix("tier=")
                out[what][tier] = int(round(v - before.get(key, 0.0)))
    return out


def summarize(label: str, n_adapters: int, records: list[Record], wall: float, slo_ttft: float,
              types: dict[str, str] | None = None, loads: dict | None = None) -> dict:
    ok = [r for r in records if r.ok]
    wall = max(wall, 1e-9)
    out_tokens = sum(r.output_tokens for r in ok)
    errors = Counter(r.error for r in records if r.error is not None)
    types = types or {}
    mix = Counter(types.get(r.adapter, "base") for r in records)
    return {
        "label": label, "adapters": n_adapters, "requests": len(records), "completed": len(ok),
        "errors": sum(errors.values()), "errors_by_kind": dict(sorted(errors.items())),
        "wall_s": wall, "request_throughput": len(ok) / wall, "output_throughput": out_tokens / wall,
        "input_throughput": sum(r.input_len for r in ok) / wall, "output_tokens": out_tokens,
        "ttft_s": percentiles([r.ttft for r in ok]), "tpot_s": percentiles([r.tpot for r in ok if r.tpot is not None]),
        "itl_s": percentiles([g for r in ok for g in r.itl]), "e2e_s": percentiles([r.e2e for r in ok]),
        "slo_ttft_s": slo_ttft,
        "slo_attainment": (sum(r.ttft is not None and r.ttft <= slo_ttft for r in ok) / len(records)) if records else None,
        "distinct_adapters_used": len({r.adapter for r in records if r.adapter}),
        "requests_by_type": dict(sorted(mix.items())), "adapter_loads": loads,
    }


def _ms(x) -> str:
    return "–" if x is None else f"{x * 1000:.0f}"


def markdown(report: dict) -> str:
    runs = report["runs"]
    base = next((r for r in runs if r["adapters"] == 0 and r["label"] == "baseline"), None)
    lines = ["| run | adapters | done/sent | errors | req/s | out tok/s | vs base | TTFT p50/p90/p99 ms "
             "| TPOT p50/p90/p99 ms | ITL p50/p99 ms | e2e p50/p99 s | SLO | loads dev/host |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|---|---|---:|---|"]
    for r in runs:
        ratio = f"{r['output_throughput'] / base['output_throughput']:.2f}" if base and base["output_throughput"] else "–"
        t, p, e, i = r["ttft_s"], r["tpot_s"], r["e2e_s"], r["itl_s"]
        loads = r["adapter_loads"] or {}
        ld = loads.get("loads", {})
        slo = "–" if r["slo_attainment"] is None else f"{100 * r['slo_attainment']:.0f}%"
        e2e = "–" if e["p50"] is None else f"{e['p50']:.1f} / {e['p99']:.1f}"
        lines.append(
            f"| {r['label']} | {r['adapters']} | {r['completed']}/{r['requests']} | {r['errors']} "
            f"| {r['request_throughput']:.2f} | {r['output_throughput']:.1f} | {ratio} "
            f"| {_ms(t['p50'])} / {_ms(t['p90'])} / {_ms(t['p99'])} | {_ms(p['p50'])} / {_ms(p['p90'])} / {_ms(p['p99'])} "
            f"| {_ms(i['p50'])} / {_ms(i['p99'])} | {e2e} | {slo} | {ld.get('device', '–')} / {ld.get('host', '–')} |")
    errs = {r["label"]: r["errors_by_kind"] for r in runs if r["errors"]}
    if errs:
        lines += ["", "Errors by kind: " + "; ".join(f"{k}: {v}" for k, v in errs.items())]
    return "\n".join(lines) + "\n"


def plots(report: dict, records: dict[str, list[Record]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for (label, recs), style in zip(records.items(), ["-", "--", "-.", ":"] * 8):
        ok = [r for r in recs if r.ok]
        for ax, vals in zip(axes, ([r.ttft for r in ok], [r.tpot for r in ok if r.tpot], [r.e2e for r in ok])):
            if vals:
                xs = np.sort(vals)
                ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), style, label=label)
    for ax, title in zip(axes, ("time to first token (s)", "time per output token (s)", "end-to-end latency (s)")):
        ax.set_xlabel(title)
        ax.set_ylabel("share of requests")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Latency CDF")
    fig.tight_layout()
    paths.append(out / "latency_cdf.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    sweep = [r for r in report["runs"] if r["label"] != "baseline"]
    if len(sweep) > 1:
        base = next((r for r in report["runs"] if r["label"] == "baseline"), None)
        xs = [r["adapters"] for r in sweep]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        a1.plot(xs, [r["output_throughput"] for r in sweep], "o-", label="with adapters")
        a2.plot(xs, [r["ttft_s"]["p50"] for r in sweep], "o-", label="TTFT p50")
        a2.plot(xs, [r["ttft_s"]["p99"] for r in sweep], "s--", label="TTFT p99")
        if base:
            a1.axhline(base["output_throughput"], color="gray", ls=":", label="base model only")
            a2.axhline(base["ttft_s"]["p50"] or 0, color="gray", ls=":", label="base p50")
        for ax, ylabel in ((a1, "output tokens/s"), (a2, "seconds")):
            ax.set_xscale("log")
            ax.set_xlabel("adapters")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        a1.set_ylim(bottom=0)
        a1.set_title("Throughput vs number of adapters")
        a2.set_title("Time to first token vs number of adapters")
        fig.tight_layout()
        paths.append(out / "sweep.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def write(out: Path, report: dict, records: dict[str, list[Record]]) -> list[Path]:
    """report.json, report.md, requests.jsonl and the PNGs under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    with open(out / "requests.jsonl", "w") as f:
        for label, recs in records.items():
            for r in recs:
                f.write(json.dumps({"run": label, **r.to_json()}) + "\n")
    pngs = plots(report, records, out)
    cmd = report.get("command")
    md = [f"# qaa-loadtest report\n", f"`{cmd}`\n" if cmd else "",
          f"Server: {report['server'].get('model_id')} ({report['server'].get('model_device_type')}, "
          f"{report['server'].get('model_dtype')}) at {report['url']}\n", markdown(report)]
    md += [f"![{p.stem}]({p.name})\n" for p in pngs]
    (out / "report.md").write_text("\n".join(md))
    return [out / "report.json", out / "report.md", out / "requests.jsonl", *pngs]
