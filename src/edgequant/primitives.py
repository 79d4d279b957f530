"""Quantization math as pure tensor functions: no modules, no I/O, no global state.

Everything edgequant stores or exports goes through these functions, so the integers and scales
that an artifact holds are exactly the ones computed here.

Conventions (one way to say each thing):

- Integers are *signed*: a ``bits``-wide value lies in ``[-2**(bits-1), 2**(bits-1) - 1]``
  (int4: ``[-8, 7]``), asymmetric schemes included, so ``zero_point`` is a signed integer too.
- Affine mapping: ``x ~ (q - zero_point) * scale``. Zero is always representable exactly: a
  symmetric scheme has ``zero_point == 0`` and an asymmetric one widens its range to include 0.
- Symmetric scale: int8 is narrow-range, ``max|x| / 127`` onto ``[-127, 127]``: the grid LiteRT's
  int8 kernels, XNNPACK's int8 weights and GGUF's Q8_0 hold, so int8 values carry over to every
  runtime unchanged. Narrower integers use the whole range, ``max|x| / ((qmax - qmin) / 2)``
  (torchao's convention: int4 divides by 7.5), so all of ``[-8, 7]`` is used; ``+max|x|`` lands
  on 7.5 and clamps to 7, an error of exactly half a step.
- Asymmetric scale: ``(max - min) / (qmax - qmin)`` with ``min <= 0 <= max``;
  ``zero_point = qmin - round(min / scale)``.
- Granularity, for a 2-D ``[rows, cols]`` tensor: ``per_tensor`` (one scale), ``per_channel``
  (one per row: a Linear's output channel, an Embedding's token, an activation's token) or
  ``per_group`` (one per ``group_size`` consecutive columns of a row). Scales and zero points
  have shape ``[rows, n_groups]``: ``[1, 1]``, ``[rows, 1]`` or ``[rows, cols // group_size]``.
- Scales are computed in float32, then rounded *up* to ``scale_dtype`` (to the nearest value,
  or the next one above when nearest would be smaller), so the extremes of a group stay within
  half a step whatever the scale dtype; quantization uses the stored scale.
"""

from __future__ import annotations

import torch

GRANULARITIES = ("per_tensor", "per_channel", "per_group")
FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Smallest scale we emit: keeps an all-zero group finite (its integers are 0 anyway) and is
# representable (as a subnormal) in fp16.
_EPS = torch.finfo(torch.float32).eps


def qrange(bits: int) -> tuple[int, int]:
    """Return ``(qmin, qmax)`` of a signed ``bits``-wide integer.

    >>> qrange(4)
    (-8, 7)
    >>> qrange(8)
    (-128, 127)
    """
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def stored_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integers a scheme stores: `qrange`, except symmetric int8, narrow-range [-127, 127].

    >>> stored_range(8, symmetric=True), stored_range(4, symmetric=True)
    ((-127, 127), (-8, 7))
    """
    qmin, qmax = qrange(bits)
    return (-qmax, qmax) if symmetric and bits == 8 else (qmin, qmax)


def _groups(x: torch.Tensor, granularity: str, group_size: int | None) -> torch.Tensor:
    """View a 2-D tensor as ``[rows, n_groups, group]`` for the given granularity."""
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D tensor [rows, cols], got shape {tuple(x.shape)}")
    rows, cols = x.shape
    if granularity == "per_tensor":
        return x.reshape(1, 1, rows * cols)
    if granularity == "per_channel":
        return x.reshape(rows, 1, cols)
    if granularity == "per_group":
        if not isinstance(group_size, int) or group_size <= 0 or cols % group_size:
            raise ValueError(
                f"group_size {group_size!r} does not divide the {cols} columns; "
                f"sizes that fit: {fitting_group_sizes(cols)}"
            )
        return x.reshape(rows, cols // group_size, group_size)
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def fitting_group_sizes(cols: int) -> list[int]:
    """Group sizes that divide a row of ``cols`` values: even (so int4 packs), at least 8.

    >>> fitting_group_sizes(64)
    [8, 16, 32, 64]
    >>> fitting_group_sizes(172)  # 4 * 43: only coarse groups fit
    [86, 172]
    """
    return [d for d in range(8, cols + 1, 2) if cols % d == 0]


def _round_scale_up(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Positive fp32 scales -> ``dtype``, never below the fp32 value (a smaller stored scale
    would push a group's extreme past the last integer, beyond half a step of error).

    >>> _round_scale_up(torch.tensor([1.0 / 7.5]), torch.float16)  # nearest fp16 is 0.13330
    tensor([0.1334], dtype=torch.float16)
    """
    scale = scale.clamp(min=_EPS)
    out = scale.to(dtype)
    if dtype in (torch.float16, torch.bfloat16):
        low = out.float() < scale
        # positive 16-bit floats order like their bit patterns: +1 is the next value up
        bumped = (out.view(torch.int16) + 1).view(dtype)
        out = torch.where(low, bumped, out)
    return out


def choose_qparams(
    x: torch.Tensor,
    *,
    bits: int,
    symmetric: bool,
    granularity: str = "per_channel",
    group_size: int | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max ``(scale, zero_point)`` for a 2-D tensor; shapes ``[rows, n_groups]``.

    ``zero_point`` is int8 (all zeros when symmetric).

    >>> x = torch.tensor([[-1.0, 0.0, 0.5, 1.5]])
    >>> s, z = choose_qparams(x, bits=4, symmetric=True)
    >>> s  # max|x| / 7.5
    tensor([[0.2000]])
    >>> s, z = choose_qparams(x, bits=4, symmetric=False)
    >>> s, z  # (1.5 - -1.0) / 15, -8 - round(-1.0 / s)
    (tensor([[0.1667]]), tensor([[-2]], dtype=torch.int8))
    """
    qmin, qmax = qrange(bits)
    g = _groups(x.detach().float(), granularity, group_size)
    if symmetric:
        low, high = stored_range(bits, symmetric)  # int8: narrow range (module doc)
        steps = (high - low) / 2
        scale = _round_scale_up(g.abs().amax(dim=-1) / steps, scale_dtype)
        return scale, torch.zeros_like(scale, dtype=torch.int8)
    lo = g.amin(dim=-1).clamp(max=0.0)
    hi = g.amax(dim=-1).clamp(min=0.0)
    scale = _round_scale_up((hi - lo) / (qmax - qmin), scale_dtype)
    zero_point = (qmin - torch.round(lo / scale.float())).clamp(qmin, qmax).to(torch.int8)
    return scale, zero_point


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    *,
    bits: int,
    granularity: str = "per_channel",
    group_size: int | None = None,
) -> torch.Tensor:
    """``clamp(round(x / scale) + zero_point, qmin, qmax)`` as int8, same shape as ``x``.

    >>> x = torch.tensor([[-1.0, 0.0, 0.5, 1.5]])
    >>> s, z = choose_qparams(x, bits=4, symmetric=True)
    >>> quantize(x, s, z, bits=4)
    tensor([[-5,  0,  2,  7]], dtype=torch.int8)
    """
    qmin, qmax = qrange(bits)
    g = _groups(x.float(), granularity, group_size)
    q = torch.round(g / scale.float().unsqueeze(-1)) + zero_point.float().unsqueeze(-1)
    return q.clamp(qmin, qmax).to(torch.int8).reshape(x.shape)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    *,
    granularity: str = "per_channel",
    group_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(q - zero_point) * scale`` in ``dtype``, same shape as ``q``.

    >>> q = torch.tensor([[-5, 0, 2, 7]], dtype=torch.int8)
    >>> dequantize(q, torch.tensor([[0.2]]), None)
    tensor([[-1.0000,  0.0000,  0.4000,  1.4000]])
    """
    g = _groups(q, granularity, group_size).float()
    if zero_point is not None:
        g = g - zero_point.float().unsqueeze(-1)
    return (g * scale.float().unsqueeze(-1)).reshape(q.shape).to(dtype)


def fake_quantize(
    x: torch.Tensor,
    *,
    bits: int,
    symmetric: bool,
    granularity: str = "per_channel",
    group_size: int | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Quantize then dequantize with min-max qparams (the float value a kernel sees).

    >>> fake_quantize(torch.tensor([[-1.0, 0.0, 0.5, 1.5]]), bits=4, symmetric=True)
    tensor([[-1.0000,  0.0000,  0.4000,  1.4000]])
    """
    kw = dict(granularity=granularity, group_size=group_size)
    scale, zp = choose_qparams(x, bits=bits, symmetric=symmetric, scale_dtype=scale_dtype, **kw)
    q = quantize(x, scale, zp, bits=bits, **kw)
    return dequantize(q, scale, zp, dtype=x.dtype, **kw)


# Packing layout: values are offset to unsigned (q + 2**(bits-1)) and ``8 // bits`` consecutive
# values along the last dimension share one byte, the first in the lowest bits:
#   int4: byte = u[2i] | u[2i+1] << 4
#   int2: byte = u[4i] | u[4i+1] << 2 | u[4i+2] << 4 | u[4i+3] << 6
PACKABLE_BITS = (2, 4)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed ``bits``-wide integers (int8 tensor) along the last dim into uint8.

    >>> pack(torch.tensor([[-8, 7, 0, 1]], dtype=torch.int8), 4)  # u = [0, 15, 8, 9]
    tensor([[240, 152]], dtype=torch.uint8)
    """
    if bits not in PACKABLE_BITS:
        raise ValueError(f"pack supports bits in {PACKABLE_BITS}, got {bits!r}")
    per_byte = 8 // bits
    if q.shape[-1] % per_byte:
        raise ValueError(
            f"the last dimension ({q.shape[-1]}) must be a multiple of {per_byte} to pack "
            f"int{bits} values {per_byte} per byte"
        )
    qmin, qmax = qrange(bits)
    if q.numel() and (int(q.min()) < qmin or int(q.max()) > qmax):
        raise ValueError(f"values out of the int{bits} range [{qmin}, {qmax}]")

    def packed(x: torch.Tensor) -> torch.Tensor:
        u = (x.to(torch.int16) - qmin).to(torch.uint8)
        u = u.reshape(*x.shape[:-1], x.shape[-1] // per_byte, per_byte)
        out = torch.zeros(u.shape[:-1], dtype=torch.uint8)
        for i in range(per_byte):
            out |= u[..., i] << (bits * i)
        return out

    if q.dim() < 2:
        return packed(q)
    # a block of rows at a time: the int16 temporaries of a whole 151,936-row embedding were
    # four times its integers
    return by_row_blocks(q.shape[0], rows_per_block(q[0].numel()), lambda i, j: packed(q[i:j]))


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 bytes -> signed int8 values (last dim grows ``8 // bits``x).

    >>> unpack(torch.tensor([[240, 152]], dtype=torch.uint8), 4)
    tensor([[-8,  7,  0,  1]], dtype=torch.int8)
    """
    if bits not in PACKABLE_BITS:
        raise ValueError(f"unpack supports bits in {PACKABLE_BITS}, got {bits!r}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed data must be uint8, got {packed.dtype}")
    per_byte, mask = 8 // bits, (1 << bits) - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per_byte)]
    u = torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)
    return (u.to(torch.int16) + qrange(bits)[0]).to(torch.int8)


def cast_float(x: torch.Tensor, dtype: torch.dtype, name: str = "tensor") -> torch.Tensor:
    """Round to fp16/bf16/fp32, refusing values that would overflow to infinity.

    >>> cast_float(torch.tensor([1.0, 65504.0]), torch.float16)
    tensor([1.0000e+00, 6.5504e+04], dtype=torch.float16)
    """
    if dtype not in FLOAT_DTYPES.values():
        raise ValueError(f"dtype must be one of {list(FLOAT_DTYPES.values())}, got {dtype}")
    out = x.to(dtype)
    if not torch.isfinite(out).all() and torch.isfinite(x).all():
        big = x.abs().max().item()
        raise ValueError(
            f"{name} has values up to {big:g}, beyond the largest {dtype} "
            f"({torch.finfo(dtype).max:g}); keep it in a wider dtype"
        )
    return out


def sqnr(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(|ref|^2 / |ref - approx|^2)``.

    >>> round(sqnr(torch.tensor([1.0, 1.0]), torch.tensor([1.1, 0.9])), 1)
    20.0
    """
    ref = reference.detach().double()
    noise = (ref - approximation.detach().double()).pow(2).sum()
    signal = ref.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))


def count_nonfinite(t: torch.Tensor, block: int = 1 << 22) -> int:
    """How many values of ``t`` are NaN or infinite, counted ``block`` values at a time (a whole
    tensor's boolean mask would be a quarter of a float32 embedding's size).

    >>> count_nonfinite(torch.tensor([1.0, float("nan"), float("inf")]))
    2
    """
    flat = t.detach().reshape(-1)
    return sum(
        int(flat[i : i + block].numel() - torch.isfinite(flat[i : i + block]).sum())
        for i in range(0, flat.numel(), block)
    )


# Large tensors are worked on a block of whole rows at a time, about this many values a block:
# the temporaries stay a few MiB, which the allocator reuses, where whole-tensor ones were
# mapped and unmapped by the kernel on every step and their pages faulted in anew.
BLOCK_ELEMENTS = 1 << 20


def rows_per_block(row_values: int, block: int = BLOCK_ELEMENTS) -> int:
    """Rows of ``row_values`` values each in a block of about ``block`` values (at least one).

    >>> rows_per_block(576), rows_per_block(3_000_000)
    (1820, 1)
    """
    return max(1, block // max(row_values, 1))


def by_row_blocks(rows: int, step: int, part):
    """``part(start, stop)`` (a torch tensor or numpy array of ``stop - start`` rows) for blocks
    of ``step`` rows, written into one result of ``rows`` rows as each block is made: the
    temporaries of a 151,936-row embedding stay those of one block.

    >>> by_row_blocks(5, 2, lambda i, j: torch.arange(i, j)[:, None] * 10).flatten().tolist()
    [0, 10, 20, 30, 40]
    """
    out = None
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        block = part(start, stop)
        if out is None:
            shape = (rows, *block.shape[1:])
            if isinstance(block, torch.Tensor):
                out = block.new_empty(shape)
            else:
                import numpy as np

                out = np.empty(shape, dtype=block.dtype)
        out[start:stop] = block
    return out
