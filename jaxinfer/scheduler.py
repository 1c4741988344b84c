"""Continuous batching with chunked prefill, on the host (no jax import).

Each step spends a token budget (`max_num_batched_tokens`): first on the running requests (one
token for each decode, the next chunk of each unfinished prefill), then on admitting waiting
requests, whose prompts may be cut into chunks. A long prompt therefore never stalls the decodes.

    running: [decode a][decode b][prefill c, chunk 2 of 3]   waiting: [d][e] ...
    budget:   1         1         256                         rest -> admit d (maybe a chunk)

When the page pool runs short, the most recently admitted running request is preempted: its pages
are freed and it goes back to the front of the queue to be recomputed later (its full pages usually
survive in the prefix cache). Nothing is lost. The result of a step is a `SchedulerOutput`, the only
thing the runner sees; `update` takes the sampled tokens back and applies the stop rules.

A chunk counts as computed when it is scheduled, and a chunk that samples leaves one *pending*
token, so step N + 1 can be scheduled before step N's tokens are back (async scheduling): a
running decode is scheduled on its pending token (the runner feeds it from the device), and
`update` later fills the token in, or ends the request (then step N + 1's work on it is dropped).

Beam search (`jaxinfer.beam_search`): a request's W beams are W requests that the search forks
after each step (`beam_scheduling.BeamScheduling`, this class's beam-search methods).
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from typing import Iterable, Mapping, Sequence

from jaxinfer.beam_scheduling import BeamScheduling
from jaxinfer.cache import KVCacheManager
from jaxinfer.request import Request, RequestStatus
from jaxinfer.scheduler_output import NewRequestData, RequestUpdate, ScheduledChunk, SchedulerOutput, SchedulerUpdate
from jaxinfer.speculative import SpeculativeConfig
from jaxinfer.speculative.proposers import LookupDrafts
from jaxinfer.speculative.scheduling import SpeculativeScheduling

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Attributes:
      max_num_seqs: most requests running at once (the decode batch bucket's upper end).
      max_num_batched_tokens: most tokens computed in one step (prefill chunks + decodes).
      max_model_len: context limit; a request reaching it finishes with "length".
      policy: "fcfs" (arrival order) or "priority" (lower `priority` first, then arrival).
      max_prefill_seqs: most requests given a multi-token chunk in one step (the attention
        handles single-token rows and prefill chunks separately and sizes the latter by it).
    """

    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    max_model_len: int = 8192
    policy: str = "fcfs"
    max_prefill_seqs: int = 4
    speculative: SpeculativeConfig | None = None

    @property
    def num_lookahead_tokens(self) -> int:
        """Slots reserved past each chunk's tokens: speculative method "draft" writes the keys of its
        k proposals there right after the step (`speculative.draft`)."""
        spec = self.speculative
        return spec.num_speculative_tokens if spec is not None and spec.method == "draft" else 0

    def __post_init__(self):
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0 or self.max_model_len <= 1 \
                or self.max_prefill_seqs <= 0:
            raise ValueError("max_num_seqs, max_num_batched_tokens, max_prefill_seqs must be > 0 and "
                             f"max_model_len > 1: {self}")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"policy must be 'fcfs' or 'priority', got {self.policy!r}")


class Scheduler(BeamScheduling, SpeculativeScheduling):
    """Decides, each step, which requests run and how many tokens each computes (beam search's
    forks: `beam_scheduling.BeamScheduling`; drafts to verify: `speculative.scheduling`)."""

    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager, *, eos_token_ids: Iterable[int] = ()):
        self.config = config
        self.kv = kv_manager
        self.eos_token_ids = frozenset(eos_token_ids)
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []  # sorted by _queue_key
        self.running: list[Request] = []  # admission order
        self.num_preemptions = 0
        # speculative decoding: decodes that verified drafts, drafts verified / accepted (per position)
        k = config.speculative.num_speculative_tokens if config.speculative is not None else 0
        self.spec_counts = dict(spec_num_drafts=0, spec_num_draft_tokens=0, spec_num_accepted_tokens=0,
                                spec_num_lookup_drafts=0, spec_num_lookup_draft_tokens=0,
                                spec_num_lookup_accepted_tokens=0)
        self.spec_proposed_by_position, self.spec_accepted_by_position = [0] * k, [0] * k
        self._finished_ids: list[str] = []  # ended since the last schedule (told to the runner)
        # beam search, since the last schedule: forked beams new to the runner, forks, page copies
        self._forked_new: list[NewRequestData] = []
        self._forks: list[tuple[tuple[str, str, int], ...]] = []
        self._page_copies: list[tuple[int, int]] = []
        self._beam_results: dict = {}  # finished searches, reported by the next update
        self.num_beam_forks = 0  # forks that kept their pages
        self.num_beam_page_copies = 0  # partial pages copied for them
        self.num_beam_shared_pages = 0  # pages a fork shares with its parent instead of recomputing

    # ---- queue --------------------------------------------------------------------------------

    def _queue_key(self, r: Request):
        if self.config.policy == "priority":
            return (r.priority, r.arrival_order)
        return (r.arrival_order,)

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        if request.dormant:
            return  # a beam waits for its fork (`_fork_beams`), not for admission
        bisect.insort(self.waiting, request, key=self._queue_key)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> bool:
        """Stops a request wherever it is and frees everything it holds. False if unknown/finished."""
        request = self.requests.get(request_id)
        if request is None or request.is_finished:
            return False
        self._finish(request, RequestStatus.FINISHED_ABORTED)
        return True

    def finish_request(self, request_id: str, status: RequestStatus, stop_reason=None) -> None:
        """Ends a request for a reason found outside the scheduler (e.g. a stop string)."""
        request = self.requests.get(request_id)
        if request is not None and not request.is_finished:
            request.stop_reason = stop_reason
            self._finish(request, status)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request)
        request.status = status
        del self.requests[request.request_id]
        if request.was_admitted:
            self._finished_ids.append(request.request_id)
        if request.beam is not None:  # a fork the runner has not heard of yet: it never will
            self._forked_new = [n for n in self._forked_new if n.request_id != request.request_id]

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.num_pages_sent = 0  # the runner drops its page table (`preempted_ids`)
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, request, key=self._queue_key)

    # ---- one step -----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        new: list[NewRequestData] = []
        prefills = 0  # chunks of more than one token
        speculate = self._speculates()

        # Running requests first, in admission order; preempt from the back when pages run out.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(self._num_to_compute(request), budget)
            drafts, parents = self._drafts(request, budget) if speculate and n == 1 else ((), ())
            n += len(drafts)
            if n <= 0:
                i += 1  # its step in flight ends it (max_tokens / the context): nothing more to compute
                continue
            if n > 1 and not drafts and prefills >= self.config.max_prefill_seqs:
                i += 1  # a prefill in progress waits a step for a prefill slot; decodes go on
                continue
            prefills += n > 1 and not drafts
            while self.kv.allocate_slots(request, n + self._lookahead(request.num_computed_tokens + n)) is None:
                victim = self._idle_beam(i + 1) or self.running[-1]  # (the ones before it keep their places)
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                chunks.append(self._chunk(request, request.num_computed_tokens, n, drafts, parents))
                budget -= n
                i += 1
                continue
            break  # the request itself was preempted: no pages left for anyone after it

        # Then admit waiting requests while budget, sequence slots and pages last. A beam that
        # reported before it was preempted is parked: the search has its candidates already.
        parked = 0
        while len(self.waiting) > parked and budget > 0 and not preempted:
            request = self.waiting[parked]
            if request.beam is not None and request.request_id in request.beam.reports:
                parked += 1
                continue
            if self._num_seq_slots() + self._slots_needed(request) > self.config.max_num_seqs:
                break
            if request.num_tokens > 1 and prefills >= self.config.max_prefill_seqs:
                break  # (checked before the prefix-cache lookup, which hashes the prompt)
            hits, num_cached = self.kv.get_computed_blocks(request)
            n = min(request.num_tokens + request.num_pending_tokens - num_cached, budget)
            while self.kv.allocate_slots(request, n + self._lookahead(num_cached + n), hits) is None:
                victim = self._idle_beam()  # a beam waiting for its search holds pages nobody uses now
                if victim is None:
                    break
                self._preempt(victim)
                preempted.append(victim.request_id)
            else:
                self._admit(request, num_cached, n, new, chunks)
                prefills += n > 1
                budget -= n
                continue
            break

        finished, self._finished_ids = tuple(self._finished_ids), []
        new = self._forked_new + new
        forks, copies = tuple(self._forks), tuple(self._page_copies)
        self._forked_new, self._forks, self._page_copies = [], [], []
        return SchedulerOutput(chunks=tuple(chunks), num_scheduled_tokens=self.config.max_num_batched_tokens - budget,
                               preempted_ids=tuple(preempted), new_requests=tuple(new), finished_ids=finished,
                               beam_forks=forks, page_copies=copies)

    def _admit(self, request: Request, num_cached: int, n: int, new: list, chunks: list) -> None:
        self.waiting.remove(request)
        request.num_computed_tokens = num_cached
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_cached
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        if not request.was_admitted:
            request.was_admitted = True
            new.append(NewRequestData(request.request_id, tuple(request.prompt_token_ids),
                                      request.sampling_params, request.seed))
        chunks.append(self._chunk(request, num_cached, n))

    def _num_to_compute(self, request: Request) -> int:
        """Tokens a running request has left to compute (its pending one included), or 0 when a
        step already in flight samples its last token (max_tokens or the context end)."""
        pending = request.num_pending_tokens
        if pending and request.beam is not None:
            return 0  # its candidates are not back: the search has not picked its next token yet
        if pending and (len(request.output_token_ids) + pending >= request.sampling_params.max_tokens
                        or request.num_tokens + pending >= self.config.max_model_len):
            return 0
        return request.num_tokens + pending - request.num_computed_tokens

    def _chunk(self, request: Request, start: int, n: int, drafts: tuple[int, ...] = (),
               parents: tuple[int, ...] = ()) -> ScheduledChunk:
        """The chunk of positions [start, start + n) (its last len(drafts) tokens drafts); counts them
        computed (and the sampled token pending) now, so the next step can be scheduled before this
        one's results are back (`update` moves it back past rejected drafts)."""
        pages = self.kv.get_block_ids(request.request_id)
        new_pages, request.num_pages_sent = tuple(pages[request.num_pages_sent:]), len(pages)
        samples = start + n - len(drafts) == request.num_tokens + request.num_pending_tokens
        request.num_computed_tokens = start + n
        request.num_pending_tokens += samples
        return ScheduledChunk(request_id=request.request_id, start_pos=start, num_tokens=n,
                              new_block_ids=new_pages, samples=samples, draft_token_ids=drafts, draft_parents=parents)

    def update(self, output: SchedulerOutput, sampled: Mapping[str, Sequence[int]],
               drafts: Mapping[str, Sequence[int]] | None = None,
               candidates: Mapping[str, Sequence[tuple[int, float]]] | None = None) -> SchedulerUpdate:
        """Applies a step's results: appends the sampled tokens (a request preempted since the step
        was scheduled keeps its token), finishes the requests they stop.

        Args:
          output: the SchedulerOutput the step ran (the oldest one not yet updated).
          sampled: request id -> the tokens it sampled (one for a chunk with `samples` set; with
            drafts, the accepted ones and the target's next token).
          drafts: request id -> the tokens proposed for its next step (speculative decoding).
          candidates: request id -> its top (token, log-probability) pairs (beam search's beams).

        Returns:
          Per request that ran: its new tokens and its status (finished ones already freed), and
          the beam searches that ended (`SchedulerUpdate.beams`).
        """
        updates = []
        for chunk in output.chunks:
            request = self.requests.get(chunk.request_id)
            if request is None:
                continue  # finished or aborted since it was scheduled: its results are dropped
            new_tokens, status, drafted, accepted = [], None, 0, 0
            if chunk.samples and request.beam is not None:  # candidates, not a token: the search picks
                self._beam_report(request, chunk, (candidates or {}).get(chunk.request_id))
                updates.append(RequestUpdate(request.request_id, [], request.status, None,
                                             max(0, request.num_cached_tokens)))
                continue
            if chunk.samples:
                request.num_pending_tokens -= 1
                tokens = sampled.get(chunk.request_id)
                if not tokens:  # nothing came back: compute the last position again next step
                    request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens - 1)
                elif chunk.draft_token_ids:  # rejected drafts' slots are computed again (overwritten)
                    drafted, accepted = len(chunk.draft_token_ids), len(tokens) - 1
                    request.num_computed_tokens -= drafted - accepted
                for token in tokens or ():
                    request.append_output_token(token)
                    new_tokens.append(token)
                    status = self._stop_status(request, token)
                    if status is not None:
                        self._finish(request, status)
                        break
                if drafted:  # drafts accepted past a stop token are not counted: they were not used
                    accepted = min(accepted, len(new_tokens))
                    self._count_drafts(request, drafted, accepted)
                if not request.is_finished:
                    proposed = (drafts or {}).get(chunk.request_id, ())
                    request.spec_token_ids = list(proposed)
                    request.spec_from_lookup = isinstance(proposed, LookupDrafts)
                    request.spec_parents = getattr(proposed, "parents", ())  # (`TreeDrafts`)
            updates.append(RequestUpdate(request.request_id, new_tokens, request.status, request.stop_reason,
                                         max(0, request.num_cached_tokens), drafted, accepted))
        beams, self._beam_results = self._beam_results, {}
        return SchedulerUpdate(updates, beams)

    def _stop_status(self, request: Request, token: int) -> RequestStatus | None:
        p = request.sampling_params
        if token in p.stop_token_ids:
            request.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if token in self.eos_token_ids and not p.ignore_eos:
            return RequestStatus.FINISHED_STOPPED
        if len(request.output_token_ids) >= p.max_tokens or request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    # ---- stats --------------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        return {"num_running": len(self.running), "num_waiting": len(self.waiting),
                "kv_pages_free": self.kv.num_free_blocks, "kv_usage": self.kv.usage,
                "beam_forks": self.num_beam_forks, "beam_page_copies": self.num_beam_page_copies,
                "beam_shared_pages": self.num_beam_shared_pages,
                "prefix_cache_hit_rate": self.kv.prefix_cache_hit_rate, "num_preemptions": self.num_preemptions,
                **self.spec_counts, "spec_proposed_by_position": list(self.spec_proposed_by_position),
                "spec_accepted_by_position": list(self.spec_accepted_by_position)}
