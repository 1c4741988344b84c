"""orbax checkpoints: `jaxinfer convert` a GGUF, restore (sharded or not, on any mesh) to the same
weights, and the engine on the restored model gives the GGUF model's tokens and logprobs."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from flax import nnx

from checkpoints import orbax_io
from jaxinfer.cli import main as cli_main
from jaxinfer.errors import CheckpointError
from jaxinfer.loader import load_model
from jaxinfer.sampling_params import SamplingParams
from jaxinfer.testing import tiny_gguf
from jaxinfer.testing.engine import make_engine, random_prompts, run
from sharding.mesh import ParallelConfig, make_mesh

PARAMS = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, prompt_logprobs=5)


def _weights(params) -> dict:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("orbax")
    gguf = str(root / "tiny.gguf")
    tiny_gguf(gguf)
    assert cli_main(["convert", gguf, str(root / "ckpt")]) == 0
    return gguf, str(root / "ckpt")


def test_convert_then_load_gives_the_same_weights_and_outputs(converted):
    gguf, ckpt = converted
    assert sorted(os.listdir(ckpt)) == ["jaxinfer.json", "params", "tokenizer.json"]
    a, b = load_model(gguf, progress=False), load_model(ckpt, progress=False)
    assert b.config == a.config and b.path == ckpt
    wa, wb = _weights(a.params), _weights(b.params)
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    prompts = random_prompts(a.config, [3, 9, 14], seed=5)
    assert b.tokenizer.encode("hello world") == a.tokenizer.encode("hello world")
    outs = [run(make_engine(m), {str(i): (p, PARAMS) for i, p in enumerate(prompts)}) for m in (a, b)]
    for i in range(len(prompts)):
        ra, rb = outs[0][str(i)], outs[1][str(i)]
        assert ra.outputs[0].token_ids == rb.outputs[0].token_ids
        assert [{t: lp.logprob for t, lp in d.items()} for d in ra.prompt_logprobs[1:]] == \
               [{t: lp.logprob for t, lp in d.items()} for d in rb.prompt_logprobs[1:]]


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (virtual CPU devices)")
def test_restore_into_any_mesh_and_save_from_a_sharded_one(converted, tmp_path):
    _, ckpt = converted
    _, plain = orbax_io.restore(ckpt)
    mesh2 = make_mesh(ParallelConfig(tensor_parallel_size=2), jax.devices()[:2])
    cfg, sharded = orbax_io.restore(ckpt, mesh=mesh2)
    w_up = sharded["layers.w_up"]
    assert w_up.sharding.spec[-1] == "model" and w_up.addressable_shards[0].data.shape[-1] == cfg.intermediate_size // 2
    # Save from the (1, 1, 2)-sharded arrays, restore onto (1, 1, 4) and onto one device.
    tokenizer_meta = orbax_io.read_tokenizer_metadata(ckpt)
    again = orbax_io.save(tmp_path / "resaved", cfg, sharded, tokenizer_meta)
    mesh4 = make_mesh(ParallelConfig(tensor_parallel_size=4), jax.devices()[:4])
    _, on4 = orbax_io.restore(again, mesh=mesh4)
    _, on1 = orbax_io.restore(again)
    assert on4["layers.w_down"].sharding.spec[1] == "model" and len(on4["embed"].sharding.device_set) == 4
    for k in plain:
        np.testing.assert_array_equal(np.asarray(on4[k]), np.asarray(plain[k]))
        np.testing.assert_array_equal(np.asarray(on1[k]), np.asarray(plain[k]))


def test_cli_runs_a_converted_checkpoint(converted, capsys):
    _, ckpt = converted
    argv = ["generate", "hello", "--model", ckpt, "--max-tokens", "3", "--tensor-parallel-size", "1"]
    assert cli_main(argv) == 0
    assert f"loading {ckpt}" in capsys.readouterr().err


def test_bad_checkpoints_and_destinations_are_typed_errors(converted, tmp_path):
    gguf, ckpt = converted
    with pytest.raises(CheckpointError, match="not empty"):
        orbax_io.save(ckpt, *orbax_io.restore(ckpt), {})
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "jaxinfer.json").write_text('{"format": "something-else", "version": 1}')
    with pytest.raises(CheckpointError, match="convert the model again"):
        load_model(str(broken), progress=False)
    assert cli_main(["convert", gguf, ckpt]) == 2  # the CLI reports the error and exits 2


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (virtual CPU devices)")
def test_llm_restores_a_checkpoint_straight_onto_its_mesh(converted):
    from jaxinfer import LLM

    _, ckpt = converted
    kw = dict(warmup=False, progress=False, max_num_seqs=4, max_num_batched_tokens=16, page_size=4, num_pages=32,
              compilation_cache_dir="")
    prompt = {"prompt_token_ids": [5, 17, 42, 7, 99]}
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    want = LLM(ckpt, **kw).generate([prompt], params)[0].outputs[0].token_ids
    llm = LLM(ckpt, tensor_parallel_size=8, **kw)
    w_up = llm.engine.runner.params["layers"]["w_up"].get_value()
    assert len(w_up.sharding.device_set) == 8 and w_up.sharding.spec[-1] == "model"
    assert llm.generate([prompt], params)[0].outputs[0].token_ids == want
