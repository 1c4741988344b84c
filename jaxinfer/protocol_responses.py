"""The OpenAI-compatible HTTP schema, response side: what the server serialises (pydantic).

Responses forbid unknown fields too, so a handler that sets a field OpenAI's schema lacks fails in
the tests rather than in a client. `/openapi.json` describes these with the request models of
`jaxinfer.protocol`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, model_serializer

from jaxinfer.protocol import ToolCall

class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SelfConsistencyInfo(_Out):
    answer: str | None
    votes: dict[str, float]
    num_samples: int = Field(description="samples that finished and voted")
    num_tokens: int = Field(description="tokens generated over every sample, stopped ones included")
    stopped_early: bool


class _WithVote(_Out):
    """A response that carries `self_consistency` only when the request asked for a vote."""

    self_consistency: SelfConsistencyInfo | None = None

    @model_serializer(mode="wrap")
    def _without_an_empty_vote(self, handler):
        body = handler(self)
        if isinstance(body, dict) and body.get("self_consistency") is None:
            body.pop("self_consistency", None)
        return body


class PromptTokensDetails(_Out):
    cached_tokens: int = Field(description="prompt tokens served from the prefix cache")


class CompletionTokensDetails(_Out):
    reasoning_tokens: int = Field(description="completion tokens inside the thinking section")


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


FinishReason = Literal["stop", "length", "abort", "tool_calls"]


class CompletionLogprobs(_Out):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = Field(None, description="the stop token id or string that ended it")


class CompletionResponse(_WithVote):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    content: list[TokenLogprob] | None


class AssistantMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_WithVote):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class DeltaFunction(_Out):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Out):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class Delta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(_Out):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None

    @field_serializer("delta")
    def _delta(self, delta: Delta) -> dict:  # {"content": "..."}: no "role": null after the first chunk
        return delta.model_dump(exclude_none=True)


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "jaxinfer"
    max_model_len: int
    quantization: str | None = None  # jaxinfer: "int8" / "int4" weights, None for float


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(_Out):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Out):
    error: ErrorInfo


class Health(_Out):
    status: Literal["ok", "draining", "dead"]
    compiling: bool | None = None  # "ok" while warm-up still compiles in the background
