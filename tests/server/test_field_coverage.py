"""No request field is accepted and ignored: every field of every request model is either
implemented, with a behavioural test named here, or refused, with the test that shows the
refusal. A field added to server/schemas.py without either fails this test."""

from __future__ import annotations

import importlib

import pytest

from server.schemas import (
    UNSUPPORTED, ChatMessage, ChatRequest, CompletionRequest, ContentPart, JsonSchemaSpec, ResponseFormat,
    StreamOptions, TGIGrammar, TGIParameters, TGIRequest,
)

FIELDS = "tests.server.test_api_fields"
API = "tests.server.test_api"
ENGINE = "tests.engine.test_generate"
HOSTILE = "tests.server.test_hostile"
CONSTRAINED = "tests.server.test_constrained"
LIFE = "tests.server.test_lifecycle"

COVERED = {
    # OpenAI and vLLM request fields -> the test that shows the behaviour
    "model": (API, "test_openai_client"), "prompt": (API, "test_openai_client"),
    "messages": (FIELDS, "test_content_parts_and_roles"), "max_tokens": (API, "test_openai_client"),
    "max_completion_tokens": (FIELDS, "test_chat_without_max_tokens_runs_to_the_context"),
    "temperature": (ENGINE, "test_seeded_sampling_is_reproducible_and_batch_independent"),
    "top_p": (ENGINE, "test_sampler_matches_transformers_logits_processors"),
    "top_k": (ENGINE, "test_sampler_matches_transformers_logits_processors"),
    "repetition_penalty": (ENGINE, "test_sampler_matches_transformers_logits_processors"),
    "seed": (FIELDS, "test_n_with_a_seed_is_n_different_completions_repeatably"),
    "n": (FIELDS, "test_n_with_a_seed_is_n_different_completions_repeatably"),
    "best_of": (FIELDS, "test_n_with_a_seed_is_n_different_completions_repeatably"),  # and TGI's:
    # test_tgi_best_of_returns_the_most_likely_of_its_seeded_sequences
    "stream": (API, "test_openai_client"), "stream_options": (API, "test_openai_client"),
    "include_usage": (API, "test_openai_client"),
    "stop": (ENGINE, "test_stop_string_ends_text_before_it"),
    "user": ("tests.ops.test_logs", "test_a_line_per_request_with_ids_sizes_timings_and_outcome"),  # logged
    "ignore_eos": (API, "test_openai_client"),
    "presence_penalty": (ENGINE, "test_presence_and_frequency_penalties_follow_openais_definition"),
    "frequency_penalty": (ENGINE, "test_presence_and_frequency_penalties_follow_openais_definition"),
    "logit_bias": (FIELDS, "test_logit_bias_forces_and_bans_tokens"),
    "min_tokens": (ENGINE, "test_logit_bias_bans_a_token_and_min_tokens_holds_back_eos"),
    "stop_token_ids": (ENGINE, "test_logit_bias_bans_a_token_and_min_tokens_holds_back_eos"),
    "logprobs": (FIELDS, "test_logprobs_are_the_log_softmax_of_the_models_logits"),
    "top_logprobs": (FIELDS, "test_chat_logprobs_and_top_logprobs"),
    "echo": (FIELDS, "test_echo_returns_the_prompt_first"),  # with logprobs:
    # test_echo_with_logprobs_scores_the_prompt_tokens
    "role": (FIELDS, "test_content_parts_and_roles"), "content": (FIELDS, "test_content_parts_and_roles"),
    "name": (FIELDS, "test_content_parts_and_roles"), "tool_call_id": (FIELDS, "test_content_parts_and_roles"),
    "type": (FIELDS, "test_content_parts_and_roles"), "text": (FIELDS, "test_content_parts_and_roles"),
    # TGI
    "inputs": (API, "test_concurrent_mixed_adapters_equal_each_alone"),
    "parameters": (API, "test_concurrent_mixed_adapters_equal_each_alone"),
    "adapter_id": (API, "test_concurrent_mixed_adapters_equal_each_alone"),
    "max_new_tokens": (API, "test_concurrent_mixed_adapters_equal_each_alone"),
    "details": (FIELDS, "test_huggingface_hub_inference_client"),
    "top_n_tokens": (FIELDS, "test_huggingface_hub_inference_client"),
    "return_full_text": (FIELDS, "test_tgi_full_text_and_truncate"),
    "truncate": (FIELDS, "test_tgi_full_text_and_truncate"),
    "do_sample": (ENGINE, "test_seeded_sampling_is_reproducible_and_batch_independent"),
    "decoder_input_details": (FIELDS, "test_tgi_decoder_input_details_are_the_prompt_tokens_logprobs"),
    # constrained decoding
    "response_format": (CONSTRAINED, "test_every_row_follows_its_own_schema_in_one_mixed_batch"),
    "json_schema": (CONSTRAINED, "test_every_row_follows_its_own_schema_in_one_mixed_batch"),
    "schema_": (CONSTRAINED, "test_every_row_follows_its_own_schema_in_one_mixed_batch"),
    "strict": (CONSTRAINED, "test_every_row_follows_its_own_schema_in_one_mixed_batch"),  # always strict
    "description": (CONSTRAINED, "test_every_row_follows_its_own_schema_in_one_mixed_batch"),  # metadata
    "value": (CONSTRAINED, "test_json_object_and_tgi_grammar"),
    "grammar": (CONSTRAINED, "test_json_object_and_tgi_grammar"),
}
REFUSED = {
    # fields present only to be refused by name when set
    **{k: (FIELDS, "test_unimplemented_or_inconsistent_fields_are_refused_by_name") for k in UNSUPPORTED},
    **{k: (FIELDS, "test_tgi_parameters_not_implemented_are_refused_by_name")
       for k in ("typical_p", "watermark")},
    "adapter_source": (HOSTILE, "test_hostile_inputs_get_4xx_fast_and_hurt_no_other_tenant"),
}
MODELS = [TGIParameters, TGIRequest, TGIGrammar, CompletionRequest, ChatRequest, ChatMessage, ContentPart,
          StreamOptions, ResponseFormat, JsonSchemaSpec]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_request_field_is_implemented_or_refused(model):
    missing = [f for f in model.model_fields if f not in COVERED and f not in REFUSED]
    assert not missing, f"{model.__name__}: fields with no behavioural test and no refusal: {missing}"


def test_the_named_tests_exist():
    for field, (module, name) in {**COVERED, **REFUSED}.items():
        assert callable(getattr(importlib.import_module(module), name, None)), (field, module, name)


def test_refused_fields_are_refused(tiny_dir):
    """Every UNSUPPORTED field set to a value other than its 'off' one fails validation."""
    from pydantic import ValidationError

    for field in UNSUPPORTED:
        with pytest.raises(ValidationError, match=field):
            CompletionRequest.model_validate({"model": "m", "prompt": "x", field: {"on": True}})
