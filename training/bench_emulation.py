"""Decode-step cost of serving a QAA adapter with shot (or noise) emulation, as a ratio to the
same adapter served exactly (a script, not a test).

    python -m training.bench_emulation [--adapter DIR] [--model PATH] [--shots 100,1000,10000]
                                       [--noise depolarizing:0.01] [--batch 8] [--steps 20] [--repeats 5]

Every row of the batch uses the adapter (the worst case: every QAA module of every row is
emulated); each setting is loaded as its own adapter, and the settings are timed in
alternation, best of --repeats. Without --adapter, a random QAA adapter of the default
configuration (RX, 2 layers, after attention and MLP of every layer) is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--shots", default="100,1000,10000")
    ap.add_argument("--noise", default="")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    from adapters.base import Adapter
    from adapters.files import load_dir
    from adapters.qaa import QAAConfig, QAAType
    from engine.bench import PROMPTS
    from engine.engine import Engine
    from engine.sampling import SamplingParams
    from engine.steps import decode, prefill
    from training.quantum_eval import parse_noises, parse_shots

    settings = {"exact": {}}
    settings.update({f"{n} shots": {"qaa_shots": n} for n in parse_shots(args.shots)})
    settings.update({s: {"qaa_noise": s} for s in parse_noises(args.noise)})
    engine = Engine(args.model, device="cpu", dtype="float32", max_batch=args.batch, max_seq_len=256,
                    max_adapters=len(settings))
    if args.adapter:
        ad = load_dir(args.adapter, engine.shape)
    else:
        cfg = QAAConfig()
        t = QAAType()
        t.check_config(cfg, engine.shape)
        g = torch.Generator().manual_seed(0)
        ad = Adapter("qaa", cfg, {k: (v if v.any() else torch.randn(v.shape, generator=g) * 0.01)
                                  for k, v in t.init(cfg, engine.shape, g).items()}, engine.shape)
    for name, over in settings.items():
        engine.load_adapter(name, dataclasses.replace(ad, config=dataclasses.replace(ad.config, **over), memo={}))

    prompts = (PROMPTS * args.batch)[: args.batch]

    def step_time(name):
        sp = SamplingParams(max_new_tokens=args.steps + 2, ignore_eos=True)
        seqs = [engine.new_sequence(engine.encode_prompt(p), sp, name) for p in prompts]
        for s in seqs:
            engine.admit(s)
        prefill(engine.model, engine.cache, seqs, engine.seams_for)
        decode(engine.model, engine.cache, seqs, engine.seams_for)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            decode(engine.model, engine.cache, seqs, engine.seams_for)
        dt = (time.perf_counter() - t0) / args.steps
        for s in seqs:
            engine.cache.free(s.slot)
        return dt

    times = {name: [] for name in settings}
    with torch.inference_mode():
        for _ in range(args.repeats):  # alternate so drift hurts every setting alike
            for name in settings:
                times[name].append(step_time(name))
    exact = min(times["exact"])
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} model={engine.name} batch={args.batch} "
          f"QAA modules={len(QAAType().compiled(ad)[0])}")
    for name, ts in times.items():
        print(f"decode step {name}: {min(ts) * 1e3:.1f} ms  ratio to exact {min(ts) / exact:.2f}x")


if __name__ == "__main__":
    main()
