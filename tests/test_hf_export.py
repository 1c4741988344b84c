"""The HF-checkpoint route on real weights nobody here wrote: transformers loads each bundled GGUF and
saves it as a standard HF checkpoint (config.json, float32 model.safetensors, tokenizer files;
`export_hf_directory` in tests/fixtures/make_hf_reference.py). jaxinfer's HF loader reads that
directory, and its logits and 32 greedy tokens on every fixture prompt must be transformers' own."""

from __future__ import annotations

import os
import sys

import pytest

from tests.hf_reference_checks import check_logits, greedy, hf_greedy

pytest.importorskip("torch")
pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def exported(request, tmp_path_factory):
    from make_hf_reference import export_hf_directory

    name = request.param
    path = export_hf_directory(name, str(tmp_path_factory.mktemp(f"{name}-hf")))
    return name, path, request.getfixturevalue(f"{'hf' if name == 'smollm2' else 'gemma3_hf'}_reference")


def test_the_export_is_a_plain_hf_checkpoint(exported):
    from checkpoints.hf import HFCheckpoint, is_hf_directory

    name, path, _ = exported
    assert is_hf_directory(path)
    files = set(os.listdir(path))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    cfg = HFCheckpoint(path).model_config()
    assert cfg.arch == {"smollm2": "llama", "gemma3": "gemma3"}[name]


def test_hf_directory_matches_transformers(exported):
    """Through `LLM(model=<HF dir>)`: the tokenizer from tokenizer.json, the weights streamed onto the
    device, HF's logits at every position (reference generator on the loaded weights) and HF's
    greedy tokens from the paged engine."""
    from jaxinfer import LLM
    from jaxinfer.reference import ReferenceGenerator

    name, path, (meta, arrays) = exported
    llm = LLM(path, dtype="float32", scan_layers=True, progress=False, warmup=False, max_num_batched_tokens=256,
              max_model_len=2048, num_pages=192)
    assert llm.model_source == {"smollm2": "HF checkpoint (LlamaForCausalLM)",
                                "gemma3": "HF checkpoint (Gemma3ForCausalLM)"}[name]
    tok = llm.get_tokenizer()
    for prompt in meta["prompts"]:
        if prompt["kind"] == "raw":
            assert tok.encode(prompt["text"]) == prompt["prompt_token_ids"]
        else:
            assert llm.chat_prompts([prompt["messages"]])[0]["prompt_token_ids"] == prompt["prompt_token_ids"]
    assert greedy(llm, meta) == hf_greedy(meta)
    runner = llm.engine.runner
    check_logits(ReferenceGenerator(llm.config, runner.graphdef, runner.params, max_model_len=2048), meta, arrays,
                 vocab_size=llm.config.vocab_size)
