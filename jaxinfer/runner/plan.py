"""A SchedulerOutput -> the StepPlan the device runs (host arrays, `inputs`' builders per replica).

With data parallelism every replica's chunks are built alike and stacked: replica r owns rows
r * T.. of the tokens and r * S.. of the sampler's rows. A step that verifies drafts runs each
chunk's 1 + d tokens as rows (`buckets.verify_chunks`) and samples one row per sequence bucket.
"""

from __future__ import annotations

import numpy as np

from jaxinfer.runner.buckets import RunnerConfig, StepShape, bucket, verify_chunks
from jaxinfer.runner.inputs import (build_bitmask, build_model_input, build_sampling_input, build_verify_input,
                                    prompt_logprob_rows, stack_model_inputs, stack_sampling_inputs)
from jaxinfer.runner.requests import CachedRequest
from jaxinfer.runner.results import InFlightStep, StepPlan
from jaxinfer.scheduler_output import SchedulerOutput
from jaxinfer.speculative.tree import with_draft_trees


def build_plan(out: SchedulerOutput, requests: dict[str, CachedRequest], rc: RunnerConfig, shape: StepShape, V: int,
               eos_token_ids: tuple[int, ...], step: InFlightStep, pending: dict[str, int] | None = None, *,
               with_bitmask: bool = True) -> tuple[StepPlan, int]:
    """The plan of `out` (requests already updated by it) and its sampler's row count S; records in
    `step` which request samples in which row and whose prompt logprobs each prompt row is.

    Args:
      pending: request id -> its row in the step in flight's tokens (async scheduling: the token
        that step is sampling for it is read on the device, `inputs.build_model_input`).
      with_bitmask: build grammar masks now; False leaves them to the caller (they wait for the
        step in flight's tokens).
    """
    outs = getattr(out, "replicas", (out,))
    verifies = any(c.draft_token_ids for c in out.chunks)
    S = bucket(rc.seq_buckets, len(out.chunks), "sequences") if verifies else shape.S  # sampler rows
    inputs, sampling, rows, srcs = [], [], [], []
    for r, o in enumerate(outs):  # replica r owns rows r*T.. of the tokens and r*S.. of the sequences
        chunks = verify_chunks(o.chunks) if verifies else o.chunks  # (a verify step: one-token rows)
        inp, src = build_model_input(chunks, requests, shape, rc.page_size, rc.pages_per_item, pending,
                                     trees=rc.draft_tree)
        if verifies and rc.draft_tree:
            inp = with_draft_trees(inp, o.chunks)
        inputs.append(inp)
        srcs.append(src)
        si = build_sampling_input(o.chunks, requests, S, V, eos_token_ids)
        sampling.append(si.replace(bitmask=build_bitmask(o.chunks, requests, S, V)) if with_bitmask else si)
        rr, tt, oo = prompt_logprob_rows(o.chunks, requests)
        rows += [x + r * shape.T for x in rr]
        step.prompt_targets += tt
        step.prompt_owners += [(rid, pos, requests[rid].params.prompt_logprobs) for rid, pos in oo]
        step.rows.update({chunk.request_id: (requests[chunk.request_id], r * S + s)
                          for s, chunk in enumerate(o.chunks) if chunk.samples})
    if len(outs) == 1:
        model_input, sampling_input = inputs[0], sampling[0]
    else:
        if any(src is not None for src in srcs):
            raise RuntimeError("async scheduling runs on one data-parallel replica")
        model_input = stack_model_inputs(inputs, shape.T)
        sampling_input = stack_sampling_inputs(sampling, V)
    verify = None
    if verifies:
        if len(outs) != 1:
            raise RuntimeError("speculative decoding runs on one data-parallel replica")
        verify = build_verify_input(out.chunks, S, rc.num_speculative_tokens, trees=rc.draft_tree)
    plan = StepPlan(shape=shape, model_input=model_input, sampling_input=sampling_input,
                    prompt_rows=np.asarray(rows, np.int32),
                    prompt_targets=np.asarray(step.prompt_targets, np.int32), token_src=srcs[0], verify=verify)
    return plan, S
