"""Structured output: a grammar per request constrains what it may generate (llguidance).

    SamplingParams.structured_outputs = StructuredOutputsParams(json=schema | json_object=True |
                                        regex=... | choice=[...] | grammar=lark-or-gbnf)
      -> InputProcessor: GrammarCompiler.check (typed error for a bad schema / regex / grammar)
      -> Runner: one Grammar (an llguidance matcher) per sample, advanced by every token it keeps
      -> each step: the rows' allowed tokens as a packed bitmask int32 [S, ceil(V / 32)] built on
         the host (`fill_bitmasks`, the matchers in parallel), unpacked and applied to the logits
         inside the sampler's jit (`apply_bitmask`): a [S, V] mask never crosses to the device.

llguidance was chosen by measurement over xgrammar and outlines-core (benchmarks/bench_structured.py,
docs/BENCHMARKS.md "Structured output"): per-token mask time and grammar compile time on JSON
schemas of real size. Grammars finish by allowing only the end-of-sequence tokens, so a
constrained request ends with "stop" as any other; one that runs out of max_tokens first ends with
"length" and its text is a prefix of a valid output.
"""

from __future__ import annotations

import collections
import dataclasses
import json as _json
import logging
import re
import threading
from typing import Any, Sequence

import numpy as np

from jaxinfer.errors import InvalidStructuredOutputError

logger = logging.getLogger(__name__)

FIELDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StructuredOutputsParams:
    """What a request's output must match (vLLM's names); exactly one field is set.

    Attributes:
      json: a JSON schema (a dict, or its JSON text): the output is one JSON value that validates.
      json_object: True: the output is any JSON object.
      regex: the output fully matches this regular expression (Rust `regex` syntax, as Python's
        for the common subset).
      choice: the output is exactly one of these strings.
      grammar: a context-free grammar, in Lark syntax (llguidance's dialect) or GBNF (llama.cpp's
        `root ::= ...`, converted).
    """

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None

    def __post_init__(self):
        def bad(field, msg):
            raise InvalidStructuredOutputError(msg, field)

        given = [f for f in FIELDS if getattr(self, f) not in (None, False)]
        if len(given) != 1:
            raise InvalidStructuredOutputError(
                f"structured outputs take exactly one of {', '.join(FIELDS)}; got {given or 'none'}", None)
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = _json.loads(schema)
                except ValueError as e:
                    bad("json", f"the JSON schema is not valid JSON: {e}")
            if not isinstance(schema, (dict, bool)):
                bad("json", f"a JSON schema is an object (or true / false), got {type(schema).__name__}")
            # as text: hashable (the compiled grammar is cached by it); the properties keep their order
            object.__setattr__(self, "json", _json.dumps(schema))
        if not isinstance(self.json_object, bool):
            bad("json_object", f"json_object must be true or false, got {self.json_object!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                bad(name, f"{name} must be a non-empty string, got {value!r}")
        if self.choice is not None:
            choice = self.choice
            if isinstance(choice, str) or not isinstance(choice, (list, tuple)) or not choice \
                    or not all(isinstance(c, str) and c for c in choice):
                bad("choice", f"choice must be a non-empty list of non-empty strings, got {choice!r}")
            object.__setattr__(self, "choice", tuple(choice))

    @property
    def field(self) -> str:
        """The one field set."""
        return next(f for f in FIELDS if getattr(self, f) not in (None, False))

    def source(self) -> str:
        """The llguidance grammar (not yet checked)."""
        from llguidance import LLMatcher

        if self.json is not None:
            return LLMatcher.grammar_from_json_schema(self.json, defaults=_JSON_DEFAULTS)
        if self.json_object:
            return LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=_JSON_DEFAULTS)
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return LLMatcher.grammar_from_lark("start: " + " | ".join(_json.dumps(c) for c in self.choice))
        grammar = self.grammar
        if re.search(r"^\s*root\s*::=", grammar, re.MULTILINE):  # GBNF (llama.cpp / vLLM's EBNF)
            from llguidance.gbnf_to_lark import gbnf_to_lark

            try:
                grammar = gbnf_to_lark(grammar)
            except Exception as e:  # (its parser raises plain exceptions)
                raise InvalidStructuredOutputError(f"grammar: not valid GBNF: {e}", "grammar") from None
        return LLMatcher.grammar_from_lark(grammar)


# JSON as compact as the schema allows (one separator style, no free whitespace): fewer tokens, and
# no run of spaces or newlines a small model can loop in. Lenient: keywords llguidance does not
# implement (uniqueItems, which pydantic writes for sets) are not enforced, with a warning in the
# log, rather than refusing the schema. A schema's own "x-guidance" overrides these.
_JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}


def _lltokenizer(tokenizer, vocab_size: int):
    """The llguidance tokenizer of a `jaxinfer.tokenizer.Tokenizer` over `vocab_size` ids (the
    model's: ids past the tokenizer's own are never allowed)."""
    import llguidance

    eos = list(tokenizer.eos_token_ids)
    backend = tokenizer._backend
    if tokenizer.kind != "spm":  # a `tokenizers` BPE: llguidance reads its JSON
        return llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos)
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_SentencePieceVocabulary(tokenizer, vocab_size)),
                                  n_vocab=vocab_size, eos_token=eos)


class _SentencePieceVocabulary:
    """A SentencePiece vocabulary as llguidance's TokenizerWrapper reads one: every id's bytes
    (control pieces as 0xFF + name: special, never matched by text), and an encoder."""

    def __init__(self, tokenizer, vocab_size: int):
        sp = tokenizer._backend
        self.eos_token_id = tokenizer.eos_token_ids[0]
        self.bos_token_id = tokenizer.bos_token_id
        self.tokens, self.special_token_ids = [], []
        for i in range(vocab_size):
            if i >= sp.get_piece_size():
                self.tokens.append(b"\xff<unused>")
                self.special_token_ids.append(i)
                continue
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):
                self.tokens.append(bytes([int(piece[3:5], 16)]))
            elif sp.is_control(i) or sp.is_unknown(i):
                self.tokens.append(b"\xff" + piece.encode())
                self.special_token_ids.append(i)
            else:
                self.tokens.append(piece.replace("\u2581", " ").encode())
        self._encode = tokenizer.encode

    def __call__(self, text: str) -> list[int]:
        return self._encode(text, add_special_tokens=False)


class Grammar:
    """One sample's grammar state: an llguidance matcher advanced by every token the sample keeps."""

    __slots__ = ("matcher",)
    restricts = True  # (every step: the matcher fills the row)

    def __init__(self, matcher):
        self.matcher = matcher

    def restrict(self, row):
        """The grammar that fills `row` (itself; `reasoning.ThinkingBudget` has the same interface)."""
        return self

    def accept(self, token_ids: Sequence[int]) -> bool:
        """Advances over tokens the sampler chose (under this grammar's mask); False if one was not
        allowed (the matcher is then in its error state and allows only end-of-sequence). Once the
        grammar is complete its mask allows only end-of-sequence, which ends the request: tokens
        after that are not consumed."""
        matcher = self.matcher
        for token in token_ids:
            if matcher.is_stopped():
                break
            if not matcher.consume_token(int(token)):
                return False
        return True

    @property
    def is_terminated(self) -> bool:
        return self.matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return _first_line(self.matcher.get_error()) if self.matcher.is_error() else None


class GrammarCompiler:
    """Compiles and checks a request's structured-output spec against one model's vocabulary, and
    makes the per-sample `Grammar`s. Thread-safe: the server checks in the request's thread; the
    llguidance tokenizer (~0.5 s for a 49k vocabulary) is built on the first use; compiled
    grammars are cached by spec (the last 256)."""

    def __init__(self, tokenizer, vocab_size: int, cache_size: int = 256):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._lltok = None
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[StructuredOutputsParams, str] = collections.OrderedDict()
        self._cache_size = cache_size

    @property
    def lltokenizer(self):
        with self._lock:
            if self._lltok is None:
                self._lltok = _lltokenizer(self.tokenizer, self.vocab_size)
            return self._lltok

    def compile(self, spec: StructuredOutputsParams) -> str:
        """The checked llguidance grammar of `spec`, or InvalidStructuredOutputError naming the field."""
        from llguidance import LLMatcher

        with self._lock:
            grammar = self._cache.get(spec)
            if grammar is not None:
                self._cache.move_to_end(spec)
                return grammar
        try:
            grammar = spec.source()
        except (ValueError, TypeError) as e:
            raise InvalidStructuredOutputError(f"{spec.field}: {e}", spec.field) from None
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.lltokenizer)
        if is_error:
            raise InvalidStructuredOutputError(f"{spec.field}: {_first_line(messages[0])}", spec.field)
        for message in messages:
            logger.warning("structured outputs (%s): %s; the rest is enforced", spec.field, _first_line(message))
        with self._lock:
            self._cache[spec] = grammar
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar

    def constraint(self, params, prompt_token_ids: Sequence[int], eos_token_ids: Sequence[int]):
        """The per-sample state that masks a request's rows: its grammar (structured outputs), that
        grammar behind a thinking section (`reasoning.ThinkingBudget`, with a budget or minimum), or
        None. One per sample: each advances on its own tokens."""
        grammar = None if params.structured_outputs is None else self.grammar(params.structured_outputs)
        if not params.limits_thinking:
            return grammar
        from jaxinfer.reasoning import ThinkingBudget, opens_thinking

        start_ids, end_ids = (self.tokenizer.encode(m, add_special_tokens=False) for m in params.reasoning_markers)
        tail = self.tokenizer.decode(list(prompt_token_ids[-16:]), skip_special_tokens=False)
        return ThinkingBudget(start_ids, end_ids, params.thinking_token_budget, params.min_thinking_tokens,
                              opens_thinking(tail, params.reasoning_markers), grammar,
                              () if params.ignore_eos else eos_token_ids)

    def grammar(self, spec: StructuredOutputsParams) -> Grammar:
        """A fresh grammar state for one sample of a request with `spec`."""
        from llguidance import LLMatcher

        matcher = LLMatcher(self.lltokenizer, self.compile(spec), log_level=0)
        if matcher.is_error():  # (compile checked it: only resource limits land here)
            raise InvalidStructuredOutputError(f"{spec.field}: {_first_line(matcher.get_error())}", spec.field)
        return Grammar(matcher)


def _first_line(message: str) -> str:
    """An llguidance error as one line: its message and the "error: ..." line of a regex error,
    without the source excerpts drawn under them."""
    lines = [line.strip() for line in message.strip().splitlines()]
    keep = lines[:1] + [line for line in lines[1:] if line.startswith("error:")]
    return " ".join(keep)[:500]


def bitmask_width(vocab_size: int) -> int:
    """int32 words of a packed allowed-token mask over `vocab_size` ids."""
    return (vocab_size + 31) // 32


_EXECUTOR = None


def fill_bitmasks(bitmask: np.ndarray, grammars: list[tuple[Grammar, int]]) -> None:
    """Writes each grammar's allowed next tokens into its row of `bitmask` (int32 [S, W], C order),
    the matchers in parallel on llguidance's thread pool (the GIL released)."""
    global _EXECUTOR
    import llguidance
    from llguidance.numpy import fill_next_token_bitmask_par

    if _EXECUTOR is None:
        _EXECUTOR = llguidance.LLExecutor()
    fill_next_token_bitmask_par(_EXECUTOR, [(g.matcher, row) for g, row in grammars], bitmask)


def apply_bitmask(logits, bitmask):
    """logits [S, V]; bitmask int32 [S, ceil(V / 32)] (bit i % 32 of word i // 32: token i
    allowed) -> logits with disallowed tokens at -inf. Runs inside the sampler's jit."""
    import jax.numpy as jnp

    V = logits.shape[-1]
    ids = jnp.arange(V, dtype=jnp.int32)
    words = bitmask[:, ids // 32]  # [S, V]
    allowed = (jnp.right_shift(words, ids % 32) & 1) == 1
    return jnp.where(allowed, logits, -jnp.inf)


def to_params(value: Any) -> StructuredOutputsParams | None:
    """A `StructuredOutputsParams`, or a dict of its fields, -> StructuredOutputsParams (None stays)."""
    if value is None or isinstance(value, StructuredOutputsParams):
        return value
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(FIELDS))
        if unknown:
            raise InvalidStructuredOutputError(f"structured outputs have no field(s) {unknown}; use one of {FIELDS}")
        return StructuredOutputsParams(**value)
    raise InvalidStructuredOutputError(
        f"structured_outputs must be a StructuredOutputsParams (or a dict of its fields), got {type(value).__name__}")
