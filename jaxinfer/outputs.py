"""What the engine returns (the vLLM shapes)."""

from __future__ import annotations

import dataclasses

from jaxinfer.self_consistency import SelfConsistencyResult


@dataclasses.dataclass
class Logprob:
    """A token's log-probability under the model's raw distribution.

    Attributes:
      logprob: natural-log probability.
      rank: 1 for the most likely token (None when unknown).
      decoded_token: the token's text.
    """

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclasses.dataclass
class RequestMetrics:
    """Times (time.monotonic seconds) and counts of one request."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_drafts: int = 0  # speculative decoding: decode steps that verified drafts
    num_draft_tokens: int = 0  # drafts verified
    num_accepted_tokens: int = 0  # drafts accepted
    num_beam_tokens: int = 0  # beam search: tokens its beams computed (all beam_width of them, every step)

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens per verify step (the accepted drafts and the target's own token); None without drafts."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else None

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        """Mean time between tokens after the first (None with fewer than two tokens)."""
        if self.num_generation_tokens < 2 or self.last_token_time is None or self.first_token_time is None:
            return None
        return (self.last_token_time - self.first_token_time) / (self.num_generation_tokens - 1)

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclasses.dataclass
class CompletionOutput:
    """One generated continuation.

    Attributes:
      index: which of the request's n samples this is.
      text: generated text, special tokens and stop strings left out as the params say.
      token_ids: generated token ids (including a final EOS / stop token).
      finish_reason: "stop" (EOS, a stop token or a stop string), "length", "abort"; None while
        generating.
      stop_reason: the stop token id or stop string that ended it; None for EOS or length.
      logprobs: per generated token, {token id: Logprob} with the sampled token and the top ones
        (None unless asked for).
      cumulative_logprob: the sum of the sampled tokens' log-probabilities (set for best_of > n,
        whose choices are ranked by it or by its mean).
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    """A prompt and what was generated for it so far (`finished` once all samples are done).

    Attributes:
      prompt_logprobs: per prompt token, {token id: Logprob} (None for the first token); None
        unless asked for.
      self_consistency: with SamplingParams.self_consistency: the voted answer, the votes and what
        they cost; `outputs` are then the samples that voted.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    metrics: RequestMetrics | None = None
    self_consistency: SelfConsistencyResult | None = None  # the vote (SamplingParams.self_consistency)
