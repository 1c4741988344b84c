"""The engine on the Pallas attention kernels gives the reference backend's greedy tokens.

On CPU the kernels run in interpret mode (tiny model); on a GPU the Triton kernel runs compiled.
"""

from __future__ import annotations

import pytest

from jaxinfer.testing.engine import assert_no_pages_held, make_engine, random_prompts, run
from pallas_kernels import ops
from tests.test_engine import GREEDY

# a decode-heavy mix: 1 token, page - 1, page, page + 1, several pages, longer than the step budget
LENGTHS = [1, 3, 4, 5, 12, 21]


@pytest.fixture(scope="module")
def tiny_and_reference_tokens(tmp_path_factory):
    from jaxinfer.loader import load_model
    from jaxinfer.testing import tiny_gguf

    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    tiny_gguf(path)
    model = load_model(str(path), progress=False)
    prompts = random_prompts(model.config, LENGTHS, seed=3)
    outs = run(make_engine(model, attention_backend="reference"), {str(i): (p, GREEDY) for i, p in enumerate(prompts)})
    return model, prompts, [outs[str(i)].outputs[0].token_ids for i in range(len(prompts))]


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
def test_pallas_backends_give_the_reference_tokens(tiny_and_reference_tokens, backend):
    model, prompts, want = tiny_and_reference_tokens
    engine = make_engine(model, attention_backend=backend)
    assert engine.runner.kv_cache.k.shape[-1] == ops.kv_cache_head_dim(model.config.head_dim, backend)
    outs = run(engine, {str(i): (p, GREEDY) for i, p in enumerate(prompts)})
    assert [outs[str(i)].outputs[0].token_ids for i in range(len(prompts))] == want
    assert engine.stats()["steps"] > 3  # mixed steps and decode-only steps both ran
    assert_no_pages_held(engine)


def test_backend_names_and_head_padding():
    assert ops.resolve_backend("auto", "cpu") == "reference"
    assert ops.resolve_backend("auto", "gpu") == "pallas_gpu" and ops.resolve_backend("pallas", "tpu") == "pallas_tpu"
    assert ops.resolve_backend("pallas", "cpu") == "pallas_gpu"  # interpret mode
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        ops.resolve_backend("flash")
    assert ops.kv_cache_head_dim(64, "pallas_tpu") == 128 and ops.kv_cache_head_dim(256, "pallas_tpu") == 256
    assert ops.kv_cache_head_dim(80, "pallas_gpu") == 128 and ops.kv_cache_head_dim(64, "reference") == 64
