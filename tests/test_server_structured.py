"""Structured outputs on the real model through the official `openai` client: `beta.chat.completions.parse`
with pydantic models of increasing nesting, json_object, guided_regex / guided_choice / guided_grammar,
streaming, n > 1 with a seed; every output checked by `jsonschema`, pydantic or `re`."""

from __future__ import annotations

import enum
import json
import re
from typing import Optional

import jsonschema
import pytest
from pydantic import BaseModel, ConfigDict, Field

import server
from tests.server_utils import all_pages_free, wait_until

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow


class Color(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Sky(BaseModel):  # an enum
    color: Color


class Language(BaseModel):  # an array
    name: str = Field(max_length=40)
    tags: list[str] = Field(max_length=4)


class Address(BaseModel):
    city: str = Field(max_length=40)
    country: str = Field(max_length=40)


class Person(BaseModel):  # a nested object
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=40)
    address: Address


class Book(BaseModel):  # optional fields
    model_config = ConfigDict(extra="forbid")  # (additionalProperties: false, as `parse` sends every schema)
    title: str = Field(max_length=60)
    subtitle: Optional[str] = Field(None, max_length=60)
    year: Optional[int] = None


class Order(BaseModel):  # numbers with bounds, in a nested list of objects
    customer: Person
    items: list[dict[str, int]] = Field(max_length=3)
    total: float = Field(ge=0, le=10000)
    quantity: int = Field(ge=1, le=100)


MODELS = [(Sky, "What color is the sky on a clear day?"),
          (Language, "Describe the Python programming language with a name and a few tags."),
          (Person, "Who is the president of France and where does he live?"),
          (Book, "Name a famous book."),
          (Order, "Alice from Paris, France buys 3 apples for 1.5 dollars in total. Write the order.")]


@pytest.fixture(scope="module")
def client(smollm2):
    app = server.create_app(smollm2.engine, server.ServerConfig(served_model_name="smollm2-135m", api_key="k"))
    srv = server.serve(app, port=0, threads=16)
    yield openai.OpenAI(base_url=f"{srv.url}/v1", api_key="k", max_retries=0, timeout=600)
    app.extensions["jaxinfer"].drain(timeout=30)  # hands the engine back to the other tests
    srv.close()


def _chat(question):
    return [{"role": "user", "content": question}]


@pytest.mark.parametrize("model,question", MODELS, ids=[m.__name__ for m, _ in MODELS])
def test_parse_returns_the_pydantic_object(client, model, question):
    r = client.beta.chat.completions.parse(model="smollm2-135m", messages=_chat(question), response_format=model,
                                           temperature=0, max_tokens=256)
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, model)
    jsonschema.validate(json.loads(choice.message.content), model.model_json_schema())


def test_json_object_always_parses(client):
    # (prompts where this 135M model closes its object at greedy: on some it repeats a key until
    # max_tokens, and a cut output is a prefix of valid JSON, finish_reason "length", as OpenAI's)
    for question in ("Give me a JSON object with the name and age of a person.",
                     "Describe a cat in JSON with two keys.", "What is 2+2? Answer in JSON.",
                     "Write a JSON object for a book with title and author.", "hi"):
        r = client.chat.completions.create(model="smollm2-135m", messages=_chat(question), temperature=0,
                                           max_tokens=256, response_format={"type": "json_object"})
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(model="smollm2-135m", prompt="A JSON object about a dog:", temperature=0,
                                  max_tokens=256, extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(r.choices[0].text), dict)


def test_regex_choice_and_grammar(client):
    regex = r" \(\d{3}\) \d{3}-\d{4}"
    r = client.completions.create(model="smollm2-135m", prompt="Call me at", temperature=0, max_tokens=30,
                                  extra_body={"guided_regex": regex})
    assert re.fullmatch(regex, r.choices[0].text), r.choices[0].text
    choices = ["positive", "negative", "neutral"]
    for text in ("I love this!", "This is terrible.", "It is a chair."):
        r = client.chat.completions.create(
            model="smollm2-135m", messages=_chat(f"Sentiment of: {text}"), temperature=0,
            extra_body={"guided_choice": choices})
        assert r.choices[0].message.content in choices and r.choices[0].finish_reason == "stop"
    grammar = 'root ::= answer " because " [a-z ]{5,40} "."\nanswer ::= "yes" | "no"'
    r = client.chat.completions.create(model="smollm2-135m", messages=_chat("Is water wet?"), temperature=0,
                                       max_tokens=64, extra_body={"guided_grammar": grammar})
    assert re.fullmatch(r"(yes|no) because [a-z ]{5,40}\.", r.choices[0].message.content)


def test_streaming_concatenates_to_the_same_valid_json(client):
    kwargs = dict(model="smollm2-135m", messages=_chat(MODELS[2][1]), temperature=0, max_tokens=256,
                  response_format={"type": "json_schema",
                                   "json_schema": {"name": "Person", "schema": Person.model_json_schema()}})
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
             if c.choices]
    assert len(parts) > 3 and "".join(parts) == whole
    Person.model_validate_json(whole)


def test_three_seeded_samples_are_valid_and_reproduce(client, smollm2):
    kwargs = dict(model="smollm2-135m", messages=_chat(MODELS[3][1]), temperature=1.0, seed=1234, n=3,
                  max_tokens=256, response_format={"type": "json_schema",
                                                   "json_schema": {"name": "Book", "schema": Book.model_json_schema()}})
    first = [c.message.content for c in client.chat.completions.create(**kwargs).choices]
    for text in first:
        Book.model_validate_json(text)
    assert len(set(first)) > 1  # sampled, not three copies
    assert [c.message.content for c in client.chat.completions.create(**kwargs).choices] == first
    assert wait_until(lambda: all_pages_free(smollm2.engine), timeout=30)


def test_a_bad_schema_is_a_400_naming_the_field_and_the_server_keeps_serving(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2-135m", messages=_chat("hi"), max_tokens=4,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": {"type": "objekt"}}})
    assert e.value.body["param"] == "response_format" and "objekt" in e.value.body["message"]
    r = client.chat.completions.create(model="smollm2-135m", messages=_chat("hi"), max_tokens=4)
    assert r.choices[0].message.content



def test_readme_openai_block(client, capsys):
    """The README's structured-output client block against this module's server."""
    from tests.test_docs import doc_python

    block = doc_python("from pydantic import BaseModel")
    namespace = {"__name__": "readme"}
    exec(compile(block.replace("http://127.0.0.1:8000/v1", str(client.base_url)).replace(
        'api_key="unused-without---api-key"', 'api_key="k"'), "README.md", "exec"), namespace)
    assert re.fullmatch(r" \(\d{3}\) \d{3}-\d{4}", namespace["r"].choices[0].text)
    assert "city='Paris' country='France'" in capsys.readouterr().out


# ---- tool calling -------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 40}},
                   "required": ["zone"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Sydney", "Toronto", "Madrid", "Nairobi", "Seoul"]


def _one_call(i: int, client, stream: bool):
    """Request i of the 20: required (any tool, one call or a list) or a named function, streamed or not."""
    name = ["get_weather", "get_time"][i % 4 // 2]
    choice = "required" if i % 2 else {"type": "function", "function": {"name": name}}
    kwargs = dict(model="smollm2-135m", messages=_chat(f"What is the weather and the time in {CITIES[i % 10]}?"),
                  tools=[WEATHER, TIME], tool_choice=choice, parallel_tool_calls=i % 3 != 0, temperature=0.8,
                  seed=i, max_tokens=160)
    if not stream:
        choice_ = client.chat.completions.create(**kwargs).choices[0]
        return choice, choice_.finish_reason, choice_.message.content, [
            (c.id, c.function.name, c.function.arguments) for c in choice_.message.tool_calls or []]
    calls, finish, content = {}, None, ""
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:  # (accumulated as OpenAI's clients do: by index)
            got = calls.setdefault(call.index, [call.id, "", ""])
            got[1] += call.function.name or ""
            got[2] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return choice, finish, content or None, [tuple(calls[k]) for k in sorted(calls)]


def test_twenty_required_and_named_tool_calls_validate_streamed_and_not(client):
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda i: _one_call(i, client, stream=i >= 10), range(20)))
    for choice, finish, content, calls in results:
        assert finish == "tool_calls" and content is None and calls, (choice, finish, content)
        for call_id, name, arguments in calls:
            assert call_id.startswith("call_") and name in SCHEMAS
            if not isinstance(choice, str):
                assert name == choice["function"]["name"]
            jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_a_tool_result_goes_back_and_the_answer_comes(client):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}
    r = client.chat.completions.create(model="smollm2-135m", temperature=0, max_tokens=48, tools=[WEATHER], messages=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temperature": 18, "sky": "sunny"})}])
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.content and not choice.message.tool_calls


# ---- reasoning ----------------------------------------------------------------------------------------

THINK = [{"role": "user", "content": "What is 17 + 25? Think first."}, {"role": "assistant", "content": "<think>\n"}]


def _think(client, budget, stream=False):
    """The conversation continued inside its opened <think> section, split by the "think" parser."""
    extra = {"reasoning_parser": "think", "continue_final_message": True, "add_generation_prompt": False}
    if budget is not None:
        extra["thinking_token_budget"] = budget
    kwargs = dict(model="smollm2-135m", messages=THINK, max_tokens=120, temperature=0, extra_body=extra)
    if not stream:
        r = client.chat.completions.create(**kwargs)
        m = r.choices[0].message
        return m.reasoning_content, m.content, r.usage.completion_tokens_details.reasoning_tokens
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    thought = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return thought or None, content or None, chunks[-1].usage.completion_tokens_details.reasoning_tokens


@pytest.mark.parametrize("budget", [0, 8, 64])
def test_a_thinking_budget_ends_the_reasoning_then_the_answer_follows(client, smollm2, budget):
    thought, content, reasoning_tokens = _think(client, budget)
    tok = smollm2.get_tokenizer()
    assert reasoning_tokens <= budget and len(tok.encode(thought or "", add_special_tokens=False)) <= budget
    assert content and "</think>" not in content and "</think>" not in (thought or "")
    assert _think(client, budget, stream=True) == (thought or None, content, reasoning_tokens)  # split alike


def test_without_a_budget_the_reasoning_runs_on(client):
    thought, content, reasoning_tokens = _think(client, None)
    assert content is None and reasoning_tokens > 8 and len(thought) > 40  # never closed: all reasoning
    assert _think(client, None, stream=True) == (thought, content, reasoning_tokens)
