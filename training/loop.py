"""The training loop: the engine's model and the adapters' own forward, so what is trained is
exactly what is served. Methods: full, lora, sora, prefix, qaa."""

from __future__ import annotations

import json
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
from engine.weights import load_model, resolve_model_dir
from training.data import IGNORE, batch, encode, load_examples, split

METHODS = ("full", "lora", "sora", "prefix", "qaa")


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
    """No progress line."""


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
        self.c = c
        self.out = Path(c.out)
        self.device = pick_device(c.device)
        self.model_dir = resolve_model_dir(c.model)
        self.tok = Tokenizer(self.model_dir)
        train, held = split(load_examples(c.data))
        self.train_set = [encode(self.tok, e, c.max_len) for e in (train or held)]
        self.held_out = held
        torch.manual_seed(c.seed)
        full = c.method == "full"
        self.model = load_model(self.model_dir, self.device, torch.float32, frozen=not full)
        self.shape = self.model.cfg.shape()
        if full:
            self.model.train().requires_grad_(True)
            self.named = dict(self.model.named_parameters())
            self.adapter, self.seams = None, None
        else:
            cfg = adapter_config(c, self.model_dir.name)
            t = get_type(c.method)
            t.check_config(cfg, self.shape)
            g = torch.Generator().manual_seed(c.seed)
            tensors = {k: torch.nn.Parameter(v.to(self.device)) for k, v in t.init(cfg, self.shape, g).items()}
            self.adapter = Adapter(c.method, cfg, tensors, self.shape)
            self.named = tensors
            self.seams = SingleSeams(self.adapter)
        self.opt = torch.optim.AdamW(self.named.values(), lr=c.lr or LR_DEFAULTS[c.method], weight_decay=0.0)
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
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(tokens, labels)
        loss.backward()
        self.opt.step()
        if self.c.method == "sora":
            lam = lambda_at(self.adapter.config, self.step, self.c.steps)
            proximal_step([p for k, p in self.named.items() if k.endswith("lora_gate")], self.opt.param_groups[0]["lr"], lam)
        self.step += 1
        rec = {"step": self.step, "loss": loss.item(), "tokens": int((labels != IGNORE).sum()),
               "seconds": time.perf_counter() - t0}
        self.log.append(rec)
        return rec

    def run(self) -> Path:
        """Train to c.steps (Ctrl-C stops early and still saves a usable result)."""
        self.out.mkdir(parents=True, exist_ok=True)
        logf = open(self.out / "train_log.jsonl", "a" if self.c.resume else "w")
        start, t_start = self.step, time.perf_counter()
        try:
            while self.step < self.c.steps:
                rec = self.train_step()
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                if not self.c.quiet:
                    _progress(rec, self.c.steps, start, t_start)
                if self.c.checkpoint_every and self.step % self.c.checkpoint_every == 0:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            print(f"\ninterrupted at step {self.step}: saving what was trained", file=sys.stderr)
        finally:
            logf.close()
            if not self.c.quiet:
                print(file=sys.stderr)
        path = self.save()
        self.save_checkpoint()
        from training.plot import plot_losses

        plot_losses({self.c.method: [r["loss"] for r in _read_log(self.out / "train_log.jsonl")]}, self.out / "loss.png")
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


def _progress(rec, total, start, t_start) -> None:
    done = rec["step"] - start
    el = time.perf_counter() - t_start
    eta = el / max(1, done) * (total - rec["step"])
    bar = "#" * int(30 * rec["step"] / total)
    print(f"\r[{bar:<30}] {rec['step']}/{total} loss {rec['loss']:.4f} "
          f"{rec['tokens'] / max(rec['seconds'], 1e-9):7.0f} tok/s ETA {int(eta // 60)}m{int(eta % 60):02d}s",
          end="", file=sys.stderr, flush=True)


def ratio_line(n: int, base: int) -> str:
    return f"trainable parameters: {n:,} ({100 * n / base:.4f}% of {base:,})"

