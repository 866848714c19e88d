"""The training loop: the engine's model and the adapters' own forward, so what is trained is
exactly what is served. Methods: full, lora, sora, prefix, qaa."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adapters.base import Adapter
from adapters.files import save_dir
from adapters.lora import LoraConfig
from adapters.prefix import PrefixConfig
from adapters.qaa import QAAConfig
from adapters.registry import get_type
from adapters.seams import SingleSeams
from adapters.sora import SoraConfig, lambda_at, proximal_step
from engine.engine import pick_device
from engine.errors import InputError
from engine.tokenizer import Tokenizer
from engine.weights import base_model_id, load_model, resolve_model_dir
from training.data import IGNORE, batch, encode, load_examples, split

METHODS = ("full", "lora", "sora", "prefix", "qaa")
SCHEDULES = ("constant", "linear", "cosine")
REPORTERS = ("none", "tensorboard")


def lr_factor(schedule: str, step: int, warmup: int, total: int) -> float:
    """Multiplier of the learning rate at optimizer step `step` (0-based): linear warmup, then
    constant, linear decay to 0 or half a cosine to 0 at `total`."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass
class TrainConfig:
    method: str
    """full | lora | sora | prefix | qaa."""
    data: str
    """Alpaca JSON/JSONL file (or a Hugging Face dataset name when online)."""
    out: str
    """Output directory: the adapter (or, for full, the checkpoint), log and plot."""
    model: str | None = None
    """Base model directory; None = the default model."""
    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 8
    """Examples per step."""
    lr: float | None = None
    """Learning rate; None = the method's default (LR_DEFAULTS)."""
    max_len: int = 256
    """Tokens per example (prompt + response), longer ones are cut."""
    seed: int = 0
    """Seeds init and batch order."""
    lora_r: int = 4
    """LoRA / SoRA rank."""
    lora_alpha: float = 8.0
    """LoRA / SoRA scale numerator."""
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Projections LoRA / SoRA adapt."""
    sora_lambda: float = 1e-3
    """SoRA's L1 strength at the start of its schedule."""
    sora_max_lambda: float = 1e-2
    """SoRA's lambda at the end of the schedule."""
    sora_schedule: str = "linear"
    """constant | linear | step."""
    prefix_tokens: int = 30
    """Prefix tuning's virtual tokens."""
    qaa_layers: int = 2
    """QAA circuit layers L."""
    qaa_rotation: str = "RX"
    """RX or RY."""
    qaa_placement: list[str] = field(default_factory=lambda: ["attn", "mlp"])
    """After attention and/or MLP of every layer."""
    qaa_gradient: str = "autograd"
    """autograd | parameter-shift (angles only)."""
    device: str = "auto"
    """auto | cpu | cuda."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N steps (0 = only at the end)."""
    resume: bool = False
    """Continue from out/checkpoint."""
    quiet: bool = False
    """No progress output."""
    lr_schedule: str = "constant"
    """constant | linear | cosine after the warmup (the formulas of transformers' schedules)."""
    warmup_steps: int = 0
    """Steps of linear warmup from 0 to the learning rate."""
    max_grad_norm: float | None = None
    """Clip the gradients' global L2 norm to this (None: no clipping; the norm is logged either way)."""
    eval_every: int = 0
    """Held-out loss every N steps and at the end (0: never)."""
    eval_examples: int = 32
    """Held-out examples the eval loss averages over."""
    report_to: str = "none"
    """none | tensorboard (event files in OUT/runs)."""


LR_DEFAULTS = {"full": 5e-5, "lora": 1e-3, "sora": 1e-3, "prefix": 1e-2, "qaa": 3e-3}


def adapter_config(c: TrainConfig, base_name: str):
    if c.method == "lora":
        return LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, target_modules=list(c.lora_targets), base_model_name_or_path=base_name)
    if c.method == "sora":
        return SoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, target_modules=list(c.lora_targets), sparse_lambda=c.sora_lambda,
                          max_lambda=c.sora_max_lambda, lambda_schedule=c.sora_schedule, base_model_name_or_path=base_name)
    if c.method == "prefix":
        return PrefixConfig(num_virtual_tokens=c.prefix_tokens, base_model_name_or_path=base_name)
    if c.method == "qaa":
        return QAAConfig(circuit_layers=c.qaa_layers, rotation=c.qaa_rotation, placement=list(c.qaa_placement),
                         gradient=c.qaa_gradient, base_model_name_or_path=base_name)
    raise InputError(f"unknown method {c.method!r} (one of {', '.join(METHODS)})")


class Trainer:
    def __init__(self, c: TrainConfig):
        if c.method not in METHODS:
            raise InputError(f"unknown method {c.method!r} (one of {', '.join(METHODS)})")
        if c.steps <= 0:
            raise InputError(f"steps must be > 0, got {c.steps}")
        if c.batch_size <= 0 or c.max_len <= 8:
            raise InputError("batch_size must be > 0 and max_len > 8")
        if c.lr_schedule not in SCHEDULES:
            raise InputError(f"lr schedule {c.lr_schedule!r} is not one of {', '.join(SCHEDULES)}")
        if c.warmup_steps < 0 or c.eval_every < 0 or c.eval_examples <= 0:
            raise InputError("warmup_steps and eval_every must be >= 0, eval_examples > 0")
        if c.max_grad_norm is not None and not c.max_grad_norm > 0:
            raise InputError(f"max_grad_norm must be > 0, got {c.max_grad_norm}")
        if c.report_to not in REPORTERS:
            raise InputError(f"--report-to {c.report_to!r} is not one of {', '.join(REPORTERS)}")
        self.c = c
        self.out = Path(c.out)
        self.device = pick_device(c.device)
        self.model_dir = resolve_model_dir(c.model)
        self.tok = Tokenizer(self.model_dir)
        train, held = split(load_examples(c.data))
        self.train_set = [encode(self.tok, e, c.max_len) for e in (train or held)]
        self.held_out = held
        self.eval_set = [encode(self.tok, e, c.max_len) for e in held[: c.eval_examples]]
        if c.eval_every and not self.eval_set:
            raise InputError(f"{c.data} has too few examples to hold any out for the eval loss")
        torch.manual_seed(c.seed)
        full = c.method == "full"
        self.model = load_model(self.model_dir, self.device, torch.float32, frozen=not full)
        self.shape = self.model.cfg.shape()
        if full:
            self.model.train().requires_grad_(True)
            self.named = dict(self.model.named_parameters())
            self.adapter, self.seams = None, None
        else:
            cfg = adapter_config(c, base_model_id(self.model_dir))
            t = get_type(c.method)
            t.check_config(cfg, self.shape)
            g = torch.Generator().manual_seed(c.seed)
            tensors = {k: torch.nn.Parameter(v.to(self.device)) for k, v in t.init(cfg, self.shape, g).items()}
            self.adapter = Adapter(c.method, cfg, tensors, self.shape)
            self.named = tensors
            self.seams = SingleSeams(self.adapter)
        self.base_lr = c.lr or LR_DEFAULTS[c.method]
        self.opt = torch.optim.AdamW(self.named.values(), lr=self.base_lr, weight_decay=0.0)
        self.step = 0
        self.log: list[dict] = []
        if c.resume:
            self._load_checkpoint()

    # --- what a trainable count and a step are -------------------------------------------
    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.named.values())

    def batch_at(self, step: int):
        """The examples of step `step`: a seeded permutation per epoch, so a resumed run sees
        the same batches as an uninterrupted one."""
        n, B = len(self.train_set), self.c.batch_size
        idx = []
        for k in range(step * B, step * B + B):
            epoch, pos = divmod(k, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.c.seed * 100_003 + epoch))
            idx.append(int(perm[pos]))
        return batch([self.train_set[i] for i in idx])

    def loss(self, tokens, labels):
        logits = self.model(tokens.to(self.device), seams=self.seams)  # (B, T, V)
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1).to(self.device),
            ignore_index=IGNORE)

    def train_step(self) -> dict:
        tokens, labels = self.batch_at(self.step)
        t0 = time.perf_counter()
        lr = self.base_lr * lr_factor(self.c.lr_schedule, self.step, self.c.warmup_steps, self.c.steps)
        for g in self.opt.param_groups:
            g["lr"] = lr  # a function of the step alone, so a resumed run continues the schedule
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(tokens, labels)
        loss.backward()
        grads = [p for p in self.named.values() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(grads, self.c.max_grad_norm or math.inf)  # the norm before clipping
        self.opt.step()
        if self.c.method == "sora":
            lam = lambda_at(self.adapter.config, self.step, self.c.steps)
            proximal_step([p for k, p in self.named.items() if k.endswith("lora_gate")], self.opt.param_groups[0]["lr"], lam)
        self.step += 1
        rec = {"step": self.step, "loss": loss.item(), "lr": lr, "grad_norm": float(grad_norm),
               "tokens": int((labels != IGNORE).sum()), "seconds": time.perf_counter() - t0}
        if self.c.eval_every and (self.step % self.c.eval_every == 0 or self.step == self.c.steps):
            rec["eval_loss"] = self.eval_loss()
        self.log.append(rec)
        return rec

    @torch.no_grad()
    def eval_loss(self) -> float:
        """Mean response-token loss over the held-out examples (weighted by their tokens)."""
        total, count = 0.0, 0
        B = self.c.batch_size
        for i in range(0, len(self.eval_set), B):
            tokens, labels = batch(self.eval_set[i : i + B])
            k = int((labels[:, 1:] != IGNORE).sum())
            total += self.loss(tokens, labels).item() * k
            count += k
        return total / max(1, count)

    def run(self) -> Path:
        """Train to c.steps (Ctrl-C stops early and still saves a usable result)."""
        self.out.mkdir(parents=True, exist_ok=True)
        logf = open(self.out / "train_log.jsonl", "a" if self.c.resume else "w")
        reporter = _reporter(self.c.report_to, self.out)
        progress = None if self.c.quiet else Progress(self.c.steps, self.step)
        try:
            while self.step < self.c.steps:
                rec = self.train_step()
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                if reporter is not None:
                    for k in ("loss", "lr", "grad_norm", "eval_loss"):
                        if k in rec:
                            reporter.add_scalar(("eval/loss" if k == "eval_loss" else f"train/{k}"), rec[k], rec["step"])
                if progress is not None:
                    progress.update(rec)
                if self.c.checkpoint_every and self.step % self.c.checkpoint_every == 0:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            print(f"\ninterrupted at step {self.step}: saving what was trained", file=sys.stderr)
        finally:
            logf.close()
            if reporter is not None:
                reporter.close()
            if progress is not None:
                progress.close()
        path = self.save()
        self.save_checkpoint()
        from training.plot import plot_losses

        log = _read_log(self.out / "train_log.jsonl")
        evals = [(r["step"], r["eval_loss"]) for r in log if "eval_loss" in r]
        plot_losses({self.c.method: [r["loss"] for r in log]}, self.out / "loss.png",
                    points={f"{self.c.method} (held-out)": evals} if evals else None)
        return path

    # --- outputs ----------------------------------------------------------------------
    def result_dir(self) -> Path:
        return self.out / ("model" if self.c.method == "full" else "adapter")

    def save(self) -> Path:
        """The adapter directory the server accepts (full: an HF checkpoint for --model)."""
        d = self.result_dir()
        if self.adapter is not None:
            return save_dir(Adapter(self.adapter.kind, self.adapter.config,
                                    {k: v.detach() for k, v in self.adapter.tensors.items()}, self.shape), d)
        tmp = d.with_name(d.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (self.model_dir / f).exists():
                shutil.copy(self.model_dir / f, tmp / f)
        sd = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        if self.model.cfg.tie_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.rmtree(d, ignore_errors=True)
        tmp.rename(d)
        return d

    def save_checkpoint(self) -> None:
        """Parameters and optimizer moments as safetensors, the rest as JSON (never pickle)."""
        ck = self.out / "checkpoint"
        ck.mkdir(parents=True, exist_ok=True)
        tensors = {f"param/{k}": p.detach().cpu().contiguous() for k, p in self.named.items()}
        for k, p in self.named.items():
            st = self.opt.state.get(p, {})
            for name in ("exp_avg", "exp_avg_sq"):
                if name in st:
                    tensors[f"{name}/{k}"] = st[name].detach().cpu().contiguous()
        save_file(tensors, str(ck / "state.safetensors.tmp"))
        (ck / "state.safetensors.tmp").replace(ck / "state.safetensors")
        steps = {k: float(self.opt.state[p]["step"]) for k, p in self.named.items() if "step" in self.opt.state.get(p, {})}
        (ck / "trainer.json").write_text(json.dumps({"step": self.step, "config": asdict(self.c), "opt_steps": steps}))

    def _load_checkpoint(self) -> None:
        ck = self.out / "checkpoint"
        if not (ck / "trainer.json").is_file():
            raise InputError(f"nothing to resume: {ck} has no checkpoint")
        meta = json.loads((ck / "trainer.json").read_text())
        tensors = load_file(str(ck / "state.safetensors"))
        with torch.no_grad():
            for k, p in self.named.items():
                p.copy_(tensors[f"param/{k}"])
        for k, p in self.named.items():
            if f"exp_avg/{k}" in tensors:
                self.opt.state[p] = {"step": torch.tensor(meta["opt_steps"][k]),
                                     "exp_avg": tensors[f"exp_avg/{k}"].to(p.device),
                                     "exp_avg_sq": tensors[f"exp_avg_sq/{k}"].to(p.device)}
        self.step = meta["step"]


def _read_log(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _reporter(kind: str, out: Path):
    if kind != "tensorboard":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise InputError("--report-to tensorboard needs the tensorboard package: pip install 'qaa-serve[tensorboard]'") from None
    return SummaryWriter(log_dir=str(out / "runs"))


class Progress:
    """A tqdm bar when stderr is a terminal; otherwise plain lines (no carriage returns in log
    files), about 20 per run and at least one a minute."""

    def __init__(self, total: int, start: int):
        self.total, self.start, self.t0, self.last = total, start, time.perf_counter(), 0.0
        self.every = max(1, total // 20)
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)

    def update(self, rec: dict) -> None:
        fields = {"loss": f"{rec['loss']:.4f}", "lr": f"{rec['lr']:.2e}", "grad_norm": f"{rec['grad_norm']:.3f}"}
        if "eval_loss" in rec:
            fields["eval_loss"] = f"{rec['eval_loss']:.4f}"
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)
            self.bar.update(1)
            return
        now = time.perf_counter() - self.t0
        step = rec["step"]
        if step % self.every and step != self.total and "eval_loss" not in rec and now - self.last < 60:
            return
        self.last = now
        eta = now / max(1, step - self.start) * (self.total - step)
        print(f"step {step}/{self.total} " + " ".join(f"{k} {v}" for k, v in fields.items())
              + f" {rec['tokens'] / max(rec['seconds'], 1e-9):.0f} tok/s ETA {int(eta // 60)}m{int(eta % 60):02d}s",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def ratio_line(n: int, base: int) -> str:
    return f"trainable parameters: {n:,} ({100 * n / base:.4f}% of {base:,})"

