"""HF safetensors checkpoints: tiny random Llama 3 (rope scaling), Mistral (sliding window), Qwen2
(qkv bias) and Gemma 3 (local/global layers, qk-norm, GeGLU, soft cap) models built by HF transformers
inside the test, saved with `save_pretrained`, read by checkpoints/hf.py, must give transformers'
logits."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from checkpoints import hf
from jaxinfer.errors import CheckpointError, UnsupportedModelError
from jaxinfer.loader import build_model
from jaxinfer.reference import ReferenceGenerator

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
FAMILIES = {
    "llama3": (transformers.LlamaConfig, dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "llama-tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True, head_dim=32)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=8)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=False)),
    # Every Gemma 3 feature, each away from its default: MQA, head_dim 32 with a query_pre_attn_scalar
    # of 24, local layers (window 8, RoPE base 100) around a global one with linear RoPE scaling,
    # and a final soft cap low enough to bend these logits.
    "gemma3": (transformers.Gemma3TextConfig, dict(
        num_hidden_layers=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
        final_logit_softcapping=0.5)),
}


def _save(tmp_path, family: str, seed: int = 0, **save_kwargs):
    config_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**(COMMON | extra)), dtype=torch.float32)
    with torch.no_grad():  # norms and biases away from their 1 / 0 init, so a swap would show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    model.eval()
    out = tmp_path / family
    model.save_pretrained(out, safe_serialization=True, **save_kwargs)
    return model, out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(tmp_path, family):
    model, path = _save(tmp_path, family)
    ckpt = hf.HFCheckpoint(path)
    cfg = ckpt.model_config(dtype="float32", scan_layers=True)
    to_device = family in ("llama3", "qwen2")  # both paths: host numpy, and streamed onto the device
    graphdef, params = build_model(cfg, ckpt.load_params(cfg, progress=False, to_device=to_device))
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, 40).tolist()  # past the Mistral window
    ours = ReferenceGenerator(cfg, graphdef, params).logits(tokens)
    with torch.no_grad():
        theirs = model(torch.tensor([tokens])).logits[0].numpy()
    assert theirs.std() > 0.05  # logits far above the tolerance
    np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=1e-4)
    if family == "mistral":
        assert cfg.sliding_window == 8
    if family == "llama3":
        assert cfg.rope_scaling is not None and cfg.rope_scaling.factor == 8.0
    if family == "qwen2":
        assert cfg.attention_bias
    if family == "gemma3":
        assert cfg.layer_windows() == (8, 8, None, 8) and cfg.local_rope_theta == 100.0
        assert cfg.rope_scaling.rope_type == "linear" and cfg.final_logit_softcap == 0.5
        assert np.abs(theirs).max() < 0.5  # the cap is in force
        # The unrolled layer loop takes each layer's window and RoPE statically; scan takes them as data.
        unrolled = dataclasses.replace(cfg, scan_layers=False)
        graphdef, params = build_model(unrolled, ckpt.load_params(unrolled, progress=False))
        np.testing.assert_allclose(ReferenceGenerator(unrolled, graphdef, params).logits(tokens), theirs,
                                   atol=2e-5, rtol=1e-4)


def test_sharded_checkpoint_with_an_index(tmp_path):
    model, path = _save(tmp_path, "llama3", max_shard_size="100KB")
    assert os.path.isfile(path / hf.INDEX_FILE) and len(list(path.glob("*.safetensors"))) > 1
    ckpt = hf.HFCheckpoint(path)
    cfg = ckpt.model_config()
    weights = ckpt.load_params(cfg, progress=False)
    q0 = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(weights["layers.wq"][0], q0.T.reshape(64, 4, 16))


def test_bfloat16_weights_load(tmp_path):
    model, path = _save(tmp_path, "qwen2")
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    ckpt = hf.HFCheckpoint(path)
    cfg = ckpt.model_config(dtype="float32")
    w = ckpt.load_params(cfg, progress=False)["embed"]
    want = model.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(w, want)


def test_bad_checkpoints_raise_typed_errors(tmp_path):
    model, path = _save(tmp_path, "llama3")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(UnsupportedModelError, match="GPTNeoXForCausalLM"):
        hf.HFCheckpoint(path).model_config()
    (path / "config.json").write_text(json.dumps({**cfg, "hidden_size": 96}))
    ckpt = hf.HFCheckpoint(path)
    with pytest.raises(CheckpointError, match="shape"):
        ckpt.load_params(ckpt.model_config(), progress=False)
    (path / "config.json").write_text(json.dumps(cfg))
    weights = next(path.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.raises(CheckpointError, match="truncated"):
        ckpt = hf.HFCheckpoint(path)
        ckpt.load_params(ckpt.model_config(), progress=False)
    (path / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="config.json"):
        hf.HFCheckpoint(path)


def _write_byte_level_tokenizer(path):
    """tokenizer.json + tokenizer_config.json (with a chat template) for the test vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from jaxinfer.testing import CHAT_TEMPLATE, SPECIAL_TOKENS, byte_level_vocab

    vocab = {t: i for i, t in enumerate(byte_level_vocab())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[2], "chat_template": CHAT_TEMPLATE}))


@pytest.mark.parametrize("family,scan,backend", [("qwen2", True, "auto"), ("gemma3", True, "auto"),
                                                  ("gemma3", False, "pallas_tpu")])
def test_llm_loads_a_hf_directory_and_generates_transformers_tokens(tmp_path, family, scan, backend):
    """Through the paged engine: chunked prefill (chunks of 16 tokens) and decode with the 8-token
    window of Gemma's local layers crossed many times; for Gemma also unrolled on the TPU kernel
    (interpret mode)."""
    from jaxinfer import LLM, SamplingParams

    model, path = _save(tmp_path, family)
    _write_byte_level_tokenizer(path)
    llm = LLM(str(path), dtype="float32", scan_layers=scan, progress=False, warmup=False, max_num_seqs=2,
              max_num_batched_tokens=16, num_pages=64, page_size=8, attention_backend=backend)
    prompts = ["hello world, this prompt is longer than one chunk of sixteen", "hi"]
    for text in prompts:
        ids = llm.get_tokenizer().encode(text, add_special_tokens=False)
        out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        with torch.no_grad():
            want = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                                  eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert out[0].outputs[0].token_ids == want, text
    assert "<|im_start|>assistant" in llm.chat_prompts([{"role": "user", "content": "hi"}])[0]["prompt"]


@pytest.mark.parametrize("family", ["llama3", "gemma3"])
def test_convert_hf_to_orbax_keeps_weights_tokenizer_and_tokens(tmp_path, family):
    from jaxinfer import LLM, SamplingParams
    from jaxinfer.cli import main

    _, path = _save(tmp_path, family)
    _write_byte_level_tokenizer(path)
    out = tmp_path / "converted"
    assert main(["convert", str(path), str(out)]) == 0
    kw = dict(dtype="float32", progress=False, warmup=False, max_num_seqs=2, max_num_batched_tokens=64, num_pages=64,
              page_size=8)
    a, b = LLM(str(path), **kw), LLM(str(out), **kw)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    assert a.generate("abc", params)[0].outputs[0].token_ids == b.generate("abc", params)[0].outputs[0].token_ids
    assert b.get_tokenizer().encode("hello") == a.get_tokenizer().encode("hello")
    assert b.get_tokenizer().chat_template == a.get_tokenizer().chat_template
    assert b.config == a.config  # rope scaling, layer types, ... survive the JSON round trip
    assert b.model_source.startswith("orbax checkpoint") and a.model_source.startswith("HF checkpoint")


_PROBE = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from checkpoints import hf

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

jnp.ones(4).block_until_ready()
base = status("VmRSS")
ckpt = hf.HFCheckpoint(sys.argv[1])
cfg = ckpt.model_config(dtype="bfloat16")
params = ckpt.load_params(cfg, progress=False, to_device=True)
jax.block_until_ready(params)
model = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in params.values())
checks = [float(params["lm_head"][5, 7]), float(params["embed"][-1, 3]), float(params["layers.w_down"][-1, 9, 1])]
print(json.dumps({"base": base, "peak": status("VmHWM"), "model": model, "checks": checks}))
"""


def _write_synthetic_checkpoint(path, L=13, D=2048, F=8192, N=16, K=4, H=128, V=65536, shard_bytes=600 << 20):
    """A Llama-shaped bfloat16 checkpoint in several safetensors shards, written tensor by tensor
    (tensor t holds the value (t % 7 + 1) / 8 everywhere). Returns (total bytes, largest tensor bytes)."""
    import ml_dtypes

    path.mkdir()
    (path / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], hidden_size=D, intermediate_size=F, num_attention_heads=N,
        num_key_value_heads=K, head_dim=H, vocab_size=V, num_hidden_layers=L, max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False)))
    tensors = [("model.embed_tokens.weight", (V, D)), ("lm_head.weight", (V, D)), ("model.norm.weight", (D,))]
    for i in range(L):
        p = f"model.layers.{i}."
        tensors += [(p + "input_layernorm.weight", (D,)), (p + "post_attention_layernorm.weight", (D,)),
                    (p + "self_attn.q_proj.weight", (N * H, D)), (p + "self_attn.k_proj.weight", (K * H, D)),
                    (p + "self_attn.v_proj.weight", (K * H, D)), (p + "self_attn.o_proj.weight", (D, N * H)),
                    (p + "mlp.gate_proj.weight", (F, D)), (p + "mlp.up_proj.weight", (F, D)),
                    (p + "mlp.down_proj.weight", (D, F))]
    shards, current, size = [], [], 0
    for t, (name, shape) in enumerate(tensors):
        nbytes = int(np.prod(shape)) * 2
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((t, name, shape))
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for s, shard in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for _, name, shape in shard:
            nbytes = int(np.prod(shape)) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(path / fname, "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            for t, _, shape in shard:
                f.write(np.full(shape, (t % 7 + 1) / 8, ml_dtypes.bfloat16).tobytes())
        total += offset
    (path / hf.INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total, max(int(np.prod(shape)) * 2 for _, shape in tensors), tensors


@pytest.mark.slow
def test_streaming_a_2gb_sharded_checkpoint_keeps_host_memory_bounded(tmp_path):
    """Peak resident memory beyond the loaded model stays under 2x the largest tensor (read in a fresh
    process: VmHWM over the baseline after importing jax, minus the model's own bytes)."""
    import subprocess
    import sys

    total, largest, tensors = _write_synthetic_checkpoint(tmp_path / "big")
    assert total >= 2 * 10**9 and len(list((tmp_path / "big").glob("*.safetensors"))) >= 2
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path / "big")], capture_output=True, text=True,
                          cwd=repo, timeout=600, env=dict(os.environ, PYTHONPATH=repo))
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    extra = r["peak"] - r["base"] - r["model"]
    assert r["model"] == total
    assert extra < 2 * largest, f"peak extra host memory {extra / 2**20:.0f} MiB >= 2 x {largest / 2**20:.0f} MiB"
    value = {name: (t % 7 + 1) / 8 for t, (name, _) in enumerate(tensors)}
    assert r["checks"] == [value["lm_head.weight"], value["model.embed_tokens.weight"],
                           value["model.layers.12.mlp.down_proj.weight"]]


def test_streams_straight_into_the_mesh_shardings(tmp_path):
    """With a mesh, every tensor is written into its tensor-parallel layout as it is read (no
    full copy on one device first): each parameter arrives with the sharding the rules give it,
    and holds the same values as a plain load."""
    import jax

    from flax import nnx

    from jaxinfer.loader import load_model, target_shardings
    from sharding.mesh import ParallelConfig, make_mesh

    _, path = _save(tmp_path, "qwen2")
    _write_byte_level_tokenizer(path)
    mesh = make_mesh(ParallelConfig(tensor_parallel_size=2), devices=jax.devices()[:2])
    sharded = load_model(path, dtype="float32", scan_layers=True, progress=False, mesh=mesh)
    plain = load_model(path, dtype="float32", scan_layers=True, progress=False)
    want = target_shardings(sharded.config, mesh)
    got = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(sharded.params)}
    ref = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(plain.params)}
    assert set(got) == set(want) and len(got) >= 10
    for key, value in got.items():
        assert value.sharding.is_equivalent_to(want[key], value.ndim), key
        np.testing.assert_array_equal(np.asarray(value), np.asarray(ref[key]), err_msg=key)
    assert any(len(want[k].spec) and "model" in want[k].spec for k in want)  # really split, not replicated
    wq = got["layers.wq"]
    assert wq.addressable_shards[0].data.shape == (wq.shape[0], wq.shape[1], wq.shape[2] // 2, wq.shape[3])
