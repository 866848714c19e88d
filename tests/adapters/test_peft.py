"""LoRA and prefix tuning interoperate with Hugging Face PEFT, both directions."""

import pytest
import torch

from adapters.files import load_dir, save_dir
from adapters.seams import SingleSeams
from engine.engine import Engine
from engine.sampling import SamplingParams
from tests.adapters.cases import CASES, make

TOL = 1e-4
IDS = torch.tensor([[5, 9, 33, 100, 7, 61, 200, 12, 3, 44]])


@pytest.fixture(scope="module")
def hf_tiny(tiny_dir):
    from transformers import AutoModelForCausalLM

    return lambda: AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return Engine(tiny_dir, device="cpu", max_batch=2, max_seq_len=64, max_adapters=2)


def _randomize(peft_model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n or "prompt_encoder" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _peft_configs():
    from peft import LoraConfig, PrefixTuningConfig

    return {
        "lora": LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj"], task_type="CAUSAL_LM"),
        "lora-patterns": LoraConfig(r=4, lora_alpha=8, use_rslora=True, layers_to_transform=[0],
                                    target_modules=["k_proj", "o_proj", "down_proj"], rank_pattern={"o_proj": 2},
                                    alpha_pattern={"down_proj": 3.0}, task_type="CAUSAL_LM"),
        "prefix": PrefixTuningConfig(num_virtual_tokens=6, task_type="CAUSAL_LM"),
    }


@pytest.mark.parametrize("name", ["lora", "lora-patterns", "prefix"])
def test_peft_adapter_loads_with_same_logits(name, hf_tiny, engine, tmp_path):
    from peft import get_peft_model

    pm = get_peft_model(hf_tiny(), _peft_configs()[name])
    _randomize(pm)
    pm.eval()
    with torch.no_grad():
        ref = pm(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits
    pm.save_pretrained(tmp_path)
    ad = load_dir(tmp_path, engine.shape)
    with torch.no_grad():
        ours = engine.model(IDS, seams=SingleSeams(ad))
    assert (ours - ref).abs().max().item() <= TOL
    # and the served path (slot bank / KV cache) gives the same next-token logits
    engine.load_adapter("peft", tmp_path)
    out = engine.generate([IDS[0].tolist()], SamplingParams(max_new_tokens=1), adapters=["peft"])
    engine.adapters.unload("peft")
    assert out[0].token_ids[0] == int(ref[0, -1].argmax())


@pytest.mark.parametrize("case", [c for c in CASES if c.kind in ("lora", "prefix")], ids=lambda c: c.name)
def test_our_adapter_loads_in_peft(case, hf_tiny, engine, tmp_path):
    from peft import PeftModel

    ad = make(case, engine.shape, seed=5)
    save_dir(ad, tmp_path / "ad")
    pm = PeftModel.from_pretrained(hf_tiny(), tmp_path / "ad").eval()
    with torch.no_grad():
        ref = pm(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits
        ours = engine.model(IDS, seams=SingleSeams(ad))
    assert (ours - ref).abs().max().item() <= TOL


def test_default_model_greedy_with_peft_lora(default_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)  # PEFT draws lora_A from the global generator: fix it, whatever ran before
    pm = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    pm.eval().save_pretrained(tmp_path)
    engine = Engine(default_dir, device="cpu", max_batch=2, max_adapters=1)
    engine.load_adapter("t", tmp_path)
    prompts = ["The three primary colors are", "Write a haiku about autumn."]
    ours = engine.generate(prompts, SamplingParams(max_new_tokens=32), adapters=["t", "t"])
    base = engine.generate(prompts[:1], SamplingParams(max_new_tokens=32))[0]
    for p, o in zip(prompts, ours):
        ids = torch.tensor([engine.tokenizer.encode(p)])
        with torch.no_grad():
            ref = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
        ref_ids = ref[0, ids.shape[1]:].tolist()
        assert o.token_ids == ref_ids[: len(o.token_ids)] and len(o.token_ids) == len(ref_ids), p
    assert ours[0].token_ids != base.token_ids  # the adapter changes the text
