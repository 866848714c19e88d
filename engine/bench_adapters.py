"""Decode-step cost of a mixed-adapter batch through the engine (a script, not a test).

    python -m engine.bench_adapters [--model PATH] [--steps 20] [--repeats 5] [--constrained] [--compile]
                                    [--rows 16 --dtype bfloat16] [--cold]

8 rows, 8 different adapters of mixed types (LoRA, SoRA, prefix, QAA RX and RY) vs the same
batch with no adapters, on the default model; best of --repeats alternating runs. With
--constrained: the same mixed batch with every row under a different JSON schema (response_format
json_schema) vs unconstrained, per decode step. With --compile: each of the two batches also
through the compiled static step (engine.graph; compiled before timing), all four alternating.
With --rows N: N rows instead, in turn LoRA r=8 and SoRA r=8 on q/v, a 30-token prefix and a
default QAA (server.bench's mix, one adapter per row), in --dtype (default: the engine's auto).
With --cold: instead, what one seam call of the 16-row mix costs repeated at once vs right after
one layer's MLP GEMMs, beside a tiny torch op and a Python call (bench_cold).
"""

from __future__ import annotations

import argparse
import time

import torch


# schemas that cannot be complete within the measured steps, each row its own
LONG_SCHEMAS = [
    {"type": "string", "minLength": 2000},
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 400},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 400},
    {"type": "object", "properties": {"text": {"type": "string", "minLength": 2000}}, "required": ["text"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 400},
    {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 400},
    {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "null"}, "minItems": 400}},
     "required": ["a"]},
    {"type": "string", "minLength": 3000},
]


def _load_mix(engine, rows: int | None) -> list[str]:
    """Load the benchmark's adapters into the engine, random weights; returns their names.
    rows None: 8 adapters of every type and shape; rows N: N adapters of server.bench's mix
    (LoRA r=8 and SoRA r=8 on q/v, a 30-token prefix, a default QAA, in turn)."""
    from adapters.base import Adapter
    from adapters.lora import LoraConfig
    from adapters.prefix import PrefixConfig
    from adapters.qaa import QAAConfig
    from adapters.registry import get_type
    from adapters.sora import SoraConfig

    configs = [("lora", LoraConfig(r=8, target_modules=["q_proj", "v_proj"])),
               ("lora", LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
               ("sora", SoraConfig(r=8, target_modules=["q_proj", "v_proj"])),
               ("sora", SoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"])),
               ("prefix", PrefixConfig(num_virtual_tokens=30)),
               ("prefix", PrefixConfig(num_virtual_tokens=10)),
               ("qaa", QAAConfig(circuit_layers=2, rotation="RX")),
               ("qaa", QAAConfig(circuit_layers=2, rotation="RY", placement=["mlp"]))]
    if rows:
        served = [("lora", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])),
                  ("sora", SoraConfig(r=8, target_modules=["q_proj", "v_proj"])),
                  ("prefix", PrefixConfig(num_virtual_tokens=30)), ("qaa", QAAConfig(circuit_layers=2))]
        configs = [served[i % len(served)] for i in range(rows)]
    g = torch.Generator().manual_seed(0)
    names = []
    for i, (kind, cfg) in enumerate(configs):
        t = get_type(kind)
        t.check_config(cfg, engine.shape)
        tensors = {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in t.init(cfg, engine.shape, g).items()}
        engine.load_adapter(f"a{i}", Adapter(kind, cfg, tensors, engine.shape))
        names.append(f"a{i}")
    return names


def bench_mixed(model, steps: int, repeats: int, constrained: bool = False, compile: bool = False,
                rows: int | None = None, dtype: str = "auto"):
    from engine.bench import PROMPTS
    from engine.engine import Engine
    from engine.sampling import SamplingParams
    from engine.steps import decode, prefill

    B = rows or 8
    engine = Engine(model, device="cpu", dtype=dtype, max_batch=B, max_seq_len=256, max_adapters=B, compile=compile)
    names = _load_mix(engine, rows)

    grammars = [engine.grammars.json(s) for s in LONG_SCHEMAS] if constrained else [None] * B

    def step_time(adapters, grammars=(None,) * B, captured=False):
        run = (lambda seqs: engine.step(engine.model, engine.cache, [(s, 1) for s in seqs], engine.seams_for)) \
            if captured else (lambda seqs: decode(engine.model, engine.cache, seqs, engine.seams_for))
        sps = [SamplingParams(max_new_tokens=steps + 2, ignore_eos=True, grammar=g) for g in grammars]
        prompts = (PROMPTS * B)[:B]
        seqs = [engine.new_sequence(engine.encode_prompt(p), sp, a) for p, a, sp in zip(prompts, adapters, sps)]
        for s in seqs:
            engine.admit(s)
        prefill(engine.model, engine.cache, seqs, engine.seams_for)
        run(seqs)  # with --compile, the first step of a new bank layout compiles it
        t0 = time.perf_counter()
        for _ in range(steps):
            run(seqs)
        dt = (time.perf_counter() - t0) / steps
        for s in seqs:
            engine.cache.free(s.slot)
        return dt

    base, mixed, c_base, c_mixed = [], [], [], []
    for _ in range(repeats):  # alternate so drift hurts both alike
        if constrained:  # the same mixed-adapter batch, free vs each row under its own schema
            base.append(step_time(names))
            mixed.append(step_time(names, grammars))
        else:
            base.append(step_time([None] * B))
            mixed.append(step_time(names))
            if compile:
                c_base.append(step_time([None] * B, captured=True))
                c_mixed.append(step_time(names, captured=True))
    b, m = min(base), min(mixed)
    if constrained:
        print(f"decode step, batch 8 (8 adapters), model={engine.name}: unconstrained_ms={b * 1e3:.1f} "
              f"8_json_schemas_ms={m * 1e3:.1f} overhead={m / b:.2f}x")
    else:
        print(f"decode step, batch {B}, dtype={engine.dtype}, model={engine.name}: no_adapters_ms={b * 1e3:.1f} "
              f"mixed_{B}_adapters_ms={m * 1e3:.1f} overhead={m / b:.2f}x base/mixed={b / m:.3f}")
    if c_base:
        cb, cm = min(c_base), min(c_mixed)
        print(f"compiled ({engine.graph.describe()}, fallbacks {engine.graph.fallbacks}): no_adapters_ms={cb * 1e3:.1f} "
              f"mixed_{B}_adapters_ms={cm * 1e3:.1f} overhead={cm / cb:.2f}x; eager/compiled: no_adapters={b / cb:.2f}x "
              f"mixed={m / cm:.2f}x")


def bench_cold(model, dtype: str = "auto", calls: int = 300):
    """What one adapter seam call costs inside a step: each probe timed alone, repeated at once
    ("hot"), and right after one layer's MLP on 16 rows ("after GEMMs": its weights, 5 MB in
    bf16, stream through the 2 MB L2 as every layer's GEMMs do). Medians of `calls` calls."""
    from engine.engine import Engine

    engine = Engine(model, device="cpu", dtype=dtype, max_batch=16, max_seq_len=256, max_adapters=16)
    names = _load_mix(engine, 16)
    seams = engine.adapters.seams_for([engine.adapters.get(n) for n in names], engine.device)
    d, dt = engine.shape.dim, engine.dtype
    g = torch.Generator().manual_seed(0)
    h, x, y, xm = (torch.randn(16, 1, d, generator=g).to(dt) for _ in range(4))
    mlp, tiny = engine.model.model.layers[3].mlp, torch.zeros(4)

    def gemms():
        with torch.inference_mode():
            mlp(xm, None)

    def median_us(fn, before=None):
        ts = []
        for _ in range(calls):
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2] * 1e6

    probes = {"LoRA seam, q_proj, 8 rows (LoRA + SoRA)": lambda: seams.linear(5, "q_proj", x, y),
              "QAA seam, attention residual, 4 rows": lambda: seams.residual(5, "attn", h),
              "a torch op on 4 floats (tensor.add_)": lambda: tiny.add_(1.0),
              "a Python call (sum(range(50)))": lambda: sum(range(50))}
    print(f"one call, dtype={engine.dtype}, threads={torch.get_num_threads()}, median of {calls}: hot us | after GEMMs us")
    for what, fn in probes.items():
        print(f"  {what:42s} {median_us(fn):7.1f} | {median_us(fn, gemms):7.1f}", flush=True)
    print(f"  (one layer's MLP alone: {median_us(gemms):.0f} us)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--constrained", action="store_true", help="JSON-schema rows vs free rows (see above)")
    ap.add_argument("--compile", action="store_true", help="also through the compiled step (see above)")
    ap.add_argument("--rows", type=int, default=None, help="rows of server.bench's adapter mix (see above)")
    ap.add_argument("--dtype", default="auto", help="the engine's dtype (auto, float32, bfloat16)")
    ap.add_argument("--cold", action="store_true", help="one seam call hot vs right after a layer's GEMMs (see above)")
    args = ap.parse_args(argv)
    if args.constrained and args.rows:
        ap.error("--constrained uses its 8 schemas: leave --rows out")
    print(f"torch={torch.__version__} threads={torch.get_num_threads()}")
    if args.cold:
        return bench_cold(args.model, args.dtype)
    bench_mixed(args.model, args.steps, args.repeats, args.constrained, args.compile, args.rows, args.dtype)


if __name__ == "__main__":
    main()
