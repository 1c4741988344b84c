"""The proposers behind `SpeculativeConfig.method`, seen by the runner through one function.

    "ngram"  prompt lookup on the host, from each request's own tokens (`ngram.propose_ngram`)
    "draft"  a smaller model of the same vocabulary on the device, k greedy decode steps in one
             graph once the step's tokens are known (`runner.steps.draft_propose_step`)
    "eagle"  a draft head on the device, run right after the sampler in the same dispatch
             (`eagle.propose` inside `runner.steps.propose_step`): its drafts [S, k] come back with
             the step's tokens, so proposing costs no host round trip of its own

`next_drafts` turns either into the next step's drafts per request. A model's drafts give way to
prompt lookup's where a suffix of at least `lookup_min` of the request's tokens recurs in it
(`lookup_in_place`, asked by the runner's `Drafter.proposals` before the draft model decodes: it
decodes nothing for such a request; the proposals are greedy either way, so verification treats
them alike).
"""

from __future__ import annotations

from jaxinfer.speculative.ngram import propose_ngram


class LookupDrafts(list):
    """Drafts prompt lookup proposed (method ngram's, or in place of a model's): the scheduler counts
    their verify steps apart (`spec_num_lookup_drafts` and its accepted tokens in engine stats)."""


class TreeDrafts(list):
    """A draft tree's tokens, node by node, and `parents` (node j's parent node, -1: the request's
    last token; `speculative.tree`): what an eagle head with `SpeculativeConfig.draft_tree` proposes."""

    def __init__(self, tokens, parents):
        super().__init__(tokens)
        self.parents = tuple(parents)


def proposes(request) -> bool:
    """Whether a request gets drafts: not while its sampling needs its token history per position
    (penalties, or min_tokens not reached: those change each position's distribution), nor with a
    grammar (each position's mask depends on the tokens before it)."""
    p = request.params
    return not p.needs_penalties and request.grammar is None \
        and len(request.token_ids) - request.num_prompt_tokens >= p.min_tokens


def lookup_in_place(spec, request) -> LookupDrafts | None:
    """Prompt lookup's drafts in place of a model's (methods draft and eagle): where a suffix of at
    least `spec.lookup_min` of the request's tokens recurs in them; None where none does (or
    lookup_min is None). The draft model decodes nothing for a request that has them."""
    if spec.lookup_min is None:
        return None
    found = propose_ngram(request.token_ids, spec.num_speculative_tokens, spec.lookup_min, spec.prompt_lookup_max)
    return LookupDrafts(found) if found else None


def next_drafts(spec, rows: dict, proposed: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """rows: request id -> (CachedRequest, its sampler row) of a collected step; proposed: request
    id -> the drafts the drafter proposed after that step (draft, eagle: a model's, or `LookupDrafts`
    in their place; None: ngram, proposed here) -> request id -> the drafts of every request that
    takes them."""
    drafts = {}
    for rid, (request, _) in rows.items():
        if not proposes(request):
            continue
        if proposed is not None:  # a model's drafts, or prompt lookup's in their place (`Drafter.proposals`)
            proposal = proposed.get(rid, [])
        else:
            proposal = LookupDrafts(propose_ngram(request.token_ids, spec.num_speculative_tokens,
                                                  spec.prompt_lookup_min, spec.prompt_lookup_max))
        if proposal:
            drafts[rid] = proposal
    return drafts
