"""Chat templates of Hugging Face tokenizer directories: rendered as transformers renders them, through the server.

A tiny byte-level BPE ``tokenizer.json`` (256 byte tokens + ``<s>``, ``<|im_start|>``, ``<|im_end|>``) is written
with the ``tokenizers`` library next to a ``tokenizer_config.json`` holding a ChatML-like template (or a
``chat_template.jinja``); the ``hf``-marked tests compare with transformers' own ``apply_chat_template``.
"""

import json
import logging
import os
import time

import pytest
from flax import nnx
from starlette.testclient import TestClient

from moejax.config import ModelConfig, MoEConfig, RouterConfig
from moejax.models.transformer import Transformer
from moejax.serve.engine import Engine, EngineConfig, SamplingParams
from moejax.serve.scheduler import SchedulerConfig
from moejax.serve.server import create_app
from moejax.serve.tokenizer import (
    ChatTemplateError,
    HFTokenizer,
    compile_chat_template,
    load_tokenizer,
    read_special_tokens,
    render_chat_template,
    simple_chat_prompt,
)

# ChatML-like; multi-line, so trim_blocks/lstrip_blocks matter; raise_exception on a late system message
TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message.role == 'system' and not loop.first %}
        {{ raise_exception('the system message must come first') }}
    {% endif %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

# transformers' extras: tojson (no HTML escaping), namespace, dict, loop controls, the generation tag, eos_token
EXTRAS = """{% set ns = namespace(n=0) %}
{% for m in messages %}
{% if m.role == 'system' %}{% continue %}{% endif %}
{% set ns.n = ns.n + 1 %}
{% generation %}{{ dict(m, turn=ns.n) | tojson(sort_keys=true) }}{% endgeneration %}{{ eos_token }}
{% endfor %}
turns={{ ns.n }}{% if add_generation_prompt %}>{% endif %}"""

MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi <b>é</b>"}]
WANT = ("<s>\n<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi <b>é</b><|im_end|>\n"
        "<|im_start|>assistant\n")
SPECIAL = {"bos_token": "<s>", "eos_token": "<|im_end|>"}
EOS_ID = 258  # <|im_end|>: the three special tokens follow the 256 byte tokens


def added_token(content):
    # a special token as transformers serializes it in tokenizer_config.json
    return {"__type": "AddedToken", "content": content, "lstrip": False, "rstrip": False, "normalized": False,
            "single_word": False, "special": True}


def write_tokenizer_dir(path, *, config_template=TEMPLATE, jinja_template=None):
    """A Hugging Face tokenizer directory: tokenizer.json, tokenizer_config.json (its chat_template when
    ``config_template`` is not None), chat_template.jinja (when ``jinja_template`` is not None), config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    os.makedirs(path, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "<|im_start|>", "<|im_end|>"])
    tok.save(os.path.join(path, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": added_token("<|im_end|>")}
    if config_template is not None:
        cfg["chat_template"] = config_template
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    if jinja_template is not None:
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(jinja_template)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"eos_token_id": EOS_ID}, f)
    return str(path)


# ------------------------------------------------------------------------------------------------ rendering
def test_render_chat_template_gives_the_expected_prompt(tmp_path):
    assert render_chat_template(TEMPLATE, MSGS, SPECIAL) == WANT
    assert render_chat_template(TEMPLATE, MSGS, SPECIAL, add_generation_prompt=False) == WANT[:-len(
        "<|im_start|>assistant\n")]
    tok = load_tokenizer(write_tokenizer_dir(tmp_path / "cfg"), 300)
    assert isinstance(tok, HFTokenizer) and tok.chat_template_file.endswith("tokenizer_config.json")
    assert tok.special_tokens == SPECIAL  # a plain string and a serialized AddedToken
    assert tok.apply_chat_template(MSGS) == WANT
    # special tokens written as text encode to their ids, and nothing is added around the prompt
    ids = tok.encode(WANT)
    assert ids[:3] == [256, 198, 257] and ids.count(257) == 3 and ids.count(EOS_ID) == 2
    assert ids[-1] == 198  # "\n" after "assistant"


def test_render_follows_transformers_extras_and_sandbox():
    got = render_chat_template(EXTRAS, MSGS + [{"role": "assistant", "content": None}], SPECIAL)
    # tojson does not escape HTML or non-ASCII (jinja's own filter would write \\u003c); None keys are dropped
    assert got == ('{"content": "hi <b>é</b>", "role": "user", "turn": 1}<|im_end|>\n'
                   '{"role": "assistant", "turn": 2}<|im_end|>\nturns=2>')
    assert render_chat_template("{{ strftime_now('%Y') }}", MSGS) == str(time.localtime().tm_year)
    with pytest.raises(ChatTemplateError, match="the system message must come first"):
        render_chat_template(TEMPLATE, MSGS[::-1], SPECIAL)
    with pytest.raises(ChatTemplateError):  # the immutable sandbox: no mutating the caller's messages
        render_chat_template("{{ messages.append(1) }}", MSGS)
    with pytest.raises(ChatTemplateError):  # no underscore attributes on a namespace
        render_chat_template("{% set ns = namespace(_x=1) %}", MSGS)
    with pytest.raises(ChatTemplateError, match="undefined"):
        render_chat_template("{{ messages[0].content.upper() + nothing.here }}", MSGS)
    with pytest.raises(ChatTemplateError, match="TypeError"):  # any error while rendering, not only jinja's
        render_chat_template("{{ messages[0].content + 1 }}", MSGS)
    compile_chat_template(TEMPLATE)


def test_template_sources_and_fallback(tmp_path, caplog):
    # chat_template.jinja (newer transformers) takes priority over tokenizer_config.json's chat_template
    d = write_tokenizer_dir(tmp_path / "jinja", config_template="{{ 'not this one' }}", jinja_template=TEMPLATE)
    tok = HFTokenizer(d)
    assert tok.chat_template_file.endswith("chat_template.jinja") and tok.apply_chat_template(MSGS) == WANT
    # a list of named templates: the default one
    d = write_tokenizer_dir(tmp_path / "named", config_template=[{"name": "tool_use", "template": "{{ 'tools' }}"},
                                                                 {"name": "default", "template": TEMPLATE}])
    assert HFTokenizer(d).apply_chat_template(MSGS) == WANT
    d = write_tokenizer_dir(tmp_path / "nodefault", config_template=[{"name": "tool_use", "template": "x"}])
    with pytest.raises(ValueError, match="default"):
        HFTokenizer(d)
    # a template that does not compile fails when the tokenizer loads, naming the file
    d = write_tokenizer_dir(tmp_path / "broken", config_template="{% for m in messages %}")
    with pytest.raises(ValueError, match="tokenizer_config.json.*does not compile"):
        HFTokenizer(d)
    # no template: the role: content lines, with a warning
    d = write_tokenizer_dir(tmp_path / "none", config_template=None)
    with caplog.at_level(logging.WARNING, logger="moejax.serve"):
        tok = HFTokenizer(d)
    assert tok.chat_template is None and "no chat template" in caplog.text
    assert tok.apply_chat_template(MSGS) == simple_chat_prompt(MSGS)
    # special tokens: a legacy special_tokens_map.json fills names tokenizer_config.json lacks
    with open(os.path.join(d, "special_tokens_map.json"), "w") as f:
        json.dump({"unk_token": {"content": "<unk>"}, "bos_token": "<ignored>"}, f)
    assert read_special_tokens(d) == {**SPECIAL, "unk_token": "<unk>"}


@pytest.mark.hf
@pytest.mark.parametrize("where", ["config", "jinja"])
@pytest.mark.parametrize("template", ["chatml", "extras"])
def test_template_matches_transformers(tmp_path, where, template):
    transformers = pytest.importorskip("transformers")
    src = TEMPLATE if template == "chatml" else EXTRAS
    d = (write_tokenizer_dir(tmp_path, config_template=src) if where == "config"
         else write_tokenizer_dir(tmp_path, config_template=None, jinja_template=src))
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(d)
    tok = HFTokenizer(d)
    for msgs in (MSGS, MSGS[1:], MSGS + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "é"}]):
        want = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert tok.apply_chat_template(msgs) == want
        want_ids = ref.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert tok.encode(tok.apply_chat_template(msgs)) == list(want_ids)


# ------------------------------------------------------------------------------------------------ server
def small_cfg():
    return ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=128,
                       moe=MoEConfig(num_experts=4, d_ff=24, router=RouterConfig(type="topk", top_k=2))).validate()


@pytest.fixture(scope="module")
def model():
    return Transformer(small_cfg(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def engine(model):
    # one engine for the module's apps (one at a time), so its compiled shapes are reused; no prefix cache, so a
    # repeated prompt runs the shapes its first run compiled
    return Engine(model, EngineConfig(block_size=8, sched=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
                                      enable_prefix_cache=False))


def test_server_chat_uses_the_checkpoint_template(tmp_path, engine):
    """The server's chat prompt is the template's (from tokenizer_config.json or chat_template.jinja), encoded
    with its special tokens; the answer is the engine's; the template's raise_exception is a 400."""
    tok = HFTokenizer(write_tokenizer_dir(tmp_path / "cfg"))
    ids = tok.encode(WANT)
    # the engine's own greedy answer to that prompt (the same engine: no further compilation)
    toks = engine.generate([ids], SamplingParams(max_tokens=1, temperature=0, stop_token_ids=(EOS_ID,)))[0].tokens
    jinja = HFTokenizer(write_tokenizer_dir(tmp_path / "jinja", config_template="{{ 'not this' }}",
                                            jinja_template=TEMPLATE))
    for tk in (tok, jinja):
        with TestClient(create_app(engine, tk, model_name="tiny-hf")) as c:
            r = c.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 1, "temperature": 0,
                                                     "return_token_ids": True})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["prompt_token_ids"] == ids and body["choices"][0]["token_ids"] == toks
            assert body["usage"]["prompt_tokens"] == len(ids) and body["usage"]["completion_tokens"] == len(toks)
            assert body["choices"][0]["message"]["content"] == tok.decode([t for t in toks if t != EOS_ID])
    with TestClient(create_app(engine, tok, model_name="tiny-hf")) as c:
        # the template's raise_exception is a 400 in OpenAI's shape, and the server keeps serving
        r = c.post("/v1/chat/completions", json={"messages": MSGS[::-1], "max_tokens": 2})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "messages" and err["type"] == "invalid_request_error"
        assert "the system message must come first" in err["message"]
        r = c.post("/v1/chat/completions", json={"messages": MSGS[::-1], "max_tokens": 2, "stream": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        assert c.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 1}).status_code == 200
