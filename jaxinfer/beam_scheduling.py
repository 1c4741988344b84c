"""Beam search's share of scheduling (`BeamScheduling`, a part of `scheduler.Scheduler`).

A request's W beams are W scheduler requests sharing one `beam_search.BeamSearch`. Its first beam
computes the prompt; the others wait outside the queue (dormant, `Request.dormant`) until the
search forks them. A beam's step returns candidates, not a token: `update` hands them to
`_beam_report`, and once every running beam reported, `_beam_step` lets the search pick the W
continuations and `_fork_beams` makes each beam a fork of its parent (`KVCacheManager.fork`:
shared pages, the last partial page copied on the device, `SchedulerOutput.page_copies`; its tokens
in `SchedulerOutput.beam_forks`), or ends the search (`SchedulerUpdate.beams`).

Slots and preemption: a request in beam search holds W sequence slots from its admission
(`_num_seq_slots`), so its forks always find room and half-admitted searches cannot deadlock; a
beam that reported waits for its search holding pages nobody uses, so it is the first preemption
victim (`_idle_beam`) and, preempted, it stays parked (the search keeps its candidates). A beam
with a step in flight is not scheduled again (async scheduling) until its candidates are back.
"""

from __future__ import annotations

import bisect

from jaxinfer.request import Request, RequestStatus
from jaxinfer.scheduler_output import NewRequestData, ScheduledChunk


class BeamScheduling:
    """The Scheduler's beam-search methods; they use its requests, queues, page manager and the
    forks / copies it hands the runner with the next SchedulerOutput."""

    def _num_seq_slots(self) -> int:
        """Sequence slots held by the running requests: one each, a beam search W (all its beams)."""
        searches = {id(r.beam): r.beam.width for r in self.running if r.beam is not None}
        return sum(r.beam is None for r in self.running) + sum(searches.values())

    def _slots_needed(self, request: Request) -> int:
        if request.beam is None:
            return 1
        return 0 if any(r.beam is request.beam for r in self.running) else request.beam.width

    def _idle_beam(self, start: int = 0) -> Request | None:
        """The most recently admitted running beam (from running[start] on) that waits for its search
        (its candidates are in)."""
        for request in reversed(self.running[start:]):
            if request.beam is not None and request.request_id in request.beam.reports:
                return request
        return None

    def _beam_report(self, request: Request, chunk: ScheduledChunk, top) -> None:
        """A beam's step came back with its candidates. A step that a fork overtook (the beam was
        recomputing when the search moved on) reports for tokens it no longer has: dropped."""
        search = request.beam
        request.num_pending_tokens = max(0, request.num_pending_tokens - 1)
        current = (chunk.start_pos + chunk.num_tokens == request.num_prompt_tokens + search.length
                   and request.request_id in search.running_ids)
        if not top:  # nothing came back: compute the last position again next step
            if current:
                request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens - 1)
            return
        if current:
            search.report(request.request_id, top)
            if search.ready:
                self._beam_step(search)

    def _beam_step(self, search) -> None:
        """Every running beam of `search` reported: pick the next beams, fork them, or finish."""
        forks, done = search.select()
        beams = [self.requests[rid] for rid in search.beam_ids if rid in self.requests]
        if done:
            for beam in beams:
                self._finish(beam, RequestStatus.FINISHED_STOPPED)
            self._beam_results[search.request_id] = search.result()
            return
        self._fork_beams(forks)

    def _fork_beams(self, forks: list[tuple[str, str, int]]) -> None:
        """Each child beam becomes its parent's tokens plus its token. Children of a parent whose KV is
        all in its pages take the pages (`KVCacheManager.fork`); the others (a parent preempted since
        it reported, or no pages for the copies) recompute, like a preempted request."""
        parents = {p: self.requests[p] for _, p, _ in forks}
        tokens = {p: list(r.output_token_ids) for p, r in parents.items()}
        paged = {p for p, r in parents.items()
                 if r.status == RequestStatus.RUNNING and r.num_computed_tokens == r.num_tokens}
        computed = {p: parents[p].num_computed_tokens for p in paged}
        keep = [(c, p, computed[p]) for c, p, _ in forks if p in paged]
        copies = self.kv.fork(keep) if keep else []
        if copies is None:
            keep, paged = [], set()
        else:
            self._page_copies += copies
            self.num_beam_page_copies += len(copies)
            self.num_beam_forks += len(keep)
            self.num_beam_shared_pages += sum(n // self.kv.page_size for _, _, n in keep)
        kept = {c for c, _, _ in keep}
        for child_id, _, _ in forks:  # (before their tokens change: free registers full pages by them)
            if child_id not in kept:
                self.kv.free(self.requests[child_id])
        for child_id, parent_id, token in forks:
            child = self.requests[child_id]
            if child.dormant:
                child.was_admitted = True
                self._forked_new.append(NewRequestData(child_id, tuple(child.prompt_token_ids), child.sampling_params,
                                                       child.seed))
            child.set_output(tokens[parent_id] + [token])
            child.num_pending_tokens = 0
            child.spec_token_ids = []
            child.num_pages_sent = 0  # the runner takes its whole page table again
            if child in self.waiting:
                self.waiting.remove(child)
            if parent_id in paged:
                child.num_computed_tokens = computed[parent_id]
                child.status = RequestStatus.RUNNING
                if child not in self.running:
                    self.running.append(child)
            else:  # recomputed from its tokens (the prefix cache holds most of them)
                if child in self.running:
                    self.running.remove(child)
                child.num_computed_tokens = 0
                child.status = RequestStatus.PREEMPTED
                bisect.insort(self.waiting, child, key=self._queue_key)
        self._forks.append(tuple(forks))
