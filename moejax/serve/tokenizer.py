"""Tokenizers for serving: byte-level (moejax's own models) and Hugging Face ``tokenizers`` files.

Both expose ``encode(text) -> ids``, ``decode(ids) -> str`` (incomplete UTF-8 at the end decodes to U+FFFD,
which the streaming detokenizer holds back), ``piece(id) -> str`` for logprob listings, ``eos_id`` and
``apply_chat_template(messages) -> str``.
"""

from __future__ import annotations

import json
import os

from moejax.config import EOS

DEFAULT_CHAT_TEMPLATE = "{role}: {content}\n"   # per message; the prompt ends with "assistant: "


def simple_chat_prompt(messages: list[dict]) -> str:
    """The default chat template for byte-level models: ``role: content`` lines, then ``assistant: ``."""
    parts = [DEFAULT_CHAT_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages]
    return "".join(parts) + "assistant: "


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
    """A ``tokenizer.json`` from a Hugging Face model directory (the ``tokenizers`` library, no transformers)."""

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

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def piece(self, i: int) -> str:
        return self.tok.id_to_token(int(i)) or f"<{int(i)}>"

    def apply_chat_template(self, messages: list[dict]) -> str:
        return simple_chat_prompt(messages)


def load_tokenizer(path: str | None, vocab_size: int):
    """``HFTokenizer`` if ``path`` holds a ``tokenizer.json``, else the byte tokenizer."""
    if path and os.path.exists(os.path.join(path, "tokenizer.json")):
        return HFTokenizer(path)
    return ByteTokenizer(vocab_size)
