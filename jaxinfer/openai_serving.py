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
import json
import logging
import time
import uuid
from typing import Callable, Iterator

from jaxinfer import openai_logprobs as logprobs_fmt
from jaxinfer.async_engine import AsyncEngine, EngineDeadError, PromptSpec, RequestStream
from jaxinfer.errors import ChatTemplateError, InvalidRequestError, InvalidStructuredOutputError, PromptTooLongError
from jaxinfer.metrics import ServerMetrics
from jaxinfer.openai_errors import ApiError, error_body, parse_request  # noqa: F401 (re-exported)
from jaxinfer.outputs import RequestOutput
from jaxinfer.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionTokensDetails,
    Delta,
    DeltaFunction,
    DeltaToolCall,
    PromptTokensDetails,
    SelfConsistencyInfo,
    Usage,
)
from jaxinfer import reasoning as reasoning_lib
from jaxinfer import tool_calls
from jaxinfer.self_consistency import SelfConsistency
from jaxinfer.structured_output import StructuredOutputsParams
from jaxinfer.sampling_params import RequestOutputKind, SamplingParams
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
    reasoning: tuple | None = None  # chat with a reasoning parser: (markers, the prompt opens the section)

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
            raise ApiError(400, str(e)) from None

    def _sampling_params(self, req, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None,
                         structured: StructuredOutputsParams | None = None, **extra):
        if req.self_consistency is not None:
            if req.stream or req.n != 1:
                raise ApiError(400, "self_consistency returns one voted answer when its samples finish: leave n at 1 "
                                    "and stream false", param="self_consistency")
            try:
                extra["self_consistency"] = SelfConsistency(**req.self_consistency.model_dump())
            except InvalidRequestError as e:
                raise ApiError(400, str(e), param="self_consistency") from None
        try:
            return SamplingParams(
                n=req.n, max_tokens=max_tokens, min_tokens=min(req.min_tokens, max_tokens), temperature=req.temperature,
                top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, seed=req.seed,
                logprobs=logprobs, prompt_logprobs=prompt_logprobs, stop=req.stop, stop_token_ids=req.stop_token_ids,
                ignore_eos=req.ignore_eos, skip_special_tokens=req.skip_special_tokens, structured_outputs=structured,
                # streamed: each output carries only what is new; else one output at the end
                output_kind=RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY, **extra)
        except InvalidRequestError as e:
            raise ApiError(400, str(e)) from None

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
        if req.best_of is not None and req.best_of < req.n:
            raise ApiError(400, f"best_of={req.best_of} must be at least n={req.n}", param="best_of")
        if req.best_of is not None and req.best_of > req.n and req.stream:
            raise ApiError(400, "best_of > n picks the best samples once they finish: it cannot stream; leave "
                                "best_of out or set stream to false", param="best_of")
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

    def _reasoning_tokens(self, prepared: Prepared, token_ids) -> int:
        markers, in_thinking = prepared.reasoning
        start, end = (self.tokenizer.encode(m, add_special_tokens=False) for m in markers)
        return reasoning_lib.count_reasoning_tokens(list(token_ids), start, end, in_thinking)

    def _reasoning(self, req: ChatCompletionRequest, prompt_text: str) -> tuple[tuple | None, dict]:
        """((markers, whether the prompt opens a thinking section) or None, the SamplingParams
        fields of a thinking budget)."""
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
        return (markers, reasoning_lib.opens_thinking(prompt_text, markers)), dict(
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
            raise ApiError(400, str(e)) from None

    # ---- engine -> response -----------------------------------------------------------------------

    def _wait(self, stream: RequestStream, disconnected: Callable[[], bool]) -> Iterator[RequestOutput]:
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
        finals: dict[str, RequestOutput] = {}
        try:
            for out in self._wait(stream, disconnected):
                if out.finished:
                    finals[out.request_id] = out
        except EngineDeadError as e:
            raise ApiError(503, str(e), type="service_unavailable") from None
        except Exception as e:
            logger.exception("request %s failed in the engine", prepared.request_id)
            raise ApiError(500, f"the engine failed while serving this request: {e}", type="server_error") from None
        if not stream.done:
            return None
        outs = [finals[rid] for rid in stream.request_ids]
        req, n = prepared.request, prepared.n
        usage = _usage(outs)
        if prepared.kind == "completion":
            choices = []
            for i, out in enumerate(outs):
                echo = prepared.prompt_texts[i] if req.echo else ""
                for c in out.outputs[:1] if out.self_consistency is not None else out.outputs:
                    lp = None
                    if req.logprobs is not None:
                        lp = logprobs_fmt.completion_logprobs(c.token_ids, c.logprobs or [], req.logprobs, len(echo))
                        if req.echo:
                            lp = logprobs_fmt.join(logprobs_fmt.prompt_logprobs(out, req.logprobs, self.tokenizer), lp)
                    choices.append(CompletionChoice(index=i * n + c.index, text=echo + c.text, logprobs=lp,
                                                    finish_reason=c.finish_reason, stop_reason=c.stop_reason))
            resp = CompletionResponse(id=prepared.request_id, created=prepared.created, model=self.model_name,
                                      choices=choices, usage=usage, self_consistency=_vote_info(outs[0]))
        else:
            k = req.top_logprobs or 0
            choices = []
            for c in outs[0].outputs[:1] if outs[0].self_consistency is not None else outs[0].outputs:
                thought, content = None, c.text
                if prepared.reasoning is not None:
                    thought, content = reasoning_lib.split(c.text, prepared.reasoning[1], prepared.reasoning[0])
                content, calls = _tool_output(prepared.tools, content) if content is not None else (None, None)
                choices.append(ChatChoice(
                    index=c.index, message=AssistantMessage(content=content, tool_calls=calls,
                                                            reasoning_content=thought),
                    logprobs=logprobs_fmt.chat_logprobs(c, k) if req.logprobs else None,
                    finish_reason="tool_calls" if calls else c.finish_reason, stop_reason=c.stop_reason))
            if prepared.reasoning is not None:
                usage.completion_tokens_details = CompletionTokensDetails(reasoning_tokens=sum(
                    self._reasoning_tokens(prepared, c.token_ids) for c in outs[0].outputs))
                if self.metrics is not None:
                    self.metrics.observe_reasoning(usage.completion_tokens_details.reasoning_tokens)
            resp = ChatCompletionResponse(id=prepared.request_id, created=prepared.created, model=self.model_name,
                                          choices=choices, usage=usage, self_consistency=_vote_info(outs[0]))
        return resp.model_dump(exclude_none=False)

    def events(self, prepared: Prepared, stream: RequestStream, disconnected: Callable[[], bool]) -> Iterator[bytes]:
        """Server-sent events: one chunk per choice that moved, then usage (if asked) and [DONE]."""
        req, n = prepared.request, prepared.n
        base = {rid: i * n for i, rid in enumerate(stream.request_ids)}
        sent_chars: dict[int, int] = {}  # text offset of each choice (its outputs are deltas)
        finished: set[int] = set()
        finals = []
        chat = prepared.kind == "chat"
        include_usage = req.stream_options is not None and req.stream_options.include_usage

        def chunk(index: int, text: str, finish, stop_reason, logprobs) -> bytes:
            if chat:
                body = ChatCompletionChunk(
                    id=prepared.request_id, created=prepared.created, model=self.model_name,
                    choices=[ChatChunkChoice(index=index, delta=Delta(content=text) if text or not finish else Delta(),
                                             logprobs=logprobs, finish_reason=finish, stop_reason=stop_reason)])
            else:
                body = CompletionResponse(
                    id=prepared.request_id, created=prepared.created, model=self.model_name,
                    choices=[CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish,
                                              stop_reason=stop_reason)])
            return _sse(body.model_dump_json(exclude_unset=False))

        held: dict[int, tool_calls.AutoStream] = {}  # tools: each choice's text until its calls are known
        thinkers: dict[int, reasoning_lib.ReasoningStream] = {}  # reasoning: each choice's split
        ids_of: dict[int, list[int]] = {}  # reasoning: each choice's tokens (for the usage's reasoning tokens)

        def tool_chunks(index: int, text: str, c, logprobs) -> Iterator[bytes]:
            """A tool request's choice: its content streams (auto: up to a <tool_call>; required:
            nothing, the output is the call's JSON); the calls go out in one delta at the end."""
            holder = held.setdefault(index, tool_calls.AutoStream())
            send = holder.feed(text) if prepared.tools == "auto" else (holder.feed_held(text) or "")
            calls = None
            if c.finish_reason:
                if prepared.tools == "auto":
                    rest, calls = holder.finish()
                else:
                    calls = tool_calls.parse_constrained(holder.text)
                    rest = "" if calls else holder.text
                send += rest
            if send or logprobs is not None:
                yield chunk(index, send, None, None, logprobs)
            if calls:
                delta = Delta(tool_calls=[DeltaToolCall(index=i, id=call["id"], type="function", function=DeltaFunction(
                    name=call["function"]["name"], arguments=call["function"]["arguments"]))
                    for i, call in enumerate(calls)])
                yield _sse(ChatCompletionChunk(id=prepared.request_id, created=prepared.created, model=self.model_name,
                                               choices=[ChatChunkChoice(index=index, delta=delta)]).model_dump_json())
            if c.finish_reason:
                yield chunk(index, "", "tool_calls" if calls else c.finish_reason, c.stop_reason, None)

        if chat:
            for i in range(n):
                first = ChatCompletionChunk(id=prepared.request_id, created=prepared.created, model=self.model_name,
                                            choices=[ChatChunkChoice(index=i, delta=Delta(role="assistant",
                                                                                          content=""))])
                yield _sse(first.model_dump_json())
        elif req.echo:
            for i, text in enumerate(prepared.prompt_texts):
                for j in range(n):
                    sent_chars[i * n + j] = 0
                    yield chunk(i * n + j, text, None, None, None)
        try:
            for out in self._wait(stream, disconnected):
                if out.finished:
                    finals.append(out)
                for c in out.outputs:  # deltas (RequestOutputKind.DELTA): only what is new
                    index = base[out.request_id] + c.index
                    if index in finished:
                        continue
                    chars = sent_chars.get(index, 0)
                    wants_logprobs = req.logprobs if chat else req.logprobs is not None
                    moved = c.text or (wants_logprobs and c.token_ids)
                    if not moved and c.finish_reason is None:
                        continue
                    logprobs = None
                    if chat and wants_logprobs:
                        logprobs = logprobs_fmt.chat_logprobs(c, req.top_logprobs or 0)
                    elif wants_logprobs:
                        logprobs = logprobs_fmt.completion_logprobs(c.token_ids, c.logprobs or [], req.logprobs, chars)
                    sent_chars[index] = chars + len(c.text)
                    if c.finish_reason:
                        finished.add(index)
                    text = c.text
                    if chat and prepared.reasoning is not None:  # the thinking section first, as reasoning_content
                        ids_of[index] = ids_of.get(index, []) + list(c.token_ids)
                        splitter = thinkers.setdefault(index, reasoning_lib.ReasoningStream(
                            prepared.reasoning[1], prepared.reasoning[0]))
                        thought, text = splitter.feed(c.text, final=bool(c.finish_reason))
                        if thought:
                            yield _sse(ChatCompletionChunk(
                                id=prepared.request_id, created=prepared.created, model=self.model_name,
                                choices=[ChatChunkChoice(index=index, delta=Delta(reasoning_content=thought))]
                            ).model_dump_json())
                    if chat and prepared.tools:
                        yield from tool_chunks(index, text, c, logprobs)
                    elif text or c.finish_reason or logprobs is not None:
                        yield chunk(index, text, c.finish_reason, c.stop_reason, logprobs)
        except Exception as e:
            status = "service_unavailable" if isinstance(e, EngineDeadError) else "server_error"
            if not isinstance(e, EngineDeadError):
                logger.exception("streamed request %s failed in the engine", prepared.request_id)
            yield _sse(json.dumps(error_body(f"the engine stopped serving this request: {e}", status)))
            yield b"data: [DONE]\n\n"
            return
        if not stream.done:  # the client went away: nothing more to say
            return
        reasoning_tokens = None
        if chat and prepared.reasoning is not None:
            reasoning_tokens = sum(self._reasoning_tokens(prepared, ids) for ids in ids_of.values())
            if self.metrics is not None:
                self.metrics.observe_reasoning(reasoning_tokens)
        if include_usage:
            outs = sorted(finals, key=lambda o: base[o.request_id])
            cls = ChatCompletionChunk if chat else CompletionResponse
            usage = _usage(outs)
            if reasoning_tokens is not None:
                usage.completion_tokens_details = CompletionTokensDetails(reasoning_tokens=reasoning_tokens)
            yield _sse(cls(id=prepared.request_id, created=prepared.created, model=self.model_name, choices=[],
                           usage=usage).model_dump_json())
        yield b"data: [DONE]\n\n"


def _vote_info(out: RequestOutput) -> SelfConsistencyInfo | None:
    r = out.self_consistency
    if r is None:
        return None
    return SelfConsistencyInfo(answer=r.answer, votes=r.votes, num_samples=r.num_samples, num_tokens=r.num_tokens,
                               stopped_early=r.stopped_early)


def _tool_output(mode: str | None, text: str) -> tuple[str | None, list[dict] | None]:
    """(content, tool calls) of a chat choice's text under the request's tool mode."""
    if mode == "required":
        calls = tool_calls.parse_constrained(text)
        return (None, calls) if calls else (text, None)
    if mode == "auto":
        return tool_calls.parse_auto(text)
    return text, None


def _sse(data: str) -> bytes:
    return b"data: " + data.encode("utf-8") + b"\n\n"


def _usage(outs: list[RequestOutput]) -> Usage:
    """Token counts of finished requests (from their metrics: a streamed output is only a delta)."""
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(o.metrics.num_generation_tokens if o.metrics is not None else
                     sum(len(c.token_ids) for c in o.outputs) for o in outs)
    cached = sum(o.metrics.num_cached_tokens for o in outs if o.metrics is not None)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))
