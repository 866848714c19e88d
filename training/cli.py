"""`qaa-train`: train one method on Alpaca-format data; optionally upload the adapter."""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="qaa-train", description=__doc__)
    ap.add_argument("--method", required=True, help="full | lora | sora | prefix | qaa")
    ap.add_argument("--data", required=True, help="Alpaca JSON/JSONL (instruction, input, output)")
    ap.add_argument("--out", required=True, help="output directory (adapter/, train_log.jsonl, loss.png, checkpoint/)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None, help="default per method: full 5e-5, lora/sora 1e-3, prefix 1e-2, qaa 3e-3")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lora-r", type=int, default=4)
    ap.add_argument("--lora-alpha", type=float, default=8.0)
    ap.add_argument("--lora-targets", default="q_proj,v_proj")
    ap.add_argument("--sora-lambda", type=float, default=1e-3)
    ap.add_argument("--sora-max-lambda", type=float, default=1e-2)
    ap.add_argument("--sora-schedule", default="linear")
    ap.add_argument("--prefix-tokens", type=int, default=30)
    ap.add_argument("--qaa-layers", type=int, default=2)
    ap.add_argument("--qaa-rotation", default="RX")
    ap.add_argument("--qaa-placement", default="attn,mlp")
    ap.add_argument("--qaa-gradient", default="autograd", help="autograd | parameter-shift")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--checkpoint-every", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--upload", default=None, metavar="URL", help="push the adapter to a running qaa-serve")
    ap.add_argument("--adapter-id", default=None)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--lr-schedule", default="constant", help="constant | linear | cosine (after the warmup)")
    ap.add_argument("--warmup-steps", type=int, default=0, help="linear warmup from 0 over this many steps")
    ap.add_argument("--max-grad-norm", type=float, default=None, help="clip the gradient norm (logged either way)")
    ap.add_argument("--eval-every", type=int, default=0, help="held-out loss every N steps (0: never)")
    ap.add_argument("--report-to", default="none", help="none | tensorboard (OUT/runs)")
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
