"""The vLLM-shaped offline API on the real model."""

from __future__ import annotations

from jaxinfer import CompletionOutput, RequestOutput, SamplingParams


def test_generate_returns_request_outputs(smollm2):
    outs = smollm2.generate(["The capital of France is", {"prompt_token_ids": [504, 3575, 282]}],
                            SamplingParams(max_tokens=8, temperature=0))
    assert len(outs) == 2 and all(isinstance(o, RequestOutput) for o in outs)
    first = outs[0]
    assert first.prompt == "The capital of France is"
    assert first.prompt_token_ids == smollm2.get_tokenizer().encode("The capital of France is")
    completion = first.outputs[0]
    assert isinstance(completion, CompletionOutput)
    assert completion.text == smollm2.get_tokenizer().decode(completion.token_ids)
    assert "Paris" in completion.text
    assert completion.finish_reason in ("stop", "length")
    assert outs[1].prompt is None and outs[1].prompt_token_ids == [504, 3575, 282]


def test_chat_answers_and_stops_at_end_of_turn(smollm2):
    out = smollm2.chat([{"role": "user", "content": "What is the capital of France?"}],
                       SamplingParams(max_tokens=64, temperature=0))[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop" and out.token_ids[-1] == 2  # <|im_end|>
    assert "<|im_end|>" not in out.text


def test_stop_string_truncates_text(smollm2):
    base = smollm2.generate("1, 2, 3, 4,", SamplingParams(max_tokens=12, temperature=0))[0].outputs[0]
    assert " 6" in base.text
    out = smollm2.generate("1, 2, 3, 4,", SamplingParams(max_tokens=12, temperature=0, stop=[" 6"]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == " 6"
    assert out.text == base.text[: base.text.index(" 6")]
    assert len(out.token_ids) < len(base.token_ids)


def test_stop_token_ids_and_max_tokens(smollm2):
    base = smollm2.generate("Once upon a time", SamplingParams(max_tokens=6, temperature=0))[0].outputs[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 6
    stop_id = base.token_ids[2]
    out = smollm2.generate("Once upon a time", SamplingParams(max_tokens=6, temperature=0,
                                                              stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == base.token_ids[:3] and out.stop_reason == stop_id


def test_seeded_sampling_is_reproducible_and_varies_with_seed(smollm2):
    prompts = ["Write a word:"] * 3
    params = [SamplingParams(max_tokens=12, temperature=1.0, seed=s) for s in (1, 2, 1)]
    outs = [o.outputs[0].token_ids for o in smollm2.generate(prompts, params)]
    assert outs[0] == outs[2]
    again = smollm2.generate("Write a word:", SamplingParams(max_tokens=12, temperature=1.0, seed=1))
    assert again[0].outputs[0].token_ids == outs[0]
    assert outs[0] != outs[1]


def test_context_end_finishes_with_length(smollm2):
    from jaxinfer.engine import EngineConfig, LLMEngine

    runner = smollm2.engine.runner
    engine = LLMEngine(smollm2.config, runner.graphdef, runner.params, smollm2.get_tokenizer(),
                       EngineConfig.of(max_model_len=12, max_num_seqs=1, max_num_batched_tokens=16,
                                    compilation_cache_dir=""))
    engine.add_request("x", list(range(100, 110)), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    out = outs[-1].outputs[0]
    assert len(out.token_ids) == 2 and out.finish_reason == "length"

def test_engine_uses_a_persistent_compilation_cache(smollm2):
    import os

    import jax

    path = smollm2.compilation_cache_dir
    assert path and os.path.isdir(path) and jax.config.jax_compilation_cache_dir == path
