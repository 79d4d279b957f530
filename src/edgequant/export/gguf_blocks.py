"""How each weight goes into a GGUF file: the exact GGUF type of a scheme, and its blocks.

Packed layers go in bit for bit:

=============================================  ===========  =====================================
edgequant scheme                               GGUF type    block
=============================================  ===========  =====================================
int4, symmetric, group 32, fp16 scales         ``Q4_0``     fp16 ``d``, 32 nibbles ``q + 8``
int5, symmetric, group 32, fp16 scales         ``Q5_0``     fp16 ``d``, 32 high bits, 32 nibbles
int8, symmetric, group 32, fp16 scales         ``Q8_0``     fp16 ``d``, 32 int8 ``q``
q2_k .. q6_k (llama.cpp's own blocks)          ``Q2_K`` ..  the bundle's bytes (`edgequant.kquants`)
fp16 / bf16 / fp32 (and float modules)         ``F16`` / ``BF16`` / ``F32``
=============================================  ===========  =====================================

Q4_0 computes ``d * (nibble - 8)``: edgequant's symmetric int4 ``q`` in [-8, 7] is ``nibble - 8``
one to one, and its fp16 scale is ``d``. Q5_0 computes ``d * (u - 16)`` with a 5-bit ``u``
(its low nibble packed as Q4_0's, its fifth bit in a 32-bit mask): edgequant's int5 ``q`` in
[-16, 15] is ``u - 16``. Q8_0 holds ``d * q``. A scheme's activation mode does
not travel: llama.cpp's CPU kernels quantize activations themselves (to 8 bits in blocks of 32).
Any other scheme (per-channel int8, other groups, fp32 scales, asymmetric int4) has no exact
GGUF type (`exact_type` is None): the writer (`edgequant.export.gguf.to_gguf`) refuses it with
`nearest_scheme`, or `encode` re-quantizes it to that scheme's type with the ``gguf`` package's
rounding (llama.cpp's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from edgequant.layers import QuantizedEmbedding, QuantizedLinear
from edgequant.primitives import by_row_blocks, rows_per_block
from edgequant.schemes import Scheme

# Puts a weight's rows (integers, scales or values) in the file's order; see `encode`.
Permute = Callable[[torch.Tensor], torch.Tensor]


def exact_type(scheme: Scheme | None) -> str | None:
    """The GGUF type that holds ``scheme``'s values exactly (None: there is none).

    >>> exact_type(Scheme("int4", "per_group", 32, scale_dtype="fp16"))
    'Q4_0'
    >>> exact_type(Scheme("int8")) is None
    True
    """
    if scheme is None or scheme.weight == "fp32":
        return "F32"
    if scheme.is_kquant:
        return scheme.weight.upper()
    if scheme.weight in ("fp16", "bf16"):
        return {"fp16": "F16", "bf16": "BF16"}[scheme.weight]
    block = (
        scheme.granularity == "per_group"
        and scheme.group_size == 32
        and scheme.symmetric
        and scheme.scale_dtype == "fp16"
    )
    if block and scheme.weight in ("int4", "int5"):
        return {"int4": "Q4_0", "int5": "Q5_0"}[scheme.weight]
    if block and scheme.weight == "int8":
        return "Q8_0"
    return None


def gguf_problem(module) -> tuple[str, str] | None:
    """Why GGUF cannot hold this packed module's values exactly, and the nearest type that can
    (the shape `edgequant.export.common.unsupported` takes)."""
    if exact_type(module.scheme) is not None:
        return None
    nearest = nearest_scheme(module.scheme, module.cols)
    return (
        f"GGUF has no exact type for {module.scheme.describe()} (exact: Q4_0, Q5_0, Q8_0, "
        "Q2_K..Q6_K, F16, BF16, F32)",
        f"{nearest.describe()} ({exact_type(nearest)})",
    )


def nearest_scheme(scheme: Scheme, cols: int = 32) -> Scheme:
    """The exact GGUF scheme closest to ``scheme`` for a weight of ``cols`` input features:
    int4 g32 sym fp16 (Q4_0) up to 4 bits, int5 (Q5_0) at 5, int8 g32 sym fp16 (Q8_0) above,
    fp16 (F16) when 32 does not divide ``cols``.

    >>> nearest_scheme(Scheme("int8")).describe()
    'int8 g32 sym fp16-scales'
    >>> nearest_scheme(Scheme("int4", "per_group", 86), cols=172).describe()
    'fp16'
    """
    import dataclasses

    if cols % 32:
        return Scheme("fp16")
    weight = "int4" if scheme.bits <= 4 else "int5" if scheme.bits == 5 else "int8"
    return dataclasses.replace(
        scheme, weight=weight, granularity="per_group", group_size=32, symmetric=True,
        scale_dtype="fp16", algorithm="minmax", algorithm_params=(),
    )  # fmt: skip


def _q4_0_blocks(q: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """``[rows, cols // 32 * 18]`` bytes: per block fp16 ``d``, then byte ``j`` holds the
    nibbles of elements ``j`` (low) and ``j + 16`` (high), each ``q + 8``."""
    rows, cols = q.shape
    n = (q.to(torch.int16) + 8).to(torch.uint8).reshape(rows, cols // 32, 2, 16)
    packed = (n[:, :, 0] | (n[:, :, 1] << 4)).numpy()
    scales = d.to(torch.float16).reshape(rows, cols // 32, 1).numpy().view(np.uint8)
    return np.concatenate([scales, packed], axis=-1).reshape(rows, -1)


def _q5_0_blocks(q: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """``[rows, cols // 32 * 22]`` bytes: per block fp16 ``d``, a little-endian 32-bit mask
    whose bit ``j`` is the fifth bit of element ``j``, then the low nibbles of ``u = q + 16``
    packed as in Q4_0 (byte ``j``: element ``j`` low, ``j + 16`` high)."""
    rows, cols = q.shape
    u = (q.to(torch.int16) + 16).to(torch.uint8).reshape(rows, cols // 32, 32)
    low = (u & 0x0F).reshape(rows, cols // 32, 2, 16)
    packed = (low[:, :, 0] | (low[:, :, 1] << 4)).numpy()
    high = np.packbits((u >> 4).numpy(), axis=-1, bitorder="little")  # [rows, blocks, 4]
    scales = d.to(torch.float16).reshape(rows, cols // 32, 1).numpy().view(np.uint8)
    return np.concatenate([scales, high, packed], axis=-1).reshape(rows, -1)


def _q8_0_blocks(q: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    rows, cols = q.shape
    values = q.to(torch.int8).reshape(rows, cols // 32, 32).numpy().view(np.uint8)
    scales = d.to(torch.float16).reshape(rows, cols // 32, 1).numpy().view(np.uint8)
    return np.concatenate([scales, values], axis=-1).reshape(rows, -1)


_BLOCKS = {"Q4_0": _q4_0_blocks, "Q5_0": _q5_0_blocks, "Q8_0": _q8_0_blocks}


def _by_rows(blocks, module) -> np.ndarray:
    """``blocks`` of a packed module's integers and scales, a block of rows at a time (the
    blocks are per row): a 151,936-row embedding's int16 temporaries were 1.2 GB at once."""
    return by_row_blocks(
        module.rows,
        rows_per_block(module.cols),
        lambda i, j: blocks(module.int_rows(i, j), module.scale[i:j]),
    )


def encode(
    fqn: str, module: nn.Module, permute: Permute | None, allow_requant: bool, requant: list
) -> tuple[np.ndarray | None, str | tuple[Scheme, int]]:
    """``(data, type)`` of one module's weight; ``requant`` collects re-quantized layers as
    ``(fqn, type, SQNR in dB)``. ``permute`` puts the rows in the file's order (the writer
    passes `edgequant.export.gguf.permute_qk` bound to the head count for q and k, None for
    the rest). Without ``allow_requant`` a scheme with no exact type gives
    ``(None, (scheme, input features))``."""
    if isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
        scheme = module.scheme
        kind = exact_type(scheme)
        if scheme.is_kquant:  # llama.cpp's bytes as they are; q/k rows in the file's order
            blocks = permute(module.blocks) if permute else module.blocks
            return blocks.contiguous().numpy(), kind
        if kind in _BLOCKS:
            blocks = _BLOCKS[kind]
            if permute:  # q/k: rows reordered within each head
                return blocks(permute(module.int_weight()), permute(module.scale)), kind
            return _by_rows(blocks, module), kind
        weight = module.dequantized_weight(torch.float32)
        if kind is None:
            target = exact_type(nearest_scheme(scheme, weight.shape[1]))
            if not allow_requant:
                return None, (scheme, weight.shape[1])
            return _requantize(fqn, weight, target, permute, requant), target
        values = weight.to(torch.float16 if kind == "F16" else torch.float32)
    else:
        values = module.weight.detach().float()
        kind = "F32"
    if permute:
        values = permute(values)
    if kind == "BF16":
        bits = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
        return bits.reshape(values.shape[0], -1), kind
    return values.contiguous().numpy(), kind


def _requantize(fqn, weight, target, permute: Permute | None, requant) -> np.ndarray:
    import gguf

    from edgequant.primitives import sqnr

    qtype = gguf.GGMLQuantizationType[target]
    w = permute(weight) if permute else weight
    if target == "F16":
        data = w.to(torch.float16).numpy()
        back = torch.from_numpy(data).float()
    else:
        data = gguf.quants.quantize(w.numpy(), qtype)
        back = torch.from_numpy(gguf.quants.dequantize(data, qtype).copy()).reshape(w.shape)
    requant.append((fqn, target, sqnr(w, back)))
    return data


def file_type(tensors: Iterable) -> int:
    """GGUF's ``general.file_type`` for the writer's tensors (each with ``name``, ``gguf_type``
    and ``data``): the type holding most of the decoder blocks' values."""
    import gguf

    counts: dict[str, int] = {}
    for t in tensors:
        if t.name.startswith("blk."):
            counts[t.gguf_type] = counts.get(t.gguf_type, 0) + t.data.size
    common = max(counts, key=counts.get) if counts else "F32"
    table = {
        "F32": gguf.LlamaFileType.ALL_F32,
        "F16": gguf.LlamaFileType.MOSTLY_F16,
        "BF16": gguf.LlamaFileType.MOSTLY_BF16,
        "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
        "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        # K-quants: llama.cpp's mixes named for them (the _S ones hold mostly that type)
        "Q2_K": gguf.LlamaFileType.MOSTLY_Q2_K,
        "Q3_K": gguf.LlamaFileType.MOSTLY_Q3_K_S,
        "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_S,
        "Q5_K": gguf.LlamaFileType.MOSTLY_Q5_K_S,
        "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K,
    }
    return int(table[common])


__all__ = ["encode", "exact_type", "file_type", "nearest_scheme"]
