"""Checks of jaxinfer against the HF transformers fixtures (tests/fixtures/make_hf_reference.py),
shared by the GGUF and the HF-checkpoint routes."""

from __future__ import annotations

import numpy as np

from jaxinfer import SamplingParams

LOGIT_TOLERANCE = 1e-3  # float32


def _logsumexp(x):
    m = x.max(-1)
    return m + np.log(np.exp(x - m[:, None]).sum(-1))


def check_logits(reference, meta, arrays, vocab_size: int | None = None) -> float:
    """Logits of the reference generator at every position of every fixture prompt against HF's:
    within 1e-3 on the sampled columns, the top 16 and the log-sum-exp over the vocabulary, and the
    same argmax. Where the fixture records that HF's own float32 result is further than that from
    float64 (`p<i>_f32_error`: one position of Gemma's long prompt, 5.8e-3), twice HF's own error.
    Returns the largest error seen."""
    columns = arrays["columns"]
    worst = 0.0
    for i, prompt in enumerate(meta["prompts"]):
        logits = reference.logits(prompt["prompt_token_ids"])  # [T, V]
        assert logits.shape[0] == len(prompt["prompt_token_ids"]) and logits.shape[1] == (vocab_size or logits.shape[1])
        error = np.max([np.abs(logits[:, columns] - arrays[f"p{i}_sampled"]).max(-1),
                        np.abs(np.take_along_axis(logits, arrays[f"p{i}_top_ids"], -1)
                               - arrays[f"p{i}_top_values"]).max(-1),
                        np.abs(_logsumexp(logits) - arrays[f"p{i}_logsumexp"])], axis=0)  # [T]
        bound = np.full_like(error, LOGIT_TOLERANCE)
        if f"p{i}_f32_error" in arrays:
            bound = np.maximum(bound, 2 * arrays[f"p{i}_f32_error"])
            assert (bound > LOGIT_TOLERANCE).sum() <= 2, i  # the exception stays an exception
        assert (error <= bound).all(), (i, np.flatnonzero(error > bound), error.max())
        assert logits.argmax(-1).tolist() == arrays[f"p{i}_top_ids"][:, 0].tolist(), i
        worst = max(worst, float(error.max()))
    return worst


def check_tokenizer_cases(tok, meta) -> None:
    """At least 30 hard strings: HF's ids from encode, HF's text from decode (specials kept)."""
    cases = meta["tokenizer_cases"]
    assert len(cases) >= 30
    for case in cases:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
        assert tok.decode(case["ids"], skip_special_tokens=False) == case["decoded"], case["text"]


def greedy(llm, meta, max_tokens: int = 32) -> list[list[int]]:
    """32 greedy tokens for every fixture prompt, all in one engine batch."""
    prompts = [{"prompt_token_ids": p["prompt_token_ids"]} for p in meta["prompts"]]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    return [list(o.outputs[0].token_ids) for o in outputs]


def hf_greedy(meta) -> list[list[int]]:
    return [p["greedy_token_ids"] for p in meta["prompts"]]
