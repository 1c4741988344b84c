"""The decoder (Llama family and Gemma 3) as a Flax NNX module with layer parameters stacked on a leading axis.

    tokens [B, T] -> embed -> L x (RMSNorm -> GQA attention (RoPE) -> + -> RMSNorm -> SwiGLU -> +)
                  -> RMSNorm -> lm_head (or tied embedding) -> logits [B, M, V] (float32)

Gemma 3 is the same skeleton with: embed * sqrt(D); RMSNorm of q and k per head before RoPE; a norm
on the attention output and on the MLP output before each residual add; GeGLU; norms x * (1 + w);
and two kinds of layer, local (sliding window, its own RoPE base) and global (full attention).

Every layer parameter has shape [L, ...] and logical axis names (`logical_axes` metadata) that
`sharding/` maps to mesh axes. The layer loop either scans (`config.scan_layers=True`: one layer is
traced and compiled, so compile time does not grow with depth) or is unrolled in Python (each layer
reads its weights in place; faster steps on GPU/TPU, see docs/ARCHITECTURE.md). A layer's window
and RoPE table are static in the unrolled loop; under scan, when the layers differ (Gemma 3), they
are per-layer data indexed by the traced layer: the window is passed to attention as a traced
scalar (`NO_WINDOW` for global layers) and the RoPE table is selected with a `where`.

Attention is delegated to an `Attend` function (`jaxinfer.attention`) so the same model runs with a
dense cache (reference generator) or a paged cache (engine) without changes here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.attention import Attend
from jaxinfer.config import ModelConfig
from jaxinfer.layers import ACTIVATIONS, apply_rope, rms_norm, rope_cos_sin, rope_inv_freq
from jaxinfer.quantization import GROUP_AXIS, stored_shape
from pallas_kernels.quantized_matmul import dequantize, float_matmuls, quantized_matmul, quantized_matmuls

# A window no context reaches: full attention for a layer whose window is traced data.
NO_WINDOW = 1 << 30


def _param(rngs: nnx.Rngs, shape, axes, dtype, *, std=0.02, ones=False) -> nnx.Param:
    if ones:
        value = jnp.ones(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


def _weights(module: nnx.Module, cfg: ModelConfig, name: str, rngs: nnx.Rngs, shape, axes, dtype, *,
             stacked: bool) -> None:
    """Sets weight `name` on `module`: one float parameter, or, when `cfg.quantization` quantizes it,
    its stored values, scales and offsets (`jaxinfer.quantization`), each with the weight's logical
    axes so that sharding splits them together. Random values (models are built abstractly and
    filled from a checkpoint; random int values are for shape-only benchmarks)."""
    wq = cfg.quantization.get(name) if cfg.quantization is not None else None
    if wq is None:
        setattr(module, name, _param(rngs, shape, axes, dtype))
        return
    axis = GROUP_AXIS[name] + (1 if stacked else 0)
    for key, s in stored_shape(tuple(shape), wq, axis).items():
        if key == name:
            value = jax.random.randint(rngs.params(), s, 0 if wq.bits == 4 else -127, 256 if wq.bits == 4 else 128,
                                       jnp.int32).astype(wq.value_dtype)
        else:
            value = (0.02 / 8 * jax.random.uniform(rngs.params(), s, jnp.float32, 0.5, 1.0)
                     if key.endswith("_scale") else jnp.full(s, -0.02, jnp.float32))
        setattr(module, key, nnx.Param(value, logical_axes=axes))


def linear(x, p: dict, name: str, cfg: ModelConfig, k: int, n: int):
    """x [..., k] @ weight `name` of `p` seen as [k, n]: a float parameter (a free reshape), or a
    quantized one through `quantized_matmul` (its values, scales and offsets reshaped alike; the
    groups run along k)."""
    wq = cfg.quantization.get(name) if cfg.quantization is not None else None
    if wq is None:
        return float_matmuls(x, [p[name].reshape(k, n)])[0]
    offset = p.get(f"{name}_offset")
    return quantized_matmul(x, p[name].reshape(-1, n), p[f"{name}_scale"].reshape(-1, n),
                            None if offset is None else offset.reshape(-1, n), bits=wq.bits)


def linears(x, p: dict, names: tuple[str, ...], cfg: ModelConfig, k: int, ns: tuple[int, ...]) -> list:
    """[linear(x, p, name, cfg, k, n) for name, n in zip(names, ns)]: projections of one input.
    Quantized, they go to `quantized_matmuls` together (one native call on CPU)."""
    quant = cfg.quantization
    if quant is None or all(quant.get(name) is None for name in names):  # float: one native call on CPU too
        return float_matmuls(x, [p[name].reshape(k, n) for name, n in zip(names, ns)])
    if any(quant.get(name) is None for name in names):
        return [linear(x, p, name, cfg, k, n) for name, n in zip(names, ns)]
    weights = []
    for name, n in zip(names, ns):
        offset = p.get(f"{name}_offset")
        weights.append((p[name].reshape(-1, n), p[f"{name}_scale"].reshape(-1, n),
                        None if offset is None else offset.reshape(-1, n), quant.get(name).bits))
    return quantized_matmuls(x, weights)


class DecoderLayers(nnx.Module):
    """All L decoder blocks' parameters, each stacked on a leading `layers` axis."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
        N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dt = jnp.dtype(cfg.dtype)
        norm_init = cfg.norm_offset == 0  # Gemma's norm weights are offsets from 1: zeros is identity
        self.attn_norm = _param(rngs, (L, D), ("layers", "embed"), dt, ones=norm_init)
        _weights(self, cfg, "wq", rngs, (L, D, N, H), ("layers", "embed", "heads", "head_dim"), dt, stacked=True)
        _weights(self, cfg, "wk", rngs, (L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), dt, stacked=True)
        _weights(self, cfg, "wv", rngs, (L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), dt, stacked=True)
        _weights(self, cfg, "wo", rngs, (L, N, H, D), ("layers", "heads", "head_dim", "embed"), dt, stacked=True)
        if cfg.attention_bias:
            self.bq = _param(rngs, (L, N, H), ("layers", "heads", "head_dim"), dt)
            self.bk = _param(rngs, (L, K, H), ("layers", "kv_heads", "head_dim"), dt)
            self.bv = _param(rngs, (L, K, H), ("layers", "kv_heads", "head_dim"), dt)
        if cfg.is_gemma:
            self.q_norm = _param(rngs, (L, H), ("layers", "head_dim"), dt, ones=norm_init)
            self.k_norm = _param(rngs, (L, H), ("layers", "head_dim"), dt, ones=norm_init)
            self.post_attn_norm = _param(rngs, (L, D), ("layers", "embed"), dt, ones=norm_init)
            self.post_mlp_norm = _param(rngs, (L, D), ("layers", "embed"), dt, ones=norm_init)
        self.mlp_norm = _param(rngs, (L, D), ("layers", "embed"), dt, ones=norm_init)
        _weights(self, cfg, "w_gate", rngs, (L, D, F), ("layers", "embed", "mlp"), dt, stacked=True)
        _weights(self, cfg, "w_up", rngs, (L, D, F), ("layers", "embed", "mlp"), dt, stacked=True)
        _weights(self, cfg, "w_down", rngs, (L, F, D), ("layers", "mlp", "embed"), dt, stacked=True)

    def arrays(self) -> dict[str, jax.Array | tuple[jax.Array, ...]]:
        """The layer parameters by name: stacked [L, ...] arrays, or L-tuples of per-layer arrays
        after `unstack_layers`. `arrays()[name][i]` is layer i's parameter either way."""
        return {name: var.get_value() for name, var in vars(self).items() if isinstance(var, nnx.Param)}


def params_for_layer_loop(cfg: ModelConfig, params: nnx.State) -> nnx.State:
    """Parameters in the layout the configured layer loop reads: stacked for scan, per-layer
    arrays for the unrolled loop (see unstack_layers). Either layout is accepted."""
    return restack_layers(params) if cfg.scan_layers else unstack_layers(params)


def restack_layers(params: nnx.State) -> nnx.State:
    """The inverse of `unstack_layers` (a copy of the weights); stacked parameters pass through."""

    def stack(path, var):
        value = var.get_value()
        return var.replace(jnp.stack(value)) if path[0] == "layers" and isinstance(value, tuple) else var

    return nnx.from_flat_state([(path, stack(path, var)) for path, var in nnx.to_flat_state(params)])


def unstack_layers(params: nnx.State) -> nnx.State:
    """A copy of `params` whose layer parameters are L-tuples of separate per-layer arrays.

    The unrolled layer loop runs on these. Measured on XLA:CPU (docs/BENCHMARKS.md), a dot that
    reads a static slice of a stacked weight is several times slower than the same dot on a
    separate array; split once at load, every step reads each layer's weights in place. The
    stacked arrays stay the storage format (checkpoints, sharding rules, the scanned loop).
    """

    def split(path, var):
        if path[0] != "layers" or isinstance(var.get_value(), tuple):  # (already per layer)
            return var
        stacked = var.get_value()
        if isinstance(stacked, jax.ShapeDtypeStruct):  # abstract parameters (AOT lowering)
            layer = jax.ShapeDtypeStruct(stacked.shape[1:], stacked.dtype)
            return var.replace((layer,) * stacked.shape[0])
        return var.replace(tuple(stacked[i] for i in range(stacked.shape[0])))

    return nnx.from_flat_state([(path, split(path, var)) for path, var in nnx.to_flat_state(params)])


def decoder_layer(p: dict[str, jax.Array], x, cos, sin, kv_cache, layer, meta, attend: Attend,
                  cfg: ModelConfig, window):
    """One decoder block. p: this layer's parameters (no leading L axis); x: [B, T, D]; window: the
    layer's attention window (None, an int, or a traced int32 scalar).

    The projections are 2-D matmuls over the flattened head axes (a free reshape of the [D, N, H]
    parameters): unrolled on XLA:CPU, the same products as 4-D einsums ('BTD,DNH->BTNH') took 3x
    longer; under scan the two forms measure the same (docs/BENCHMARKS.md).
    """
    B, T, D = x.shape
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    eps, off = cfg.rms_norm_eps, cfg.norm_offset
    F = cfg.intermediate_size
    h = rms_norm(x, p["attn_norm"], eps, off)
    q, k, v = linears(h, p, ("wq", "wk", "wv"), cfg, D, (N * H, K * H, K * H))
    q, k, v = q.reshape(B, T, N, H), k.reshape(B, T, K, H), v.reshape(B, T, K, H)
    if cfg.attention_bias:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    if cfg.is_gemma:
        q, k = rms_norm(q, p["q_norm"], eps, off), rms_norm(k, p["k_norm"], eps, off)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    attn, kv_cache = attend(q, k, v, kv_cache, layer, meta, sliding_window=window, sm_scale=cfg.attn_scale,
                            soft_cap=cfg.attn_logit_softcap)  # [B, T, N, H]
    h = linear(attn.reshape(B, T, N * H), p, "wo", cfg, N * H, D)
    x = x + (rms_norm(h, p["post_attn_norm"], eps, off) if cfg.is_gemma else h)
    h = rms_norm(x, p["mlp_norm"], eps, off)  # the gated MLP: act(h @ w_gate) * (h @ w_up) @ w_down
    gate, up = linears(h, p, ("w_gate", "w_up"), cfg, D, (F, F))
    h = ACTIVATIONS[cfg.hidden_act](gate) * up
    h = linear(h, p, "w_down", cfg, F, D)
    x = x + (rms_norm(h, p["post_mlp_norm"], eps, off) if cfg.is_gemma else h)
    return x, kv_cache


EMBED_KEYS = ("embed", "embed_scale", "embed_offset")  # the embedding's arrays (scale/offset when quantized)


def embedding_arrays(params) -> dict:
    """The embedding's arrays from a model's parameter state (what `embed_inputs` takes)."""
    return {k: params[k].get_value() for k in EMBED_KEYS if k in params}


def embed_tokens(cfg: ModelConfig, embed: dict, tokens):
    """tokens [...] -> their embeddings [..., D] as the model's first block sees them. `embed`: the
    embedding's arrays (`embedding_arrays`); quantized rows are gathered, then dequantized."""
    if "embed_scale" in embed:
        take = functools.partial(jnp.take, indices=tokens, axis=0)
        wq = cfg.quantization.get("embed")
        offset = embed.get("embed_offset")
        x = dequantize(take(embed["embed"]), take(embed["embed_scale"]), None if offset is None else take(offset),
                       bits=wq.bits, axis=-1, dtype=jnp.dtype(cfg.dtype))
    else:
        x = jnp.take(embed["embed"], tokens, axis=0)  # [..., D]
    if cfg.is_gemma:  # HF multiplies by the scale rounded to the embedding's dtype
        x = x * jnp.asarray(cfg.hidden_size ** 0.5, x.dtype)
    return x


def rope_frequencies(cfg: ModelConfig):
    """The RoPE inverse frequencies [H / 2] of the global (full-attention) layers."""
    return rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rope_freq_factors)


def embed_inputs(cfg: ModelConfig, embed: dict, tokens, positions):
    """tokens, positions: [B, T] -> (x [B, T, D], RoPE tables: (global (cos, sin), local or None))."""
    x = embed_tokens(cfg, embed, tokens)
    rope = rope_cos_sin(positions, rope_frequencies(cfg))
    local_rope = None
    if any(cfg.layer_is_local()):
        local_rope = rope_cos_sin(positions, rope_inv_freq(cfg.head_dim, cfg.local_rope_theta, None))
    return x, (rope, local_rope)


def run_layer(cfg: ModelConfig, p, x, kv_cache, layer, ropes, meta, attend: Attend):
    """Decoder block `layer` (a Python int, or a traced int32 scalar under scan or when one
    compiled layer serves them all) with its parameters `p`: (x, kv_cache). The layer's RoPE table
    and window are static for an int layer and selected as data for a traced one."""
    rope, local_rope = ropes
    is_local = cfg.layer_is_local()
    windows = cfg.layer_windows()
    if local_rope is None:
        cos, sin = rope
    elif isinstance(layer, int):
        cos, sin = local_rope if is_local[layer] else rope
    else:
        local = jnp.asarray(is_local)[layer]
        cos, sin = (jnp.where(local, a, b) for a, b in zip(local_rope, rope))
    if isinstance(layer, int) or len(set(windows)) == 1:
        window = windows[layer if isinstance(layer, int) else 0]
    else:
        window = jnp.asarray([NO_WINDOW if w is None else w for w in windows], jnp.int32)[layer]
    return decoder_layer(p, x, cos, sin, kv_cache, layer, meta, attend, cfg, window)


class Transformer(nnx.Module):
    """Decoder-only language model (Llama family, Gemma 3)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = jnp.dtype(cfg.dtype)
        _weights(self, cfg, "embed", rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dt, stacked=False)
        self.layers = DecoderLayers(cfg, rngs=rngs)
        self.final_norm = _param(rngs, (cfg.hidden_size,), ("embed",), dt, ones=cfg.norm_offset == 0)
        if not cfg.tie_word_embeddings:
            _weights(self, cfg, "lm_head", rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dt,
                     stacked=False)

    def __call__(self, tokens, positions, kv_cache, meta, attend: Attend, logits_indices=None):
        """Runs the decoder over a chunk of tokens, updating the KV cache.

        Args:
          tokens: [B, T] int32 token ids.
          positions: [B, T] int32 absolute positions (for RoPE).
          kv_cache: cache pytree whose leaves have a leading L axis; passed to `attend`.
          meta: attention metadata for `attend` (where the chunk sits in the cache).
          attend: the attention implementation (dense or paged).
          logits_indices: optional [B, M] indices into T; logits only at those tokens
            (prefill needs only the last). None computes logits at every token.

        Returns:
          (logits [B, M, V] float32, kv_cache).
        """
        x, kv_cache = self.forward(tokens, positions, kv_cache, meta, attend)
        if logits_indices is not None:
            x = jnp.take_along_axis(x, logits_indices[:, :, None], axis=1)  # [B, M, D]
        return self.compute_logits(x), kv_cache

    def forward(self, tokens, positions, kv_cache, meta, attend: Attend, unroll: bool = False):
        """The decoder blocks: (hidden states [B, T, D] before the final norm, kv_cache). unroll:
        the unrolled loop even when the config scans (per-layer arrays: the runner's "hybrid" loop)."""
        cfg = self.cfg
        x, ropes = embed_inputs(cfg, {k: getattr(self, k)[...] for k in EMBED_KEYS if hasattr(self, k)},
                                tokens, positions)
        params = self.layers.arrays()

        def body(carry, xs):
            x, kv_cache = carry
            p, layer = xs
            return run_layer(cfg, p, x, kv_cache, layer, ropes, meta, attend), None

        if cfg.scan_layers and not unroll:
            layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
            (x, kv_cache), _ = jax.lax.scan(body, (x, kv_cache), (params, layer_ids))
        else:  # per-layer arrays after unstack_layers (fast), or static slices of stacked ones
            for i in range(cfg.num_layers):
                p = {name: w[i] for name, w in params.items()}
                (x, kv_cache), _ = body((x, kv_cache), (p, i))
        return x, kv_cache

    def compute_logits(self, x):
        """Hidden states [..., D] from `forward` -> float32 logits [..., V] (final norm, then head)."""
        cfg = self.cfg
        x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps, cfg.norm_offset)
        name = "embed" if cfg.tie_word_embeddings else "lm_head"
        wq = cfg.quantization.get(name) if cfg.quantization is not None else None
        if wq is not None:
            offset = getattr(self, f"{name}_offset", None)
            logits = quantized_matmul(x, getattr(self, name)[...], getattr(self, f"{name}_scale")[...],
                                      None if offset is None else offset[...], bits=wq.bits,
                                      transpose=cfg.tie_word_embeddings, out_dtype=jnp.float32)
        else:  # float: on CPU, a step of a few rows in the native kernel (`float_matmuls`)
            logits = float_matmuls(x, [getattr(self, name)[...]], transpose=cfg.tie_word_embeddings,
                                   preferred_element_type=jnp.float32)[0]
        if cfg.final_logit_softcap is not None:
            logits = cfg.final_logit_softcap * jnp.tanh(logits / cfg.final_logit_softcap)
        return logits
