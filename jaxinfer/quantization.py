"""Quantized weights: how each projection is stored, and turning float or GGUF values into that form.

A quantized weight W (any of the model's projections, the embedding or lm_head) is three arrays
beside each other in the parameter state, all in the float weight's layout:

    <name>          values, grouped along one axis of the weight (its input axis, `GROUP_AXIS`):
                      int8 containers: int8, the weight's shape;
                      int4 containers: uint8, two 4-bit values per byte, that axis halved; the byte
                      at position j of a group holds element j (low nibble) and j + group/2 (high),
                      the order of llama.cpp's Q4_0 / Q4_1 blocks, so no group is ever split;
    <name>_scale    float32, that axis divided by the group size;
    <name>_offset   float32 like the scale (int4 always; int8 when the source had a minimum)

    W = values * scale + offset   (per group, in float32; `pallas_kernels.quantized_matmul`)

Values, scales and offsets are the source's own: a GGUF's Q4_0/Q4_1/Q4_K blocks become int4 groups,
Q5_0/Q5_1/Q5_K/Q6_K/Q8_0 int8 groups, with the very scale and minimum llama.cpp stores (products of
its f16 and 6/8-bit scales, exact in float32), so dequantizing gives bit for bit the float weights
the `gguf` package (and HF transformers through it) computes. Float sources are quantized
round-to-nearest with a clipping ratio chosen per group (`quantize`).

All of this is host-side numpy, run once at load; the device only ever dequantizes.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

QUANTIZATION_METHODS = ("int8", "int4")

# The axis of each quantizable weight's per-layer array that groups run along: its input axis.
#   wq/wk/wv [D, heads, H], w_gate/w_up [D, F], w_down [F, D], lm_head [D, V]: axis 0;
#   wo [N, H, D]: axis 1 (groups within a head, so they follow the heads when sharded);
#   embed [V, D]: axis 1 (rows are gathered; the tied lm_head contracts over D).
GROUP_AXIS = {"wq": 0, "wk": 0, "wv": 0, "wo": 1, "w_gate": 0, "w_up": 0, "w_down": 0,
              "embed": 1, "lm_head": 0}
LAYER_WEIGHTS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")

# Group sizes for weights quantized from float (a file's own groups are kept as they are).
DEFAULT_GROUP = {"int4": 32, "int8": None}  # None: one scale per output channel
# The embedding and lm_head stay 8-bit (one scale per vocabulary row / output) under int4, as a GGUF
# Q4 file keeps them (SmolLM2's Q4_1 file: token_embd Q8_0) and GPTQ / AWQ leave the lm_head in
# float: SmolLM2's tied embedding at int4 (groups of 32) has 8.7% relative error against 1.2% at
# int8, and it raised HumanEval perplexity by 6.1% where the int4 layers add nothing measurable
# (docs/BENCHMARKS.md, "Quantization's accuracy").
EMBEDDING_METHOD = {"int4": "int8", "int8": "int8"}
INT8_MAX, INT4_LEVELS = 127, 15
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8)  # tried per group; the lowest squared error wins


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightQuant:
    """How one weight is stored: `bits` 8 or 4 per value, one scale (and `offset`) per `group`
    inputs. int4 always carries an offset (values are unsigned nibbles)."""

    name: str
    bits: int
    group: int
    offset: bool

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"{self.name}: bits must be 4 or 8, got {self.bits}")
        if self.group <= 0 or (self.bits == 4 and self.group % 2):
            raise ValueError(f"{self.name}: group must be a positive (even, for int4) size, got {self.group}")
        if self.bits == 4 and not self.offset:
            raise ValueError(f"{self.name}: int4 values are unsigned nibbles and need an offset")

    @property
    def value_dtype(self):
        return np.uint8 if self.bits == 4 else np.int8


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """The quantized weights of a model: the method asked for and each weight's storage."""

    method: str
    weights: tuple[WeightQuant, ...]

    def __post_init__(self):
        check_method(self.method)

    def get(self, name: str) -> WeightQuant | None:
        for w in self.weights:
            if w.name == name:
                return w
        return None

    @staticmethod
    def from_dict(raw: dict) -> QuantSpec:
        return QuantSpec(method=raw["method"], weights=tuple(WeightQuant(**w) for w in raw["weights"]))


def float_group(method: str, n: int) -> int:
    """The group size for quantizing a float weight whose grouped axis has `n` inputs: per channel
    (all n) for int8; for int4 DEFAULT_GROUP's 32, or the largest power of two below it that
    divides n (small test models), at least 8.

    Raises:
      ValueError: no group of 8 or more divides n.
    """
    group = DEFAULT_GROUP[method]
    if group is None:
        return n
    group = math.gcd(group, n)
    if group < 8:
        raise ValueError(f"no int4 group of 8 to {DEFAULT_GROUP[method]} inputs divides the axis ({n}); use int8")
    return group


def check_method(method: str | None) -> str | None:
    """`method` if it names a quantization (ValueError saying the choices otherwise)."""
    if method is not None and method not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS} or None (float weights), got {method!r}")
    return method


def quantized_names(cfg) -> tuple[str, ...]:
    """The parameters a quantized model stores quantized: the layer projections, the embedding and,
    when untied, lm_head."""
    return ("embed",) + (() if cfg.tie_word_embeddings else ("lm_head",)) + LAYER_WEIGHTS


@dataclasses.dataclass
class QTensor:
    """One weight's host-side quantized form, before packing: `values` as integers in the weight's
    layout (int4: 0..15; int8: -128..127 or 0..31 with an offset), `scale` / `offset` float32 with
    the group axis divided by `group` (offset None when the source has none)."""

    values: np.ndarray
    scale: np.ndarray
    offset: np.ndarray | None
    bits: int
    group: int

    def map(self, fn) -> QTensor:
        """The same tensor with a layout change `fn` (transpose, reshape with -1 on the grouped axis,
        row permutation) applied to values, scales and offsets alike."""
        return QTensor(fn(self.values), fn(self.scale), None if self.offset is None else fn(self.offset),
                       self.bits, self.group)

    def dequantize(self, axis: int) -> np.ndarray:
        """float32 weights: values * scale + offset per group along `axis` (as the device does)."""
        scale = np.repeat(self.scale, self.group, axis=axis)
        w = self.values.astype(np.float32) * scale
        return w + np.repeat(self.offset, self.group, axis=axis) if self.offset is not None else w


def quantize(w: np.ndarray, *, bits: int, group: int | None, axis: int) -> QTensor:
    """Round-to-nearest quantization of float `w` along `axis` in groups of `group` (None: the
    whole axis), with the clipping ratio per group (of CLIP_RATIOS) that gives the lowest squared
    error. int8 is symmetric (no offset); int4 is asymmetric (scale and offset per group).

    Raises:
      ValueError: `group` does not divide the axis.
    """
    w = np.asarray(w, dtype=np.float32)
    n = w.shape[axis]
    group = n if group is None else group
    if n % group:
        raise ValueError(f"group size {group} does not divide the quantized axis ({n}); choose a divisor of {n}")
    moved = np.moveaxis(w, axis, -1)
    g = moved.reshape(*moved.shape[:-1], n // group, group)  # [..., groups, group]
    best_err = best = None
    for ratio in CLIP_RATIOS:
        if bits == 8:
            amax = np.abs(g).max(-1, keepdims=True) * ratio
            scale = np.where(amax > 0, amax / INT8_MAX, 1.0).astype(np.float32)
            q = np.clip(np.rint(g / scale), -INT8_MAX, INT8_MAX)
            deq, off = q * scale, None
        else:
            lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
            mid, half = (hi + lo) / 2, (hi - lo) / 2 * ratio
            lo, hi = mid - half, mid + half
            scale = np.where(hi > lo, (hi - lo) / INT4_LEVELS, 1.0).astype(np.float32)
            off = lo.astype(np.float32)
            q = np.clip(np.rint((g - off) / scale), 0, INT4_LEVELS)
            deq = q * scale + off
        err = ((deq - g) ** 2).sum(-1, keepdims=True)
        if best is None:
            best_err, best = err, (q, scale, off)
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best = tuple(None if old is None else np.where(better, new, old) for old, new in zip(best, (q, scale, off)))
    q, scale, off = best

    def back(a):  # [..., groups, k] -> the weight's layout with the axis of size groups * k
        a = a.reshape(*a.shape[:-2], -1)
        return np.moveaxis(a, -1, axis)

    dtype = np.uint8 if bits == 4 else np.int8
    return QTensor(back(q).astype(dtype), back(scale), None if off is None else back(off), bits, group)


def merge_layers(tensors: list[QTensor], bits: int, axis: int) -> QTensor:
    """One stacked [L, ...] QTensor from per-layer ones that may differ in group size, offset and
    bits (a GGUF can mix Q4_K and Q6_K in one tensor kind): the smallest group (others' scales
    repeated), an offset for all when any has one (zero for the rest), in `bits` containers.
    Every layer dequantizes to exactly what it did before. `axis`: the per-layer grouped axis."""
    group = min(t.group for t in tensors)
    if any(t.group % group for t in tensors):
        raise ValueError(f"layer group sizes {sorted({t.group for t in tensors})} have no common divisor group")
    any_offset = any(t.offset is not None for t in tensors)
    values, scales, offsets = [], [], []
    for t in tensors:
        rep = t.group // group
        scales.append(np.repeat(t.scale, rep, axis=axis))
        if any_offset:
            offsets.append(np.zeros_like(scales[-1]) if t.offset is None else np.repeat(t.offset, rep, axis=axis))
        values.append(t.values)
    if bits == 4 and any(t.bits != 4 for t in tensors):
        raise ValueError("an int4 stack cannot hold 8-bit layers")
    dtype = np.uint8 if bits == 4 else np.int8
    return QTensor(np.stack([v.astype(dtype) for v in values]), np.stack(scales),
                   np.stack(offsets) if any_offset else None, bits, group)  # [L, ...]


def pack_int4(values: np.ndarray, axis: int, group: int) -> np.ndarray:
    """uint8 values 0..15 -> bytes along `axis` (halved): within each group, byte j holds element j
    in its low nibble and element j + group/2 in its high nibble."""
    v = np.moveaxis(values.astype(np.uint8), axis, -1)
    g = v.reshape(*v.shape[:-1], -1, 2, group // 2)
    packed = (g[..., 0, :] | (g[..., 1, :] << 4)).reshape(*v.shape[:-1], -1)
    return np.ascontiguousarray(np.moveaxis(packed, -1, axis))


def unpack_int4(packed: np.ndarray, axis: int, group: int) -> np.ndarray:
    """The inverse of `pack_int4` (uint8 0..15)."""
    p = np.moveaxis(packed, axis, -1)
    g = p.reshape(*p.shape[:-1], -1, group // 2)
    out = np.stack([g & 0xF, g >> 4], axis=-2).reshape(*p.shape[:-1], -1)
    return np.moveaxis(out, -1, axis)


def to_params(name: str, t: QTensor, axis: int) -> tuple[WeightQuant, dict[str, np.ndarray]]:
    """The stored arrays of weight `name` ({name, name_scale[, name_offset]}) and its WeightQuant.
    `axis` is the grouped axis of `t` (including any leading layers axis)."""
    offset = t.offset
    if t.bits == 4 and offset is None:
        raise ValueError(f"{name}: int4 needs an offset")
    values = pack_int4(t.values, axis, t.group) if t.bits == 4 else t.values.astype(np.int8)
    arrays = {name: values, f"{name}_scale": t.scale.astype(np.float32)}
    if offset is not None:
        arrays[f"{name}_offset"] = offset.astype(np.float32)
    return WeightQuant(name=name, bits=t.bits, group=t.group, offset=offset is not None), arrays


def stored_shape(shape: tuple[int, ...], wq: WeightQuant, axis: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the stored arrays of a weight of float `shape` grouped along `axis`."""
    n = shape[axis]
    if n % wq.group:
        raise ValueError(f"{wq.name}: group size {wq.group} does not divide its input axis ({n}); "
                         f"choose a group size that divides {n}")

    def with_axis(size):
        return shape[:axis] + (size,) + shape[axis + 1:]

    shapes = {wq.name: with_axis(n // 2 if wq.bits == 4 else n), f"{wq.name}_scale": with_axis(n // wq.group)}
    if wq.offset:
        shapes[f"{wq.name}_offset"] = with_axis(n // wq.group)
    return shapes


def quantize_params(cfg, weights: dict, method: str, *, progress: bool = True) -> tuple[QuantSpec, dict]:
    """Float weights keyed like the model's state ("embed", "lm_head", "layers.<name>" [L, ...])
    -> (QuantSpec, the weights with the projections quantized round-to-nearest to `method` and the
    embedding and lm_head to EMBEDDING_METHOD[method], one layer at a time under a tqdm bar).
    Host-side numpy; arrays may be jax arrays.

    Raises:
      ValueError: a weight's input axis is not a multiple of the group size.
    """
    from tqdm.auto import tqdm

    check_method(method)
    bits = 8 if method == "int8" else 4
    names = quantized_names(cfg)
    out = {k: v for k, v in weights.items() if k.removeprefix("layers.") not in names}
    specs = []
    total = sum(cfg.num_layers if n in LAYER_WEIGHTS else 1 for n in names)
    with tqdm(total=total, desc=f"Quantizing to {method}", unit="tensor", disable=not progress, leave=False) as bar:
        for name in names:
            axis = GROUP_AXIS[name]
            if name in LAYER_WEIGHTS:
                stacked = weights[f"layers.{name}"]
                layers = []
                group = float_group(method, stacked.shape[axis + 1])
                for i in range(stacked.shape[0]):
                    layers.append(quantize(np.asarray(stacked[i], np.float32), bits=bits, group=group, axis=axis))
                    bar.update()
                wq, arrays = to_params(name, merge_layers(layers, bits, axis), axis + 1)
                out |= {f"layers.{k}": v for k, v in arrays.items()}
            else:  # the embedding / lm_head
                w = np.asarray(weights[name], np.float32)
                m = EMBEDDING_METHOD[method]
                t = quantize(w, bits=8 if m == "int8" else 4, group=float_group(m, w.shape[axis]), axis=axis)
                bar.update()
                wq, arrays = to_params(name, t, axis)
                out |= arrays
            specs.append(wq)
    return QuantSpec(method=method, weights=tuple(specs)), out


def dequantize_weights(cfg, weights: dict) -> tuple:
    """The inverse view of `quantize_params`: (config without quantization, float32 weights) whose
    every quantized weight is replaced by values * scale + offset. A float model built from these
    computes what the quantized model computes (tests compare the two)."""
    spec = cfg.quantization
    if spec is None:
        return cfg, dict(weights)
    out = {}
    for key, value in weights.items():
        prefix, _, name = key.rpartition(".")
        wq = spec.get(name)
        if name.endswith(("_scale", "_offset")) and spec.get(name.rsplit("_", 1)[0]) is not None:
            continue
        if wq is None:
            out[key] = value
            continue
        axis = GROUP_AXIS[name] + (1 if prefix == "layers" else 0)
        k = f"{prefix}.{name}" if prefix else name
        values = np.asarray(value)
        if wq.bits == 4:
            values = unpack_int4(values, axis, wq.group)
        offset = weights.get(f"{k}_offset")
        t = QTensor(values, np.asarray(weights[f"{k}_scale"]), None if offset is None else np.asarray(offset),
                    wq.bits, wq.group)
        out[key] = t.dequantize(axis)
    return dataclasses.replace(cfg, quantization=None), out
