"""A request's host-side state while the engine serves it (no jax import)."""

from __future__ import annotations

import enum
import itertools
import time
from typing import Sequence

from jaxinfer.sampling_params import SamplingParams

_arrival_counter = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, its pages freed; it will recompute
    FINISHED_STOPPED = "stop"  # EOS, a stop token or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or the context end
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


class Request:
    """Prompt, sampling parameters and progress of one request.

    Attributes:
      num_computed_tokens: tokens whose KV is in the cache once the steps scheduled so far have run
        (advanced when a chunk is scheduled, so the next step can be scheduled while this one runs).
      num_pending_tokens: tokens sampled by scheduled steps whose results have not come back yet
        (0 between synchronous steps; at most 1 with async scheduling).
      num_cached_tokens: prompt tokens found in the prefix cache when first scheduled (-1 before).
      stop_reason: the stop token id or stop string that finished it, if any.
      parent_id, sample_index: the request id the caller knows, and which of its n samples this is
        (a request with n = 1 is its own parent, sample 0).
    """

    def __init__(self, request_id: str, prompt_token_ids: Sequence[int], sampling_params: SamplingParams, *,
                 priority: int = 0, arrival_time: float | None = None, seed: int | None = None,
                 parent_id: str | None = None, sample_index: int = 0):
        self.request_id = request_id
        self.parent_id = request_id if parent_id is None else parent_id  # n > 1: the request it samples for
        self.sample_index = sample_index
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.priority = priority
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.arrival_order = next(_arrival_counter)  # ties broken by submission order
        self.output_token_ids: list[int] = []
        self._all_token_ids = list(self.prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_pending_tokens = 0
        self.num_pages_sent = 0  # its pages the runner has been told of (all of them since its admission)
        self.num_cached_tokens = -1
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.was_admitted = False  # its data went to the runner (NewRequestData)
        self.stop_reason: int | str | None = None
        self.spec_token_ids: list[int] = []  # speculative decoding: proposed for its next step
        self.spec_from_lookup = False  # ... by prompt lookup (`proposers.LookupDrafts`)
        self.spec_parents: tuple[int, ...] = ()  # ... as a draft tree (`proposers.TreeDrafts`); (): a chain
        self.num_draft_tokens = 0  # drafts it verified
        self.num_accepted_tokens = 0  # of which accepted
        # The sampling seed: the params' seed, else one the engine draws.
        self.seed = seed if seed is not None else (sampling_params.seed or 0)
        self.beam = None  # beam search: the request's `beam_search.BeamSearch`, shared by its beams

    @property
    def dormant(self) -> bool:
        """A beam the search has not forked yet (it waits outside the queue, holding nothing)."""
        return self.beam is not None and not self.was_admitted and self.request_id != self.beam.root_id

    def set_output(self, output_token_ids: Sequence[int]) -> None:
        """Replaces the generated tokens (beam search: a beam becomes a fork of another)."""
        self.output_token_ids = list(output_token_ids)
        self._all_token_ids = self.prompt_token_ids + self.output_token_ids

    @property
    def all_token_ids(self) -> list[int]:
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def skip_prefix_cache(self) -> bool:
        """Prompt logprobs need every prompt token's hidden state: no prefix-cache hits."""
        return self.sampling_params.prompt_logprobs is not None

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, prompt={self.num_prompt_tokens}, out={len(self.output_token_ids)}, "
                f"computed={self.num_computed_tokens}, pending={self.num_pending_tokens}, {self.status.value})")
