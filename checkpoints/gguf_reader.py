"""A GGUF file's header in one pass: metadata values, the tensor table, zero-copy tensor views.

The gguf package's `GGUFReader` builds a numpy view for every part of every metadata value and
keeps them: a vocabulary is ~100k strings, which takes it 2.7 s for SmolLM2's file and 12.5 s for
Gemma 3's 262k-token one before a single weight is read (every `LLM(...)`, every server start).
This reader walks the same bytes with `struct` (GGUF v2/v3, either byte order: the format of
ggml/docs/gguf.md) in 0.1-0.3 s, and gives each tensor as an ndarray over one read-only mmap of
the file - a plain ndarray, not an `np.memmap`, whose subclass hooks ran 1.2 million times in
`gguf.quants.dequantize`'s row slicing (2.5 of SmolLM2's 3.2 s of dequantizing). The gguf
package still owns the tensor types (`GGMLQuantizationType`, block sizes) and dequantization.
"""

from __future__ import annotations

import mmap
import struct
from typing import Any, NamedTuple

import numpy as np

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_PLAIN = {"F32": "f4", "F16": "f2", "F64": "f8", "I8": "i1", "I16": "i2", "I32": "i4", "I64": "i8"}


class GGUFTensor(NamedTuple):
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order (innermost first), as the file stores it
    n_bytes: int
    data_offset: int
    data: np.ndarray  # typed for float / int types, uint8 [..., bytes per row] for block types


class GGUFHeader:
    """`metadata` (key -> str, int, float, bool or list) and `tensors` (name -> GGUFTensor).

    Raises:
      ValueError: not a GGUF file, an unsupported version, a cut or inconsistent header, or a
        tensor extending past the end of the file (the caller names the file).
    """

    def __init__(self, path: str):
        import gguf

        with open(path, "rb") as f:
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if f.seek(0, 2) else b""
        buf = self._buf
        if buf[:4] != MAGIC:
            raise ValueError("GGUF magic invalid")
        self.order = "<"
        (version,) = struct.unpack_from("<I", buf, 4)
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            self.order = ">"
            (version,) = struct.unpack_from(">I", buf, 4)
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(f"GGUF version {version} (this reader handles {SUPPORTED_VERSIONS})")
        self.version = version
        n_tensors, n_kv = self._unpack("QQ", 8)
        self._pos = 24
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            if key in self.metadata:
                raise ValueError(f"duplicate metadata key {key!r}")
            self.metadata[key] = self._value(self._next("I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = tuple(self._next("Q") for _ in range(self._next("I")))
            infos.append((name, dims, self._next("I"), self._next("Q")))
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment {alignment!r} is not a power of two")
        start = -(-self._pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, raw_type, offset in infos:
            if name in self.tensors:
                raise ValueError(f"duplicate tensor {name!r}")
            qtype = gguf.GGMLQuantizationType(raw_type)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n_elements = int(np.prod(dims, dtype=np.int64))
            n_bytes = n_elements * type_size // block
            np_shape = tuple(reversed(dims))
            if qtype.name in _PLAIN:
                dtype, count = np.dtype(self.order + _PLAIN[qtype.name]), n_elements
            else:
                dtype, count = np.dtype(np.uint8), n_bytes
                np_shape = (*np_shape[:-1], np_shape[-1] // block * type_size)
            at = start + offset
            if at + n_bytes > len(buf):
                raise TruncatedTensor(name, at + n_bytes, len(buf))
            data = np.frombuffer(buf, dtype, count, at).reshape(np_shape)
            self.tensors[name] = GGUFTensor(name, qtype, dims, n_bytes, at, data)

    # ---- the bytes -----------------------------------------------------------------------

    def _unpack(self, fmt: str, at: int) -> tuple:
        try:
            return struct.unpack_from(self.order + fmt, self._buf, at)
        except struct.error:
            raise ValueError(f"the header is cut at byte {at:,}") from None

    def _next(self, code: str):
        (value,) = self._unpack(code, self._pos)
        self._pos += struct.calcsize(code)
        return value

    def _string(self) -> str:
        n = self._next("Q")
        end = self._pos + n
        if end > len(self._buf):
            raise ValueError(f"the header is cut at byte {self._pos:,} (a {n:,}-byte string)")
        raw = self._buf[self._pos:end]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"a string at byte {self._pos:,} is not UTF-8 ({e.reason})") from None
        finally:
            self._pos = end

    def _value(self, value_type: int):
        if value_type in _SCALARS:
            return self._next(_SCALARS[value_type])
        if value_type == _STRING:
            return self._string()
        if value_type != _ARRAY:
            raise ValueError(f"unknown metadata value type {value_type} at byte {self._pos - 4:,}")
        item_type, n = self._next("I"), self._next("Q")
        if item_type in _SCALARS:  # numbers: one vectorised read
            dtype = np.dtype(self.order + _SCALARS[item_type])
            if self._pos + n * dtype.itemsize > len(self._buf):
                raise ValueError(f"the header is cut at byte {self._pos:,} (an array of {n:,} values)")
            values = np.frombuffer(self._buf, dtype, n, self._pos).tolist()
            self._pos += n * dtype.itemsize
            return values
        return [self._value(item_type) for _ in range(n)]


class TruncatedTensor(ValueError):
    def __init__(self, name: str, end: int, size: int):
        super().__init__(f"tensor {name!r} needs bytes up to {end:,} but the file has {size:,}")
        self.name, self.end, self.size = name, end, size
