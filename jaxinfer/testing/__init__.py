"""Test fixtures: tiny model configs, random weights, and GGUF files written from them.

`write_gguf` writes weights the way llama.cpp's converter does (torch [out, in] layout, Llama Q/K
rows interleaved for GPT-J style rotary), so loading one back exercises the real GGUF path.
"""

from __future__ import annotations

import numpy as np

from jaxinfer.config import ModelConfig

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def numpy_attention(q, k, v, positions, window: int | None = None) -> np.ndarray:
    """Plain causal GQA attention in numpy, the oracle for every attention implementation.

    q: [T, N, H] queries at absolute `positions` [T]; k, v: [L, K, H], the sequence's keys and
    values from position 0. A query at p sees keys 0..p (the last `window` of them, if given).
    """
    N, H, K = q.shape[1], q.shape[2], k.shape[1]
    kk, vv = np.repeat(k, N // K, axis=1), np.repeat(v, N // K, axis=1)
    s = np.einsum("tnh,lnh->ntl", q, kk) / np.sqrt(H)
    j = np.arange(k.shape[0])[None, None, :]
    pos = np.asarray(positions)[None, :, None]
    allowed = j <= pos
    if window:
        allowed &= j > pos - window
    s = np.where(allowed, s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("ntl,lnh->tnh", w, vv)


def byte_level_vocab() -> list[str]:
    """Special tokens, then the 256 single-byte tokens spelled in GPT-2's byte alphabet."""
    from tokenizers import pre_tokenizers

    return [*SPECIAL_TOKENS, *sorted(pre_tokenizers.ByteLevel.alphabet())]


def tiny_config(**overrides) -> ModelConfig:
    """A 2-layer GQA model small enough to compile in seconds on CPU."""
    base = dict(arch="llama", vocab_size=len(byte_level_vocab()), hidden_size=64, intermediate_size=128,
                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False)
    base.update(overrides)
    return ModelConfig(**base)


def random_weights(cfg: ModelConfig, seed: int = 0, scale: float = 0.2) -> dict[str, np.ndarray]:
    """Random float32 weights keyed like the model state ("embed", "layers.wq", ...)."""
    rng = np.random.default_rng(seed)
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    shapes = {
        "embed": (V, D), "final_norm": (D,),
        "layers.attn_norm": (L, D), "layers.mlp_norm": (L, D),
        "layers.wq": (L, D, N, H), "layers.wk": (L, D, K, H), "layers.wv": (L, D, K, H),
        "layers.wo": (L, N, H, D), "layers.w_gate": (L, D, F), "layers.w_up": (L, D, F),
        "layers.w_down": (L, F, D),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (D, V)
    if cfg.attention_bias:
        shapes |= {"layers.bq": (L, N, H), "layers.bk": (L, K, H), "layers.bv": (L, K, H)}
    out = {}
    for name, shape in shapes.items():
        if name.endswith("norm"):
            out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (scale * rng.standard_normal(shape)).astype(np.float32)
    return out


def write_gguf(path, cfg: ModelConfig, weights: dict[str, np.ndarray], *, qtype: str = "F32",
               arch: str | None = None, chat_template: str | None = CHAT_TEMPLATE) -> None:
    """Writes `weights` (jaxinfer layout) as a llama.cpp-style GGUF with a byte-level BPE vocab.

    Matrices are stored as `qtype` (any type the gguf package can quantize: F32, F16, BF16, Q8_0,
    Q4_0, Q4_1, Q5_0, Q5_1); norms and biases stay F32, as llama.cpp writes them.
    """
    import gguf

    arch = arch or cfg.arch
    L, D, N, K, H = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    permute = arch == "llama"

    def interleave(w, heads):  # rotate-half rows -> llama.cpp's interleaved rows (its converter)
        if not permute:
            return w
        return w.reshape(heads, 2, H // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    tensors = {"token_embd.weight": weights["embed"], "output_norm.weight": weights["final_norm"]}
    if "lm_head" in weights:
        tensors["output.weight"] = weights["lm_head"].T
    for i in range(L):
        g = lambda name: weights[f"layers.{name}"][i]  # noqa: E731
        tensors |= {
            f"blk.{i}.attn_norm.weight": g("attn_norm"),
            f"blk.{i}.attn_q.weight": interleave(g("wq").reshape(D, N * H).T, N),
            f"blk.{i}.attn_k.weight": interleave(g("wk").reshape(D, K * H).T, K),
            f"blk.{i}.attn_v.weight": g("wv").reshape(D, K * H).T,
            f"blk.{i}.attn_output.weight": g("wo").reshape(N * H, D).T,
            f"blk.{i}.ffn_norm.weight": g("mlp_norm"),
            f"blk.{i}.ffn_gate.weight": g("w_gate").T,
            f"blk.{i}.ffn_up.weight": g("w_up").T,
            f"blk.{i}.ffn_down.weight": g("w_down").T,
        }
        if cfg.attention_bias:
            tensors |= {
                f"blk.{i}.attn_q.bias": interleave(g("bq").reshape(N * H), N),
                f"blk.{i}.attn_k.bias": interleave(g("bk").reshape(K * H), K),
                f"blk.{i}.attn_v.bias": g("bv").reshape(K * H),
            }

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(D)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(N)
    w.add_head_count_kv(K)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.sliding_window:
        w.add_sliding_window(cfg.sliding_window)
    vocab = byte_level_vocab()
    assert len(vocab) == cfg.vocab_size, "write_gguf needs cfg.vocab_size == len(byte_level_vocab())"
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    w.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in vocab])
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)
    q = gguf.GGMLQuantizationType[qtype]
    for name, t in tensors.items():
        t = np.ascontiguousarray(t, dtype=np.float32)
        if t.ndim == 1 or q == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, t)
        else:
            w.add_tensor(name, gguf.quants.quantize(t, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_gguf(path, **overrides) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Writes a tiny random model to `path`; returns its config and weights."""
    qtype = overrides.pop("qtype", "F32")
    seed = overrides.pop("seed", 0)
    cfg = tiny_config(**overrides)
    weights = random_weights(cfg, seed)
    write_gguf(path, cfg, weights, qtype=qtype)
    return cfg, weights


