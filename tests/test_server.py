"""The HTTP server on a tiny random model, over real sockets: protocol, load, disconnects, bad input,
admission limits, drain, metrics and the OpenAPI description (fuzzed by schemathesis)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import socket
import subprocess
import sys
import threading

import pytest

import server
from jaxinfer.async_engine import AsyncEngine
from jaxinfer.engine import EngineConfig, LLMEngine
from jaxinfer.loader import load_model
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.testing import tiny_gguf
from tests.server_utils import all_pages_free, post_json, request, stream, wait_until

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 64 * 1024
LONG = {"max_tokens": 120, "ignore_eos": True, "temperature": 0.0}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    tiny_gguf(path)
    return load_model(str(path), progress=False)


@pytest.fixture(scope="module")
def engine(tiny_model):
    m = tiny_model
    return LLMEngine(m.config, m.graphdef, m.params, m.tokenizer,
                     EngineConfig.of(max_num_seqs=8, max_num_batched_tokens=64, page_size=4, num_pages=600,
                                  compilation_cache_dir=""))


@pytest.fixture(scope="module")
def live(engine):
    """One engine thread behind two apps: the main one (API key, 64 KiB bodies) and one that admits
    no waiting requests (capacity = the 8 running)."""
    async_engine = AsyncEngine(engine)
    app = server.create_app(async_engine, server.ServerConfig(served_model_name="tiny", api_key=KEY,
                                                              max_request_bytes=MAX_BODY))
    tight = server.create_app(async_engine, server.ServerConfig(served_model_name="tiny", max_waiting_requests=0))
    main, small = server.serve(app, port=0, threads=96), server.serve(tight, port=0, threads=16)
    yield main, small, app
    async_engine.shutdown(drain_timeout=5)
    main.close()
    small.close()


def url(live):
    return live[0].url


# ---- protocol -------------------------------------------------------------------------------------


def test_completion_matches_the_engine_and_reports_usage(live, engine):
    prompt_ids = engine.tokenizer.encode("The quick brown fox")
    status, _, body = post_json(url(live), "/v1/completions",
                                {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 7,
                                 "temperature": 0, "ignore_eos": True}, AUTH)
    assert status == 200, body
    assert body["object"] == "text_completion" and body["model"] == "tiny" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == len(prompt_ids) and body["usage"]["completion_tokens"] == 7
    assert body["usage"]["total_tokens"] == len(prompt_ids) + 7
    # The same request as token ids, streamed: same text, and the usage chunk at the end.
    ev = stream(url(live), "/v1/completions", {"prompt": prompt_ids, "max_tokens": 7, "temperature": 0,
                                               "ignore_eos": True, "stream_options": {"include_usage": True}}, AUTH)
    assert ev.status == 200 and ev.done
    assert "".join(e["choices"][0]["text"] for e in ev.events if e["choices"]) == choice["text"]
    assert ev.events[-1]["choices"] == [] and ev.events[-1]["usage"]["completion_tokens"] == 7
    assert [e["choices"][0]["finish_reason"] for e in ev.events if e["choices"]][-1] == "length"


def test_multiple_prompts_n_and_echo(live):
    status, _, body = post_json(url(live), "/v1/completions",
                                {"prompt": ["ab", "cd", "ef"], "n": 2, "max_tokens": 3, "temperature": 0.8,
                                 "seed": 5, "echo": True, "ignore_eos": True}, AUTH)
    assert status == 200, body
    assert [c["index"] for c in body["choices"]] == list(range(6))
    for c in body["choices"]:
        assert c["text"].startswith(["ab", "cd", "ef"][c["index"] // 2])
    assert body["usage"]["completion_tokens"] == 18


def test_completion_logprobs_are_consistent(live, engine):
    status, _, body = post_json(url(live), "/v1/completions",
                                {"prompt": "xyz", "max_tokens": 5, "temperature": 0, "logprobs": 3,
                                 "ignore_eos": True}, AUTH)
    assert status == 200, body
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    for tok, token_lp, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        # At most the 3 best and the sampled token (texts of byte tokens may collide, keeping the best).
        assert token_lp <= 0 and 1 <= len(top) <= 4 and tok in top
        assert max(top.values()) == pytest.approx(token_lp, abs=1e-5)  # greedy: the sampled token is the best
    # Chat: top_logprobs entries come best first.
    status, _, body = post_json(url(live), "/v1/chat/completions",
                                {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "logprobs": True,
                                 "top_logprobs": 2, "temperature": 0, "ignore_eos": True}, AUTH)
    assert status == 200, body
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for t in content:
        assert len(t["top_logprobs"]) == 2 and t["top_logprobs"][0]["logprob"] >= t["top_logprobs"][1]["logprob"]
        assert t["logprob"] == pytest.approx(t["top_logprobs"][0]["logprob"], abs=1e-5)
        assert bytes(t["bytes"]).decode("utf-8", "replace") == t["token"]


def test_chat_stream_shape(live):
    ev = stream(url(live), "/v1/chat/completions",
                {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
                 "max_tokens": 6, "n": 2, "temperature": 1.0, "seed": 3, "ignore_eos": True}, AUTH)
    assert ev.status == 200 and ev.done
    assert all(e["object"] == "chat.completion.chunk" for e in ev.events)
    firsts = [e for e in ev.events if e["choices"][0]["delta"].get("role") == "assistant"]
    assert sorted(e["choices"][0]["index"] for e in firsts) == [0, 1]
    finishes = {e["choices"][0]["index"]: e["choices"][0]["finish_reason"] for e in ev.events
                if e["choices"][0]["finish_reason"]}
    assert finishes == {0: "length", 1: "length"}


def test_models_health_and_page(live):
    status, _, body = request(url(live), "GET", "/v1/models", headers=AUTH)
    models = json.loads(body)
    assert status == 200 and models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 256
    assert models["data"][0]["quantization"] is None  # float weights
    assert request(url(live), "GET", "/health")[0] == 200
    status, headers, page = request(url(live), "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"/v1/chat/completions" in page and b"<script src=\"http" not in page


# ---- load and disconnects ---------------------------------------------------------------------------


def test_64_streams_with_a_quarter_disconnecting(live, engine):
    aborted_before = engine.counters["aborted"]

    def client(i):
        body = {"prompt": f"client {i} says", **LONG}
        return stream(url(live), "/v1/completions", body, AUTH, stop_after=3 if i % 4 == 0 else None)

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(client, range(64)))
    statuses = [r.status for r in results]
    assert statuses == [200] * 64, statuses
    for i, r in enumerate(results):
        if i % 4:
            assert r.done, f"stream {i} did not complete"
            text_chunks = [e for e in r.events if e["choices"]]
            assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert wait_until(lambda: live[2].extensions["jaxinfer"].async_engine.num_in_flight == 0, timeout=120)
    assert engine.counters["aborted"] - aborted_before == 16  # each dropped client's request was aborted
    assert all_pages_free(engine)


def test_queue_full_gets_429_with_retry_after(live, engine):
    small = live[1].url
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        holders = [pool.submit(stream, small, "/v1/completions", {"prompt": f"hold {i}", **LONG}) for i in range(8)]
        async_engine = live[2].extensions["jaxinfer"].async_engine
        assert wait_until(lambda: async_engine.num_in_flight >= 8, timeout=60)
        status, headers, body = post_json(small, "/v1/completions", {"prompt": "one more", "max_tokens": 2})
        assert status == 429 and headers["retry-after"] == "1"
        assert body["error"]["type"] == "rate_limit_error"
        assert [(h.result().status, h.result().done) for h in holders] == [(200, True)] * 8
    assert wait_until(lambda: async_engine.num_in_flight == 0, timeout=60)
    assert post_json(small, "/v1/completions", {"prompt": "now", "max_tokens": 2})[0] == 200
    assert all_pages_free(engine)


# ---- bad input ---------------------------------------------------------------------------------------

JSON = {"Content-Type": "application/json", **AUTH}
MSG = [{"role": "user", "content": "hi"}]

# (name, method, path, headers, body, status, param)
BAD_REQUESTS = [
    ("no key", "POST", "/v1/completions", {"Content-Type": "application/json"}, {"prompt": "a"}, 401, None),
    ("wrong key", "POST", "/v1/completions", {"Content-Type": "application/json", "Authorization": "Bearer nope"},
     {"prompt": "a"}, 401, None),
    ("key as basic auth", "POST", "/v1/completions",
     {"Content-Type": "application/json", "Authorization": f"Basic {KEY}"}, {"prompt": "a"}, 401, None),
    ("models without key", "GET", "/v1/models", {}, None, 401, None),
    ("GET a POST route", "GET", "/v1/completions", AUTH, None, 405, None),
    ("PUT chat", "PUT", "/v1/chat/completions", JSON, {"messages": MSG}, 405, None),
    ("DELETE models", "DELETE", "/v1/models", AUTH, None, 405, None),
    ("POST health", "POST", "/health", JSON, {}, 405, None),
    ("unknown route", "GET", "/v1/engines", AUTH, None, 404, None),
    ("path traversal", "GET", "/../../etc/passwd", AUTH, None, 404, None),
    ("static traversal", "GET", "/static/../server.py", AUTH, None, 404, None),
    ("text/plain body", "POST", "/v1/completions", {"Content-Type": "text/plain", **AUTH}, '{"prompt": "a"}', 415,
     None),
    ("form body", "POST", "/v1/completions", {"Content-Type": "application/x-www-form-urlencoded", **AUTH},
     "prompt=a", 415, None),
    ("no content type", "POST", "/v1/completions", AUTH, b'{"prompt": "a"}', 415, None),
    ("malformed JSON", "POST", "/v1/completions", JSON, '{"prompt": "a",', 400, None),
    ("JSON array", "POST", "/v1/completions", JSON, '[{"prompt": "a"}]', 400, None),
    ("JSON NaN", "POST", "/v1/completions", JSON, '{"prompt": "a", "temperature": NaN}', 400, None),
    ("empty body", "POST", "/v1/completions", JSON, b"", 400, None),
    ("invalid UTF-8", "POST", "/v1/completions", JSON, b'{"prompt": "\xff\xfe"}', 400, None),
    ("huge body", "POST", "/v1/completions", JSON, json.dumps({"prompt": "a" * (MAX_BODY + 10)}), 413, None),
    ("deep nesting", "POST", "/v1/completions", JSON, "[" * 20000 + "]" * 20000, 400, None),
    ("missing prompt", "POST", "/v1/completions", JSON, {"max_tokens": 3}, 400, "prompt"),
    ("empty prompt", "POST", "/v1/completions", JSON, {"prompt": ""}, 400, "prompt"),
    ("empty prompt list", "POST", "/v1/completions", JSON, {"prompt": []}, 400, "prompt"),
    ("prompt wrong type", "POST", "/v1/completions", JSON, {"prompt": 42}, 400, "prompt"),
    ("token id out of vocab", "POST", "/v1/completions", JSON, {"prompt": [1, 2, 10**6]}, 400, "prompt"),
    ("negative token id", "POST", "/v1/completions", JSON, {"prompt": [1, -2]}, 400, "prompt"),
    ("prompt too long", "POST", "/v1/completions", JSON, {"prompt": [5] * 300}, 400, "prompt"),
    ("prompt + max_tokens over context", "POST", "/v1/completions", JSON, {"prompt": [5] * 200, "max_tokens": 100},
     400, "max_tokens"),
    ("max_tokens 0", "POST", "/v1/completions", JSON, {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens as string", "POST", "/v1/completions", JSON, {"prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ("max_tokens float", "POST", "/v1/completions", JSON, {"prompt": "a", "max_tokens": 2.5}, 400, "max_tokens"),
    ("temperature negative", "POST", "/v1/completions", JSON, {"prompt": "a", "temperature": -1}, 400,
     "temperature"),
    ("temperature too high", "POST", "/v1/completions", JSON, {"prompt": "a", "temperature": 3}, 400, "temperature"),
    ("top_p zero", "POST", "/v1/completions", JSON, {"prompt": "a", "top_p": 0}, 400, "top_p"),
    ("n zero", "POST", "/v1/completions", JSON, {"prompt": "a", "n": 0}, 400, "n"),
    ("n huge", "POST", "/v1/completions", JSON, {"prompt": "a", "n": 1000}, 400, "n"),
    ("n as bool", "POST", "/v1/completions", JSON, {"prompt": "a", "n": True}, 400, "n"),
    ("stream as string", "POST", "/v1/completions", JSON, {"prompt": "a", "stream": "yes"}, 400, "stream"),
    ("logprobs over 20", "POST", "/v1/completions", JSON, {"prompt": "a", "logprobs": 21}, 400, "logprobs"),
    ("presence_penalty range", "POST", "/v1/completions", JSON, {"prompt": "a", "presence_penalty": 2.5}, 400,
     "presence_penalty"),
    ("frequency_penalty range", "POST", "/v1/completions", JSON, {"prompt": "a", "frequency_penalty": -3}, 400,
     "frequency_penalty"),
    ("top_k below -1", "POST", "/v1/completions", JSON, {"prompt": "a", "top_k": -5}, 400, "top_k"),
    ("min_p over 1", "POST", "/v1/completions", JSON, {"prompt": "a", "min_p": 1.5}, 400, "min_p"),
    ("repetition_penalty 0", "POST", "/v1/completions", JSON, {"prompt": "a", "repetition_penalty": 0}, 400,
     "repetition_penalty"),
    ("seed as float", "POST", "/v1/completions", JSON, {"prompt": "a", "seed": 1.5}, 400, "seed"),
    ("seed over int64", "POST", "/v1/completions", JSON, {"prompt": "a", "seed": 2**70}, 400, "seed"),
    ("empty stop string", "POST", "/v1/completions", JSON, {"prompt": "a", "stop": [""]}, 400, "stop"),
    ("stop wrong type", "POST", "/v1/completions", JSON, {"prompt": "a", "stop": 7}, 400, "stop"),
    ("unknown field", "POST", "/v1/completions", JSON, {"prompt": "a", "temprature": 0.5}, 400, "temprature"),
    ("stream_options unknown", "POST", "/v1/completions", JSON,
     {"prompt": "a", "stream_options": {"include_usage": True, "x": 1}}, 400, "stream_options.x"),
    ("best_of < n", "POST", "/v1/completions", JSON, {"prompt": "a", "n": 3, "best_of": 2}, 400, "best_of"),
    ("best_of > n streamed", "POST", "/v1/completions", JSON, {"prompt": "a", "best_of": 3, "stream": True}, 400,
     "best_of"),
    ("logit_bias", "POST", "/v1/completions", JSON, {"prompt": "a", "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("suffix", "POST", "/v1/completions", JSON, {"prompt": "a", "suffix": "z"}, 400, "suffix"),
    ("wrong model", "POST", "/v1/completions", JSON, {"prompt": "a", "model": "gpt-4"}, 404, "model"),
    ("no messages", "POST", "/v1/chat/completions", JSON, {"max_tokens": 2}, 400, "messages"),
    ("empty messages", "POST", "/v1/chat/completions", JSON, {"messages": []}, 400, "messages"),
    ("bad role", "POST", "/v1/chat/completions", JSON, {"messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role"),
    ("content wrong type", "POST", "/v1/chat/completions", JSON, {"messages": [{"role": "user", "content": 5}]},
     400, "messages[0].content"),
    ("image content part", "POST", "/v1/chat/completions", JSON,
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content"),
    ("messages not a list", "POST", "/v1/chat/completions", JSON, {"messages": "hi"}, 400, "messages"),
    ("top_logprobs without logprobs", "POST", "/v1/chat/completions", JSON, {"messages": MSG, "top_logprobs": 2},
     400, "top_logprobs"),
    ("chat logprobs as int", "POST", "/v1/chat/completions", JSON, {"messages": MSG, "logprobs": 3}, 400,
     "logprobs"),
    ("max_tokens disagree", "POST", "/v1/chat/completions", JSON,
     {"messages": MSG, "max_tokens": 3, "max_completion_tokens": 4}, 400, "max_completion_tokens"),
    ("tool parameters not a schema", "POST", "/v1/chat/completions", JSON,
     {"messages": MSG, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
     400, "tools[0].function.parameters"),
    ("tool parameters not an object", "POST", "/v1/chat/completions", JSON,
     {"messages": MSG, "tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}, 400,
     "tools[0].function.parameters"),
    ("tool name with spaces", "POST", "/v1/chat/completions", JSON,
     {"messages": MSG, "tools": [{"type": "function", "function": {"name": "my tool"}}]}, 400,
     "tools[0].function.name"),
    ("tool_choice required without tools", "POST", "/v1/chat/completions", JSON,
     {"messages": MSG, "tool_choice": "required"}, 400, "tool_choice"),
    ("tool_choice names a missing tool", "POST", "/v1/chat/completions", JSON,
     {"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice"),
    ("required call and a response_format", "POST", "/v1/chat/completions", JSON,
     {"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("functions (deprecated)", "POST", "/v1/chat/completions", JSON,
     {"messages": MSG, "functions": [{"name": "f"}]}, 400, "functions"),
    ("self_consistency with a bad answer regex", "POST", "/v1/completions", JSON,
     {"prompt": "a", "self_consistency": {"answer": "(x"}}, 400, "self_consistency"),
    ("self_consistency over the server's cap", "POST", "/v1/completions", JSON,
     {"prompt": "a", "self_consistency": {"max_samples": 17}}, 400, "self_consistency.max_samples"),
    ("self_consistency streamed", "POST", "/v1/chat/completions", JSON,
     {"messages": MSG, "stream": True, "self_consistency": {}}, 400, "self_consistency"),
    ("beam search with temperature > 0", "POST", "/v1/completions", JSON,
     {"prompt": "a", "use_beam_search": True, "temperature": 0.7}, 400, "temperature"),
    ("beam_width 0", "POST", "/v1/completions", JSON, {"prompt": "a", "use_beam_search": True, "beam_width": 0}, 400,
     "beam_width"),
    ("beam_width over the engine's maximum", "POST", "/v1/chat/completions", JSON,
     {"messages": MSG, "use_beam_search": True, "beam_width": 9}, 400, "beam_width"),
    ("beam search streamed", "POST", "/v1/completions", JSON, {"prompt": "a", "use_beam_search": True, "stream": True},
     400, "stream"),
    ("beam search with a stop string", "POST", "/v1/completions", JSON,
     {"prompt": "a", "use_beam_search": True, "stop": ["x"]}, 400, "use_beam_search"),
    ("length_penalty without beam search", "POST", "/v1/completions", JSON, {"prompt": "a", "length_penalty": 0.5},
     400, "use_beam_search"),
    ("self_consistency with n > 1", "POST", "/v1/completions", JSON,
     {"prompt": "a", "n": 2, "self_consistency": {}}, 400, "self_consistency"),
    ("unknown reasoning parser", "POST", "/v1/chat/completions", JSON, {"messages": MSG, "reasoning_parser": "nope"},
     400, "reasoning_parser"),
    ("negative thinking budget", "POST", "/v1/chat/completions", JSON,
     {"messages": MSG, "reasoning_parser": "think", "thinking_token_budget": -1}, 400, "thinking_token_budget"),
    ("thinking budget without a parser", "POST", "/v1/chat/completions", JSON,
     {"messages": MSG, "thinking_token_budget": 8}, 400, "thinking_token_budget"),
    ("minimum above the budget", "POST", "/v1/chat/completions", JSON,
     {"messages": MSG, "reasoning_parser": "think", "thinking_token_budget": 4, "min_thinking_tokens": 5}, 400,
     "min_thinking_tokens"),
    ("continue_final_message after a user message", "POST", "/v1/chat/completions", JSON,
     {"messages": MSG, "continue_final_message": True, "add_generation_prompt": False}, 400, "continue_final_message"),
    ("user message without content", "POST", "/v1/chat/completions", JSON, {"messages": [{"role": "user"}]}, 400,
     "messages[0]"),
    ("system message without content", "POST", "/v1/chat/completions", JSON,
     {"messages": [{"role": "system"}, {"role": "user", "content": "hi"}]}, 400, "messages[0]"),
    ("assistant message with neither content nor tool_calls", "POST", "/v1/chat/completions", JSON,
     {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}, 400, "messages[1]"),
    ("tool message without tool_call_id", "POST", "/v1/chat/completions", JSON,
     {"messages": [{"role": "tool", "content": "18C"}]}, 400, "messages[0]"),
    ("tool_calls on a user message", "POST", "/v1/chat/completions", JSON,
     {"messages": [{"role": "user", "content": "hi", "tool_calls": [
         {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, 400, "messages[0]"),
    ("response_format of an unknown type", "POST", "/v1/chat/completions", JSON,
     {"messages": MSG, "response_format": {"type": "yaml"}}, 400, "response_format"),
    ("json_schema that is not a schema", "POST", "/v1/chat/completions", JSON,
     {"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                                  "schema": {"type": "objekt"}}}},
     400, "response_format"),
    ("json_schema without a name", "POST", "/v1/chat/completions", JSON,
     {"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, 400,
     "response_format.json_schema.name"),
    ("guided_json with a dangling $ref", "POST", "/v1/completions", JSON,
     {"prompt": "a", "guided_json": {"$ref": "#/nowhere"}}, 400, "guided_json"),
    ("guided_regex unclosed", "POST", "/v1/completions", JSON, {"prompt": "a", "guided_regex": "(ab"}, 400,
     "guided_regex"),
    ("guided_choice empty", "POST", "/v1/chat/completions", JSON, {"messages": MSG, "guided_choice": []}, 400,
     "guided_choice"),
    ("guided_grammar undefined rule", "POST", "/v1/chat/completions", JSON,
     {"messages": MSG, "guided_grammar": "start: missing"}, 400, "guided_grammar"),
    ("guided_grammar bad GBNF", "POST", "/v1/completions", JSON, {"prompt": "a", "guided_grammar": "root ::= ("},
     400, "guided_grammar"),
    ("two constraints", "POST", "/v1/completions", JSON,
     {"prompt": "a", "guided_regex": "a+", "guided_choice": ["b"]}, 400, "guided_choice"),
    ("chat over context", "POST", "/v1/chat/completions", JSON,
     {"messages": [{"role": "user", "content": "word " * 300}]}, 400, "messages"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_its_status(live, case):
    name, method, path, headers, body, want_status, want_param = case
    status, resp_headers, data = request(url(live), method, path, body, headers)
    assert status == want_status, data
    error = json.loads(data)["error"]
    assert error["message"] and error["type"]
    if want_param is not None:
        assert error["param"] == want_param, error
    if status == 401:
        assert resp_headers["www-authenticate"] == "Bearer"
    if status == 405:
        assert "allow" in resp_headers


def test_battery_is_large_and_the_server_still_serves(live, engine):
    assert len(BAD_REQUESTS) >= 40
    for case in BAD_REQUESTS:  # all again, back to back, then a normal request
        request(url(live), case[1], case[2], case[4], case[3])
    status, _, body = post_json(url(live), "/v1/completions", {"prompt": "still here", "max_tokens": 3}, AUTH)
    assert status == 200 and body["usage"]["completion_tokens"] >= 1
    assert wait_until(lambda: all_pages_free(engine), timeout=30)


def test_chunked_oversized_body_is_refused(live):
    import http.client
    import urllib.parse

    u = urllib.parse.urlsplit(url(live))
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    chunks = (b'{"prompt": "' + b"a" * 8192 for _ in range(3 * MAX_BODY // 8192))
    conn.request("POST", "/v1/completions", body=chunks, headers=JSON, encode_chunked=True)
    assert conn.getresponse().status == 413
    conn.close()


def test_metrics_expose_latency_queue_and_kv(live):
    post_json(url(live), "/v1/completions", {"prompt": "metrics", "max_tokens": 4, "ignore_eos": True}, AUTH)
    status, headers, body = request(url(live), "GET", "/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['jaxinfer_time_to_first_token_seconds_count{model_name="tiny"}'] >= 1
    assert samples['jaxinfer_time_per_output_token_seconds_count{model_name="tiny"}'] >= 1
    assert samples['jaxinfer_e2e_request_latency_seconds_count{model_name="tiny"}'] >= 1
    assert samples['jaxinfer_kv_pages_total{model_name="tiny"}'] == 599
    used = samples['jaxinfer_kv_pages_used{model_name="tiny"}']
    assert samples['jaxinfer_kv_pages_peak{model_name="tiny"}'] >= max(1, used)  # (a request ran above)
    assert 'jaxinfer_num_requests_waiting{model_name="tiny"}' in samples
    assert 'jaxinfer_prefix_cache_hits_total{model_name="tiny"}' in samples
    assert 'jaxinfer_num_preemptions_total{model_name="tiny"}' in samples
    assert samples['jaxinfer_generation_tokens_total{model_name="tiny"}'] >= 4
    assert samples['jaxinfer_http_requests_total{route="/v1/completions",status="200"}'] >= 1


def test_schemathesis_finds_no_server_error(live, tmp_path):
    """Fuzzes both generation routes from /openapi.json: no request may get a 5xx, and every response
    must match the schema's status codes, content types and bodies."""
    cmd = [os.path.join(os.path.dirname(sys.executable), "schemathesis"), "run", f"{url(live)}/openapi.json",
           "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                       "response_schema_conformance",
           "--max-examples", "15", "--seed", "7", "--request-timeout", "120", "--no-shrink",
           "-H", f"Authorization: Bearer {KEY}", "--report", "junit", "--report-dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "generated" in done.stdout


def test_drain_finishes_in_flight_and_refuses_new(tiny_model):
    """Shutdown: /health turns 503, new requests get 503, the stream already running completes."""
    m = tiny_model
    engine = LLMEngine(m.config, m.graphdef, m.params, m.tokenizer,
                       EngineConfig.of(max_num_seqs=2, max_num_batched_tokens=16, page_size=4, num_pages=64,
                                    compilation_cache_dir=""))
    drain_engine = AsyncEngine(engine)
    app = server.create_app(drain_engine, server.ServerConfig(served_model_name="tiny", drain_timeout=120))
    srv = server.serve(app, port=0, threads=8)
    try:
        result = {}

        def client():
            body = {"prompt": "in flight", "max_tokens": 60, "ignore_eos": True}
            result["r"] = stream(srv.url, "/v1/completions", body)

        t = threading.Thread(target=client)
        t.start()
        assert wait_until(lambda: drain_engine.num_in_flight == 1, timeout=60)
        drainer = threading.Thread(target=app.extensions["jaxinfer"].drain)
        drainer.start()
        assert wait_until(lambda: app.extensions["jaxinfer"].draining, timeout=10)
        assert request(srv.url, "GET", "/health")[0] == 503
        status, _, body = post_json(srv.url, "/v1/completions", {"prompt": "late", "max_tokens": 2})
        assert status == 503 and body["error"]["type"] == "service_unavailable"
        t.join(120)
        drainer.join(120)
        assert result["r"].done and result["r"].status == 200
        assert not drain_engine.is_running
    finally:
        srv.close()
    assert all_pages_free(engine)


def test_close_survives_a_closed_wake_up_pipe():
    """CI once saw the waitress loop's wake-up pipe closed before `close()` (EBADF): closing must
    still drop the listener and every connection, not raise."""
    from flask import Flask

    app = Flask("pipe")
    app.add_url_rule("/", "root", lambda: "ok")
    srv = server.RunningServer(app, "127.0.0.1", 0, threads=2, max_request_bytes=1024)
    assert request(srv.url, "GET", "/")[0] == 200
    srv._server.trigger.close()  # what waitress does when poll reports the pipe gone
    srv.close()
    srv._thread.join(5)
    assert not srv._thread.is_alive()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=2).close()


@pytest.mark.slow
def test_command_line_server_serves_while_it_compiles_then_compiles_nothing_and_drains_on_sigterm(tmp_path):
    """The port opens right after loading and serves while warm-up compiles in the background
    (/health: compiling); once it says ready, requests compile nothing (the xla_compilations metric
    stays flat); SIGTERM drains."""
    path = tmp_path / "tiny.gguf"
    tiny_gguf(path)
    env = dict(os.environ, JAXINFER_COMPILATION_CACHE=str(tmp_path / "xla"))
    proc = subprocess.Popen([sys.executable, "server.py", "--model", str(path), "--port", "0", "--max-num-seqs", "2",
                             "--max-num-batched-tokens", "16", "--served-model-name", "cli-tiny"],
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
                            stderr=subprocess.PIPE, text=True)

    def compilations(base):
        text = request(base, "GET", "/metrics")[2].decode()
        return float(re.search(r'jaxinfer_xla_compilations_total\{model_name="cli-tiny"\} (\S+)', text).group(1))

    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "serving cli-tiny at " in line:
                break
        assert not any("ready" in ln for ln in lines), lines  # serving before the warm-up is done
        base = lines[-1].split(" at ")[1].split()[0]
        assert base.startswith("http://127.0.0.1:")
        health = json.loads(request(base, "GET", "/health")[2])
        assert health["status"] == "ok" and isinstance(health["compiling"], bool)
        for line in proc.stderr:
            lines.append(line)
            if "ready" in line:
                break
        assert "compiled" in lines[-1] and "ready" in lines[-1], lines
        assert json.loads(request(base, "GET", "/health")[2]) == {"status": "ok", "compiling": False}
        before = compilations(base)
        assert before > 0
        status, _, body = request(base, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 5})
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] >= 1
        assert compilations(base) == before  # nothing compiles once ready
        result = {}
        t = threading.Thread(target=lambda: result.setdefault(
            "r", stream(base, "/v1/completions", {"prompt": "bye", "max_tokens": 40, "ignore_eos": True})))
        t.start()
        assert wait_until(lambda: request(base, "GET", "/metrics")[2].find(b"num_requests_in_flight") >= 0)
        import signal

        assert wait_until(lambda: b'in_flight{model_name="cli-tiny"} 1.0' in request(base, "GET", "/metrics")[2])
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert result["r"].status == 200 and result["r"].done  # drained, not cut off
        assert proc.wait(120) == 0
        rest = proc.stderr.read()
        assert "0 requests aborted" in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()


def test_server_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="max_waiting_requests"):
        server.ServerConfig(served_model_name="x", max_waiting_requests=-1)
    with pytest.raises(ValueError, match="served_model_name"):
        server.ServerConfig(served_model_name="")
    assert server.main(["--threads", "0"]) == 2


def test_sampling_params_from_requests_match_the_python_api(live):
    serving = live[2].extensions["jaxinfer"].serving
    from jaxinfer.openai_serving import parse_request
    from jaxinfer.protocol import CompletionRequest

    req = parse_request(json.dumps({"prompt": "a", "max_tokens": 9, "temperature": 0.5, "top_p": 0.9, "top_k": 7,
                                    "min_p": 0.1, "repetition_penalty": 1.2, "presence_penalty": 0.3,
                                    "frequency_penalty": -0.4, "seed": 11, "stop": "zz", "ignore_eos": True,
                                    "n": 2, "logprobs": 2}).encode(), CompletionRequest)
    from jaxinfer.sampling_params import RequestOutputKind

    (spec,) = serving.prepare_completion(req).specs
    expected = SamplingParams(n=2, max_tokens=9, temperature=0.5, top_p=0.9, top_k=7, min_p=0.1,
                              repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=-0.4,
                              seed=11, stop=("zz",), ignore_eos=True, logprobs=2,
                              output_kind=RequestOutputKind.FINAL_ONLY)  # one output at the end
    assert spec.params == expected
    streamed = parse_request(json.dumps({"prompt": "a", "max_tokens": 9, "stream": True}).encode(), CompletionRequest)
    (spec,) = serving.prepare_completion(streamed).specs
    assert spec.params.output_kind is RequestOutputKind.DELTA  # a stream carries only what is new


def test_the_http_response_id_is_the_engine_request_id(live):
    serving = live[2].extensions["jaxinfer"].serving
    from jaxinfer.openai_serving import parse_request
    from jaxinfer.protocol import ChatCompletionRequest, CompletionRequest

    one = serving.prepare_completion(parse_request(b'{"prompt": "a"}', CompletionRequest))
    assert [s.request_id for s in one.specs] == [one.request_id] and one.request_id.startswith("cmpl-")
    two = serving.prepare_completion(parse_request(b'{"prompt": ["a", "b"]}', CompletionRequest))
    assert [s.request_id for s in two.specs] == [f"{two.request_id}-0", f"{two.request_id}-1"]
    chat = serving.prepare_chat(parse_request(b'{"messages": [{"role": "user", "content": "hi"}]}',
                                              ChatCompletionRequest))
    assert [s.request_id for s in chat.specs] == [chat.request_id] and chat.request_id.startswith("chatcmpl-")
    stream = serving.submit(chat)  # the engine serves it under that id
    assert stream.request_ids == [chat.request_id]
    stream.results(timeout=120)


def test_jaxinfer_serve_is_the_server_command(capsys):
    from jaxinfer.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--api-key" in out and "--max-waiting-requests" in out and "--drain-timeout" in out


def test_best_of_returns_the_n_choices_with_the_highest_mean_logprob(live):
    body = {"prompt": "best of", "n": 2, "best_of": 4, "temperature": 1.0, "seed": 5, "max_tokens": 6, "logprobs": 0}
    status, _, data = post_json(url(live), "/v1/completions", body, AUTH)
    assert status == 200 and [c["index"] for c in data["choices"]] == [0, 1]
    means = [sum(c["logprobs"]["token_logprobs"]) / len(c["logprobs"]["token_logprobs"]) for c in data["choices"]]
    assert means[0] >= means[1] and data["usage"]["completion_tokens"] >= 4  # (all four samples' tokens)


def test_beam_search_returns_the_n_best_beams_and_what_they_cost(live):
    body = {"prompt": "beam", "use_beam_search": True, "n": 2, "beam_width": 3, "max_tokens": 5, "logprobs": 0,
            "ignore_eos": True}
    status, _, data = post_json(url(live), "/v1/completions", body, AUTH)
    assert status == 200 and [c["index"] for c in data["choices"]] == [0, 1], data
    sums = [sum(c["logprobs"]["token_logprobs"]) for c in data["choices"]]
    assert all(len(c["logprobs"]["tokens"]) == 5 for c in data["choices"]) and sums[0] >= sums[1]
    metrics = request(url(live), "GET", "/metrics")[2].decode()
    spent = re.search(r'jaxinfer_technique_tokens_total\{model_name="tiny",technique="beams"\} ([\d.]+)', metrics)
    assert float(spent.group(1)) >= 3 * 4  # three beams, at least four steps each


def test_self_consistency_returns_the_voted_answer_and_what_it_cost(live):
    body = {"prompt": "vote", "temperature": 1.0, "seed": 4, "max_tokens": 4, "guided_choice": ["A", "B"],
            "self_consistency": {"answer": "last_line", "max_samples": 6}}
    status, _, data = post_json(url(live), "/v1/completions", body, AUTH)
    vote = data["self_consistency"]
    assert status == 200 and len(data["choices"]) == 1 and data["choices"][0]["text"] == vote["answer"]
    assert vote["answer"] == max(vote["votes"], key=vote["votes"].get) and sum(vote["votes"].values()) == \
        vote["num_samples"] <= 6 and vote["num_tokens"] >= vote["num_samples"]
    status, _, plain = post_json(url(live), "/v1/completions", {"prompt": "vote", "max_tokens": 2}, AUTH)
    assert status == 200 and "self_consistency" not in plain  # only requests that ask carry one
    metrics = request(url(live), "GET", "/metrics")[2].decode()  # what the techniques cost, in Prometheus
    voted = re.search(r'jaxinfer_self_consistency_samples_total\{model_name="tiny",outcome="voted"\} ([\d.]+)', metrics)
    spent = re.search(r'jaxinfer_technique_tokens_total\{model_name="tiny",technique="self_consistency"\} ([\d.]+)',
                      metrics)
    assert float(voted.group(1)) >= vote["num_samples"] and float(spent.group(1)) >= vote["num_tokens"]
