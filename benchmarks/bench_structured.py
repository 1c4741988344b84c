"""Structured output's cost: the grammar libraries side by side (compile time and per-token mask time on
JSON schemas of real size, over the model's own vocabulary), and the engine's output tok/s at a fixed
number of concurrent requests with 0%, 50% and 100% of them constrained by a JSON schema.

    python benchmarks/bench_structured.py [--model smollm2-135m] [--concurrency 16] [--max-tokens 64]
                                          [--rounds 3] [--libraries llguidance xgrammar outlines-core]

Libraries: llguidance (what jaxinfer uses), xgrammar and outlines-core (`make bench-structured`
installs the last two; a library that is not installed gets a row saying so). Each gets the same
vocabulary (every token's bytes, special tokens excluded) and the same schemas:

    tool-call  a function's arguments: strings, an enum, bounded integers, an array
    order      nested objects, an array of objects, a pattern, numbers with bounds, nullable fields
    issue      a GitHub-issue-like record: enums in arrays, a nullable object, many properties
    pydantic   a pydantic model's schema with $defs / $ref and optional fields

Compile: the schema to a ready matcher, fresh (each library's caches off or a new compiler), median
of --compile-reps. Mask: a valid instance of the schema (compact separators, checked with
jsonschema) is tokenized; at each of its tokens the library fills one int32 bitmask row of the
next allowed tokens, then advances by the token: median and p99 microseconds per token.

Engine: an LLM with max_num_seqs = --concurrency; each request generates --max-tokens tokens
(greedy; the constrained ones follow an array-of-objects schema that cannot close sooner, the others
ignore EOS), an untimed first round compiles the shapes, then the fractions run round-robin and a
figure is the median over rounds. Printed with each step's mean host and device milliseconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCHEMAS = {
    "tool-call": (
        {"type": "object", "properties": {
            "location": {"type": "string", "description": "city and country"},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
            "include": {"type": "array", "items": {"enum": ["wind", "rain", "uv", "humidity"]}, "maxItems": 4}},
         "required": ["location", "unit", "days", "include"], "additionalProperties": False},
        {"location": "Paris, France", "unit": "celsius", "days": 5, "include": ["wind", "rain"]}),
    "order": (
        {"type": "object", "properties": {
            "order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
            "customer": {"type": "object", "properties": {
                "name": {"type": "string"}, "email": {"type": "string"},
                "address": {"type": "object", "properties": {
                    "street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string"},
                    "country": {"type": "string"}}, "required": ["street", "city", "zip", "country"],
                    "additionalProperties": False}},
                "required": ["name", "email", "address"], "additionalProperties": False},
            "items": {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
                "sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                "unit_price": {"type": "number", "minimum": 0}}, "required": ["sku", "quantity", "unit_price"],
                "additionalProperties": False}},
            "status": {"enum": ["pending", "paid", "shipped", "delivered", "cancelled"]},
            "coupon": {"type": ["string", "null"]},
            "total": {"type": "number", "minimum": 0}},
         "required": ["order_id", "customer", "items", "status", "coupon", "total"], "additionalProperties": False},
        {"order_id": "ORD-004217", "customer": {"name": "Ada Lovelace", "email": "ada@example.com", "address": {
            "street": "12 Analytical Row", "city": "London", "zip": "NW1 6XE", "country": "United Kingdom"}},
         "items": [{"sku": "BK-101", "quantity": 2, "unit_price": 12.5},
                   {"sku": "PN-7", "quantity": 10, "unit_price": 0.99}],
         "status": "paid", "coupon": None, "total": 34.9}),
    "issue": (
        {"type": "object", "properties": {
            "number": {"type": "integer", "minimum": 1}, "title": {"type": "string", "maxLength": 120},
            "state": {"enum": ["open", "closed"]}, "body": {"type": "string"},
            "labels": {"type": "array", "items": {"enum": ["bug", "feature", "docs", "performance", "question",
                                                           "good first issue"]}, "uniqueItems": True},
            "assignees": {"type": "array", "items": {"type": "string"}},
            "milestone": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {
                "title": {"type": "string"}, "due_on": {"type": "string"}}, "required": ["title", "due_on"],
                "additionalProperties": False}]},
            "comments": {"type": "integer", "minimum": 0}, "locked": {"type": "boolean"},
            "reactions": {"type": "object", "properties": {k: {"type": "integer", "minimum": 0} for k in (
                "plus_one", "minus_one", "laugh", "hooray", "heart")},
                "required": ["plus_one", "minus_one", "laugh", "hooray", "heart"], "additionalProperties": False}},
         "required": ["number", "title", "state", "body", "labels", "assignees", "milestone", "comments", "locked",
                      "reactions"], "additionalProperties": False},
        {"number": 1842, "title": "Decode slows down after 2k tokens", "state": "open",
         "body": "Steps take 40% longer once the context passes 2048 tokens; see the attached profile.",
         "labels": ["bug", "performance"], "assignees": ["kernels-team"],
         "milestone": {"title": "v0.3", "due_on": "2027-01-15"}, "comments": 7, "locked": False,
         "reactions": {"plus_one": 12, "minus_one": 0, "laugh": 0, "hooray": 1, "heart": 3}}),
}


def pydantic_schema():
    from typing import Optional

    from pydantic import BaseModel, ConfigDict, Field

    class Address(BaseModel):
        model_config = ConfigDict(extra="forbid")
        city: str
        country: str

    class Person(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str
        age: int = Field(ge=0, le=150)
        home: Address
        work: Optional[Address] = None

    class Team(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str
        lead: Person
        members: list[Person]
        budget: Optional[float] = Field(None, ge=0)

    instance = {"name": "Compilers", "lead": {"name": "Grace", "age": 45, "home": {"city": "Arlington",
                                                                                     "country": "USA"},
                                             "work": None},
                "members": [{"name": "Alan", "age": 41, "home": {"city": "Manchester", "country": "UK"},
                             "work": {"city": "Bletchley", "country": "UK"}}], "budget": 125000.0}
    return Team.model_json_schema(), instance


# The engine run's constraint: an array of at least 40 small objects (no earlier end than max_tokens).
ENGINE_SCHEMA = {"type": "array", "minItems": 40, "items": {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 999}, "name": {"type": "string", "maxLength": 16},
    "ok": {"type": "boolean"}}, "required": ["id", "name", "ok"], "additionalProperties": False}}


# ---- the libraries ---------------------------------------------------------------------------------

class Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size):
        from jaxinfer.structured_output import GrammarCompiler

        self.lltok = GrammarCompiler(tokenizer, vocab_size).lltokenizer

    def compile(self, schema):
        from llguidance import LLMatcher

        from jaxinfer.structured_output import _JSON_DEFAULTS

        return LLMatcher(self.lltok, LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_DEFAULTS))

    def fill(self, matcher, bitmask):
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(matcher, bitmask, 0)

    def advance(self, matcher, token):
        assert matcher.consume_token(token), matcher.get_error()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, token_bytes, vocab_size, stop_ids):
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo(token_bytes, vocab_type=xgr.VocabType.RAW, vocab_size=vocab_size,
                                      stop_token_ids=stop_ids)

    def compile(self, schema):
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, bitmask):
        matcher.fill_next_token_bitmask(bitmask, 0)

    def advance(self, matcher, token):
        assert matcher.accept_token(token)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, token_bytes, vocab_size, stop_ids):
        from outlines_core import Vocabulary

        words = {}
        for i, b in enumerate(token_bytes):
            if b and i not in stop_ids:
                words.setdefault(b, []).append(i)
        self.vocab = Vocabulary(stop_ids[0], words)

    def compile(self, schema):
        from outlines_core import Guide, Index
        from outlines_core.json_schema import build_regex_from_schema

        return Guide(Index(build_regex_from_schema(json.dumps(schema), r"[ ]?"), self.vocab))

    def fill(self, guide, bitmask):
        guide.write_mask_into(bitmask.ctypes.data, bitmask.size, bitmask.itemsize)

    def advance(self, guide, token):
        guide.advance(token)


def token_bytes(tokenizer, vocab_size, lltok):
    """Every id's bytes (special tokens empty: no text matches them), from llguidance's decoder."""
    return [b"" if i >= lltok.vocab_size or lltok.is_special_token(i) else lltok.decode_bytes([i])
            for i in range(vocab_size)]


def measure_library(lib, tokenizer, schemas, reps, V):
    """{schema: (compile ms median, mask us median, mask us p99, tokens)}."""
    import jsonschema

    rows = {}
    for name, (schema, instance) in schemas.items():
        jsonschema.validate(instance, schema)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            matcher = lib.compile(schema)
            times.append(time.perf_counter() - t0)
        text = json.dumps(instance, separators=(", ", ": "))
        ids = tokenizer.encode(text, add_special_tokens=False)
        bitmask = np.zeros((1, (V + 31) // 32), np.int32)
        mask_times = []
        for token in ids:
            t0 = time.perf_counter()
            lib.fill(matcher, bitmask)
            mask_times.append(time.perf_counter() - t0)
            if not (bitmask[0, token // 32] >> (token % 32)) & 1:
                raise AssertionError(f"{lib.name}: the instance's token {token} is not allowed in {name}")
            lib.advance(matcher, token)
        rows[name] = (statistics.median(times) * 1e3, statistics.median(mask_times) * 1e6,
                      float(np.percentile(mask_times, 99)) * 1e6, len(ids))
    return rows


# ---- the engine -------------------------------------------------------------------------------------

def engine_rows(args, context: int):
    from jaxinfer import LLM, SamplingParams, StructuredOutputsParams

    llm = LLM(args.model, dtype="float32", progress=False, warmup=False, max_num_seqs=args.concurrency,
              max_model_len=args.max_model_len or min(512, context))
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"List {40 + i} inventory items as JSON: id, "
                                                                    f"name and whether each is ok."}])
               for i in range(args.concurrency)]
    spec = StructuredOutputsParams(json=ENGINE_SCHEMA)

    def run(fraction):
        n_constrained = round(fraction * args.concurrency)
        params = [SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=i >= n_constrained,
                                 structured_outputs=spec if i < n_constrained else None)
                  for i in range(args.concurrency)]
        c0 = dict(llm.engine.counters)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        c = llm.engine.counters
        steps = c["steps"] - c0["steps"]
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        for o, p in zip(outs, params):
            if p.structured_outputs is not None:  # a valid prefix of the array, cut by max_tokens
                assert o.outputs[0].text.startswith("["), o.outputs[0].text
        return (tokens / wall, (c["host_seconds"] - c0["host_seconds"]) / steps * 1e3,
                (c["device_seconds"] - c0["device_seconds"]) / steps * 1e3)

    fractions = (0.0, 0.5, 1.0)
    for f in fractions:  # untimed: compiles the shapes and sampler variants these runs use
        run(f)
    results = {f: [] for f in fractions}
    for r in range(args.rounds):
        for f in fractions:
            results[f].append(run(f))
        print(f"engine round {r} done", flush=True)
    return {f: tuple(statistics.median(x[i] for x in v) for i in range(3)) for f, v in results.items()}


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (argv: None reads sys.argv)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--libraries", nargs="+", default=["llguidance", "xgrammar", "outlines-core"])
    ap.add_argument("--compile-reps", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=None, help="default: 512, or the model's context if shorter")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-engine", action="store_true", help="only the libraries' table")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)

    import jax

    from jaxinfer.loader import load_model

    model = load_model(args.model, dtype="float32", progress=False)
    tokenizer, V = model.tokenizer, model.config.vocab_size
    schemas = dict(SCHEMAS)
    schemas["pydantic"] = pydantic_schema()
    ll = Llguidance(tokenizer, V)
    words = token_bytes(tokenizer, V, ll.lltok)
    stop_ids = list(tokenizer.eos_token_ids)
    makers = {"llguidance": lambda: ll, "xgrammar": lambda: Xgrammar(words, V, stop_ids),
              "outlines-core": lambda: OutlinesCore(words, V, stop_ids)}
    tables = {}
    for name in args.libraries:
        try:
            lib = makers[name]()
        except ImportError as e:
            tables[name] = f"not installed ({e.name}): make bench-structured"
            continue
        tables[name] = measure_library(lib, tokenizer, schemas, args.compile_reps, V)
        print(f"{name}: measured", flush=True)
    engine = None if args.skip_engine else engine_rows(args, model.config.max_position_embeddings)

    print(f"\n{datetime.date.today()}, {platform.node() or 'this machine'}, jax {jax.__version__} "
          f"({jax.devices()[0].platform}), {args.model} ({V} tokens)")
    print("\n| library | schema | compile ms | mask us / token (median) | p99 | tokens |")
    print("|---|---|---|---|---|---|")
    for name, rows in tables.items():
        if isinstance(rows, str):
            print(f"| {name} | {rows} | | | | |")
            continue
        for schema, (compile_ms, med, p99, n) in rows.items():
            print(f"| {name} | {schema} | {compile_ms:.2f} | {med:.1f} | {p99:.1f} | {n} |")
    if engine is not None:
        base = engine[0.0][0]
        print(f"\n{args.concurrency} concurrent requests, {args.max_tokens} tokens each, greedy, median of "
              f"{args.rounds} rounds")
        print("\n| constrained | output tok/s | vs unconstrained | host ms / step | device ms / step |")
        print("|---|---|---|---|---|")
        for f, (tps, host, device) in engine.items():
            print(f"| {f:.0%} | {tps:.1f} | {tps / base:.2f}x | {host:.1f} | {device:.1f} |")


if __name__ == "__main__":
    main()
