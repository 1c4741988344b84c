"""An EAGLE-style draft head: drafts from the target's own last hidden state, k tokens in one jit.

The target's hidden state h_t (its last decoder block's output, before the final norm) already
summarises the context; the token it sampled from it, x_{t+1}, is the one thing it does not hold.
The head maps the two to a guess of the next hidden state and reads a token from that guess with
the target's own final norm and output head, then feeds its guess back in:

    f_1 = head(h_t, embed(x_{t+1}))   ~ h_{t+1}  ->  d_1 = argmax lm_head(norm(f_1))
    f_2 = head(f_1, embed(d_1))       ~ h_{t+2}  ->  d_2 ...                          (k times)

    head(f, e) = y' + mlp(norm(y')),  y = W_fc [norm_e(e); norm_f(f)]    (a SwiGLU block)
                 y' = y + W_o attend(W_q norm(y))      (with `HeadConfig.context_window`, else y' = y)

Differences from the EAGLE paper's head, each for this runtime's sake:
  - no KV cache of its own: its attention (a head with `context_window`) reads the keys and values
    the target already cached for one of its layers (`context_layer`, the last full-attention one),
    over the `context_window` positions up to t, with a query of its own (`Context`); so there is
    nothing to page, roll back or keep in step with the target's cache, and a draft step attends
    to the context only (what its earlier drafts said is in its feature);
  - a draft vocabulary: the head scores only the `draft_vocab_size` tokens the target emits most
    often in its training data (the target's output-head rows of those tokens, gathered once at
    load). SmolLM2's output head is 21% of its weights; scoring 8k of its 49k rows makes a draft
    step ~1/6 of that, and the tokens left out are rarely the argmax (coverage is printed by
    `train-draft`). Drafts are proposed greedily, so verification's rejection rule is exact for them.

    init_head(hc, key) -> params             trainable arrays (a dict)
    head_step(...), draft_logits(...)        one draft step, its logits over the draft vocabulary
    propose(head, embed_fn, feature, token, k, context) -> drafts [S, k] (target token ids)
    Context(keys, values, valid, position, inv_freq)  what the attention reads (gathered by the
                                             runner from its pages, by training from the answers')
    save_head(path, ...), load_head(path, cfg, params, tokenizer, quantization=None) -> DraftHead (ready for
                                             the runner; quantization "int8" / "int4": `quantize_head`)
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.errors import InvalidRequestError
from jaxinfer.layers import apply_rope, rms_norm, rope_cos_sin

HEAD_FORMAT = "jaxinfer-draft-head"
HEAD_VERSION = 1


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """The head's shapes and the target facts its math needs (hashable: a static jit argument)."""

    hidden_size: int
    intermediate_size: int
    draft_vocab_size: int
    rms_norm_eps: float = 1e-5
    norm_offset: float = 0.0  # the target's final norm: weight + offset (Gemma: 1)
    dtype: str = "float32"
    # attention over the target's cached keys / values of `context_layer` (None: no attention)
    context_window: int | None = None  # positions t - W + 1 .. t
    context_layer: int = 0
    num_heads: int = 0  # the head's queries; the keys' heads and width are the target's
    num_kv_heads: int = 0
    head_dim: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def cache_layer(self) -> int | None:  # the target layer whose cache the head reads (None: no attention)
        return self.context_layer if self.context_window else None


def init_head(hc: HeadConfig, key) -> dict:
    """Fresh trainable parameters: the fc's feature half starts as the identity (the first guess of
    the next hidden state is the current one), the rest small and random."""
    D, F = hc.hidden_size, hc.intermediate_size
    k1, k2, k3, k4 = jax.random.split(key, 4)
    normal = lambda k, shape, std: std * jax.random.normal(k, shape, jnp.float32)  # noqa: E731
    fc = jnp.concatenate([normal(k1, (D, D), 0.02), jnp.eye(D, dtype=jnp.float32)], axis=0)  # [2D, D]
    params = {"norm_e": jnp.ones((D,)), "norm_f": jnp.ones((D,)), "fc": fc, "mlp_norm": jnp.ones((D,)),
              "gate": normal(k2, (D, F), 0.02), "up": normal(k3, (D, F), 0.02),
              "down": normal(k4, (F, D), 0.02 / F ** 0.5)}
    if hc.context_window:  # the attention's output starts at zero: the head starts as the one without
        NH = hc.num_heads * hc.head_dim
        params |= {"attn_norm": jnp.ones((D,)), "wq": normal(jax.random.fold_in(key, 5), (D, NH), 0.02),
                   "wo": jnp.zeros((NH, D))}
    return params


def abstract_params(hc: HeadConfig) -> dict:
    """`init_head`'s arrays as shapes and dtypes (nothing computed): what a saved head must hold."""
    return jax.eval_shape(lambda: init_head(hc, jax.random.key(0)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Context:
    """What a head's attention reads, per row: the target's cached keys and values of the head's
    `context_layer` at the `context_window` positions up to t (RoPE applied, as the cache holds
    them), which of them it sees, t itself (draft step j's query sits at t + 1 + j) and that
    layer's RoPE frequencies (`model.rope_frequencies`: a full-attention layer's). `rotated`:
    8-bit pages hold rotated heads (`kv_quant.rotate`)."""

    keys: jax.Array  # [S, W, K, H]
    values: jax.Array  # [S, W, K, H]
    valid: jax.Array  # [S, W] bool
    position: jax.Array  # [S] int32
    inv_freq: jax.Array  # [H / 2]
    rotated: bool = dataclasses.field(default=False, metadata=dict(static=True))


def context_layer_for(cfg) -> int:
    """The target layer a head's attention reads: its last full-attention one."""
    local = cfg.layer_is_local()
    return max(i for i in range(cfg.num_layers) if not local[i]) if not all(local) else cfg.num_layers - 1


def _attend(params: dict, hc: HeadConfig, y, ctx: Context, step: int):
    """The head's attention for draft step `step`: y [S, D] -> [S, D] (W_o of the attended values)."""
    from pallas_kernels.kv_quant import rotate

    S, N, K, H = y.shape[0], hc.num_heads, hc.num_kv_heads, hc.head_dim
    q, = _matmuls(rms_norm(y, params["attn_norm"].astype(y.dtype), hc.rms_norm_eps), [params["wq"]])
    cos, sin = rope_cos_sin((ctx.position + 1 + step)[:, None], ctx.inv_freq)
    q = apply_rope(q.reshape(S, 1, N, H), cos, sin)[:, 0].astype(jnp.float32)
    if ctx.rotated:
        q = rotate(q)
    scores = jnp.einsum("skgh,swkh->skgw", q.reshape(S, K, N // K, H), ctx.keys.astype(jnp.float32)) * H ** -0.5
    scores = jnp.where(ctx.valid[:, None, None], scores, -1e30)
    out = jnp.einsum("skgw,swkh->skgh", jax.nn.softmax(scores, -1), ctx.values.astype(jnp.float32)).reshape(S, N, H)
    if ctx.rotated:
        out = rotate(out, transpose=True)
    return _matmuls(out.reshape(S, N * H).astype(y.dtype), [params["wo"]])[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantizedWeight:
    """A head matrix [K, N] (output rows: [N, K]) quantized along K (`quantize_head`) as in
    `jaxinfer.quantization`: int8 values, a scale per output, no offset; or int4 packed two to a
    byte, a scale and offset per g inputs (`float_group`; values [K / 2, N], offsets [K / g, N])."""

    values: jax.Array
    scale: jax.Array
    offset: jax.Array | None = None
    bits = property(lambda self: 8 if self.offset is None else 4)  # (int8 is symmetric, int4 has offsets)


def _matmuls(x, weights, transpose: bool = False):
    """[x @ W for W in weights] (transpose: x @ W.T), float or `QuantizedWeight` (`quantized_matmuls`:
    on CPU one call of the native kernel), accumulated in float32; x's dtype out (transpose: float32)."""
    from pallas_kernels.quantized_matmul import quantized_matmul, quantized_matmuls

    if isinstance(weights[0], QuantizedWeight):
        if transpose:
            return [quantized_matmul(x, w.values, w.scale, w.offset, bits=w.bits, transpose=True,
                                     out_dtype=jnp.float32) for w in weights]
        return quantized_matmuls(x, [(w.values, w.scale, w.offset, w.bits) for w in weights])
    if transpose:
        return [jnp.einsum("...D,ND->...N", x, w.astype(x.dtype), preferred_element_type=jnp.float32) for w in weights]
    return [x @ w.astype(x.dtype) for w in weights]


def head_step(params: dict, hc: HeadConfig, feature, emb, context: Context | None = None, step: int = 0):
    """feature (h_t or the previous guess), emb (the next token's embedding): [S, D] -> the guess
    of the next hidden state [S, D] (in feature's dtype). A head with attention reads `context`
    at draft step `step`."""
    eps, dt = hc.rms_norm_eps, feature.dtype
    x = jnp.concatenate([rms_norm(emb, params["norm_e"].astype(dt), eps), rms_norm(feature, params["norm_f"].astype(dt),
                                                                                     eps)], axis=-1)
    y, = _matmuls(x, [params["fc"]])
    if hc.context_window:
        y = y + _attend(params, hc, y, context, step)
    z = rms_norm(y, params["mlp_norm"].astype(dt), eps)
    gate, up = _matmuls(z, [params["gate"], params["up"]])
    down, = _matmuls(jax.nn.silu(gate) * up, [params["down"]])
    return y + down


def draft_logits(final_norm, lm_head, hc: HeadConfig, feature):
    """feature [..., D] -> float32 logits over the draft vocabulary [..., N]: the target's final norm,
    then its output head's rows of the draft tokens (`lm_head` [N, D], float or `QuantizedWeight`)."""
    x = rms_norm(feature, final_norm, hc.rms_norm_eps, hc.norm_offset)
    return _matmuls(x, [lm_head], transpose=True)[0].astype(jnp.float32)


HEAD_MATRICES = ("fc", "gate", "up", "down", "wq", "wo")


def quantize_head(head: DraftHead, method: str = "int8") -> DraftHead:
    """The head's matrices and output rows stored `method` ("int8" / "int4", grouped as the target's
    float weights are, `quantization.float_group`: ValueError where no int4 group fits): a draft
    step reads a quarter (an eighth) of the float32 bytes. Drafts may differ where two tokens'
    logits nearly tie; what the target emits does not (it verifies)."""
    from jaxinfer.quantization import float_group, pack_int4, quantize

    bits = 8 if method == "int8" else 4  # (as `quantization.quantize_params` reads a method)
    def q(w, axis):
        t = quantize(np.asarray(w, np.float32), bits=bits, group=float_group(method, w.shape[axis]), axis=axis)
        values = pack_int4(t.values, axis, t.group) if bits == 4 else t.values
        return QuantizedWeight(jnp.asarray(values), jnp.asarray(t.scale), None if bits == 8 else jnp.asarray(t.offset))

    params = {k: q(v, 0) if k in HEAD_MATRICES else v for k, v in head.params.items()}
    return dataclasses.replace(head, params=params, lm_head=q(head.lm_head, 1))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DraftHead:
    """A head ready to propose: trainable params and, from the target, its final norm and its output
    head's rows of the draft vocabulary; `token_map` [N] maps draft index -> target token id."""

    params: dict
    final_norm: jax.Array  # [D]
    lm_head: jax.Array | QuantizedWeight  # [N, D]
    token_map: jax.Array  # [N] int32
    config: HeadConfig = dataclasses.field(metadata=dict(static=True))


def propose(head: DraftHead, embed, feature, token, k: int, context: Context | None = None):
    """feature [S, D]: the target's hidden state that sampled `token` [S] -> drafts [S, k] int32 (the
    k tokens after `token`, greedily), all on the device. `embed`: tokens [S] -> [S, D]; `context`:
    what a head with attention reads."""
    if head.config.context_window and context is None:
        raise ValueError("this draft head attends over the target's cached keys: propose needs its context")
    drafts = []
    for j in range(k):  # k <= MAX_SPECULATIVE_TOKENS: unrolled
        feature = head_step(head.params, head.config, feature, embed(token), context, j)
        token = head.token_map[jnp.argmax(draft_logits(head.final_norm, head.lm_head, head.config, feature), axis=-1)]
        drafts.append(token)
    return jnp.stack(drafts, axis=1).astype(jnp.int32)


# ---- the target's identity (a head trained for one model refuses another) ---------------------------

def target_identity(cfg, tokenizer) -> dict:
    """What a head depends on: the target's width, vocabulary and the tokens' spellings."""
    from jaxinfer.speculative.draft import vocabulary_sha256

    return {"arch": cfg.arch, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
            "num_layers": cfg.num_layers, "vocabulary_sha256": vocabulary_sha256(cfg.vocab_size, tokenizer)}


def output_rows(cfg, params, token_ids: np.ndarray):
    """The target's output-head rows [N, D] (the model's dtype) of `token_ids`: tied models'
    embedding rows, else the lm_head's columns; quantized weights are dequantized."""
    from jaxinfer.quantization import GROUP_AXIS
    from pallas_kernels.quantized_matmul import dequantize

    name = "embed" if cfg.tie_word_embeddings else "lm_head"
    axis = 0 if cfg.tie_word_embeddings else 1  # the vocabulary axis: [V, D] or [D, V]
    ids = jnp.asarray(token_ids)
    take = lambda key: jnp.take(params[key].get_value(), ids, axis=axis)  # noqa: E731
    wq = cfg.quantization.get(name) if cfg.quantization is not None else None
    w = take(name) if wq is None else dequantize(
        take(name), take(f"{name}_scale"), take(f"{name}_offset") if f"{name}_offset" in params else None,
        bits=wq.bits, axis=GROUP_AXIS[name], dtype=jnp.dtype(cfg.dtype))
    return (w if cfg.tie_word_embeddings else w.T).astype(cfg.dtype)


def head_config_for(cfg, draft_vocab_size: int, intermediate_size: int | None = None,
                    context_window: int | None = None) -> HeadConfig:
    """A head for target `cfg`; `context_window`: attention over that many of its cached positions
    (the target's query heads and key layout, its last full-attention layer's cache)."""
    attn = dict(context_window=context_window, context_layer=context_layer_for(cfg), num_heads=cfg.num_heads,
                num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim) if context_window else {}
    return HeadConfig(hidden_size=cfg.hidden_size, intermediate_size=intermediate_size or cfg.intermediate_size,
                      draft_vocab_size=draft_vocab_size, rms_norm_eps=cfg.rms_norm_eps,
                      norm_offset=cfg.norm_offset, dtype=cfg.dtype, **attn)


# ---- files -------------------------------------------------------------------------------------

def save_head(path: str | os.PathLike, hc: HeadConfig, params: dict, token_map: np.ndarray, identity: dict,
              info: dict | None = None) -> None:
    """OUT_DIR/draft_head.json (format, head config, target identity, training info) and
    OUT_DIR/params/ (orbax: the trainable arrays and token_map)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    os.makedirs(path, exist_ok=True)
    arrays = {k: np.asarray(v, np.float32) for k, v in params.items()} | {"token_map": np.asarray(token_map, np.int32)}
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(path, "params"), arrays, force=True)
    meta = {"format": HEAD_FORMAT, "version": HEAD_VERSION, "head": hc.to_json(), "target": identity,
            "training": info or {}}
    with open(os.path.join(path, "draft_head.json"), "w") as f:
        json.dump(meta, f, indent=1)


def read_head_meta(path: str | os.PathLike) -> dict:
    meta_path = os.path.join(os.fspath(path), "draft_head.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise InvalidRequestError(f"speculative_config.model={os.fspath(path)!r} is not a draft head directory (no "
                                  "draft_head.json); write one with `jaxinfer train-draft MODEL OUT_DIR`") from None
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidRequestError(f"cannot read {meta_path}: {e}") from None
    if meta.get("format") != HEAD_FORMAT or meta.get("version") != HEAD_VERSION:
        raise InvalidRequestError(f"{meta_path} is not a version-{HEAD_VERSION} {HEAD_FORMAT} file")
    return meta


def load_head(path: str | os.PathLike, cfg, params, tokenizer, quantization: str | None = None) -> DraftHead:
    """The head at `path`, checked against the target (`cfg`, its parameter state `params`,
    `tokenizer`) and completed with the target's final norm and output rows; `quantization`
    "int8" / "int4": its matrices and output rows stored so (`quantize_head`), None: in the target's dtype
    ("auto" is the engine's to resolve, `SpeculativeConfig.resolve`).

    Raises:
      InvalidRequestError: not a head directory, or a head trained for another model (width,
        vocabulary or the tokens' spellings differ) — the message says which.
    """
    import orbax.checkpoint as ocp

    from jaxinfer.speculative import HEAD_QUANTIZATIONS  # (SpeculativeConfig checks the same list)

    if quantization is not None and quantization not in HEAD_QUANTIZATIONS:
        choices = ", ".join(f'"{q}"' for q in HEAD_QUANTIZATIONS)
        raise InvalidRequestError(f"a draft head's quantization is {choices} or None, got {quantization!r}")
    path = os.path.abspath(os.fspath(path))
    meta = read_head_meta(path)
    want, have = meta["target"], target_identity(cfg, tokenizer)
    diff = [k for k in ("hidden_size", "vocab_size", "vocabulary_sha256") if want.get(k) != have[k]]
    if diff:
        what = ", ".join(f"{k}: head {want.get(k)!r}, target {have[k]!r}" for k in diff)
        raise InvalidRequestError(f"the draft head at {path} was trained for another model ({what}); train one for "
                                  f"this model with `jaxinfer train-draft MODEL {path}`")
    hc = HeadConfig(**{**meta["head"], "dtype": cfg.dtype, "norm_offset": cfg.norm_offset})
    if hc.context_window and (hc.context_layer >= cfg.num_layers or (hc.num_kv_heads, hc.head_dim) != (
            cfg.num_kv_heads, cfg.head_dim)):
        raise InvalidRequestError(f"the draft head at {path} attends over another model's cache (layer "
                                  f"{hc.context_layer}, {hc.num_kv_heads} heads of {hc.head_dim}); train one for this "
                                  f"model with `jaxinfer train-draft MODEL {path}`")
    abstract = abstract_params(hc)
    abstract["token_map"] = jax.ShapeDtypeStruct((hc.draft_vocab_size,), jnp.int32)
    try:
        with ocp.StandardCheckpointer() as ckpt:
            arrays = ckpt.restore(os.path.join(path, "params"), abstract)
    except Exception as e:  # orbax raises many types for missing / mismatched arrays
        raise InvalidRequestError(f"{path}: cannot restore the draft head ({type(e).__name__}: {e})") from None
    token_map = np.asarray(arrays.pop("token_map"))
    if token_map.min() < 0 or token_map.max() >= cfg.vocab_size:
        raise InvalidRequestError(f"{path}: its draft vocabulary has ids outside the target's [0, {cfg.vocab_size})")
    dt = jnp.dtype(cfg.dtype)
    head = DraftHead(params={k: v.astype(dt) for k, v in arrays.items()},
                     final_norm=params["final_norm"].get_value(), lm_head=output_rows(cfg, params, token_map),
                     token_map=jnp.asarray(token_map), config=hc)
    try:
        return head if quantization is None else quantize_head(head, quantization)
    except ValueError as e:  # int4: no group divides a matrix's input width
        raise InvalidRequestError(f'{path}: cannot store this head {quantization} ({e}); use "int8" or None') from None
