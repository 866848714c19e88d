"""Generation quality of a QAA adapter when its circuit runs on a (emulated) quantum device:
finite shots and depolarizing noise, beside the exact circuit and the base model.

One engine serves every setting: the adapter is reloaded with its config's qaa_shots /
qaa_noise set (adapters.emulation), so each setting goes through the same serving path
(slot bank, batched, seeded) as a tenant who asked for it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from adapters.emulation import make_emulation, parse_noise
from adapters.files import load_dir
from engine.engine import Engine
from engine.errors import InputError
from engine.sampling import SamplingParams
from training.evaluate import METRICS, held_out, score


def parse_shots(text: str | None) -> list[int]:
    """'10,100,1000' -> [10, 100, 1000] (validated like an adapter config's qaa_shots)."""
    if not text:
        return []
    try:
        out = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise InputError(f"--shots {text!r}: expected comma-separated integers, e.g. 10,100,1000") from None
    for n in out:
        make_emulation(n, None)
    return out


def parse_noises(text: str | None) -> list[str]:
    """'depolarizing:0.001,depolarizing:0.01' -> the specs (validated)."""
    out = [s.strip() for s in (text or "").split(",") if s.strip()]
    for s in out:
        parse_noise(s)
    return out


def settings(shots: list[int], noises: list[str]) -> list[tuple[str, dict | None]]:
    """(row name, config overrides; None = the base model) in table order."""
    rows = [("base model", None), ("exact", {})]
    rows += [(f"{n} shots", {"qaa_shots": n}) for n in shots]
    rows += [(f"depolarizing p={parse_noise(s):g}", {"qaa_noise": s}) for s in noises]
    return rows


def quantum_sweep(adapter: str | Path, data: str, shots: list[int], noises: list[str], n: int = 40,
                  model: str | None = None, max_new_tokens: int = 64, batch_size: int = 8, device: str = "auto",
                  seed: int = 0, log=None) -> dict:
    """{row name: {metrics..., seconds, generations}} for the base model, the exact circuit and
    every shots / noise setting, on the first n held-out examples, greedy decoding."""
    held = held_out(data, n)
    engine = Engine(model, device=device, dtype="float32", max_batch=batch_size, max_adapters=1)  # as evaluate's
    ad = load_dir(adapter, engine.shape)
    if ad.kind != "qaa":
        raise InputError(f"--shots / --noise need a QAA adapter, {adapter} is {ad.kind}")
    sp = SamplingParams(max_new_tokens=max_new_tokens)
    prompts = [e.messages() for e in held]
    refs = [e.output for e in held]
    out = {}
    for name, overrides in settings(shots, noises):
        t0 = time.perf_counter()
        if overrides is None:
            names = [None] * len(held)
        else:
            cfg = dataclasses.replace(ad.config, **{"qaa_shots": None, "qaa_noise": None, "qaa_seed": seed, **overrides})
            engine.load_adapter("eval", dataclasses.replace(ad, config=cfg, memo={}))
            names = ["eval"] * len(held)
        outs = engine.generate(prompts, sp, chat=True, adapters=names)
        cands = [o.text.strip() for o in outs]
        out[name] = {"n": len(held), **score(cands, refs), "seconds": time.perf_counter() - t0,
                     "generations": cands, "token_ids": [list(o.token_ids) for o in outs]}
        if log:
            log(f"{name}: " + ", ".join(f"{m} {out[name][m]:.2f}" for m in METRICS) + f" ({out[name]['seconds']:.0f} s)")
    return out


def plot_sweep(res: dict, path: str | Path, title: str = "QAA on an emulated quantum device") -> Path:
    """Each metric against shots (log axis), the exact circuit and the base model as lines,
    the noise settings as labelled points at the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shot_rows = sorted((int(k.split()[0]), v) for k, v in res.items() if k.endswith(" shots"))
    noise_rows = [(k, v) for k, v in res.items() if k.startswith("depolarizing")]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.6), dpi=100)
    for ax, m in zip(axes, METRICS):
        if shot_rows:
            ax.plot([s for s, _ in shot_rows], [v[m] for _, v in shot_rows], "o-", label="shots")
        for name, style in (("exact", "C2--"), ("base model", "C7:")):
            if name in res:
                ax.axhline(res[name][m], color=style[:2], linestyle=style[2:], label=name)
        right = max([s for s, _ in shot_rows], default=1) * 3
        for i, (k, v) in enumerate(noise_rows):
            ax.plot([right * (1.6**i)], [v[m]], "s", color=f"C{3 + i}", label=k)
        ax.set_xscale("log")
        ax.set_xlabel("shots per circuit execution")
        ax.set_title(m)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
