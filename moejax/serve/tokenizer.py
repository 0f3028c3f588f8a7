"""Tokenizers for serving: byte-level (moejax's own models) and Hugging Face ``tokenizers`` files.

Both expose ``encode(text) -> ids``, ``decode(ids) -> str`` (incomplete UTF-8 at the end decodes to U+FFFD,
which the streaming detokenizer holds back), ``piece(id) -> str`` for logprob listings, ``eos_id`` and
``apply_chat_template(messages) -> str``.

Chat templates. A byte-level model uses :func:`simple_chat_prompt` (``role: content`` lines). A Hugging Face
directory uses its own Jinja template, found where transformers finds it: ``chat_template.jinja`` beside
``tokenizer.json`` (newer transformers save it there; it takes priority), else ``chat_template`` in
``tokenizer_config.json`` (a string, or a list of named templates of which ``default`` is used). It is rendered
as ``transformers``' ``apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`` renders it
(:func:`compile_chat_template`, :func:`render_chat_template`): jinja2's ``ImmutableSandboxedEnvironment`` with
``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``strftime_now``, transformers' ``tojson``, and the
special tokens of ``tokenizer_config.json`` (``bos_token``, ``eos_token``, ...) as variables. A directory with
no template falls back to :func:`simple_chat_prompt`, with a logged warning. The rendered prompt is encoded
without adding special tokens (as transformers' ``apply_chat_template(tokenize=True)``): the template writes
them, and special tokens written as text (``<|im_start|>``) encode to their ids.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime

from moejax.config import EOS

log = logging.getLogger("moejax.serve")

CHAT_TEMPLATE_FILE = "chat_template.jinja"
# the named special tokens transformers passes to a chat template (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

DEFAULT_CHAT_TEMPLATE = "{role}: {content}\n"   # per message; the prompt ends with "assistant: "


def simple_chat_prompt(messages: list[dict]) -> str:
    """The default chat template for byte-level models: ``role: content`` lines, then ``assistant: ``."""
    parts = [DEFAULT_CHAT_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages]
    return "".join(parts) + "assistant: "


# ------------------------------------------------------------------------------------------------ chat templates
class ChatTemplateError(ValueError):
    """A chat template failed on a request's messages: a jinja ``TemplateError`` (including the template's own
    ``raise_exception``, e.g. "roles must alternate") or another error raised while rendering. The server answers
    it with a 400 (param ``messages``)."""


def _token_text(value) -> str | None:
    # a special token in tokenizer_config.json is a string or a serialized AddedToken {"content": ..., ...}
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def read_chat_template(path: str) -> tuple[str | None, str | None]:
    """The chat template of the Hugging Face tokenizer directory ``path`` and the file it came from, or
    ``(None, None)``: ``chat_template.jinja`` first, then ``tokenizer_config.json``'s ``chat_template`` (a string,
    or a list of ``{"name", "template"}`` of which ``default`` is used)."""
    jinja_file = os.path.join(path, CHAT_TEMPLATE_FILE)
    if os.path.exists(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read(), jinja_file
    cfg_file = os.path.join(path, "tokenizer_config.json")
    tpl = _read_json(cfg_file).get("chat_template")
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        if "default" not in named:
            raise ValueError(f"{cfg_file}: chat_template lists named templates {sorted(map(str, named))} and no "
                             "'default'; moejax serves the default template")
        tpl = named["default"]
    if tpl is None:
        return None, None
    if not isinstance(tpl, str):
        raise ValueError(f"{cfg_file}: chat_template must be a string or a list of named templates, "  # noqa: TRY004
                         f"got {type(tpl).__name__}")
    return tpl, cfg_file


def read_special_tokens(path: str) -> dict[str, str]:
    """The special tokens transformers passes to the chat template (its ``special_tokens_map``): the named ones
    of :data:`SPECIAL_TOKEN_NAMES` and the model-specific ones of an ``extra_special_tokens`` dict in
    ``tokenizer_config.json``; a name missing there is read from a legacy ``special_tokens_map.json``."""
    cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
    legacy = _read_json(os.path.join(path, "special_tokens_map.json"))
    extra = cfg.get("extra_special_tokens")
    names = list(SPECIAL_TOKEN_NAMES) + (list(extra) if isinstance(extra, dict) else [])
    out = {}
    for name in names:
        value = _token_text(cfg.get(name))
        if value is None and isinstance(extra, dict):
            value = _token_text(extra.get(name))
        if value is None:
            value = _token_text(legacy.get(name))
        if value is not None:
            out[name] = value
    return out


def compile_chat_template(source: str):
    """Compile a chat template as transformers does (``utils/chat_template_utils.py``): jinja2's
    ``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with the ``loopcontrols`` extension,
    the ``{% generation %}`` tag (rendered as its body), the globals ``raise_exception`` (raises a
    ``TemplateError``), ``strftime_now``, ``dict`` and a ``namespace`` that refuses underscore names, and a
    ``tojson`` filter that does not escape HTML (``json.dumps(x, ensure_ascii=False, ...)``). Hub templates are
    untrusted code: the sandbox is why jinja2 >= 3.1.6 is required (older ones have known escapes)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        # transformers marks assistant spans with {% generation %}...{% endgeneration %}; serving renders the body
        tags = frozenset({"generation"})

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class TemplateDict:
        # dict() and dict.fromkeys() without exposing the dict type itself
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # a namespace that refuses underscore-prefixed attributes (no route to CPython internals)
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(source)


def render_chat_template(template, messages: list[dict], special_tokens: dict[str, str] | None = None,
                         add_generation_prompt: bool = True) -> str:
    """``template`` (a compiled template or its source) applied to ``messages`` as transformers'
    ``apply_chat_template(messages, tokenize=False, add_generation_prompt=...)``: message keys whose value is
    None are dropped, ``tools`` and ``documents`` are None, the special tokens are variables. Any error while
    rendering is raised as :class:`ChatTemplateError`."""
    import jinja2

    if isinstance(template, str):
        template = compile_chat_template(template)
    msgs = [{k: v for k, v in m.items() if v is not None} for m in messages]
    try:
        return template.render(messages=msgs, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                               **(special_tokens or {}))
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template error: {e.message or type(e).__name__}") from None
    except Exception as e:  # noqa: BLE001 (a template that breaks on these messages, e.g. a TypeError in it)
        raise ChatTemplateError(f"chat template failed on these messages: {type(e).__name__}: {e}") from None


# ------------------------------------------------------------------------------------------------ tokenizers
class ByteTokenizer:
    """Token ``b`` < 256 is the byte ``b``; ``256`` is end-of-document (EOS); other ids decode to nothing."""

    name = "bytes"

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eos_id = EOS if vocab_size > EOS else None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def piece(self, i: int) -> str:
        i = int(i)
        if i == self.eos_id:
            return "<eos>"
        if 0 <= i < 128:
            return chr(i)
        return f"<0x{i:02X}>" if i < 256 else f"<{i}>"

    def apply_chat_template(self, messages: list[dict]) -> str:
        return simple_chat_prompt(messages)


class HFTokenizer:
    """A ``tokenizer.json`` from a Hugging Face model directory (the ``tokenizers`` library, no transformers) and
    the directory's chat template (see the module docstring; ``chat_template_file`` says where it came from,
    None: no template, chat falls back to ``role: content`` lines). A template that does not compile is an
    error here, when the server starts, not on the first chat request."""

    name = "hf"

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        self.vocab_size = self.tok.get_vocab_size()
        self.eos_id = None
        cfg = os.path.join(path, "config.json")
        if os.path.exists(cfg):
            with open(cfg) as f:
                eos = json.load(f).get("eos_token_id")
            self.eos_id = eos[0] if isinstance(eos, list) else eos
        source, self.chat_template_file = read_chat_template(path)
        self.special_tokens = read_special_tokens(path)
        self.chat_template = None
        if source is not None:
            import jinja2

            try:
                self.chat_template = compile_chat_template(source)
            except jinja2.TemplateError as e:
                raise ValueError(f"{self.chat_template_file}: the chat template does not compile: {e}") from None
        else:
            log.warning("%s has no chat template (no %s, no chat_template in tokenizer_config.json): chat requests "
                        "use the 'role: content' template, which this model was probably not trained on",
                        path, CHAT_TEMPLATE_FILE)

    def encode(self, text: str) -> list[int]:
        # no post-processor tokens (BOS): a chat template writes its own, and special tokens in the text (e.g.
        # "<|im_start|>") still encode to their ids, as transformers' apply_chat_template(tokenize=True)
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def piece(self, i: int) -> str:
        return self.tok.id_to_token(int(i)) or f"<{int(i)}>"

    def apply_chat_template(self, messages: list[dict]) -> str:
        """The directory's chat template on ``messages`` with the generation prompt (raises
        :class:`ChatTemplateError`); ``role: content`` lines when it has none."""
        if self.chat_template is None:
            return simple_chat_prompt(messages)
        return render_chat_template(self.chat_template, messages, self.special_tokens)


def load_tokenizer(path: str | None, vocab_size: int):
    """``HFTokenizer`` if ``path`` holds a ``tokenizer.json``, else the byte tokenizer."""
    if path and os.path.exists(os.path.join(path, "tokenizer.json")):
        return HFTokenizer(path)
    return ByteTokenizer(vocab_size)
