"""jaxinfer vs HF transformers on the same GGUF (fixture made by tests/fixtures/make_hf_reference.py)."""

from __future__ import annotations

import numpy as np

from jaxinfer import SamplingParams
from tests.hf_reference_checks import LOGIT_TOLERANCE, check_logits



def test_fixture_covers_raw_and_chat_prompts(hf_reference):
    meta, _ = hf_reference
    kinds = [p["kind"] for p in meta["prompts"]]
    assert len(kinds) >= 8 and "raw" in kinds and "chat" in kinds
    assert all(len(p["greedy_token_ids"]) == 32 for p in meta["prompts"])


def test_logits_match_hf_at_every_prompt_position(smollm2, smollm2_reference, hf_reference):
    check_logits(smollm2_reference, *hf_reference, vocab_size=smollm2.config.vocab_size)


def test_engine_prompt_logprobs_match_hf(smollm2, hf_reference):
    """The paged engine's log-probabilities (prompt_logprobs, top 16) against HF's logits."""
    meta, arrays = hf_reference
    prompts = [{"prompt_token_ids": p["prompt_token_ids"]} for p in meta["prompts"]]
    outs = smollm2.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=16))
    for i, (out, prompt) in enumerate(zip(outs, meta["prompts"])):
        hf_logprobs = arrays[f"p{i}_top_values"] - arrays[f"p{i}_logsumexp"][:, None]  # [T, 16]
        for pos in range(1, len(prompt["prompt_token_ids"])):
            entry = out.prompt_logprobs[pos]  # predicted at position pos - 1
            ids = arrays[f"p{i}_top_ids"][pos - 1]
            got = np.array([entry[int(t)].logprob if int(t) in entry else np.nan for t in ids])
            assert np.nanmax(np.abs(got - hf_logprobs[pos - 1])) <= LOGIT_TOLERANCE, (i, pos)
            assert np.isnan(got).sum() <= 1  # ties at the 16th place aside, the same top 16


def test_greedy_continuations_match_hf_in_one_batch(smollm2, hf_reference):
    meta, _ = hf_reference
    prompts = [{"prompt_token_ids": p["prompt_token_ids"]} for p in meta["prompts"]]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    outputs = smollm2.generate(prompts, params)  # all prompts padded into one batch
    for out, prompt in zip(outputs, meta["prompts"]):
        assert out.outputs[0].token_ids == prompt["greedy_token_ids"]
        assert out.outputs[0].finish_reason == "length"


def test_greedy_continuation_alone_matches_hf(smollm2, hf_reference):
    meta, _ = hf_reference
    prompt = meta["prompts"][-1]  # the longest, chat-templated
    out = smollm2.generate({"prompt_token_ids": prompt["prompt_token_ids"]},
                           SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    assert out[0].outputs[0].token_ids == prompt["greedy_token_ids"]
