"""`qaa-train`: train one method on Alpaca-format data; optionally upload the adapter."""

from __future__ import annotations

import sys


def parse_args(argv=None):
    from adapters.circuit import ROTATIONS
    from adapters.qaa import GRADIENTS
    from adapters.sora import SCHEDULES as SORA_SCHEDULES
    from engine.cli_parser import Parser, listed, number, one_of
    from training.loop import LR_DEFAULTS, METHODS, REPORTERS, SCHEDULES

    ap = Parser("qaa-train", description=__doc__)
    ap.add_argument("--method", required=True, type=one_of("method", METHODS), metavar=listed(METHODS), help="what to train")
    ap.add_argument("--data", required=True, help="Alpaca JSON/JSONL (instruction, input, output)")
    ap.add_argument("--out", required=True, metavar="DIR",
                    help="output directory (adapter/, train_log.jsonl, loss.png, checkpoint/)")
    ap.add_argument("--model", default=None, metavar="DIR", help="local HF Llama-family checkpoint dir (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--steps", type=number(int), default=100, metavar="N", help="optimizer steps")
    ap.add_argument("--batch-size", type=number(int), default=8, metavar="N", help="examples per step")
    ap.add_argument("--lr", type=number(float), default=None,
                    help="learning rate (default per method: " + ", ".join(f"{k} {v:g}" for k, v in LR_DEFAULTS.items()) + ")")
    ap.add_argument("--max-len", type=number(int), default=256, metavar="N", help="tokens per example (longer ones are cut)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the initialization, data order and split")
    ap.add_argument("--lora-r", type=number(int, 1), default=4, metavar="R", help="LoRA/SoRA rank")
    ap.add_argument("--lora-alpha", type=number(float), default=8.0, help="LoRA/SoRA scale numerator (scale = alpha / r)")
    ap.add_argument("--lora-targets", default="q_proj,v_proj", metavar="LIST", help="LoRA/SoRA projections, comma-separated")
    ap.add_argument("--sora-lambda", type=number(float, 0), default=1e-3, help="SoRA gate sparsity (start of the schedule)")
    ap.add_argument("--sora-max-lambda", type=number(float, 0), default=1e-2, help="SoRA sparsity at the end of the schedule")
    ap.add_argument("--sora-schedule", choices=SORA_SCHEDULES, default="linear", help="how SoRA's lambda moves over the steps")
    ap.add_argument("--prefix-tokens", type=number(int, 1), default=30, metavar="N", help="prefix tuning's virtual tokens")
    ap.add_argument("--qaa-layers", type=number(int, 1), default=2, metavar="L", help="QAA circuit layers")
    ap.add_argument("--qaa-rotation", choices=ROTATIONS, default="RX", help="QAA rotation gate")
    ap.add_argument("--qaa-placement", default="attn,mlp", metavar="LIST", help="QAA modules: attn, mlp or both")
    ap.add_argument("--qaa-gradient", choices=GRADIENTS, default="autograd", help="how QAA's angle gradients are computed")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--checkpoint-every", type=number(int, 0), default=0, metavar="N",
                    help="write OUT/checkpoint/ every N steps (0: only at the end)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint/")
    ap.add_argument("--upload", default=None, metavar="URL", help="push the adapter to a running qaa-serve")
    ap.add_argument("--adapter-id", default=None, metavar="ID", help="the adapter id for --upload")
    ap.add_argument("--api-key", default=None, metavar="KEY", help="tenant key for --upload")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    ap.add_argument("--lr-schedule", default="constant",
                    help="learning-rate schedule after the warmup: " + " | ".join(SCHEDULES))
    ap.add_argument("--warmup-steps", type=number(int, 0), default=0, metavar="N", help="linear warmup from 0 over this many steps")
    ap.add_argument("--max-grad-norm", type=number(float), default=None, help="clip the gradient norm (logged either way)")
    ap.add_argument("--eval-every", type=number(int, 0), default=0, metavar="N", help="held-out loss every N steps (0: never)")
    ap.add_argument("--report-to", default="none",
                    help="where metrics also go: " + " | ".join(REPORTERS) + " (tensorboard: OUT/runs)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from adapters.base import AdapterError
    from engine.errors import QaaError

    try:
        from training.loop import TrainConfig, Trainer, ratio_line
        from training.upload import upload_adapter

        if args.upload and not args.adapter_id:
            raise QaaError("--upload needs --adapter-id")
        if args.upload and args.method == "full":
            raise QaaError("--upload takes adapters; a full fine-tune is served with qaa-serve --model OUT/model")
        c = TrainConfig(
            method=args.method, data=args.data, out=args.out, model=args.model, steps=args.steps,
            batch_size=args.batch_size, lr=args.lr, max_len=args.max_len, seed=args.seed, lora_r=args.lora_r,
            lora_alpha=args.lora_alpha, lora_targets=args.lora_targets.split(","), sora_lambda=args.sora_lambda,
            sora_max_lambda=args.sora_max_lambda, sora_schedule=args.sora_schedule, prefix_tokens=args.prefix_tokens,
            qaa_layers=args.qaa_layers, qaa_rotation=args.qaa_rotation, qaa_placement=args.qaa_placement.split(","),
            qaa_gradient=args.qaa_gradient, device=args.device, checkpoint_every=args.checkpoint_every,
            resume=args.resume, quiet=args.quiet, lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
            max_grad_norm=args.max_grad_norm, eval_every=args.eval_every, report_to=args.report_to)
        t = Trainer(c)
        print(f"{args.method}: {ratio_line(t.n_trainable(), t.shape.n_params)}", file=sys.stderr)
        out = t.run()
        print(f"saved {out}", file=sys.stderr)
        if args.upload:
            info = upload_adapter(args.upload, args.adapter_id, out, args.api_key)
            print(f"uploaded {args.adapter_id} (version {info.get('version')}) to {args.upload}", file=sys.stderr)
    except (QaaError, AdapterError) as e:
        print(f"qaa-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
