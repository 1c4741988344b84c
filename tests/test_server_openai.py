"""The server on the real model, driven by the official `openai` client: well-formed responses whose
greedy text is `LLM.generate`'s / `LLM.chat`'s."""

from __future__ import annotations

import concurrent.futures

import pytest

import server
from jaxinfer.sampling_params import SamplingParams
from tests.server_utils import all_pages_free, wait_until

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "Water boils at",
           "The three primary colors are", "In 1969, Neil Armstrong"]
QUESTIONS = ["What is the capital of Japan?", "Name a prime number greater than 10.", "Say hello in French."]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def expected(smollm2):
    """What the offline API generates, computed before the server takes over the engine."""
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    completions = [o.outputs[0].text for o in smollm2.generate(PROMPTS, greedy)]
    chats = [o.outputs[0].text for o in smollm2.chat([[{"role": "user", "content": q}] for q in QUESTIONS], greedy)]
    with_lp = smollm2.generate(PROMPTS[:2], SamplingParams(max_tokens=8, temperature=0.0, logprobs=3))
    return {"completions": completions, "chats": chats, "logprobs": with_lp}


@pytest.fixture(scope="module")
def client(smollm2, expected):
    app = server.create_app(smollm2.engine, server.ServerConfig(served_model_name="smollm2-135m", api_key="k"))
    srv = server.serve(app, port=0, threads=32)
    yield openai.OpenAI(base_url=f"{srv.url}/v1", api_key="k", max_retries=0, timeout=600), app
    app.extensions["jaxinfer"].drain(timeout=30)  # hands the engine back to the other tests
    srv.close()


def test_models(client):
    c, _ = client
    (model,) = c.models.list().data
    assert model.id == "smollm2-135m" and model.object == "model"


def test_completions_equal_llm_generate(client, expected):
    c, _ = client

    def one(prompt):
        return c.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        responses = list(pool.map(one, PROMPTS))  # concurrently: batched differently than offline
    for r, want in zip(responses, expected["completions"]):
        assert r.object == "text_completion" and r.choices[0].text == want
        assert r.choices[0].finish_reason in ("stop", "length")
        usage = r.usage
        assert usage.completion_tokens >= 1 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_completion_equals_llm_generate(client, expected):
    c, _ = client
    for prompt, want in zip(PROMPTS[:3], expected["completions"]):
        chunks = list(c.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                           stream=True, stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want
        assert len([ch for ch in chunks if ch.choices]) > 3  # streamed in pieces, not one block
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_chat_equals_llm_chat(client, expected):
    c, _ = client
    for q, want in zip(QUESTIONS, expected["chats"]):
        r = c.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": q}],
                                      max_tokens=MAX_TOKENS, temperature=0)
        assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == want
        stream = c.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": q}],
                                           max_tokens=MAX_TOKENS, temperature=0, stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == want


def test_n_samples_and_seed(client, expected):
    c, _ = client
    r = c.completions.create(model="smollm2-135m", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, n=2)
    assert [ch.index for ch in r.choices] == [0, 1]
    assert [ch.text for ch in r.choices] == [expected["completions"][0]] * 2  # greedy: both the same
    kw = dict(model="smollm2-135m", messages=[{"role": "user", "content": "Write a word."}], max_tokens=12,
              temperature=1.0, n=2, seed=1234)
    a, b = c.chat.completions.create(**kw), c.chat.completions.create(**kw)
    assert [ch.message.content for ch in a.choices] == [ch.message.content for ch in b.choices]
    assert [ch.index for ch in a.choices] == [0, 1] and all(ch.message.content for ch in a.choices)


def test_logprobs_match_the_offline_api(client, expected):
    c, _ = client
    for prompt, offline in zip(PROMPTS[:2], expected["logprobs"]):
        r = c.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=8, temperature=0, logprobs=3)
        lp = r.choices[0].logprobs
        want = offline.outputs[0]
        assert r.choices[0].text == want.text
        assert len(lp.token_logprobs) == len(want.token_ids)
        for got, tid, d in zip(lp.token_logprobs, want.token_ids, want.logprobs):
            assert got == pytest.approx(d[tid].logprob, abs=2e-3)
        assert all(1 <= len(t) <= 4 for t in lp.top_logprobs)
    r = c.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                  max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)


def test_errors_reach_the_client_typed(client):
    c, app = client
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="smollm2-135m", prompt="hi", max_tokens=10**6)
    assert e.value.body["param"] == "max_tokens" and e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    bad = openai.OpenAI(base_url=c.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert wait_until(lambda: app.extensions["jaxinfer"].async_engine.num_in_flight == 0)
    assert all_pages_free(app.extensions["jaxinfer"].async_engine.engine)
