"""OpenAI completions and chat completions over an `AsyncEngine`, independent of the web framework.

    body bytes -> parse_request (UTF-8, JSON, pydantic)        -> CompletionRequest / ChatCompletionRequest
              -> OpenAIServing.prepare (tokenize, template,     -> Prepared: engine PromptSpecs, one per prompt
                 context check, SamplingParams)
              -> AsyncEngine.submit_many                       -> RequestStream
              -> respond (wait for the finals) or events (SSE) -> JSON / "data: ..." lines

Every refusal is an `ApiError` carrying its HTTP status and the OpenAI error body; `server.py`
only maps routes to these calls.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from typing import Callable, Iterator

from jaxinfer import openai_responses, tool_calls
from jaxinfer import reasoning as reasoning_lib
from jaxinfer.async_engine import AsyncEngine, EngineDeadError, PromptSpec, RequestStream
from jaxinfer.errors import ChatTemplateError, InvalidRequestError, InvalidStructuredOutputError, PromptTooLongError
from jaxinfer.metrics import ServerMetrics
from jaxinfer.openai_errors import ApiError, error_body, parse_request  # noqa: F401 (re-exported)
from jaxinfer.outputs import RequestOutput
from jaxinfer.protocol import ChatCompletionRequest, CompletionRequest
from jaxinfer.sampling_params import RequestOutputKind, SamplingParams
from jaxinfer.self_consistency import SelfConsistency
from jaxinfer.structured_output import StructuredOutputsParams
from jaxinfer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

@dataclasses.dataclass
class Prepared:
    """An accepted request, ready to submit."""

    kind: str  # "completion" or "chat"
    request: CompletionRequest | ChatCompletionRequest
    specs: list[PromptSpec]
    prompt_texts: list[str]
    request_id: str
    created: int
    tools: str | None = None  # chat with tools: "auto" (calls parsed from the text) or "required" (JSON)
    reasoning: reasoning_lib.ReasoningSpec | None = None  # chat with a reasoning parser

    @property
    def n(self) -> int:
        return self.request.n


class OpenAIServing:
    """Turns OpenAI requests into engine requests and engine outputs into OpenAI responses."""

    def __init__(self, engine: AsyncEngine, tokenizer: Tokenizer, model_name: str, max_model_len: int,
                 metrics: ServerMetrics | None = None, poll_interval: float = 0.25, *,
                 reasoning_parser: str | None = None, thinking_token_budget: int | None = None):
        self.engine = engine
        self.reasoning_parser = reasoning_parser
        self.thinking_token_budget = thinking_token_budget
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.metrics = metrics
        self.poll_interval = poll_interval

    # ---- request -> engine ----------------------------------------------------------------------

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    @staticmethod
    def _structured_outputs(req) -> tuple[StructuredOutputsParams | None, str | None]:
        """The request's output constraint and the field that carried it (None, None: none)."""
        given = []
        fmt = req.response_format
        if fmt is not None and fmt.type == "json_object":
            given.append(("response_format", dict(json_object=True)))
        elif fmt is not None and fmt.type == "json_schema":
            schema = fmt.json_schema.schema_
            given.append(("response_format", dict(json=schema) if schema is not None else dict(json_object=True)))
        for field, key in zip(("guided_json", "guided_regex", "guided_choice", "guided_grammar"),
                              ("json", "regex", "choice", "grammar")):
            if getattr(req, field) is not None:
                given.append((field, {key: getattr(req, field)}))
        if not given:
            return None, None
        if len(given) > 1:
            raise ApiError(400, f"give at most one output constraint; got {', '.join(f for f, _ in given)}",
                           param=given[1][0])
        field, spec = given[0]
        try:
            return StructuredOutputsParams(**spec), field
        except InvalidStructuredOutputError as e:
            raise ApiError(400, str(e), param=field) from None

    def _seal(self, ids, params: SamplingParams, structured_field: str | None):
        """The ProcessedPrompt of checked ids and their params (a structured-output spec compiled
        against the model's vocabulary here: a bad one is a 400 naming its field)."""
        try:
            return self.engine.engine.input_processor.seal(tuple(ids), params)
        except InvalidStructuredOutputError as e:
            raise ApiError(400, str(e), param=structured_field) from None
        except InvalidRequestError as e:
            raise ApiError(400, str(e), param=e.param) from None

    def _sampling_params(self, req, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None,
                         structured: StructuredOutputsParams | None = None, **extra):
        if req.self_consistency is not None:  # (n = 1, not streamed: SamplingParams checks, naming the field)
            try:
                extra["self_consistency"] = SelfConsistency(**req.self_consistency.model_dump())
            except InvalidRequestError as e:
                raise ApiError(400, str(e), param="self_consistency") from None
        temperature = req.temperature
        if req.use_beam_search:  # (SamplingParams refuses length_penalty / early_stopping without it)
            extra.update(use_beam_search=True, beam_width=req.beam_width or max(req.n, 4))
            if "temperature" not in req.model_fields_set:
                temperature = 0.0
        try:
            return SamplingParams(
                n=req.n, max_tokens=max_tokens, min_tokens=min(req.min_tokens, max_tokens), temperature=temperature,
                top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, seed=req.seed,
                logprobs=logprobs, prompt_logprobs=prompt_logprobs, stop=req.stop, stop_token_ids=req.stop_token_ids,
                ignore_eos=req.ignore_eos, skip_special_tokens=req.skip_special_tokens, structured_outputs=structured,
                length_penalty=req.length_penalty, early_stopping=req.early_stopping,
                # streamed: each output carries only what is new; else one output at the end
                output_kind=RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY, **extra)
        except InvalidRequestError as e:
            raise ApiError(400, str(e), param=e.param) from None

    def _max_tokens(self, requested: int | None, prompt_len: int, prompt_param: str, where: str) -> int:
        room = self.max_model_len - prompt_len
        if room <= 0:
            raise ApiError(400, f"{where} has {prompt_len} tokens but this model's context is {self.max_model_len} "
                                f"tokens; shorten it to at most {self.max_model_len - 1}", param=prompt_param,
                           code="context_length_exceeded")
        if requested is None:
            return room
        if requested > room:
            raise ApiError(400, f"this model's context is {self.max_model_len} tokens and {where} has {prompt_len}; "
                                f"max_tokens={requested} does not fit: ask for at most {room}", param="max_tokens",
                           code="context_length_exceeded")
        return requested

    def _validated_ids(self, ids: list[int], param: str, where: str) -> list[int]:
        """The prompt checked once (`InputProcessor`), before its sampling params are built from
        its length; the engine trusts the ProcessedPrompt made of both."""
        try:
            return list(self.engine.engine.input_processor.prompt(ids, where))
        except PromptTooLongError as e:
            raise ApiError(400, str(e), param=param, code="context_length_exceeded") from None
        except InvalidRequestError as e:
            raise ApiError(400, str(e), param=param) from None

    def prepare_completion(self, req: CompletionRequest) -> Prepared:
        self._check_model(req.model)
        p = req.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if req.self_consistency is not None and len(prompts) > 1:
            raise ApiError(400, "self_consistency votes over one prompt's samples: send one prompt",
                           param="self_consistency")
        structured, structured_field = self._structured_outputs(req)
        request_id = f"cmpl-{uuid.uuid4().hex}"  # the engine's id too (prompt i of several: -i after it)
        specs, texts = [], []
        for i, prompt in enumerate(prompts):
            where = "the prompt" if len(prompts) == 1 else f"prompt {i}"
            if isinstance(prompt, str):
                ids, text = self.tokenizer.encode(prompt), prompt
            else:
                ids, text = list(prompt), None
            ids = self._validated_ids(ids, "prompt", where)
            if text is None and req.echo:
                text = self.tokenizer.decode(ids, skip_special_tokens=False)
            max_tokens = self._max_tokens(req.max_tokens, len(ids), "prompt", where)
            params = self._sampling_params(req, max_tokens, req.logprobs,
                                           req.logprobs if req.echo and req.logprobs is not None else None, structured,
                                           best_of=req.best_of)
            specs.append(PromptSpec(self._seal(ids, params, structured_field), params, prompt=text,
                                    request_id=request_id if len(prompts) == 1 else f"{request_id}-{i}"))
            texts.append(text or "")
        return Prepared("completion", req, specs, texts, request_id, int(time.time()))

    def prepare_chat(self, req: ChatCompletionRequest) -> Prepared:
        self._check_model(req.model)
        structured, structured_field = self._structured_outputs(req)
        if req.max_tokens is not None and req.max_completion_tokens is not None \
                and req.max_tokens != req.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens disagree; give one of them",
                           param="max_completion_tokens")
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        tools, choice = self._tools(req, structured_field)
        mode = choice if isinstance(choice, str) else "required"
        name = None if isinstance(choice, str) else choice.function.name
        if mode == "required":  # the output is the call's JSON, constrained by the arguments' schemas
            structured = StructuredOutputsParams(json=tool_calls.call_schema(tools, name, req.parallel_tool_calls))
            structured_field = "tools"
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": None if m.content is None else m.text(),
                     **({"tool_calls": [c.model_dump() for c in m.tool_calls]} if m.tool_calls else {}),
                     **({"tool_call_id": m.tool_call_id} if m.tool_call_id else {})} for m in req.messages]
        template = self.tokenizer.chat_template or ""
        messages, extra = tool_calls.render_messages(messages, tools, mode, "tools" in template, name,
                                                     req.parallel_tool_calls)
        if req.continue_final_message and (req.add_generation_prompt or req.messages[-1].role != "assistant"):
            raise ApiError(400, "continue_final_message continues a last assistant message: end messages with one "
                                "and set add_generation_prompt to false", param="continue_final_message")
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt,
                                                      **extra)
        except ChatTemplateError as e:
            raise ApiError(400, str(e), param="messages") from None
        if req.continue_final_message:  # the template's text up to the end of the last message's content
            last = messages[-1]["content"] or ""
            end = text.rfind(last) if last else -1
            if end < 0:
                raise ApiError(400, "the chat template does not write the last message's content as given; "
                                    "continue_final_message cannot continue it", param="continue_final_message")
            text = text[:end + len(last)]
        reasoning, thinking = self._reasoning(req, text)
        # The template writes the special tokens itself: no BOS on top (as LLM.chat does).
        ids = self._validated_ids(self.tokenizer.encode(text, add_special_tokens=False), "messages",
                                  "the conversation")
        max_tokens = self._max_tokens(req.max_completion_tokens or req.max_tokens, len(ids), "messages",
                                      "the conversation")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self._sampling_params(req, max_tokens, logprobs, None, structured, **thinking)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"  # the HTTP response's id is the engine's
        sealed = self._seal(ids, params, structured_field)
        spec = PromptSpec(sealed, params, prompt=text, request_id=request_id)
        return Prepared("chat", req, [spec], [text], request_id, int(time.time()),
                        tools=None if mode == "none" else mode, reasoning=reasoning)

    def _reasoning(self, req: ChatCompletionRequest, prompt_text: str) -> tuple[reasoning_lib.ReasoningSpec | None,
                                                                                dict]:
        """(the request's thinking section (ReasoningSpec) or None, the SamplingParams fields of a
        thinking budget)."""
        name = req.reasoning_parser or self.reasoning_parser
        if name is not None and name not in reasoning_lib.REASONING_PARSERS:
            raise ApiError(400, f"unknown reasoning parser {name!r}; choose one of "
                                f"{sorted(reasoning_lib.REASONING_PARSERS)}", param="reasoning_parser")
        budget = req.thinking_token_budget
        if budget is None and name is not None and req.reasoning_parser is None:
            budget = self.thinking_token_budget  # (the server's default goes with the server's parser)
        if name is None:
            if budget is not None or req.min_thinking_tokens:
                raise ApiError(400, "a thinking budget needs a reasoning parser: start the server with "
                                    "--reasoning-parser or give reasoning_parser", param="thinking_token_budget")
            return None, {}
        if budget is not None and req.min_thinking_tokens > budget:
            raise ApiError(400, f"min_thinking_tokens ({req.min_thinking_tokens}) is above thinking_token_budget "
                                f"({budget})", param="min_thinking_tokens")
        markers = reasoning_lib.REASONING_PARSERS[name]
        start_ids, end_ids = (self.tokenizer.encode(m, add_special_tokens=False) for m in markers)
        opened = reasoning_lib.opens_thinking(prompt_text, markers)
        return reasoning_lib.ReasoningSpec(markers, opened, start_ids, end_ids), dict(
            thinking_token_budget=budget, min_thinking_tokens=req.min_thinking_tokens, reasoning_markers=markers)

    def _tools(self, req: ChatCompletionRequest, structured_field: str | None):
        """(the tools as dicts, tool_choice: "none" / "auto" / "required" / a NamedToolChoice), each
        tool's parameters compiled as a JSON schema (a 400 naming the tool that does not)."""
        tools = [t.model_dump() for t in req.tools or []]
        choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
        if choice != "none" and not tools:
            raise ApiError(400, f"tool_choice {choice if isinstance(choice, str) else 'naming a function'} needs "
                                "tools; give tools or leave tool_choice out", param="tool_choice")
        names = [t["function"]["name"] for t in tools]
        if len(set(names)) != len(names):
            raise ApiError(400, f"tool names must be unique, got {names}", param="tools")
        if not isinstance(choice, str) and choice.function.name not in names:
            raise ApiError(400, f"tool_choice names {choice.function.name!r}, which is not one of the tools {names}",
                           param="tool_choice")
        if (choice == "required" or not isinstance(choice, str)) and structured_field is not None:
            raise ApiError(400, f"a required tool call constrains the output itself; leave {structured_field} out",
                           param=structured_field)
        for i, tool in enumerate(tools):
            schema = tool["function"]["parameters"]
            if schema is None:
                continue
            try:
                self.engine.engine.grammars.compile(StructuredOutputsParams(json=schema))
            except InvalidStructuredOutputError as e:
                raise ApiError(400, f"tools[{i}].function.parameters is not a usable JSON schema: {e}",
                               param=f"tools[{i}].function.parameters") from None
        return tools, choice

    def submit(self, prepared: Prepared) -> RequestStream:
        try:
            return self.engine.submit_many(prepared.specs)
        except EngineDeadError as e:
            raise ApiError(503, str(e), type="service_unavailable") from None
        except InvalidRequestError as e:
            raise ApiError(400, str(e), param=e.param) from None

    # ---- engine -> response -----------------------------------------------------------------------

    def wait(self, stream: RequestStream, disconnected: Callable[[], bool]) -> Iterator[RequestOutput]:
        """The stream's outputs; aborts the requests (freeing their pages) if the client goes away."""
        try:
            while not stream.done:
                out = stream.get(timeout=self.poll_interval)
                if out is None:
                    if disconnected():
                        return
                    continue
                if out.finished and self.metrics is not None:
                    self.metrics.observe_finished(out)
                yield out
        finally:
            if not stream.done:
                stream.cancel()

    def respond(self, prepared: Prepared, stream: RequestStream, disconnected: Callable[[], bool]) -> dict | None:
        """The whole response once every request finished (None if the client went away)."""
        return openai_responses.respond(self, prepared, stream, disconnected)

    def events(self, prepared: Prepared, stream: RequestStream, disconnected: Callable[[], bool]) -> Iterator[bytes]:
        """Server-sent events: one chunk per choice that moved, then usage (if asked) and [DONE]."""
        return openai_responses.events(self, prepared, stream, disconnected)
