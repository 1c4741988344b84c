"""Structured outputs on the tiny model: every constrained output matches its regex / choice /
grammar / JSON schema (checked by `re` and `jsonschema`, not by the grammar library), with async
scheduling on and off, sampled and greedy, n > 1 with seeds, preemption and prefix-cache hits;
unconstrained requests in the same batches generate what they generate alone; bad specs are typed
errors naming the field. The packed mask's unpacking is checked against llguidance's own numpy
implementation. (SmolLM2 through the OpenAI client: tests/test_server_structured.py.)"""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from jaxinfer import SamplingParams, SpeculativeConfig, StructuredOutputsParams
from jaxinfer.errors import InvalidRequestError, InvalidSamplingParamsError, InvalidStructuredOutputError
from jaxinfer.structured_output import apply_bitmask, bitmask_width
from jaxinfer.testing import engine as testing_engine
from jaxinfer.testing.engine import assert_no_pages_held, run

REGEX = r"[a-z]{2,6}-[0-9]{1,3}(\.[0-9])?"
CHOICES = ["alpha", "beta gamma", "delta!"]
LARK = 'start: "(" item (", " item)* ")"\nitem: /[xyz]/ | "n" NUMBER\nNUMBER: /[0-9]{1,2}/'
GBNF = 'root ::= "ok" [0-9]{2,3} suffix\nsuffix ::= "!" | "?"'
# Bounded so a random model's output always closes: enums, small integers, short strings, a short array.
SCHEMA = {"type": "object", "properties": {
    "kind": {"enum": ["cat", "dog"]},
    "age": {"type": "integer", "minimum": 0, "maximum": 99},
    "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
    "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    "owner": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["id"], "additionalProperties": False}},
    "required": ["kind", "age", "name", "tags", "owner"], "additionalProperties": False}

SPECS = {"regex": StructuredOutputsParams(regex=REGEX), "choice": StructuredOutputsParams(choice=CHOICES),
         "lark": StructuredOutputsParams(grammar=LARK), "gbnf": StructuredOutputsParams(grammar=GBNF),
         "json": StructuredOutputsParams(json=SCHEMA)}


def assert_matches(kind: str, text: str) -> None:
    if kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert text in CHOICES, text
    elif kind == "lark":
        assert re.fullmatch(r"\((?:[xyz]|n[0-9]{1,2})(?:, (?:[xyz]|n[0-9]{1,2}))*\)", text), text
    elif kind == "gbnf":
        assert re.fullmatch(r"ok[0-9]{2,3}[!?]", text), text
    else:
        jsonschema.validate(json.loads(text), SCHEMA)


@pytest.fixture
def tiny(tiny_model):
    return tiny_model


def make_engine(model, **overrides):
    return testing_engine.make_engine(model, **{**dict(max_num_seqs=4, page_size=16, num_pages=160), **overrides})


def _requests(tiny, n_prompts=10):
    """Constrained requests of every kind, greedy and sampled, between unconstrained ones."""
    rng = np.random.default_rng(3)
    kinds = list(SPECS) + [None] * 3
    requests, kind_of = {}, {}
    for i in range(n_prompts):
        kind = kinds[i % len(kinds)]
        ids = rng.integers(3, tiny.config.vocab_size, int(rng.integers(3, 40))).tolist()
        params = SamplingParams(max_tokens=128, temperature=[0.0, 0.9][i % 2], seed=i,
                                structured_outputs=SPECS[kind] if kind else None)
        requests[f"r{i}"], kind_of[f"r{i}"] = (ids, params), kind
    return requests, kind_of


# ---- the spec -----------------------------------------------------------------------------------

def test_params_take_exactly_one_constraint_and_check_their_types():
    assert SamplingParams(structured_outputs=dict(regex="a+")).structured_outputs == StructuredOutputsParams(regex="a+")
    as_text = StructuredOutputsParams(json='{"type": "integer"}')
    assert as_text.json == StructuredOutputsParams(json={"type": "integer"}).json
    for bad, field in [(dict(), None), (dict(regex="a", choice=["b"]), None), (dict(choice="ab"), "choice"),
                       (dict(choice=["a", ""]), "choice"), (dict(regex=""), "regex"), (dict(json="{nope"), "json"),
                       (dict(json=[1]), "json"), (dict(json_object="yes"), "json_object")]:
        with pytest.raises(InvalidStructuredOutputError) as e:
            StructuredOutputsParams(**bad)
        assert e.value.field == field
    with pytest.raises(InvalidRequestError, match="no field"):
        SamplingParams(structured_outputs=dict(schema={}))
    with pytest.raises(InvalidRequestError, match="StructuredOutputsParams"):
        SamplingParams(structured_outputs="a+")
    assert not isinstance(InvalidStructuredOutputError("x"), InvalidSamplingParamsError)


def test_bad_specs_are_refused_naming_the_field_and_the_engine_keeps_serving(tiny):
    engine = make_engine(tiny)
    for spec, field in [(StructuredOutputsParams(regex="(unclosed"), "regex"),
                        (StructuredOutputsParams(grammar="start: undefined_rule"), "grammar"),
                        (StructuredOutputsParams(grammar="root ::= ("), "grammar"),
                        (StructuredOutputsParams(json={"type": "objekt"}), "json"),
                        (StructuredOutputsParams(json={"$ref": "#/nowhere"}), "json")]:
        with pytest.raises(InvalidStructuredOutputError) as e:
            engine.add_request("bad", [5, 6, 7], SamplingParams(structured_outputs=spec))
        assert e.value.field == field and str(e.value).startswith(field)
    assert not engine.has_unfinished_requests()
    outs = run(engine, {"good": ([5, 6, 7], SamplingParams(max_tokens=40, structured_outputs=SPECS["regex"]))})
    assert_matches("regex", outs["good"].outputs[0].text)
    assert_no_pages_held(engine)


def test_the_packed_mask_unpacks_as_llguidance_reads_it():
    from llguidance.numpy import apply_token_bitmask_inplace

    rng = np.random.default_rng(0)
    for V in (259, 1000, 1024):
        logits = rng.normal(size=(5, V)).astype(np.float32)
        bitmask = rng.integers(-2**31, 2**31, size=(5, bitmask_width(V)), dtype=np.int64).astype(np.int32)
        bitmask[0] = -1  # all allowed
        bitmask[1] = 0  # none
        want = logits.copy()
        apply_token_bitmask_inplace(want, bitmask)
        got = np.asarray(apply_bitmask(jnp.asarray(logits), jnp.asarray(bitmask)))
        np.testing.assert_array_equal(got, want)


# ---- in the engine --------------------------------------------------------------------------------

@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_constrained_outputs_match_and_leave_the_others_unchanged(tiny, async_scheduling):
    requests, kind_of = _requests(tiny)
    engine = make_engine(tiny, async_scheduling=async_scheduling)
    outs = run(engine, requests)
    for rid, kind in kind_of.items():
        out = outs[rid].outputs[0]
        if kind is not None:
            assert out.finish_reason == "stop", (rid, kind, out.text)
            assert_matches(kind, out.text)
    assert_no_pages_held(engine)
    # the unconstrained requests alone: the same tokens (a grammar in the batch changes no other row)
    alone = run(make_engine(tiny, async_scheduling=async_scheduling),
                {rid: requests[rid] for rid, kind in kind_of.items() if kind is None})
    for rid, out in alone.items():
        assert out.outputs[0].token_ids == outs[rid].outputs[0].token_ids
    if async_scheduling:  # the masks wait for the step in flight: the same tokens as synchronous steps
        sync = run(make_engine(tiny, async_scheduling=False), requests)
        assert {r: o.outputs[0].token_ids for r, o in sync.items()} == \
            {r: o.outputs[0].token_ids for r, o in outs.items()}


def test_a_stop_string_inside_a_constrained_output_ends_it_there(tiny):
    spec = StructuredOutputsParams(regex="[a-z]{3,8}@[0-9]{2}")
    outs = run(make_engine(tiny), {str(i): ([5 + i, 40, 50], SamplingParams(max_tokens=40, temperature=1.0, seed=i,
                                                                             stop=["@"], structured_outputs=spec))
                                   for i in range(4)})
    for out in outs.values():
        c = out.outputs[0]
        assert re.fullmatch("[a-z]{3,8}", c.text) and c.finish_reason == "stop" and c.stop_reason == "@"


def test_a_complete_grammar_ends_the_request_even_before_min_tokens(tiny):
    """min_tokens holds EOS back, but a complete grammar allows nothing else: the grammar wins."""
    params = SamplingParams(max_tokens=20, min_tokens=10, temperature=0.7, seed=1,
                            structured_outputs=StructuredOutputsParams(choice=["ab"]))
    out = run(make_engine(tiny), {"a": ([5, 6, 7], params)})["a"].outputs[0]
    assert out.text == "ab" and out.finish_reason == "stop" and len(out.token_ids) == 3


def test_n_samples_with_a_seed_reproduce_through_preemption_and_the_prefix_cache(tiny):
    prompt = list(range(10, 70))
    params = SamplingParams(n=3, max_tokens=128, temperature=1.0, seed=11, structured_outputs=SPECS["json"])
    roomy = run(make_engine(tiny), {"a": (prompt, params)})["a"]
    texts = [c.text for c in roomy.outputs]
    for text in texts:
        assert_matches("json", text)
    # 16 pages of 16 tokens cannot hold 4 sequences of up to 60 + 128 tokens: requests are preempted and
    # recomputed; the second run of the same prompt hits the prefix cache.
    engine = make_engine(tiny, num_pages=16, max_num_seqs=4)
    outs = run(engine, {"a": (prompt, params), "b": (prompt[:40], SamplingParams(max_tokens=60, temperature=0))})
    assert engine.stats()["num_preemptions"] > 0
    assert [c.text for c in outs["a"].outputs] == texts
    again = run(engine, {"c": (prompt, params)})["c"]
    assert [c.text for c in again.outputs] == texts and again.metrics.num_cached_tokens > 0
    assert_no_pages_held(engine)


def test_speculative_decoding_gives_grammar_requests_no_drafts_and_the_same_tokens(tiny):
    requests, kind_of = _requests(tiny, n_prompts=8)
    plain = run(make_engine(tiny), requests)
    spec = SpeculativeConfig(num_speculative_tokens=3, disable_by_batch_size=None)
    engine = make_engine(tiny, speculative_config=spec)
    outs = run(engine, requests)
    for rid, kind in kind_of.items():
        assert outs[rid].outputs[0].token_ids == plain[rid].outputs[0].token_ids, rid
        if kind is not None:
            assert_matches(kind, outs[rid].outputs[0].text)
    assert_no_pages_held(engine)


@pytest.mark.slow
def test_readme_python_block(smollm2, capsys):
    """The README's structured-output Python block on the session's SmolLM2 (the weights
    `LLM("smollm2-135m")` loads). (Its openai block: tests/test_server_structured.py.)"""
    from tests.test_docs import doc_python

    made = []

    def LLM(model):  # noqa: N802 - stands in for jaxinfer.LLM in the block
        made.append(model)
        return smollm2

    block = doc_python("from jaxinfer import LLM, SamplingParams, StructuredOutputsParams")
    namespace = {"__name__": "readme", "LLM": LLM}
    exec(compile(block.replace("import LLM, ", "import "), "README.md", "exec"), namespace)
    assert made == ["smollm2-135m"]
    text = namespace["out"][0].outputs[0].text
    assert json.loads(text) == {"city": "Paris", "country": "France"} and text in capsys.readouterr().out
    assert namespace["yes_no"][0].outputs[0].text in (" yes", " no")


# ---- tool calling's formats (the server's half: tests/test_server_structured.py) -------------------

def test_tool_call_schemas_accept_calls_and_refuse_others():
    from jaxinfer.tool_calls import call_schema

    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}},
        {"type": "function", "function": {"name": "g"}}]
    one, many, named = call_schema(tools, parallel=False), call_schema(tools), call_schema(tools, "g")
    jsonschema.validate({"name": "f", "arguments": {"x": 1}}, one)
    jsonschema.validate([{"name": "g", "arguments": {}}, {"name": "f", "arguments": {"x": 2}}], many)
    jsonschema.validate({"name": "g", "arguments": {}}, named)
    for bad, schema in [({"name": "f", "arguments": {}}, one), ([], many),
                        ({"name": "f", "arguments": {"x": 1}}, named),
                        ({"name": "h", "arguments": {}}, one)]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_auto_tool_calls_are_parsed_out_of_text_and_held_back_in_a_stream():
    from jaxinfer.tool_calls import AutoStream, parse_auto

    text = 'Let me look. <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>\n' \
           '<tool_call>{"name": "g", "arguments": {}}</tool_call>'
    content, calls = parse_auto(text)
    assert content == "Let me look." and [c["function"]["name"] for c in calls] == ["f", "g"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"x": 1} and calls[0]["id"] != calls[1]["id"]
    for size in (1, 3, 7):
        stream = AutoStream()
        sent = "".join(stream.feed(text[i:i + size]) for i in range(0, len(text), size))
        rest, streamed_calls = stream.finish()
        assert "<" not in sent and (sent + rest).strip() == content and len(streamed_calls) == 2
    assert parse_auto("no calls <tool_call>not json</tool_call>") == ("no calls <tool_call>not json</tool_call>", None)
    stream = AutoStream()  # text that only looks like the start of a block is sent in the end
    assert stream.feed("a <tool") == "a " and stream.finish() == ("<tool", None)


def test_tools_render_into_any_template_or_the_models_own_tools_section(tiny):
    from jaxinfer.tool_calls import render_messages

    tools = [{"type": "function", "function": {"name": "f", "description": "does f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}}}}]
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "f of 1?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": "2", "tool_call_id": "call_1"},
                {"role": "tool", "content": "3", "tool_call_id": "call_2"}]
    out, extra = render_messages(messages, tools, "auto", template_has_tools=False)
    assert extra == {} and [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\nYou can call these functions")
    assert '"name": "f"' in out[0]["content"]
    assert out[2]["content"] == '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
    assert out[3]["content"] == "<tool_response>\n2\n</tool_response>\n<tool_response>\n3\n</tool_response>"
    text = tiny.tokenizer.apply_chat_template(out)  # the tiny model's ChatML template renders it
    assert "<tool_call>" in text and "<tool_response>" in text
    out, extra = render_messages(messages, tools, "auto", template_has_tools=True)
    assert extra["tools"][0]["function"]["name"] == "f" and out[2]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    # a template with a tools section (Hermes / Qwen 2.5 style, as HF transformers renders it) gets them itself
    import copy

    hermes = copy.copy(tiny.tokenizer)
    hermes.chat_template = (
        "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools><|im_end|>\n"
        "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
        "<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    hermes._template = None
    text = hermes.apply_chat_template(out, **extra)
    assert '<tools>{"type": "function", "function": {"name": "f"' in text
    assert '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>' in text and "<|im_start|>tool\n2" in text
    assert render_messages(messages[:2], tools, "none", template_has_tools=False)[0] == messages[:2]


# ---- reasoning: the split and the thinking budget ---------------------------------------------------

def test_the_reasoning_split_streams_as_it_splits_whole():
    from jaxinfer.reasoning import ReasoningStream, split

    cases = [("plan it</think>\n\nThe answer.", True), ("plan it", True), ("</think>done", True),
             ("  <think>a</think>b", False), ("no thinking here", False), ("<thi", False), ("a</thin", True)]
    for text, opened in cases:
        whole = split(text, opened)
        for size in (1, 2, 5, 100):
            stream = ReasoningStream(opened)
            parts = [stream.feed(text[i:i + size], final=i + size >= len(text)) for i in range(0, len(text), size)]
            thought, content = "".join(p[0] for p in parts), "".join(p[1] for p in parts)
            assert (thought or None, content or None) == (whole[0] or None, whole[1] or None), (text, size)
    assert split("plan</think>\n\nThe answer.", True) == ("plan", "The answer.")
    assert split("<think>x</think>y", False) == ("x", "y") and split("just text", False) == (None, "just text")


def _think_prompt(tiny, text="Question: 2 + 2? <think>"):
    return tiny.tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_the_thinking_budget_ends_the_section_at_n_tokens_then_an_answer_follows(tiny, async_scheduling):
    from jaxinfer.reasoning import count_reasoning_tokens, split

    tok = tiny.tokenizer
    start, end = (tok.encode(m, add_special_tokens=False) for m in ("<think>", "</think>"))
    assert len(end) > 1  # (byte tokens: the marker is forced token by token)
    engine = make_engine(tiny, async_scheduling=async_scheduling)
    budgets = [0, 3, 10, 25]
    requests = {f"b{n}": (_think_prompt(tiny), SamplingParams(max_tokens=60, temperature=0.8, seed=n,
                                                               thinking_token_budget=n)) for n in budgets}
    requests["min"] = (_think_prompt(tiny), SamplingParams(max_tokens=60, temperature=0.8, seed=5,
                                                           thinking_token_budget=20, min_thinking_tokens=12))
    requests["json"] = (_think_prompt(tiny), SamplingParams(max_tokens=128, temperature=0.8, seed=6,
                                                            thinking_token_budget=5, structured_outputs=SPECS["json"]))
    requests["plain"] = (_think_prompt(tiny), SamplingParams(max_tokens=30, temperature=0.8, seed=7))
    outs = run(engine, requests)
    for n in budgets:
        ids = outs[f"b{n}"].outputs[0].token_ids
        assert count_reasoning_tokens(ids, start, end, True) == n  # (EOS is kept out until the marker)
        i = next(i for i in range(len(ids)) if ids[i:i + len(end)] == end)
        assert i == n and len(ids) > n + len(end)  # the marker, then at least one answer token
        assert split(tok.decode(ids, skip_special_tokens=False), True)[1] is not None
    ids = outs["min"].outputs[0].token_ids
    assert 12 <= count_reasoning_tokens(ids, start, end, True) <= 20
    assert count_reasoning_tokens(outs["json"].outputs[0].token_ids, start, end, True) <= 5
    assert_matches("json", split(outs["json"].outputs[0].text, True)[1])  # the grammar holds the answer
    alone = run(make_engine(tiny), {"p": requests["plain"]})["p"]  # a request without a budget: unchanged
    assert outs["plain"].outputs[0].token_ids == alone.outputs[0].token_ids
    assert_no_pages_held(engine)
    if async_scheduling:
        sync = run(make_engine(tiny), requests)
        assert {r: o.outputs[0].token_ids for r, o in sync.items()} == \
            {r: o.outputs[0].token_ids for r, o in outs.items()}


def test_thinking_params_are_checked():
    for bad in [dict(thinking_token_budget=-1), dict(thinking_token_budget=1.5), dict(min_thinking_tokens=-1),
                dict(thinking_token_budget=4, min_thinking_tokens=5), dict(reasoning_markers=("<t>", "<t>")),
                dict(reasoning_markers=("<t>",))]:
        with pytest.raises(InvalidSamplingParamsError):
            SamplingParams(**bad)
    assert SamplingParams(thinking_token_budget=0).limits_thinking and not SamplingParams().limits_thinking
