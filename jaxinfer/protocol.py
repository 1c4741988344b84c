"""The OpenAI-compatible HTTP schema, request side: validation of what clients send (pydantic).

Requests are validated strictly: unknown fields, wrong types ("0.5" for a number, 1 for a bool)
and out-of-range values are refused with the field named, as OpenAI's API does. The response
models are in `jaxinfer.protocol_responses`; both are what `/openapi.json` describes.

Fields beyond OpenAI's (top_k, min_p, repetition_penalty, ignore_eos, min_tokens,
stop_token_ids, skip_special_tokens) take the meanings of `jaxinfer.SamplingParams`; the
structured-output extras take vLLM's names (guided_json, guided_regex, guided_choice,
guided_grammar) and `jaxinfer.StructuredOutputsParams`' meanings.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from jaxinfer.sampling_params import MAX_LOGPROBS

MAX_N = 16  # most samples per prompt
MAX_PROMPTS = 64  # most prompts in one /v1/completions request
MAX_STOP = 16  # most stop strings
INT64 = 2**63 - 1

# OpenAI fields this server knows but does not implement: refused with a message naming them,
# rather than as "unknown field". Each maps to the values that mean "not used".
UNSUPPORTED_FIELDS: dict[str, tuple] = {
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "functions": (None, []),
    "function_call": (None, "none"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="send a last chunk with the token usage")


class JsonSchemaSpec(_Strict):
    """`response_format.json_schema`: OpenAI's structured outputs."""

    name: str = Field(max_length=64, pattern=r"^[a-zA-Z0-9_-]+$", description="the schema's name")
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema", description="the JSON schema; absent: any JSON object")
    strict: bool | None = Field(None, description="always enforced here: the output follows the schema")


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[Union[TextFormat, JsonObjectFormat, JsonSchemaFormat], Field(discriminator="type")]
GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


class SelfConsistencySpec(_Strict):
    """`self_consistency` (jaxinfer's extra): sample, extract each answer, majority-vote, stop early."""

    answer: str = Field("number", min_length=1, description="number, boxed, last_line, or a regex")
    max_samples: int = Field(8, ge=2, le=MAX_N, description="most samples drawn")
    stop_when: Literal["decided", "never"] | Annotated[float, Field(gt=0.5, le=1)] = Field(
        "decided", description="decided: once the rest cannot change the winner; a share: once the leader holds it")
    min_samples: int = Field(3, ge=1, le=MAX_N, description="votes needed before a share rule may stop")
    weighted: bool = Field(False, description="votes weighted by exp(mean token logprob)")


PositiveTokens = Annotated[int, Field(ge=1, le=INT64)]
TokenId = Annotated[int, Field(ge=0, le=INT64)]
StopString = Annotated[str, Field(min_length=1)]


class _SamplingRequest(_Strict):
    """Fields shared by both generation endpoints."""

    model: str | None = Field(None, description="the served model's name (GET /v1/models); optional")
    n: int = Field(1, ge=1, le=MAX_N, description="samples per prompt")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=-INT64 - 1, le=INT64)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: str | None = Field(None, max_length=256)
    # Beyond OpenAI's fields:
    top_k: int = Field(0, ge=-1, le=INT64, description="keep the k most likely tokens; 0 or -1 disables it")
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=100)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=INT64)
    stop_token_ids: Annotated[list[TokenId], Field(max_length=256)] | None = None
    skip_special_tokens: bool = True
    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema")
    # Structured outputs in vLLM's spelling (at most one of these and response_format's JSON):
    guided_json: dict | str | None = Field(None, description="a JSON schema the output follows")
    guided_regex: str | None = Field(None, min_length=1, description="a regex the output fully matches")
    guided_choice: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1024)] \
        | None = Field(None, description="the output is one of these strings")
    guided_grammar: str | None = Field(None, min_length=1, description="a Lark or GBNF grammar the output follows")
    self_consistency: SelfConsistencySpec | None = None
    # Beam search (vLLM's extra): the n best of beam_width beams; temperature 0 unless given
    use_beam_search: bool = False
    beam_width: int | None = Field(None, ge=1, le=MAX_N, description="beams kept each step (default: max(n, 4))")
    length_penalty: float = Field(1.0, ge=-10, le=10, description="a finished beam's score is its log-probability "
                                                                  "/ length ** length_penalty")
    early_stopping: bool | Literal["never"] = Field(False, description="HF's beam-search stopping rule")


TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    prompt: Union[Annotated[str, Field(min_length=1)], TokenIds,
                  Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)],
                  Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]] = Field(
        description="a string, a list of token ids, or a list of either (one choice set per prompt)")
    max_tokens: PositiveTokens | None = Field(16, description="most new tokens; None: the rest of the context")
    echo: bool = Field(False, description="return the prompt before the completion")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="log-probabilities of the sampled and this many most likely tokens")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="draw best_of samples, return the n with the "
                                                                  "highest mean log-probability per token")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class CalledFunction(_Strict):
    name: str = Field(max_length=64)
    arguments: str = Field(description="the arguments as JSON text")


class ToolCall(_Strict):
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_Strict):
    """A message as OpenAI validates it: system / developer / user messages have content; an
    assistant message may leave it out only when it carries tool_calls; a tool message answers a
    tool_call_id."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[TextPart], Field(min_length=1)] | None = None
    name: str | None = Field(None, max_length=256)
    tool_calls: Annotated[list[ToolCall], Field(min_length=1, max_length=128)] | None = None
    tool_call_id: str | None = Field(None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _fields_of_the_role(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"{'an' if self.role == 'assistant' else 'a'} {self.role} message needs content" +
                             (" or tool_calls" if self.role == "assistant" else ""))
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls belong to assistant messages, not {self.role}")
        if (self.tool_call_id is None) == (self.role == "tool"):
            raise ValueError("a tool message needs tool_call_id" if self.role == "tool" else
                             f"tool_call_id belongs to tool messages, not {self.role}")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = Field(None, description="a JSON schema of the arguments object")
    strict: bool | None = Field(None, description="always enforced when a call is required")


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="default: auto with tools, none without")
    parallel_tool_calls: bool = Field(True, description="with tool_choice required: one call or a list of calls")
    # Reasoning (beyond OpenAI's fields):
    reasoning_parser: str | None = Field(None, description="this request's thinking markers (default: the server's)")
    thinking_token_budget: int | None = Field(None, ge=0, le=INT64,
                                              description="most tokens inside the thinking section; then it ends")
    min_thinking_tokens: int = Field(0, ge=0, le=INT64, description="the end marker is held back until then")
    continue_final_message: bool = Field(False, description="continue the last (assistant) message instead of "
                                                            "starting a new turn; needs add_generation_prompt false")

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: PositiveTokens | None = Field(None, description="most new tokens; None: the rest of the context")
    max_completion_tokens: PositiveTokens | None = Field(None, description="OpenAI's newer name for max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="needs logprobs: true")
    add_generation_prompt: bool = Field(True, description="end the prompt with the assistant turn's header")
