"""A GGUF tensor's own quantized values, scales and minimums, without dequantizing.

llama.cpp's linear block types are all `w = scale * q + offset` per group of 16 or 32 inputs; this
reads that form out of the raw blocks, in the exact float32 arithmetic the `gguf` package's
dequantizer uses (its f16 scales times 6/8-bit sub-scales are exact in float32), so that
`QTensor.dequantize` equals `gguf.quants.dequantize` bit for bit (tests/test_quantization.py).

    type   values                  group  scale          offset       container
    Q4_0   q - 8 held as q         32     d              -8 d         int4
    Q4_1   q (0..15)               32     d              m            int4
    Q4_K   q (0..15)               32     d * sc_j       -dmin * m_j  int4
    Q5_0   q - 16 (-16..15)        32     d              none         int8
    Q5_1   q (0..31)               32     d              m            int8
    Q5_K   q (0..31)               32     d * sc_j       -dmin * m_j  int8
    Q6_K   q - 32 (-32..31)        16     d * sc_j       none         int8
    Q8_0   q (-128..127)           32     d              none         int8

Other types (Q2_K, Q3_K, the IQ codebooks, ...) have no exact form here: `decode` raises and the
loader says to load them with quantization=None.
"""

from __future__ import annotations

import numpy as np

from jaxinfer.quantization import QTensor

QK_K = 256
EXACT_TYPES = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 8, "Q5_1": 8, "Q5_K": 8, "Q6_K": 8, "Q8_0": 8}


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, block: int) -> np.ndarray:
    """[n, block/2] bytes -> [n, block]: low nibbles are elements 0..block/2-1, high the rest."""
    n = qs.shape[0]
    return ((qs.reshape(n, 1, block // 2) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)) & 0xF).reshape(n, block)


def _k_scale_min(scales: np.ndarray):
    """Q4_K / Q5_K's 12 bytes of packed 6-bit scales and minimums -> ([n, 8], [n, 8])."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def decode(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> QTensor:
    """A tensor's raw blocks (`tensor.data`, uint8 [rows, bytes]) -> QTensor in torch layout
    [out, in] = `shape`, grouped along axis 1.

    Raises:
      ValueError: the type has no exact int4/int8 form (see EXACT_TYPES; callers check first).
    """
    if type_name not in EXACT_TYPES:
        raise ValueError(f"GGUF type {type_name} has no exact int4/int8 form; exact types: {sorted(EXACT_TYPES)}")
    rows, cols = shape
    blocks = np.ascontiguousarray(data).reshape(-1, data.shape[-1]).view(np.uint8)
    blocks = blocks.reshape(rows * cols // (QK_K if type_name.endswith("_K") else 32), -1)
    n = blocks.shape[0]
    offset = None
    if type_name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        d = _f16(blocks[:, :2])  # [n, 1]
        group = 32
        if type_name == "Q8_0":
            q = blocks[:, 2:].view(np.int8)
            scale = d
        elif type_name == "Q4_0":
            q, scale, offset = _nibbles(blocks[:, 2:], 32), d, -8 * d
        elif type_name == "Q4_1":
            q, scale, offset = _nibbles(blocks[:, 4:], 32), d, _f16(blocks[:, 2:4])
        else:
            start = 2 if type_name == "Q5_0" else 4
            qh = np.ascontiguousarray(blocks[:, start:start + 4]).view(np.uint32)  # [n, 1]
            hi = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # [n, 32]
            q = _nibbles(blocks[:, start + 4:], 32) | (hi << 4)
            if type_name == "Q5_0":
                q, scale = q.astype(np.int8) - np.int8(16), d
            else:
                scale, offset = d, _f16(blocks[:, 2:4])
        values = q.reshape(n, 1, group)
        scale = scale.reshape(n, 1)
        offset = None if offset is None else offset.reshape(n, 1)
    elif type_name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        sc, mn = _k_scale_min(blocks[:, 4:16])
        group = 32
        scale = d * sc.astype(np.float32)  # [n, 8]
        offset = -(dmin * mn.astype(np.float32))
        if type_name == "Q4_K":
            qs = blocks[:, 16:16 + QK_K // 2].reshape(n, 4, 32)
            q = ((qs[:, :, None, :] >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0xF).reshape(n, 8, 32)
        else:
            qh = blocks[:, 16:16 + QK_K // 8].reshape(n, 1, 32)
            qs = blocks[:, 48:48 + QK_K // 2].reshape(n, 4, 32)
            ql = ((qs[:, :, None, :] >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0xF).reshape(n, 8, 32)
            hb = ((qh >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1)
            q = ql | (hb << 4)
        values = q
    else:  # Q6_K
        ql = blocks[:, :QK_K // 2]
        qh = blocks[:, QK_K // 2:QK_K // 2 + QK_K // 4]
        sc = blocks[:, QK_K // 2 + QK_K // 4:QK_K // 2 + QK_K // 4 + QK_K // 16].view(np.int8)
        d = _f16(blocks[:, -2:])
        group = 16
        scale = d * sc.astype(np.float32)  # [n, 16]
        lo = ((ql.reshape(n, -1, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0xF).reshape(n, -1, 32)
        hi = ((qh.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3).reshape(n, -1, 32)
        values = ((lo | (hi << 4)).astype(np.int8) - np.int8(32)).reshape(n, QK_K // 16, 16)
    bits = EXACT_TYPES[type_name]
    dtype = np.uint8 if bits == 4 else np.int8
    if bits == 4 and offset is None:
        raise AssertionError(type_name)
    return QTensor(values.reshape(rows, cols).astype(dtype, copy=False), scale.reshape(rows, cols // group),
                   None if offset is None else offset.reshape(rows, cols // group), bits, group)
