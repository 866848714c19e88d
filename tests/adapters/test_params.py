"""Parameter counts: the survey's numbers on GPT-Neo-125M, and agreement with real tensors."""

import pytest

from adapters.lora import LoraConfig
from adapters.params import GPT_NEO_125M, count_trainable, ratio
from adapters.prefix import PrefixConfig
from adapters.registry import get_type
from tests.adapters.cases import CASES, IDS, make


def test_survey_counts_on_gpt_neo_125m():
    assert count_trainable("lora", GPT_NEO_125M, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])) == 147_456
    assert count_trainable("prefix", GPT_NEO_125M, PrefixConfig(num_virtual_tokens=30)) == 552_960
    assert count_trainable("full", GPT_NEO_125M) == 125_198_592
    # the survey's table rounds these to 0.12% and 0.44%
    assert round(100 * ratio("lora", GPT_NEO_125M, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])), 2) == 0.12
    assert round(100 * ratio("prefix", GPT_NEO_125M, PrefixConfig(num_virtual_tokens=30)), 2) == 0.44


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_count_equals_the_initialised_tensors(case, tiny_dir):
    from engine.config import ModelConfig

    shape = ModelConfig.from_dir(tiny_dir).shape()
    ad = make(case, shape)
    assert count_trainable(case.kind, shape, case.make_config()) == ad.n_params() > 0


def test_qaa_count_by_hand():
    """QAA per module: L*n angles + d*n up-projection + d bias."""
    from adapters.qaa import QAAConfig

    d, n, L = 768, 10, 2
    per_module = L * n + d * n + d
    cfg = QAAConfig(circuit_layers=L, placement=["attn", "mlp"])
    assert count_trainable("qaa", GPT_NEO_125M, cfg) == 12 * 2 * per_module
    assert get_type("qaa").virtual_tokens(cfg) == 0
