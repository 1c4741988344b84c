"""What the runner keeps of each request between its admission and its end (`CachedRequest`),
and how a SchedulerOutput changes it (`update_requests`), before the step's inputs are built.

A request's data (prompt, sampling params, seed) crosses from the scheduler once, when it is first
admitted (`SchedulerOutput.new_requests`); after that a step brings the pages its chunks were given,
preemptions (the page table empties: the request recomputes on new pages), beam forks (a beam takes
its parent's history and one token) and the ids that finished (dropped).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from jaxinfer.sampling_params import SamplingParams
from jaxinfer.scheduler_output import SchedulerOutput
from jaxinfer.structured_output import Grammar


@dataclasses.dataclass
class CachedRequest:
    """What the runner keeps of a request between its admission and its end, updated in place."""

    request_id: str
    token_ids: list[int]  # the prompt, then every token the runner sampled for it
    num_prompt_tokens: int
    params: SamplingParams
    seed: int
    block_ids: list[int] = dataclasses.field(default_factory=list)  # its page table (emptied on preemption)
    # structured outputs and / or a thinking budget (`reasoning.ThinkingBudget`): advanced by every token sampled
    grammar: Grammar | None = None
    # speculative method "draft": its first draft_len tokens are in the draft model's cache (`Drafter.track`)
    draft_len: int = 0

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


def update_requests(requests: dict[str, CachedRequest], out: SchedulerOutput, grammars=None,
                    eos_token_ids: Iterable[int] = ()) -> None:
    """Applies `out` to the runner's per-request state in place. grammars: the runner's
    `structured_output.GrammarCompiler`, which makes a new request's mask state (structured
    outputs, thinking budgets); None refuses such requests."""
    for rid in out.finished_ids:
        requests.pop(rid, None)
    for rid in out.preempted_ids:
        if rid in requests:
            requests[rid].block_ids = []  # recomputed later on new pages
            requests[rid].draft_len = 0
    for new in out.new_requests:
        p = new.sampling_params
        grammar = None
        if p.structured_outputs is not None or p.limits_thinking:
            if grammars is None:
                raise RuntimeError("a request with structured outputs or a thinking budget reached a runner "
                                   "without a GrammarCompiler")
            grammar = grammars.constraint(p, new.prompt_token_ids, tuple(eos_token_ids))
        requests[new.request_id] = CachedRequest(new.request_id, list(new.prompt_token_ids),
                                                 len(new.prompt_token_ids), new.sampling_params, new.seed,
                                                 grammar=grammar)
    for forks in out.beam_forks:  # beam search: all of a step's forks at once (parents are children too)
        if any(child not in requests for child, _, _ in forks):
            continue  # the search was aborted since (its beams are in finished_ids)
        parents = {parent: list(requests[parent].token_ids) for _, parent, _ in forks}
        for child, parent, token in forks:
            requests[child].token_ids = parents[parent] + [token]
            requests[child].block_ids = []  # its next chunk sends its whole page table
    for chunk in out.chunks:
        requests[chunk.request_id].block_ids += chunk.new_block_ids
