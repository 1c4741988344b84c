"""What the scheduler hands out each step and takes back (host only, no jax import).

    SchedulerOutput   the only thing the runner sees of a step: ScheduledChunks (positions, new
                      pages, drafts to verify), NewRequestData (sent once), preempted / finished ids,
                      beam search's forks and the page copies they need
    SchedulerUpdate   what `Scheduler.update` applied: a RequestUpdate per request that ran (new
                      tokens, finish status, drafts verified / accepted), beam searches that ended
"""

from __future__ import annotations

import dataclasses

from jaxinfer.request import RequestStatus
from jaxinfer.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class ScheduledChunk:
    """Tokens of one request to compute this step: positions [start_pos, start_pos + num_tokens).

    The runner knows the tokens themselves (the prompt came once, the rest it sampled) and the
    request's pages (the chunk adds the ones allocated since it last heard)."""

    request_id: str
    start_pos: int  # position of the first token (= tokens already computed)
    num_tokens: int
    new_block_ids: tuple[int, ...]  # pages appended to the request's page table (all of them after (re)admission)
    samples: bool  # the chunk reaches the end of the request's tokens: sample the next one
    # speculative decoding: proposed tokens after the request's last one, the chunk's last
    # len(draft_token_ids) tokens; the step verifies them (num_tokens counts them)
    draft_token_ids: tuple[int, ...] = ()
    draft_parents: tuple[int, ...] = ()  # a draft tree's (`speculative.tree.parents_of`); (): a chain


@dataclasses.dataclass(frozen=True)
class NewRequestData:
    """A request's data, sent to the runner once, in the step that first admits it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling_params: SamplingParams
    seed: int


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    """The only thing the runner sees of a step.

    Attributes:
      chunks: what each scheduled request computes.
      num_scheduled_tokens: tokens of all chunks.
      preempted_ids: requests preempted in this step (they recompute later; the runner keeps them).
      new_requests: data of the requests admitted for the first time in this step.
      finished_ids: requests that ended since the previous step (the runner forgets them).
      beam_forks: beam search's forks since the previous step, one tuple per search step, each
        (child id, parent id, token): the child's tokens become the parent's plus the token (all
        of a tuple at once), and its page table is sent again whole with its next chunk.
      page_copies: (source page, destination page) to copy on the device before this step runs.
    """

    chunks: tuple[ScheduledChunk, ...]
    num_scheduled_tokens: int
    preempted_ids: tuple[str, ...] = ()
    new_requests: tuple[NewRequestData, ...] = ()
    finished_ids: tuple[str, ...] = ()
    beam_forks: tuple[tuple[tuple[str, str, int], ...], ...] = ()
    page_copies: tuple[tuple[int, int], ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclasses.dataclass
class RequestUpdate:
    """What one request got in a step: its new tokens (a list: a step may add several) and, if it
    ended, why (`RequestStatus.FINISHED_*`) and what stopped it (a stop token id)."""

    request_id: str
    new_token_ids: list[int]
    status: RequestStatus
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0  # prompt tokens its first admission found in the prefix cache
    num_draft_tokens: int = 0  # speculative decoding: drafts it verified this step
    num_accepted_tokens: int = 0  # of which accepted

    @property
    def finished(self) -> bool:
        return self.status.is_finished


@dataclasses.dataclass
class SchedulerUpdate:
    """The typed result of `Scheduler.update`: one entry per request that ran a chunk."""

    requests: list[RequestUpdate]
    beams: dict = dataclasses.field(default_factory=dict)  # request id -> its `BeamSearchResult` (ended)

    @property
    def finished(self) -> list[RequestUpdate]:
        return [r for r in self.requests if r.finished]
