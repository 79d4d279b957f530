"""llama.cpp's K-quants as edgequant weights: rounded by llama.cpp's own quantizer, kept as its
bytes, dequantized by the ``gguf`` package's reference.

A K-quant stores a row in super-blocks of 256 values (`BLOCK_VALUES`), each `BLOCK_BYTES` long:

=========  =======  ==========================================================================
scheme     bytes    a super-block of 256
=========  =======  ==========================================================================
``q2_k``   84       16 blocks of 16: 2-bit ``q``, 4-bit scale and min each; fp16 ``d``, ``dmin``
``q3_k``   110      16 blocks of 16: 3-bit ``q``, 6-bit scales; fp16 ``d``
``q4_k``   144      8 blocks of 32: 4-bit ``q``, 6-bit scale and min each; fp16 ``d``, ``dmin``
``q5_k``   176      8 blocks of 32: 5-bit ``q``, 6-bit scale and min each; fp16 ``d``, ``dmin``
``q6_k``   210      16 blocks of 16: 6-bit ``q``, int8 scales; fp16 ``d``
=========  =======  ==========================================================================

``q4_k`` computes ``d * sc * q - dmin * m`` per block of 32. Its scales and mins are chosen by a
search, which llama.cpp runs (``ggml_quantize_chunk`` in the ``libggml-base`` llama-cpp-python
ships; `quantize`) with or without an importance per input column (the mean square of that
column's calibration inputs, what ``llama-imatrix`` gathers): edgequant does not re-implement it,
and a GGUF holds the very bytes. Rows must be a multiple of 256 values long (SmolLM2's 576-wide
rows are not; its 1,536-wide down projections are).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BLOCK_VALUES = 256  # ggml's QK_K
BLOCK_BYTES = {"q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210}


def ggml_type(weight: str) -> str:
    """GGUF's type name of a K-quant weight.

    >>> ggml_type("q4_k")
    'Q4_K'
    """
    if weight not in BLOCK_BYTES:
        raise ValueError(f"{weight!r} is not a K-quant; K-quants: {list(BLOCK_BYTES)}")
    return weight.upper()


def row_bytes(weight: str, cols: int) -> int:
    """Bytes of one row of ``cols`` values.

    >>> row_bytes("q6_k", 1536)
    1260
    """
    return cols // BLOCK_VALUES * BLOCK_BYTES[weight]


def shape_problem(weight: str, cols: int, what: str = "input features") -> str | None:
    """Why rows of ``cols`` values cannot be stored as the K-quant ``weight``, or None.

    >>> print(shape_problem("q4_k", 576))
    q4_k stores rows in blocks of 256 values; its 576 input features are not a multiple of 256
    """
    if cols % BLOCK_VALUES:
        return (
            f"{weight} stores rows in blocks of {BLOCK_VALUES} values; its {cols} {what} are not "
            f"a multiple of {BLOCK_VALUES}"
        )
    return None


@functools.cache
def _ggml() -> ctypes.CDLL:
    """llama-cpp-python's ``libggml-base`` with ``ggml_quantize_chunk``'s signature."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "K-quant weights are rounded by llama.cpp's quantizer, which comes with "
            "llama-cpp-python; it is not installed (make setup builds it)"
        )
    lib_dir = Path(next(iter(spec.submodule_search_locations))) / "lib"
    found = sorted(lib_dir.glob("libggml-base.*"))
    if not found:
        raise ImportError(f"llama-cpp-python has no libggml-base in {lib_dir}")
    lib = ctypes.CDLL(str(found[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_int64, ctypes.c_void_p,
    ]  # fmt: skip
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def quantize(
    weight: torch.Tensor, kind: str, importance: torch.Tensor | None = None
) -> torch.Tensor:
    """``weight [rows, cols]`` as llama.cpp rounds it to the K-quant ``kind``: its bytes,
    ``[rows, row_bytes(kind, cols)]`` uint8. ``importance [cols]``: how much each input column's
    error counts (the mean square of its calibration inputs, llama.cpp's importance matrix);
    None weighs the columns as llama.cpp does without one.

    >>> w = torch.randn(2, 256)
    >>> quantize(w, "q4_k").shape
    torch.Size([2, 144])
    """
    import gguf

    rows, cols = weight.shape
    problem = shape_problem(kind, cols)
    if problem:
        raise ValueError(problem)
    type_id = int(gguf.GGMLQuantizationType[ggml_type(kind)])
    src = np.ascontiguousarray(weight.detach().float().numpy())
    dst = np.zeros((rows, row_bytes(kind, cols)), dtype=np.uint8)
    imatrix = None
    if importance is not None:
        if importance.shape != (cols,):
            raise ValueError(
                f"importance has shape {tuple(importance.shape)}; expected ({cols},), one value "
                "per input column"
            )
        imatrix = np.ascontiguousarray(importance.detach().float().numpy())
    lib = _ggml()
    lib.ggml_quantize_init(type_id)
    written = lib.ggml_quantize_chunk(
        type_id, src.ctypes.data, dst.ctypes.data, 0, rows, cols,
        None if imatrix is None else imatrix.ctypes.data,
    )  # fmt: skip
    if written != dst.nbytes:
        raise RuntimeError(f"llama.cpp wrote {written} bytes of {kind}; expected {dst.nbytes}")
    return torch.from_numpy(dst)


def dequantize(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """The float32 ``[rows, cols]`` values of K-quant ``blocks`` ``[rows, row_bytes]`` (the
    ``gguf`` package's reference dequantization, llama.cpp's formulas).

    >>> w = torch.randn(2, 256)
    >>> float((dequantize(quantize(w, "q6_k"), "q6_k") - w).abs().max()) < 0.1
    True
    """
    import gguf

    qtype = gguf.GGMLQuantizationType[ggml_type(kind)]
    data = np.ascontiguousarray(blocks.numpy())
    return torch.from_numpy(gguf.quants.dequantize(data, qtype).copy())


@dataclass(frozen=True)
class Blocks:
    """A weight rounded to a K-quant elsewhere (e.g. with calibration data), for
    `edgequant.layers.pack_weight`'s ``result``."""

    blocks: torch.Tensor  # [rows, row_bytes] uint8
    kind: str

    def dequantize(self, group_size: int | None = None) -> torch.Tensor:
        """The float32 weight (``group_size`` is not used: the blocks carry their own)."""
        return dequantize(self.blocks, self.kind)


def rounded(weight: torch.Tensor, kind: str, importance: torch.Tensor | None = None) -> Blocks:
    """`quantize` as a `Blocks` result."""
    return Blocks(quantize(weight, kind, importance), kind)


__all__ = [
    "BLOCK_BYTES",
    "BLOCK_VALUES",
    "Blocks",
    "dequantize",
    "ggml_type",
    "quantize",
    "rounded",
    "row_bytes",
    "shape_problem",
]
