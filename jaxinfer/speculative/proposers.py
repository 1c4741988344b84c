"""The proposers behind `SpeculativeConfig.method`, seen by the runner through one function.

    "ngram"  prompt lookup on the host, from each request's own tokens (`ngram.propose_ngram`)
    "eagle"  a draft head on the device, run right after the sampler in the same dispatch
             (`eagle.propose` inside `runner.steps.propose_step`): its drafts [S, k] come back with
             the step's tokens, so proposing costs no host round trip of its own

`next_drafts` turns either into the next step's drafts per request.
"""

from __future__ import annotations

import numpy as np

from jaxinfer.speculative.ngram import propose_ngram


def proposes(request) -> bool:
    """Whether a request gets drafts: not while its sampling needs its token history per position
    (penalties, or min_tokens not reached: those change each position's distribution)."""
    p = request.params
    return not p.needs_penalties and len(request.token_ids) - request.num_prompt_tokens >= p.min_tokens


def next_drafts(spec, rows: dict, device_drafts: np.ndarray | None = None) -> dict[str, list[int]]:
    """rows: request id -> (CachedRequest, its sampler row) of a collected step; device_drafts
    [S, k] (eagle: the drafts proposed on the device after that step) -> request id -> drafts."""
    drafts = {}
    for rid, (request, s) in rows.items():
        if not proposes(request):
            continue
        if device_drafts is not None:
            proposal = device_drafts[s].tolist()
        else:
            proposal = propose_ngram(request.token_ids, spec.num_speculative_tokens, spec.prompt_lookup_min,
                                     spec.prompt_lookup_max)
        if proposal:
            drafts[rid] = proposal
    return drafts
