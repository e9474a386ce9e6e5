"""FastGGUFReader is gguf-py's GGUFReader, field by field and tensor by tensor: the same parts,
data indexes, types, contents and tensor views — on the shipped model and on a file holding every
metadata value type."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from pagoda.quant.fast_gguf_reader import FastGGUFReader


def assert_same(path: str) -> None:
    slow, fast = gguf.gguf_reader.GGUFReader(path), FastGGUFReader(path)
    assert list(slow.fields) == list(fast.fields)
    for name, a in slow.fields.items():
        b = fast.fields[name]
        assert (a.offset, a.data, a.types) == (b.offset, b.data, b.types), name
        assert len(a.parts) == len(b.parts), name
        for x, y in zip(a.parts, b.parts, strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), name
        ca, cb = a.contents(), b.contents()
        assert repr(ca) == repr(cb), name
    assert slow.data_offset == fast.data_offset and slow.alignment == fast.alignment
    assert len(slow.tensors) == len(fast.tensors)
    for x, y in zip(slow.tensors, fast.tensors, strict=True):
        assert (x.name, x.tensor_type, x.n_elements, x.n_bytes, x.data_offset) == (
            y.name, y.tensor_type, y.n_elements, y.n_bytes, y.data_offset)
        assert np.array_equal(x.shape, y.shape) and x.data.dtype == y.data.dtype
        assert x.data.shape == y.data.shape and np.array_equal(x.data, y.data)


def test_the_default_model_reads_the_same(loaded_model):
    assert_same(loaded_model.path)


@pytest.fixture
def every_type(tmp_path) -> str:
    path = str(tmp_path / "types.gguf")
    w = gguf.GGUFWriter(path, "llama")
    scalars = {"u8": (7, gguf.GGUFValueType.UINT8), "i8": (-7, gguf.GGUFValueType.INT8),
               "u16": (700, gguf.GGUFValueType.UINT16), "i16": (-700, gguf.GGUFValueType.INT16),
               "u32": (70000, gguf.GGUFValueType.UINT32),
               "i32": (-70000, gguf.GGUFValueType.INT32),
               "u64": (1 << 40, gguf.GGUFValueType.UINT64),
               "i64": (-(1 << 40), gguf.GGUFValueType.INT64),
               "f32": (0.5, gguf.GGUFValueType.FLOAT32), "f64": (0.25, gguf.GGUFValueType.FLOAT64),
               "b": (True, gguf.GGUFValueType.BOOL), "s": ("héllo ✓", gguf.GGUFValueType.STRING)}
    for key, (value, vtype) in scalars.items():
        w.add_key_value(f"t.{key}", value, vtype)
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, 1.5])
    w.add_array("t.strings", ["", "a", "ünïcode", "x" * 300])
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.empty", [])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_tensor("w.f32", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("w.f16", np.ones((2, 8), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_every_value_type_reads_the_same(every_type):
    assert_same(every_type)
