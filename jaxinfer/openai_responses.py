"""Engine outputs -> OpenAI responses: the whole JSON body once a request finished (`respond`) or
server-sent events as it runs (`events`), with reasoning split out, tool calls parsed, self-consistency's
vote and the usage. `OpenAIServing.respond` / `events` call these.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Callable, Iterator

from jaxinfer import openai_logprobs as logprobs_fmt
from jaxinfer import reasoning as reasoning_lib
from jaxinfer import tool_calls
from jaxinfer.async_engine import EngineDeadError, RequestStream
from jaxinfer.openai_errors import ApiError, error_body
from jaxinfer.outputs import RequestOutput
from jaxinfer.protocol_responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    CompletionTokensDetails,
    Delta,
    DeltaFunction,
    DeltaToolCall,
    PromptTokensDetails,
    SelfConsistencyInfo,
    Usage,
)

if TYPE_CHECKING:
    from jaxinfer.openai_serving import OpenAIServing, Prepared

logger = logging.getLogger(__name__)


def _reasoning_tokens_of(prepared: Prepared, token_ids) -> int:
    r = prepared.reasoning
    return reasoning_lib.count_reasoning_tokens(list(token_ids), r.start_ids, r.end_ids, r.in_thinking)


def respond(serving: OpenAIServing, prepared: Prepared, stream: RequestStream,
            disconnected: Callable[[], bool]) -> dict | None:
    """The whole response once every request finished (None if the client went away)."""
    finals: dict[str, RequestOutput] = {}
    try:
        for out in serving.wait(stream, disconnected):
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
                        lp = logprobs_fmt.join(logprobs_fmt.prompt_logprobs(out, req.logprobs, serving.tokenizer), lp)
                choices.append(CompletionChoice(index=i * n + c.index, text=echo + c.text, logprobs=lp,
                                                finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        resp = CompletionResponse(id=prepared.request_id, created=prepared.created, model=serving.model_name,
                                  choices=choices, usage=usage, self_consistency=_vote_info(outs[0]))
    else:
        k = req.top_logprobs or 0
        choices = []
        for c in outs[0].outputs[:1] if outs[0].self_consistency is not None else outs[0].outputs:
            thought, content = None, c.text
            if prepared.reasoning is not None:
                thought, content = reasoning_lib.split(c.text, prepared.reasoning.in_thinking,
                                                       prepared.reasoning.markers)
            content, calls = _tool_output(prepared.tools, content) if content is not None else (None, None)
            choices.append(ChatChoice(
                index=c.index, message=AssistantMessage(content=content, tool_calls=calls,
                                                        reasoning_content=thought),
                logprobs=logprobs_fmt.chat_logprobs(c, k) if req.logprobs else None,
                finish_reason="tool_calls" if calls else c.finish_reason, stop_reason=c.stop_reason))
        if prepared.reasoning is not None:
            usage.completion_tokens_details = CompletionTokensDetails(reasoning_tokens=sum(
                _reasoning_tokens_of(prepared, c.token_ids) for c in outs[0].outputs))
            if serving.metrics is not None:
                serving.metrics.observe_reasoning(usage.completion_tokens_details.reasoning_tokens)
        resp = ChatCompletionResponse(id=prepared.request_id, created=prepared.created, model=serving.model_name,
                                      choices=choices, usage=usage, self_consistency=_vote_info(outs[0]))
    return resp.model_dump(exclude_none=False)


def events(serving: OpenAIServing, prepared: Prepared, stream: RequestStream,
           disconnected: Callable[[], bool]) -> Iterator[bytes]:
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
                id=prepared.request_id, created=prepared.created, model=serving.model_name,
                choices=[ChatChunkChoice(index=index, delta=Delta(content=text) if text or not finish else Delta(),
                                         logprobs=logprobs, finish_reason=finish, stop_reason=stop_reason)])
        else:
            body = CompletionResponse(
                id=prepared.request_id, created=prepared.created, model=serving.model_name,
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
        send = holder.feed(text) if prepared.tools == "auto" else holder.feed_held(text)
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
            yield _sse(ChatCompletionChunk(id=prepared.request_id, created=prepared.created, model=serving.model_name,
                                           choices=[ChatChunkChoice(index=index, delta=delta)]).model_dump_json())
        if c.finish_reason:
            yield chunk(index, "", "tool_calls" if calls else c.finish_reason, c.stop_reason, None)

    if chat:
        for i in range(n):
            first = ChatCompletionChunk(id=prepared.request_id, created=prepared.created, model=serving.model_name,
                                        choices=[ChatChunkChoice(index=i, delta=Delta(role="assistant",
                                                                                      content=""))])
            yield _sse(first.model_dump_json())
    elif req.echo:
        for i, text in enumerate(prepared.prompt_texts):
            for j in range(n):
                sent_chars[i * n + j] = 0
                yield chunk(i * n + j, text, None, None, None)
    try:
        for out in serving.wait(stream, disconnected):
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
                        prepared.reasoning.in_thinking, prepared.reasoning.markers))
                    thought, text = splitter.feed(c.text, final=bool(c.finish_reason))
                    if thought:
                        yield _sse(ChatCompletionChunk(
                            id=prepared.request_id, created=prepared.created, model=serving.model_name,
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
        reasoning_tokens = sum(_reasoning_tokens_of(prepared, ids) for ids in ids_of.values())
        if serving.metrics is not None:
            serving.metrics.observe_reasoning(reasoning_tokens)
    if include_usage:
        outs = sorted(finals, key=lambda o: base[o.request_id])
        cls = ChatCompletionChunk if chat else CompletionResponse
        usage = _usage(outs)
        if reasoning_tokens is not None:
            usage.completion_tokens_details = CompletionTokensDetails(reasoning_tokens=reasoning_tokens)
        yield _sse(cls(id=prepared.request_id, created=prepared.created, model=serving.model_name, choices=[],
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
