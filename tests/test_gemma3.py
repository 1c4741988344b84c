"""Gemma 3 270M (bundled GGUF) against HF transformers' Gemma 3 on the same file
(tests/fixtures/make_hf_reference.py): tokenizer, logits at every prompt position, and 32 greedy
tokens through the paged engine, with the reference attention and with the Pallas kernels in
interpret mode (the GPU kernel in `make test`; the TPU kernel's run takes 10 minutes and is marked
`long`). One prompt (1116 tokens) is longer than twice the 512-token window of the local layers."""

from __future__ import annotations

import pytest

from tests.hf_reference_checks import check_logits, check_tokenizer_cases, greedy, hf_greedy


def test_fixture_covers_the_window(gemma3, gemma3_hf_reference):
    meta, _ = gemma3_hf_reference
    prompts = meta["prompts"]
    assert len(prompts) >= 6 and {p["kind"] for p in prompts} == {"raw", "chat"}
    window = gemma3.config.sliding_window
    assert window == 512 and max(len(p["prompt_token_ids"]) for p in prompts) > 2 * window
    assert gemma3.config.layer_windows().count(None) == 3  # layers 5, 11, 17 are global
    assert gemma3.model_source == "GGUF file (gemma3)"


def test_tokenizer_matches_hf(gemma3, gemma3_hf_reference):
    check_tokenizer_cases(gemma3.get_tokenizer(), gemma3_hf_reference[0])


def test_chat_prompts_match_hf(gemma3, gemma3_hf_reference):
    meta, _ = gemma3_hf_reference
    tok = gemma3.get_tokenizer()
    assert tok.eos_token_ids == (1, 106)  # <eos>, and <end_of_turn> for chat
    for prompt in meta["prompts"]:
        if prompt["kind"] == "chat":
            text = tok.apply_chat_template(prompt["messages"], add_generation_prompt=True)
            assert text == prompt["text"]
            assert tok.encode(text, add_special_tokens=False) == prompt["prompt_token_ids"]
        else:
            assert tok.encode(prompt["text"]) == prompt["prompt_token_ids"]


def test_logits_match_hf_at_every_prompt_position(gemma3, gemma3_hf_reference):
    from jaxinfer.reference import ReferenceGenerator

    runner = gemma3.engine.runner
    reference = ReferenceGenerator(gemma3.config, runner.graphdef, runner.params, max_model_len=2048)
    check_logits(reference, *gemma3_hf_reference, vocab_size=gemma3.config.vocab_size)


def test_paged_engine_greedy_matches_hf(gemma3, gemma3_hf_reference):
    meta, _ = gemma3_hf_reference
    assert greedy(gemma3, meta) == hf_greedy(meta)


def test_paged_engine_greedy_matches_hf_on_the_gpu_kernel(gemma3_hf_reference):
    """The Pallas GPU kernel in interpret mode, scanned layers: each layer's window reaches the kernel
    as data (an SMEM/scalar input), not as a compile-time constant."""
    from jaxinfer import LLM

    meta, _ = gemma3_hf_reference
    llm = LLM("gemma3-270m", dtype="float32", scan_layers=True, progress=False, warmup=False,
              max_num_batched_tokens=256, max_model_len=2048, attention_backend="pallas_gpu", num_pages=192)
    assert greedy(llm, meta) == hf_greedy(meta)


@pytest.mark.long
def test_paged_engine_greedy_matches_hf_on_the_tpu_kernel(gemma3_hf_reference):
    """The Pallas TPU kernel in interpret mode, with unrolled layers (each layer's window and RoPE
    static). The interpreter copies the cache it is handed, so the pool is kept to the 192 pages
    these prompts need (110 MB). About 10 minutes on 2 CPU cores: the TPU interpreter emulates every
    DMA and semaphore, hence `long` (JAXINFER_LONG_TESTS=1)."""
    from jaxinfer import LLM

    meta, _ = gemma3_hf_reference
    llm = LLM("gemma3-270m", dtype="float32", scan_layers=False, progress=False, warmup=False,
              max_num_batched_tokens=256, max_model_len=2048, attention_backend="pallas_tpu", num_pages=192)
    assert greedy(llm, meta) == hf_greedy(meta)
