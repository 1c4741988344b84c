"""GGUF loading: layouts, tensor types, and clear errors for bad files."""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest
from flax import nnx

from checkpoints.gguf import GGUFFile
from jaxinfer.errors import CheckpointError, UnsupportedModelError
from jaxinfer.loader import load_model
from jaxinfer.testing import random_weights, tiny_config, tiny_gguf, write_gguf

# Quantization error bound relative to the largest |weight|, per type (what the formats allow:
# Q4_0 keeps -8..7 steps of max/8, so the top value can be off by max/8).
TYPE_TOLERANCE = {"F32": 0.0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 1e-2, "Q5_0": 0.08, "Q5_1": 0.08,
                  "Q4_0": 0.15, "Q4_1": 0.15}  # 4-bit: half a step, or a clamped top value


def _loaded_weights(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(model.params)}


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(tie_word_embeddings=True),
    dict(arch="qwen2", attention_bias=True),
    dict(num_kv_heads=1, sliding_window=64),
])
def test_round_trip_restores_layout_and_config(tmp_path, overrides):
    path = tmp_path / "m.gguf"
    cfg, weights = tiny_gguf(path, **overrides)
    model = load_model(path, progress=False, dtype="float32", scan_layers=True)
    assert model.config == dataclasses.replace(cfg, rms_norm_eps=model.config.rms_norm_eps)
    assert model.config.rms_norm_eps == pytest.approx(cfg.rms_norm_eps)
    loaded = _loaded_weights(model)
    assert set(loaded) == set(weights)
    for key, w in weights.items():
        np.testing.assert_array_equal(loaded[key], w, err_msg=key)


@pytest.mark.parametrize("qtype", sorted(TYPE_TOLERANCE))
def test_quantized_types_dequantize_to_the_original_weights(tmp_path, qtype):
    path = tmp_path / "m.gguf"
    cfg, weights = tiny_gguf(path, qtype=qtype)
    loaded = _loaded_weights(load_model(path, progress=False))
    for key, w in weights.items():
        err = np.abs(loaded[key] - w).max() / np.abs(w).max()
        assert err <= TYPE_TOLERANCE[qtype], (key, err)


def _k_quant_block(qtype: str, rng) -> bytes:
    """One valid 256-value block of a K-quant: random quants and scales, finite f16 super-scales."""
    half = lambda x: np.float16(x).tobytes()  # noqa: E731
    if qtype == "Q4_K":  # d, dmin, scales[12], qs[128]
        return half(0.01) + half(0.005) + rng.bytes(12) + rng.bytes(128)
    if qtype == "Q5_K":  # d, dmin, scales[12], qh[32], qs[128]
        return half(0.01) + half(0.005) + rng.bytes(12) + rng.bytes(32) + rng.bytes(128)
    if qtype == "Q6_K":  # ql[128], qh[64], scales[16] (int8), d
        return rng.bytes(128) + rng.bytes(64) + rng.bytes(16) + half(0.01)
    raise ValueError(qtype)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_tensors_load_with_their_element_shape(tmp_path, qtype):
    import gguf

    rng = np.random.default_rng(0)
    rows, cols = 3, 512
    raw = np.frombuffer(b"".join(_k_quant_block(qtype, rng) for _ in range(rows * cols // 256)), np.uint8)
    raw = raw.reshape(rows, -1)
    path = tmp_path / "k.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("t", raw, raw_dtype=gguf.GGMLQuantizationType[qtype])
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    f = GGUFFile(path)
    values = f._tensor("t", (rows, cols))
    assert values.dtype == np.float32 and np.isfinite(values).all()
    np.testing.assert_array_equal(values, gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]))
    assert len(np.unique(values)) > 16  # real dequantized values, not a constant fill


def test_truncated_file_names_the_file_and_the_problem(tmp_path):
    path = tmp_path / "m.gguf"
    tiny_gguf(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"m\.gguf.*truncated"):
        load_model(path, progress=False)
    path.write_bytes(data[:200])  # cut inside the metadata
    with pytest.raises(CheckpointError, match=r"m\.gguf"):
        load_model(path, progress=False)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match=r"junk\.gguf: not a readable GGUF file"):
        GGUFFile(path)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "m.gguf"
    cfg = tiny_config()
    write_gguf(path, cfg, random_weights(cfg), arch="rwkv6")
    with pytest.raises(UnsupportedModelError, match="architecture 'rwkv6' is not supported"):
        load_model(path, progress=False)


def test_missing_tensor_is_named(tmp_path):
    import gguf

    path = tmp_path / "m.gguf"
    cfg = tiny_config()
    weights = random_weights(cfg)
    write_gguf(path, cfg, weights)
    reader = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(tmp_path / "n.gguf"), "llama")  # same metadata, one tensor dropped
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    for t in reader.tensors:
        if t.name != "blk.1.ffn_up.weight":
            w.add_tensor(t.name, np.asarray(t.data))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(CheckpointError, match="'blk.1.ffn_up.weight' is missing"):
        load_model(tmp_path / "n.gguf", progress=False)


def test_real_model_metadata(smollm2):
    cfg = smollm2.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.max_position_embeddings == 8192


def test_header_magic_is_checked(tmp_path):
    path = tmp_path / "m.gguf"
    tiny_gguf(path)
    data = bytearray(path.read_bytes())
    data[:4] = struct.pack("<I", 0xDEADBEEF)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        GGUFFile(path)


def _same_as_the_gguf_package(path) -> None:
    """checkpoints.gguf_reader reads exactly what the gguf package's GGUFReader reads: every metadata
    value (and its Python type), every tensor's type, shape, offset and bytes."""
    import gguf

    from checkpoints.gguf_reader import GGUFHeader

    ours, theirs = GGUFHeader(str(path)), gguf.GGUFReader(str(path), "r")
    meta = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(meta)
    for key, value in meta.items():
        assert ours.metadata[key] == value and type(ours.metadata[key]) is type(value), key
        if isinstance(value, list) and value:
            assert {type(v) for v in ours.metadata[key]} == {type(v) for v in value}, key
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert (mine.tensor_type, mine.shape, mine.n_bytes, mine.data_offset) == \
            (t.tensor_type, tuple(int(d) for d in t.shape), t.n_bytes, t.data_offset), t.name
        assert mine.data.dtype == t.data.dtype and mine.data.shape == t.data.shape, t.name
        np.testing.assert_array_equal(mine.data, t.data)


def test_header_reader_reads_what_the_gguf_package_reads():
    """On the bundled SmolLM2 file (its 49k-token vocabulary and merges); Gemma 3's K-quant blocks are
    read through the same code by test_k_quant_tensors_load_with_their_element_shape and the Gemma 3
    fidelity tests."""
    from jaxinfer.registry import resolve_model_path

    _same_as_the_gguf_package(resolve_model_path("smollm2-135m"))


@pytest.mark.parametrize("qtype", ["F32", "Q4_1", "Q5_0", "Q8_0"])
def test_header_reader_reads_every_value_type_and_big_endian_files(tmp_path, qtype):
    import gguf

    for endian in (gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG):
        path = tmp_path / f"{endian.name}.gguf"
        w = gguf.GGUFWriter(str(path), "llama", endianess=endian)
        for i, value_type in enumerate(t for t in gguf.GGUFValueType if t not in (gguf.GGUFValueType.ARRAY,)):
            value = {gguf.GGUFValueType.STRING: "é ✓", gguf.GGUFValueType.BOOL: True,
                     gguf.GGUFValueType.FLOAT32: 0.1, gguf.GGUFValueType.FLOAT64: 0.1}.get(value_type, 7)
            w.add_key_value(f"test.value{i}", value, value_type)
        w.add_array("test.strings", ["a", "", "ü" * 3])
        w.add_array("test.floats", [0.5, -1.25])
        w.add_array("test.empty", [])
        values = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
        if qtype == "F32":
            w.add_tensor("t", values)
        else:
            quantized = gguf.quants.quantize(values, gguf.GGMLQuantizationType[qtype])
            w.add_tensor("t", quantized, raw_dtype=gguf.GGMLQuantizationType[qtype])
        w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
        _same_as_the_gguf_package(path)
        assert GGUFFile(path).metadata["test.strings"] == ["a", "", "üüü"]
