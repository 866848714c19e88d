"""`qaa-generate`: complete one prompt with the engine and print the completion only."""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None):
    from engine.cli_parser import Parser, number

    ap = Parser("qaa-generate", description=__doc__)
    ap.add_argument("--prompt", required=True, help="prompt text, or - to read UTF-8 from stdin")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    ap.add_argument("--max-new-tokens", type=number(int), default=64, metavar="N", help="tokens to generate at most")
    ap.add_argument("--temperature", type=number(float), default=0.0, help="sampling temperature; 0 is greedy")
    ap.add_argument("--top-k", type=number(int), default=0, metavar="K", help="sample from the K likeliest tokens (0: all)")
    ap.add_argument("--top-p", type=number(float), default=1.0, metavar="P", help="nucleus sampling mass (1: off)")
    ap.add_argument("--repetition-penalty", type=number(float), default=1.0, metavar="R", help="1 is none")
    ap.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    ap.add_argument("--stop", action="append", default=[], metavar="STR", help="stop string (repeatable)")
    ap.add_argument("--model", default=None, metavar="DIR", help="local HF Llama-family checkpoint dir (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--adapter", default=None, metavar="DIR", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 | float16 (default $QAA_DTYPE, else auto: bf16 on "
                                                  "CUDA and on a CPU with native bf16, AMX or avx512_bf16; fp32 elsewhere)")
    ap.add_argument("--compile", action="store_true",
                    help="decode through a static-shape step compiled by torch.compile (CUDA graphs on a GPU)")
    return ap.parse_args(argv)


def read_prompt(arg: str) -> str:
    if arg == "-":
        data = sys.stdin.buffer.read()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            from engine.errors import InputError

            raise InputError("prompt on stdin is not valid UTF-8") from None
    return arg


def main(argv=None) -> int:
    args = parse_args(argv)
    from adapters.base import AdapterError
    from engine.errors import QaaError

    try:
        from engine.engine import Engine, check_prompt_text
        from engine.sampling import SamplingParams

        prompt = read_prompt(args.prompt)
        check_prompt_text(prompt)  # before the model loads: bad input fails fast
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
        )
        engine = Engine(args.model, device=args.device, dtype=args.dtype, max_batch=1, max_adapters=1,
                        compile=args.compile)
        name = None
        if args.adapter:
            name = "cli"
            engine.load_adapter(name, args.adapter)
        out = engine.generate([prompt], params, chat=args.chat, adapters=[name])[0]
    except (QaaError, AdapterError) as e:
        print(f"qaa-generate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    sys.stdout.write(out.text + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
