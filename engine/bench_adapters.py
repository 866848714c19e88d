"""Decode-step cost of a mixed-adapter batch through the engine (a script, not a test).

    python -m engine.bench_adapters [--model PATH] [--steps 20] [--repeats 5] [--constrained]

8 rows, 8 different adapters of mixed types (LoRA, SoRA, prefix, QAA RX and RY) vs the same
batch with no adapters, on the default model; best of --repeats alternating runs. With
--constrained: the same mixed batch with every row under a different JSON schema (response_format
json_schema) vs unconstrained, per decode step.
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


def bench_mixed(model, steps: int, repeats: int, constrained: bool = False):
    from adapters.base import Adapter
    from adapters.lora import LoraConfig
    from adapters.prefix import PrefixConfig
    from adapters.qaa import QAAConfig
    from adapters.registry import get_type
    from adapters.sora import SoraConfig
    from engine.bench import PROMPTS
    from engine.engine import Engine
    from engine.sampling import SamplingParams
    from engine.steps import decode, prefill

    engine = Engine(model, device="cpu", max_batch=8, max_seq_len=256, max_adapters=8)
    configs = [("lora", LoraConfig(r=8, target_modules=["q_proj", "v_proj"])),
               ("lora", LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
               ("sora", SoraConfig(r=8, target_modules=["q_proj", "v_proj"])),
               ("sora", SoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"])),
               ("prefix", PrefixConfig(num_virtual_tokens=30)),
               ("prefix", PrefixConfig(num_virtual_tokens=10)),
               ("qaa", QAAConfig(circuit_layers=2, rotation="RX")),
               ("qaa", QAAConfig(circuit_layers=2, rotation="RY", placement=["mlp"]))]
    g = torch.Generator().manual_seed(0)
    names = []
    for i, (kind, cfg) in enumerate(configs):
        t = get_type(kind)
        t.check_config(cfg, engine.shape)
        tensors = {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in t.init(cfg, engine.shape, g).items()}
        engine.load_adapter(f"a{i}", Adapter(kind, cfg, tensors, engine.shape))
        names.append(f"a{i}")

    grammars = [engine.grammars.json(s) for s in LONG_SCHEMAS] if constrained else [None] * 8

    def step_time(adapters, grammars=(None,) * 8):
        sps = [SamplingParams(max_new_tokens=steps + 2, ignore_eos=True, grammar=g) for g in grammars]
        seqs = [engine.new_sequence(engine.encode_prompt(p), sp, a) for p, a, sp in zip(PROMPTS, adapters, sps)]
        for s in seqs:
            engine.admit(s)
        prefill(engine.model, engine.cache, seqs, engine.seams_for)
        decode(engine.model, engine.cache, seqs, engine.seams_for)
        t0 = time.perf_counter()
        for _ in range(steps):
            decode(engine.model, engine.cache, seqs, engine.seams_for)
        dt = (time.perf_counter() - t0) / steps
        for s in seqs:
            engine.cache.free(s.slot)
        return dt

    base, mixed = [], []
    for _ in range(repeats):  # alternate so drift hurts both alike
        if constrained:  # the same mixed-adapter batch, free vs each row under its own schema
            base.append(step_time(names))
            mixed.append(step_time(names, grammars))
        else:
            base.append(step_time([None] * 8))
            mixed.append(step_time(names))
    b, m = min(base), min(mixed)
    if constrained:
        print(f"decode step, batch 8 (8 adapters), model={engine.name}: unconstrained_ms={b * 1e3:.1f} "
              f"8_json_schemas_ms={m * 1e3:.1f} overhead={m / b:.2f}x")
    else:
        print(f"decode step, batch 8, model={engine.name}: no_adapters_ms={b * 1e3:.1f} "
              f"mixed_8_adapters_ms={m * 1e3:.1f} overhead={m / b:.2f}x")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--constrained", action="store_true", help="JSON-schema rows vs free rows (see above)")
    args = ap.parse_args(argv)
    print(f"torch={torch.__version__} threads={torch.get_num_threads()}")
    bench_mixed(args.model, args.steps, args.repeats, args.constrained)


if __name__ == "__main__":
    main()
