"""Data parallelism: D replicas, each with its own KV pages and batch slice, under one scheduler.

    DataParallelScheduler                       one object the engine drives, like a Scheduler
      replica 0: Scheduler + KVCacheManager     pages 0..P-1 of replica 0's own pool
      replica 1: Scheduler + KVCacheManager     (local page ids; page 0 is each replica's null page)
      ...
    schedule() -> DataParallelOutput            every replica's chunks for this step

    Runner.execute (D > 1): every replica's chunks are packed with one common step shape
    (`Runner.step_shape`) and concatenated, replica r owning the r-th slice of every array:

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
from typing import Iterable, Mapping

import numpy as np

from jaxinfer.cache import KVCacheManager
from jaxinfer.request import Request, RequestStatus
from jaxinfer.scheduler import Scheduler, SchedulerConfig, SchedulerOutput


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
        self._groups: dict[str, list] = {}  # "id" of "id#i" samples -> [replica, live members]

    def _load(self, i: int) -> int:
        r = self.replicas[i]
        return len(r.running) + len(r.waiting)

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        group = request.request_id.split("#", 1)[0]  # n > 1 samples share their prompt's pages
        if group not in self._groups:
            self._groups[group] = [min(range(len(self.replicas)), key=self._load), 0]
        self._groups[group][1] += 1
        i = self._groups[group][0]
        self._replica_of[request.request_id] = i
        self.replicas[i].add_request(request)

    def replica_of(self, request_id: str) -> int:
        return self._replica_of[request_id]

    def has_unfinished_requests(self) -> bool:
        return any(r.has_unfinished_requests() for r in self.replicas)

    def _forget(self, request_id: str) -> None:
        if request_id in self.requests or self._replica_of.pop(request_id, None) is None:
            return
        group = request_id.split("#", 1)[0]
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

    def update(self, output: DataParallelOutput, sampled: Mapping[str, int]) -> list[Request]:
        finished = []
        for replica, out in zip(self.replicas, output.replicas):
            finished += replica.update(out, sampled)
        for request in finished:
            self._forget(request.request_id)
        return finished

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


# ---- packing the replicas' steps into one (used by Runner.execute) -------------------------------

def _cat(arrays, axis=0):
    return np.concatenate([np.asarray(a) for a in arrays], axis=axis)


def stack_model_inputs(inputs, T: int):
    """Per-replica ModelInputs of one shape -> one, replica r in the r-th slice of every array."""
    from jaxinfer.paged_attention import DecodeItems, PagedAttentionMeta
    from jaxinfer.runner import ModelInput

    metas = [m.meta for m in inputs]
    items = None
    if metas[0].decode_items is not None:
        items = DecodeItems(seq=_cat([m.decode_items.seq for m in metas]),
                            page=_cat([m.decode_items.page for m in metas]),
                            pos=_cat([m.decode_items.pos for m in metas]))
    meta = PagedAttentionMeta(slot_mapping=_cat([m.slot_mapping for m in metas]),
                              kv_lens=_cat([m.kv_lens for m in metas]), page_table=_cat([m.page_table for m in metas]),
                              cu_q_lens=_cat([m.cu_q_lens for m in metas]),
                              num_seqs=np.asarray([m.num_seqs for m in metas], np.int32), decode_items=items)
    return ModelInput(tokens=_cat([m.tokens for m in inputs], axis=1),
                      positions=_cat([m.positions for m in inputs], axis=1), meta=meta,
                      logits_indices=_cat([m.logits_indices + r * T for r, m in enumerate(inputs)]))


def stack_sampling_inputs(inputs, vocab_size: int):
    """Per-replica SamplingInputs -> one (penalties everywhere if any replica needs them)."""
    from jaxinfer.runner import Penalties, SamplingInput

    penalties = None
    if any(s.penalties is not None for s in inputs):
        def neutral(S):
            return Penalties(seen=np.zeros((S, vocab_size), bool),
                             output_counts=np.zeros((S, vocab_size), np.float32),
                             repetition=np.ones(S, np.float32), presence=np.zeros(S, np.float32),
                             frequency=np.zeros(S, np.float32), suppress=np.zeros((S, vocab_size), bool))
        parts = [s.penalties or neutral(len(s.temperature)) for s in inputs]
        penalties = Penalties(**{f.name: _cat([getattr(p, f.name) for p in parts])
                                 for f in dataclasses.fields(Penalties)})
    fields = ("temperature", "top_k", "top_p", "min_p", "seeds", "num_generated")
    return SamplingInput(**{f: _cat([getattr(s, f) for s in inputs]) for f in fields}, penalties=penalties,
                         num_logprobs=max(s.num_logprobs for s in inputs))
