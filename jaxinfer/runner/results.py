"""What a step is while it runs and what it gives back.

    StepPlan      the device part of a step as host arrays (what process 0 sends the others)
    InFlightStep  a dispatched step: its device outputs, which request sampled in which row
    StepResult    a collected step: sampled tokens (several a request when drafts held), logprobs,
                  prompt logprobs, the next step's drafts, timing
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxinfer.runner.buckets import StepShape
from jaxinfer.runner.inputs import HeadContextInput, ModelInput, SamplingInput, VerifyInput
from jaxinfer.runner.requests import CachedRequest
from jaxinfer.scheduler_output import SchedulerOutput


@dataclasses.dataclass
class SampledToken:
    token_id: int
    logprob: float | None = None  # under the raw distribution, when asked for
    top_logprobs: list[tuple[int, float]] | None = None  # best first


@dataclasses.dataclass
class PromptLogprob:
    position: int  # the prompt token this is the log-probability of
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]]


@dataclasses.dataclass
class StepResult:
    out: SchedulerOutput  # the step these are the results of
    sampled: dict[str, list[SampledToken]]  # one token a request, or (verified drafts) several
    prompt_logprobs: dict[str, list[PromptLogprob]]
    device_seconds: float = 0.0  # time waiting for the device (the rest of the step is host work)
    start_time: float = 0.0  # time.monotonic() when the step began
    draft_token_ids: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # proposed for the next step
    # beam search: a beam's top (token, log-probability) pairs, for the search to pick from
    candidates: dict[str, list[tuple[int, float]]] = dataclasses.field(default_factory=dict)

    @property
    def token_ids(self) -> dict[str, list[int]]:
        """Request id -> the tokens it sampled this step (what Scheduler.update takes)."""
        return {rid: [s.token_id for s in tokens] for rid, tokens in self.sampled.items()}


@dataclasses.dataclass
class StepPlan:
    """Everything the device part of a step needs (host numpy arrays): what process 0 sends to
    the others in a multi-host run."""

    shape: StepShape
    model_input: ModelInput
    sampling_input: SamplingInput
    prompt_rows: np.ndarray  # [R] int32 hidden-state rows whose next-token logprobs are wanted
    prompt_targets: np.ndarray  # [R] int32 the prompt token each row predicts
    token_src: np.ndarray | None = None  # [T] rows of the step in flight's tokens (async; -1: known)
    verify: VerifyInput | None = None  # speculative decoding: the step verifies drafts
    head_context: HeadContextInput | None = None  # eagle with a head that attends (`Drafter.context_input`)


@dataclasses.dataclass
class InFlightStep:
    """A dispatched step: its device outputs and which request sampled in which row."""

    out: SchedulerOutput
    start_time: float  # time.monotonic() when the step began
    tokens: jax.Array | None = None  # [P] sampled tokens, padded (resolve_tokens reads them); [S, K + 1] verifying
    num_accepted: jax.Array | None = None  # [S] drafts accepted per sequence (a verify step)
    drafts: jax.Array | None = None  # [S, k] the draft head's proposals for the next step (eagle)
    hidden: jax.Array | None = None  # [S, D] the sampler rows' hidden states (kept for `Runner.hidden_sink`)
    logprobs: tuple | None = None
    prompt_logprobs: tuple | None = None
    rows: dict[str, tuple[CachedRequest, int]] = dataclasses.field(default_factory=dict)  # samplers
    prompt_owners: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)  # (id, position, top n)
    prompt_targets: list[int] = dataclasses.field(default_factory=list)
    result: StepResult | None = None  # once collected


def sampled_tokens(rows: dict[str, tuple[CachedRequest, int]], tokens: np.ndarray, lps: list | None,
                   accepted: np.ndarray | None) -> dict[str, list[SampledToken]]:
    """A collected step's tokens by request: rows maps a request to its sampler row s; `tokens` is
    [S] (a sampling step) or [S, K + 1] with `accepted` [S] (a verify step: row s gave accepted[s]
    + 1 tokens); `lps` the (logprob, top ids, top logprobs) arrays of the same rows, each request's
    own top n kept."""
    if accepted is None:  # one token a row: seen as a verify step without drafts
        tokens, accepted = tokens[:, None], np.zeros(len(tokens), np.int64)
        lps = None if lps is None else [a[:, None] for a in lps]
    sampled = {}
    for rid, (request, s) in rows.items():
        n = request.params.logprobs
        results = []
        for j in range(int(accepted[s]) + 1):
            result = SampledToken(int(tokens[s, j]))
            if n is not None:
                result.logprob = float(lps[0][s, j])
                result.top_logprobs = [(int(i), float(v)) for i, v in zip(lps[1][s, j, :n], lps[2][s, j, :n])]
            results.append(result)
        sampled[rid] = results
    return sampled


def prompt_logprobs(owners: list[tuple[str, int, int]], targets: list[int],
                    prompt_lps: list | None) -> dict[str, list[PromptLogprob]]:
    """A collected step's prompt logprobs by request: row r is owners[r] = (request id, position,
    top n) predicting targets[r]."""
    prompt = {}
    for r, ((rid, pos, n), target) in enumerate(zip(owners, targets)):
        prompt.setdefault(rid, []).append(PromptLogprob(
            pos, target, float(prompt_lps[0][r]),
            [(int(i), float(v)) for i, v in zip(prompt_lps[1][r, :n], prompt_lps[2][r, :n])]))
    return prompt
