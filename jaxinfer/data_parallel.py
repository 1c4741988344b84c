"""Data parallelism: D replicas, each with its own KV pages and batch slice, under one scheduler.

    DataParallelScheduler                       one object the engine drives, like a Scheduler
      replica 0: Scheduler + KVCacheManager     pages 0..P-1 of replica 0's own pool
      replica 1: Scheduler + KVCacheManager     (local page ids; page 0 is each replica's null page)
      ...
    schedule() -> DataParallelOutput            every replica's chunks for this step

    Runner.execute (D > 1): every replica's chunks are packed with one common step shape
    (`runner.buckets.step_shape`) and concatenated (`runner.inputs.stack_*`), replica r owning
    the r-th slice of every array:

    tokens [1, D*T]    replica 0's T tokens | replica 1's T tokens | ...     (split over `data`)
    page table [D*S, W], kv_lens [D*S], cu_q_lens [D*(S+1)], num_seqs [D]   (local page ids)
    KV cache [L, D*P, page, K, H]                                            (pages over `data`)

Attention runs per (data, model) shard under shard_map, so a replica only ever reads its own pages;
everything else is per token and XLA splits it over `data`. A request stays on the replica it was
admitted to (the least loaded; the samples of an n > 1 request go with their first).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterable, Mapping, Sequence

from jaxinfer.cache import KVCacheManager
from jaxinfer.request import Request, RequestStatus
from jaxinfer.scheduler import Scheduler, SchedulerConfig
from jaxinfer.scheduler_output import SchedulerOutput, SchedulerUpdate


@dataclasses.dataclass(frozen=True)
class DataParallelOutput:
    replicas: tuple[SchedulerOutput, ...]

    @property
    def chunks(self):
        return tuple(c for out in self.replicas for c in out.chunks)

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(out.num_scheduled_tokens for out in self.replicas)

    @property
    def preempted_ids(self) -> tuple[str, ...]:
        return tuple(i for out in self.replicas for i in out.preempted_ids)

    @property
    def new_requests(self):
        return tuple(n for out in self.replicas for n in out.new_requests)

    @property
    def finished_ids(self) -> tuple[str, ...]:
        return tuple(i for out in self.replicas for i in out.finished_ids)

    @property
    def beam_forks(self):
        return tuple(f for out in self.replicas for f in out.beam_forks)

    @property
    def is_empty(self) -> bool:
        return all(out.is_empty for out in self.replicas)


class DataParallelScheduler:
    """D Schedulers, one per replica, behind the Scheduler interface."""

    def __init__(self, config: SchedulerConfig, kv_managers: list[KVCacheManager], *,
                 eos_token_ids: Iterable[int] = ()):
        self.config = config
        self.replicas = [Scheduler(config, kv, eos_token_ids=eos_token_ids) for kv in kv_managers]
        self.requests = collections.ChainMap(*[r.requests for r in self.replicas])
        self._replica_of: dict[str, int] = {}
        self._parent_of: dict[str, str] = {}
        self._groups: dict[str, list] = {}  # parent id of n > 1 samples -> [replica, live members]

    def _load(self, i: int) -> int:
        r = self.replicas[i]
        return len(r.running) + len(r.waiting)

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        group = request.parent_id  # n > 1 samples share their prompt's pages
        if group not in self._groups:
            self._groups[group] = [min(range(len(self.replicas)), key=self._load), 0]
        self._groups[group][1] += 1
        i = self._groups[group][0]
        self._replica_of[request.request_id] = i
        self._parent_of[request.request_id] = group
        self.replicas[i].add_request(request)

    def replica_of(self, request_id: str) -> int:
        return self._replica_of[request_id]

    def has_unfinished_requests(self) -> bool:
        return any(r.has_unfinished_requests() for r in self.replicas)

    def _forget(self, request_id: str) -> None:
        if request_id in self.requests or self._replica_of.pop(request_id, None) is None:
            return
        group = self._parent_of.pop(request_id)
        self._groups[group][1] -= 1
        if not self._groups[group][1]:
            del self._groups[group]

    def abort(self, request_id: str) -> bool:
        i = self._replica_of.get(request_id)
        done = i is not None and self.replicas[i].abort(request_id)
        self._forget(request_id)
        return done

    def finish_request(self, request_id: str, status: RequestStatus, stop_reason=None) -> None:
        i = self._replica_of.get(request_id)
        if i is not None:
            self.replicas[i].finish_request(request_id, status, stop_reason)
            self._forget(request_id)

    def schedule(self) -> DataParallelOutput:
        return DataParallelOutput(tuple(r.schedule() for r in self.replicas))

    def update(self, output: DataParallelOutput, sampled: Mapping[str, Sequence[int]],
               drafts: Mapping[str, Sequence[int]] | None = None, candidates=None) -> SchedulerUpdate:
        updates, beams = [], {}
        for replica, out in zip(self.replicas, output.replicas):
            u = replica.update(out, sampled, drafts, candidates)
            updates += u.requests
            beams.update(u.beams)
        for u in updates:
            if u.finished:
                self._forget(u.request_id)
        # (a beam search's beams end together in `update`, some without a step of their own)
        for rid in [r for r, parent in self._parent_of.items() if parent in beams]:
            self._forget(rid)
        return SchedulerUpdate(updates, beams)

    @property
    def num_preemptions(self) -> int:
        return sum(r.num_preemptions for r in self.replicas)

    def stats(self) -> dict[str, float]:
        per = [r.stats() for r in self.replicas]
        out = {k: sum(s[k] for s in per) for k in ("num_running", "num_waiting", "kv_pages_free", "num_preemptions")}
        out["kv_usage"] = sum(s["kv_usage"] for s in per) / len(per)
        hits = sum(r.kv.prefix_cache_hits for r in self.replicas)
        queries = sum(r.kv.prefix_cache_queries for r in self.replicas)
        out["prefix_cache_hit_rate"] = hits / queries if queries else 0.0  # by tokens, over all replicas
        return out
