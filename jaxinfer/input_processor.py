"""Validation at the edge: every request is checked once, against the model, before it enters the
engine; the layers inside trust what passed.

    LLM.generate / chat ----\
    CLI (through LLM) -------+--> InputProcessor.process(ids, params) -> ProcessedPrompt --> LLMEngine
    server -> AsyncEngine --/      (typed errors: say what to change)                        (trusts it)

Checks: the prompt is a non-empty list of ints inside the vocabulary and shorter than the context;
the sampling parameters are a `SamplingParams` (which checks its own ranges when built; stop token
ids past the vocabulary are allowed and never match) whose structured-output spec, if any, compiles
against this model's vocabulary (`GrammarCompiler`), and whose beam width, if any, fits the engine
(`max_beam_width`). Pure and thread-safe: the server validates in the request's
thread, so a bad request never reaches the engine thread.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from jaxinfer.errors import EmptyPromptError, InvalidRequestError, PromptTooLongError
from jaxinfer.sampling_params import MAX_LOGPROBS, SamplingParams


@dataclasses.dataclass(frozen=True)
class ProcessedPrompt:
    """A prompt and its sampling parameters that passed an `InputProcessor`'s checks. An engine
    trusts one only if its own processor made it (`checked_by`); any other is checked again."""

    token_ids: tuple[int, ...]
    params: SamplingParams
    checked_by: object = dataclasses.field(default=None, compare=False, repr=False)


class InputProcessor:
    """Checks requests against one model's vocabulary and context.

    Args:
      vocab_size: token ids must be in [0, vocab_size).
      max_model_len: the engine's context; a prompt must leave room for one generated token.
      max_position_embeddings: the model's own limit (named in the error, as what the context can
        be raised to).
      grammars: compiles structured-output specs for this model (None: a request with one is refused).
      max_num_seqs, eos_token_ids: the engine's batch limit and end-of-sequence tokens (beam search).
    """

    def __init__(self, vocab_size: int, max_model_len: int, max_position_embeddings: int | None = None,
                 grammars=None, *, max_num_seqs: int | None = None, eos_token_ids: Sequence[int] = ()):
        self.grammars = grammars
        self.max_num_seqs = max_num_seqs
        self.eos_token_ids = tuple(eos_token_ids)
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_position_embeddings = max_position_embeddings or max_model_len

    def prompt(self, prompt_token_ids: Sequence[int], where: str = "prompt") -> tuple[int, ...]:
        """The prompt as a tuple of ints, or a typed error saying what to change."""
        if not isinstance(prompt_token_ids, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in prompt_token_ids):
            raise InvalidRequestError(f"{where}: prompt_token_ids must be a list of integers")
        if not prompt_token_ids:
            raise EmptyPromptError(f"{where} is empty; give at least one token of prompt")
        bad = [i for i in prompt_token_ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"{where}: token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"{where} has {len(prompt_token_ids)} tokens but the context window is {self.max_model_len}; "
                f"shorten it to at most {self.max_model_len - 1} tokens (or raise max_model_len, up to "
                f"{self.max_position_embeddings})")
        return tuple(prompt_token_ids)

    def params(self, params: SamplingParams) -> SamplingParams:
        """The sampling parameters, checked against the model."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if params.structured_outputs is not None:
            if self.grammars is None:
                raise InvalidRequestError("structured outputs need the model's tokenizer; this engine has none")
            self.grammars.compile(params.structured_outputs)
        if params.use_beam_search and params.beam_width > (limit := self.max_beam_width(params)):
            raise InvalidRequestError(
                f"beam_width={params.beam_width} is over this engine's maximum of {limit}: a request's beams run in "
                f"one batch (max_num_seqs={self.max_num_seqs}) and each beam returns its top "
                f"{self.candidates_per_beam(params)} x beam_width candidates, at most {MAX_LOGPROBS}; lower "
                "beam_width (or raise max_num_seqs)", "beam_width")
        return params

    def candidates_per_beam(self, params: SamplingParams) -> int:
        """Beam search keeps max(2, 1 + stop tokens) x beam_width candidates a step (HF's rule)."""
        return max(2, 1 + len(params.ending_token_ids(self.eos_token_ids)))

    def max_beam_width(self, params: SamplingParams) -> int:
        """The widest beam search this engine runs for `params`: its beams fit one batch, and every
        candidate comes from one beam's top MAX_LOGPROBS."""
        limit = MAX_LOGPROBS // self.candidates_per_beam(params)
        return limit if self.max_num_seqs is None else min(self.max_num_seqs, limit)

    def process(self, prompt_token_ids: Sequence[int], params: SamplingParams,
                where: str = "prompt") -> ProcessedPrompt:
        """Both checks: what `LLMEngine.add_request` accepts without checking again."""
        return ProcessedPrompt(self.prompt(prompt_token_ids, where), self.params(params), checked_by=self)

    def checked(self, prompt: ProcessedPrompt | Sequence[int], params: SamplingParams | None = None,
                where: str = "prompt") -> ProcessedPrompt:
        """`prompt` as a ProcessedPrompt this processor made: returned as is, or checked now (raw
        ids, or one another processor made). Params given beside a ProcessedPrompt must be its own."""
        if isinstance(prompt, ProcessedPrompt):
            if params is not None and params is not prompt.params:
                raise InvalidRequestError("a ProcessedPrompt carries its own sampling params: pass none beside it")
            if prompt.checked_by is self:
                return prompt
            prompt, params = list(prompt.token_ids), prompt.params
        return self.process(prompt, params, where)

    def seal(self, token_ids: tuple[int, ...], params: SamplingParams) -> ProcessedPrompt:
        """A ProcessedPrompt of ids the caller already passed through `prompt()` (a caller that
        needs the checked prompt before it can build the params, as the HTTP handler does)."""
        return ProcessedPrompt(tuple(token_ids), self.params(params), checked_by=self)
