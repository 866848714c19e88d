"""Alpaca-format data: loading, chat formatting, tokenisation with response-only labels, and a
deterministic held-out split."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.errors import InputError

FIELDS = ("instruction", "input", "output")
IGNORE = -100


@dataclass
class Example:
    instruction: str
    input: str
    output: str

    def messages(self) -> list[dict]:
        user = self.instruction if not self.input else f"{self.instruction}\n\n{self.input}"
        return [{"role": "user", "content": user}]


def load_examples(source: str) -> list[Example]:
    """Alpaca records from a JSON list, a JSONL file, or (online) a Hugging Face dataset name."""
    path = Path(source)
    if not path.exists():
        if "/" in source and not source.startswith((".", "/")) and not path.suffix:
            return _from_hub(source)
        raise InputError(f"data file {source} does not exist")
    text = path.read_text(encoding="utf-8", errors="strict") if path.is_file() else ""
    if not path.is_file():
        raise InputError(f"data path {source} is not a file")
    if not text.strip():
        raise InputError(f"data file {source} is empty")
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise InputError(f"data file {source} is neither JSON nor JSONL: {e}") from None
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list) or not records:
        raise InputError(f"data file {source} holds no records (expected a list of {{instruction, input, output}})")
    return [_example(r, i, source) for i, r in enumerate(records)]


def _example(r, i: int, source: str) -> Example:
    if not isinstance(r, dict):
        raise InputError(f"{source}: record {i} is not an object")
    missing = [f for f in ("instruction", "output") if not isinstance(r.get(f), str)]
    if missing:
        raise InputError(f"{source}: record {i} lacks the field(s) {', '.join(missing)} (Alpaca format: instruction, input, output)")
    return Example(r["instruction"], r.get("input") or "", r["output"])


def _from_hub(name: str) -> list[Example]:
    try:
        import datasets  # optional: only for users who are online
    except ImportError:
        raise InputError(f"{name} is not a local file, and loading Hugging Face datasets needs `pip install datasets`") from None
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:
        raise InputError(f"cannot load dataset {name}: {e}") from None
    return [_example(r, i, name) for i, r in enumerate(ds)]


def split(examples: list[Example], holdout: float = 0.1, max_holdout: int = 200) -> tuple[list[Example], list[Example]]:
    """Deterministic train / held-out split: by a hash of each example's text, so the same
    file always gives the same split, independent of order and seed."""
    def h(e: Example) -> int:
        return int(hashlib.sha1(f"{e.instruction}\x00{e.input}\x00{e.output}".encode()).hexdigest()[:8], 16)

    n_hold = min(max_holdout, max(1, int(len(examples) * holdout))) if len(examples) > 1 else 0
    ranked = sorted(range(len(examples)), key=lambda i: h(examples[i]))
    held = set(ranked[:n_hold])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def encode(tok, e: Example, max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels): chat-formatted prompt + response + end-of-turn; labels are
    IGNORE on the prompt, so the loss is on response tokens only."""
    prompt = tok.encode(tok.apply_chat_template(e.messages(), add_generation_prompt=True), add_special_tokens=False)
    eos = [min(tok.eos_ids)] if tok.eos_ids else []
    response = tok.encode(e.output, add_special_tokens=False) + eos
    ids = (prompt + response)[:max_len]
    labels = ([IGNORE] * len(prompt) + response)[:max_len]
    return ids, labels


def batch(encoded: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (tokens, labels) tensors (B, T)."""
    T = max(len(ids) for ids, _ in encoded)
    tokens = torch.zeros(len(encoded), T, dtype=torch.long)
    labels = torch.full((len(encoded), T), IGNORE, dtype=torch.long)
    for i, (ids, lab) in enumerate(encoded):
        tokens[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
    return tokens, labels
