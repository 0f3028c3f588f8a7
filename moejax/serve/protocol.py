"""Request bodies of the OpenAI-compatible API (pydantic models validated by FastAPI).

A field that fails validation is answered with a 400 naming the field (see :mod:`moejax.serve.errors`); fields
this server does not know are accepted and ignored (``extra="allow"``), as OpenAI clients send many.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class SamplingRequest(BaseModel):
    # the fields shared by completions and chat completions: model, length and sampling controls
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=0, lt=2 ** 32)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    # vLLM's: the choices' generated token ids (`token_ids`) and the prompt's (`prompt_token_ids`) in the response
    return_token_ids: bool | None = None


# No docstrings on the request classes: FastAPI would publish them as schema descriptions in /openapi.json.
class CompletionRequest(SamplingRequest):
    # POST /v1/completions: a prompt is text, token ids, or a batch of either
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]]


class ChatRequest(SamplingRequest):
    # POST /v1/chat/completions
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=5)
