"""A streaming safetensors writer: the streaming quantizer writes a bundle's ``model.safetensors``
layer by layer with `write`, holding one tensor in memory at a time, and the file is byte for byte
what ``safetensors.torch.save_file`` writes for the same tensors and metadata.

It reproduces the Rust core's ``serialize_to_file`` (safetensors 0.4 to 0.8):

* data order: by dtype descending in the order of the Rust ``Dtype`` enum (BOOL < U8 < I8 < F8_*
  < I16 < U16 < F16 < BF16 < I32 < U32 < F32 < C64 < F64 < I64 < U64; note BF16 > F16 and
  I64 > F64, so this is neither "by size" alone nor by name), then by name (UTF-8 bytes);
* the header: compact JSON, ``__metadata__`` first (when metadata is given, even ``{}``), then each
  tensor in data order as ``{"dtype","shape","data_offsets"}`` with offsets relative to the data
  section, padded with spaces to a multiple of 8 bytes, after its length as 8 little-endian bytes;
* the data: each tensor's raw little-endian bytes, back to back.

One difference cannot be matched: save_file keeps metadata in a Rust ``HashMap``, so with two or
more metadata keys their order varies from call to call; here they keep the dict's order.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from edgequant._io import atomic_path

Entry = tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]

# Rust's ``Dtype`` enum, in declaration order (the order `serialize` sorts by, descending).
_RUST_DTYPES = (
    ("BOOL", "bool"),
    ("U8", "uint8"),
    ("I8", "int8"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E8M0", "float8_e8m0fnu"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("I16", "int16"),
    ("U16", "uint16"),
    ("F16", "float16"),
    ("BF16", "bfloat16"),
    ("I32", "int32"),
    ("U32", "uint32"),
    ("F32", "float32"),
    ("C64", "complex64"),
    ("F64", "float64"),
    ("I64", "int64"),
    ("U64", "uint64"),
)
# torch dtype -> (rank in the Rust enum, safetensors name); dtypes this torch lacks are skipped.
_DTYPES: dict[torch.dtype, tuple[int, str]] = {
    getattr(torch, attr): (rank, name)
    for rank, (name, attr) in enumerate(_RUST_DTYPES)
    if hasattr(torch, attr)
}
_MAX_HEADER = 100_000_000  # safetensors' MAX_HEADER_SIZE


def _header(entries: Sequence[Entry], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape, _ in entries:
        end = offset + dtype.itemsize * math.prod(shape)
        info = {"dtype": _DTYPES[dtype][1], "shape": list(shape), "data_offsets": [offset, end]}
        header[name], offset = info, end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    if len(text) > _MAX_HEADER:
        raise ValueError(f"safetensors header of {len(text)} bytes exceeds {_MAX_HEADER}")
    return struct.pack("<Q", len(text)) + text


def _ordered(entries: Sequence[Entry]) -> list[Entry]:
    """Check names, dtypes and shapes; return the entries in the file's data order."""
    seen: set[str] = set()
    checked: list[Entry] = []
    for name, dtype, shape, load in entries:
        if name in seen:
            raise ValueError(f"duplicate tensor name {name!r}")
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved in safetensors, not a tensor name")
        if dtype not in _DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} is not supported by safetensors")
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"tensor {name!r}: negative dimension in shape {shape}")
        seen.add(name)
        checked.append((name, dtype, shape, load))
    return sorted(checked, key=lambda e: (-_DTYPES[e[1]][0], e[0].encode()))


def write(
    path: str | os.PathLike[str],
    entries: Sequence[Entry],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file equal to ``save_file({name: load() ...}, path, metadata)``.

    ``entries`` are ``(name, dtype, shape, load)``; ``load()`` returns that tensor (contiguous or
    not) and is called once per entry, in the file's data order, right before its bytes are
    written, so only one tensor is in memory at a time. The file is written beside ``path`` under a
    temporary name and renamed into place, or removed on any error. Raises ValueError on duplicate
    names, and naming the tensor when ``load()`` returns a dtype or shape other than declared.
    """
    ordered = _ordered(entries)
    header = _header(ordered, metadata)
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
        f.write(header)
        for name, dtype, shape, load in ordered:
            t = load()
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"tensor {name!r}: load() returned {type(t).__name__}")
            if t.dtype != dtype:
                raise ValueError(f"tensor {name!r}: declared dtype {dtype}, loaded {t.dtype}")
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"tensor {name!r}: declared shape {shape}, loaded {tuple(t.shape)}"
                )
            raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            f.write(memoryview(raw.numpy()))
            del t, raw
