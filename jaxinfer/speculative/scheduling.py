"""Speculative decoding's share of scheduling (`SpeculativeScheduling`, a part of
`scheduler.Scheduler`).

A decode verifies its drafts (proposed after its last step, `Request.spec_token_ids`) only in a step
without prefill chunks: a verify step is shaped for decodes, 1 + k tokens a sequence. Its drafts
are cut to what max_tokens, the context and the token budget leave, and dropped for good once a
request's acceptance shows they do not pay (`SpeculativeConfig.min_acceptance`). Speculative
method "draft" writes the keys of its k proposals past each chunk, so those slots are reserved
(`_lookahead`). `update` counts what was drafted and accepted, per request and per position.
"""

from __future__ import annotations

from jaxinfer.request import Request
from jaxinfer.speculative import tree


class SpeculativeScheduling:
    """The Scheduler's speculative-decoding methods; they use its config, running and waiting
    queues and draft counters."""

    def _lookahead(self, end: int) -> int:
        """Slots to reserve past position `end` (`SchedulerConfig.num_lookahead_tokens`), within the context."""
        return max(0, min(self.config.num_lookahead_tokens, self.config.max_model_len - end))

    def _speculates(self) -> bool:
        """Whether this step's decodes verify drafts: only in steps without prefill chunks (a verify
        step is shaped for decodes: 1 + k tokens a sequence), so not while a running request is still
        prefilling or a waiting one could be admitted, and not above the batch size where
        speculation stops paying (`SpeculativeConfig.disable_by_batch_size`)."""
        spec = self.config.speculative
        if spec is None or not self.running:
            return False
        if not spec.drafts_at(len(self.running)):
            return False
        if self.waiting and len(self.running) < self.config.max_num_seqs:
            return False
        return all(r.num_tokens + r.num_pending_tokens - r.num_computed_tokens <= 1 for r in self.running)

    def _drafts(self, request: Request, budget: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The drafts a decode verifies this step and their tree's parents ((): a chain): its proposed
        tokens, cut so the step's tokens stay within max_tokens, the context and the token budget (a
        tree: its nodes at most that deep, `tree.trim`)."""
        spec = self.config.speculative
        if not request.spec_token_ids or request.beam is not None:
            return (), ()
        if (spec.min_acceptance > 0 and request.num_draft_tokens >= spec.probe_drafts
                and request.num_accepted_tokens < spec.min_acceptance * request.num_draft_tokens):
            return (), ()  # its drafts do not pay: it decodes plainly from now on
        room = max(0, min(request.sampling_params.max_tokens - len(request.output_token_ids),
                          self.config.max_model_len - request.num_tokens, budget) - 1)
        if request.spec_parents:  # nodes at most `room` deep, and at most `room` rows (the first: parents first)
            tokens, parents = tree.trim(request.spec_token_ids, request.spec_parents, room)
            return tokens[:room], parents[:room]
        return tuple(request.spec_token_ids[:room]), ()

    def _count_drafts(self, request: Request, drafted: int, accepted: int) -> None:
        request.num_draft_tokens += drafted
        request.num_accepted_tokens += accepted
        c = self.spec_counts
        c["spec_num_drafts"] += 1
        c["spec_num_draft_tokens"] += drafted
        c["spec_num_accepted_tokens"] += accepted
        if request.spec_from_lookup:  # prompt lookup's drafts (method ngram, or lookup_min's)
            c["spec_num_lookup_drafts"] += 1
            c["spec_num_lookup_draft_tokens"] += drafted
            c["spec_num_lookup_accepted_tokens"] += accepted
        for j in range(drafted):
            self.spec_proposed_by_position[j] += 1
            self.spec_accepted_by_position[j] += j < accepted
