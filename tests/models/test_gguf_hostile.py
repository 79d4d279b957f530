"""The GGUF reader against damaged and hostile files: every case is a ValueError naming the
file, before any tensor is allocated."""

from __future__ import annotations

import re
import struct

import gguf
import numpy as np
import pytest

from edgequant.models import gguf as eq_gguf


def _write(path, shapes=((4, 8), (8,))) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    for i, shape in enumerate(shapes):
        writer.add_tensor(f"t{i}", np.arange(np.prod(shape), dtype=np.float32).reshape(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tensor_info(data: bytes, name: str) -> int:
    """Offset of the tensor info record of ``name`` (just after its name)."""
    key = struct.pack("<Q", len(name)) + name.encode()
    return data.index(key) + len(key)


def _patch(path, name: str, field: str, value: int) -> None:
    """Set a tensor info field: ``dim0`` or ``offset``."""
    data = bytearray(path.read_bytes())
    at = _tensor_info(data, name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    if field == "dim0":
        struct.pack_into("<Q", data, at + 4, value)
    else:  # after n_dims, the dims, the type
        struct.pack_into("<Q", data, at + 4 + 8 * n_dims + 4, value)
    path.write_bytes(bytes(data))


def _offset(path, name: str) -> int:
    data = path.read_bytes()
    at = _tensor_info(data, name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    return struct.unpack_from("<Q", data, at + 4 + 8 * n_dims + 4)[0]


def test_a_valid_file_opens(tmp_path):
    path = tmp_path / "ok.gguf"
    _write(path)
    assert [t.name for t in eq_gguf.open_reader(path).tensors] == ["t0", "t1"]


def test_overlapping_tensors_are_refused(tmp_path):
    path = tmp_path / "overlap.gguf"
    _write(path)
    _patch(path, "t1", "offset", _offset(path, "t0") + 32)
    overlap = f"{str(path)!r}: tensors 't0' and 't1' overlap"
    with pytest.raises(ValueError, match=re.escape(overlap)):
        eq_gguf.open_reader(path)


def test_a_tensor_past_the_end_is_refused(tmp_path):
    path = tmp_path / "short.gguf"
    _write(path)
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        eq_gguf.open_reader(path)


def test_a_zero_dimension_is_refused(tmp_path):
    path = tmp_path / "zero.gguf"
    _write(path)
    _patch(path, "t0", "dim0", 0)
    with pytest.raises(ValueError, match=re.escape(f"{str(path)!r}: tensor 't0' has shape [0, 4]")):
        eq_gguf.open_reader(path)


@pytest.mark.parametrize("length", [2**62, 2**40, 10**6])
def test_absurd_string_lengths_are_refused(tmp_path, length):
    path = tmp_path / "absurd.gguf"
    _write(path)
    data = bytearray(path.read_bytes())
    key = b"general.architecture"
    struct.pack_into("<Q", data, data.index(key) - 8, length)  # the key's length
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(f"{str(path)!r} is not a readable GGUF file")):
        eq_gguf.open_reader(path)


def test_a_file_without_a_vocabulary_is_refused_before_loading(tmp_path):
    path = tmp_path / "novocab.gguf"
    _write(path)
    with pytest.raises(
        ValueError, match=re.escape(f"{str(path)!r} has no tokenizer (no tokenizer.ggml.tokens)")
    ):
        eq_gguf.load(path, use_cache=False)
