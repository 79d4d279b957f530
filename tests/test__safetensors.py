"""The streaming safetensors writer writes the very bytes ``safetensors.torch.save_file`` does."""

from __future__ import annotations

import filecmp
import json
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgequant._safetensors import write


def _entries(tensors: dict[str, torch.Tensor], calls: list[str] | None = None) -> list:
    def loader(name: str):
        def load() -> torch.Tensor:
            if calls is not None:
                calls.append(name)
            return tensors[name]

        return load

    return [(k, v.dtype, tuple(v.shape), loader(k)) for k, v in tensors.items()]


def _assert_identical(tmp_path: Path, tensors: dict[str, torch.Tensor], metadata=None) -> None:
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    write(ours, _entries(tensors), metadata=metadata)
    save_file({k: v.contiguous() for k, v in tensors.items()}, theirs, metadata=metadata)
    assert filecmp.cmp(ours, theirs, shallow=False)
    loaded = load_file(ours)
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v)


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # Names sort against dtypes: by name "a_bool" would come first, by dtype "z_i64" does.
    return {
        "a_bool": torch.rand(3, 5, generator=g) > 0.5,
        "b_u8": torch.randint(0, 256, (7,), generator=g, dtype=torch.uint8),
        "c_i8": torch.randint(-128, 128, (2, 3, 4), generator=g, dtype=torch.int8),
        "d_f16": torch.randn(4, 3, generator=g).half(),
        "e_bf16": torch.randn(5, 2, generator=g).bfloat16(),
        "f_i32": torch.randint(-1000, 1000, (3, 3), generator=g, dtype=torch.int32),
        "g_f32_t": torch.randn(3, 4, generator=g).t(),  # not contiguous
        "h_f32_empty": torch.zeros(0, 4),
        "i_f32_scalar": torch.tensor(3.25),
        "j_bf16_scalar": torch.tensor(-1.5, dtype=torch.bfloat16),
        "z_i64": torch.randint(-(2**40), 2**40, (6,), generator=g, dtype=torch.int64),
        "model.layers.0.w": torch.randn(8, generator=g),
    }


def test_identical_with_metadata(tmp_path: Path) -> None:
    _assert_identical(tmp_path, _mixed(), metadata={"format": "pt"})


def test_identical_without_metadata(tmp_path: Path) -> None:
    _assert_identical(tmp_path, _mixed())


def test_identical_empty_metadata_and_no_tensors(tmp_path: Path) -> None:
    _assert_identical(tmp_path, {"x": torch.ones(2)}, metadata={})
    _assert_identical(tmp_path, {}, metadata={"format": "pt"})
    _assert_identical(tmp_path, {})


def test_identical_random(tmp_path: Path) -> None:
    rng = random.Random(1234)
    g = torch.Generator().manual_seed(1234)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8]
    dtypes += [torch.int32, torch.int64, torch.bool, torch.float64, torch.int16]
    tensors: dict[str, torch.Tensor] = {}
    while len(tensors) < 30:
        name = ".".join(rng.choice(["w", "Wb", "_s", "é", "layer", "9"]) for _ in range(3))
        name += str(rng.randrange(100))
        shape = tuple(rng.randrange(4) for _ in range(rng.randrange(4)))
        tensors[name] = (torch.randn(shape, generator=g) * 50).to(rng.choice(dtypes))
    _assert_identical(tmp_path, tensors, metadata={"format": "pt"})


def test_data_order_and_one_load_each(tmp_path: Path) -> None:
    tensors = _mixed()
    calls: list[str] = []
    write(tmp_path / "m.safetensors", _entries(tensors, calls))
    raw = (tmp_path / "m.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert calls == list(header)  # loaded once each, in data order
    assert calls[0] == "z_i64" and calls[-1] == "a_bool"
    # bf16 sorts before f16 in the data, though both are 2 bytes wide
    assert calls.index("e_bf16") < calls.index("d_f16")


def test_wrong_dtype_names_the_tensor(tmp_path: Path) -> None:
    entries = [("w.bad", torch.float32, (2,), lambda: torch.zeros(2, dtype=torch.float16))]
    with pytest.raises(ValueError, match=r"'w\.bad'.*declared dtype torch.float32"):
        write(tmp_path / "m.safetensors", entries)


def test_wrong_shape_names_the_tensor(tmp_path: Path) -> None:
    entries = [("w.bad", torch.float32, (2, 3), lambda: torch.zeros(3, 2))]
    with pytest.raises(ValueError, match=r"'w\.bad'.*declared shape \(2, 3\), loaded \(3, 2\)"):
        write(tmp_path / "m.safetensors", entries)


def test_duplicate_name(tmp_path: Path) -> None:
    entries = [("w", torch.float32, (1,), lambda: torch.zeros(1))] * 2
    with pytest.raises(ValueError, match="duplicate tensor name 'w'"):
        write(tmp_path / "m.safetensors", entries)
    assert list(tmp_path.iterdir()) == []


def test_failing_load_leaves_nothing(tmp_path: Path) -> None:
    def boom() -> torch.Tensor:
        raise RuntimeError("load failed")

    entries = [
        ("a", torch.int64, (3,), lambda: torch.arange(3)),  # written first (I64 sorts first)
        ("b", torch.float32, (1,), boom),
    ]
    with pytest.raises(RuntimeError, match="load failed"):
        write(tmp_path / "m.safetensors", entries)
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old")
    entries = [("a", torch.float32, (1,), lambda: torch.zeros(2))]
    with pytest.raises(ValueError, match="declared shape"):
        write(path, entries)
    assert path.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [path]


def test_identical_other_dtypes(tmp_path: Path) -> None:
    names = ["float8_e5m2", "float8_e4m3fn", "float8_e8m0fnu", "float8_e4m3fnuz"]
    names += ["float8_e5m2fnuz", "uint16", "uint32", "uint64", "complex64"]
    tensors = {
        f"{i:02d}_{n}": torch.arange(6).reshape(2, 3).to(getattr(torch, n))
        for i, n in enumerate(names)
        if hasattr(torch, n)
    }
    tensors["grad"] = torch.ones(3, requires_grad=True)
    _assert_identical(tmp_path, tensors, metadata={"format": "pt"})
