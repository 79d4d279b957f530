"""Pure-torch reference kernels: the definition of what every scheme computes.

Fast kernels (`edgequant.kernels.cpu`) must agree with these; tests compare the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgequant.primitives import choose_qparams, dequantize, quantize, unpack


def quantize_tokens(x2d: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, ...]:
    """Per-token int8 quantization of activations ``[tokens, features]``.

    Returns ``(q int8, scale fp32 [tokens, 1], zero_point int8 [tokens, 1])``: each token (row)
    gets its own min-max range, never one range for a whole batch.
    """
    scale, zp = choose_qparams(x2d, bits=8, symmetric=symmetric, granularity="per_channel")
    return quantize(x2d, scale, zp, bits=8), scale, zp


def fake_quantize_tokens(x: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """Activations as the int8 dynamic kernels see them: quantized per token, dequantized."""
    x2d = x.reshape(-1, x.shape[-1]).float()
    q, scale, zp = quantize_tokens(x2d, symmetric)
    return dequantize(q, scale, zp).reshape(x.shape)


def fake_quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """Activations as llama.cpp's CPU matmuls see them for a Q4_0 / Q5_0 / Q8_0 weight: blocks
    of 32 along the features, each ``round(x / d)`` with ``d = absmax / 127`` (rounding half
    away from zero), dequantized with ``d`` stored in fp16 (ggml's ``quantize_row_q8_0``).

    >>> x = torch.tensor([[1.0] * 31 + [-127.0]])
    >>> fake_quantize_q8_0(x)[0, -2:].tolist()
    [1.0, -127.0]
    """
    shape = x.shape
    if shape[-1] % 32:
        raise ValueError(f"Q8_0 activations need features divisible by 32, got {shape[-1]}")
    blocks = x.float().reshape(-1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    v = blocks * inverse
    q = v.sign() * (v.abs() + 0.5).floor()
    return (q * d.half().float()).reshape(shape)


# How a runtime's matmul rounds the input of each weight dtype, for `linear_as`.
ACTIVATIONS_AS = ("ggml",)


def check_runtime(runtime: str) -> None:
    """Refuse a ``runtime`` whose arithmetic `linear_as` does not know."""
    if runtime not in ACTIVATIONS_AS:
        raise ValueError(f"unknown runtime arithmetic {runtime!r}; known: {list(ACTIVATIONS_AS)}")


def linear_as(x: torch.Tensor, layer, runtime: str) -> torch.Tensor:
    """`linear` with the input rounded as ``runtime`` rounds it instead of as the scheme says.

    ``ggml`` (llama.cpp's CPU backend): an integer weight (written as Q4_0 / Q5_0 / Q8_0) meets
    Q8_0 activation blocks; an fp16 / bf16 weight meets activations converted to its dtype;
    fp32 activations stay as they are, and so do a K-quant weight's (llama.cpp rounds them to
    8-bit blocks of 256, Q8_K; not modelled here: on a random 256-wide Llama the eager model's
    logits are 36 dB from llama.cpp's either way).
    """
    check_runtime(runtime)
    scheme = layer.scheme
    x = x.float()
    if scheme.is_integer:
        x = fake_quantize_q8_0(x)
    elif scheme.weight in ("fp16", "bf16"):
        x = x.to(torch.float16 if scheme.weight == "fp16" else torch.bfloat16).float()
    return F.linear(x, layer.dequantized_weight(), layer.bias)


def linear(x: torch.Tensor, layer) -> torch.Tensor:
    """``F.linear`` on the dequantized weight; int8 dynamic schemes quantize ``x`` per token."""
    scheme = layer.scheme
    x = x.float()
    if scheme.activation == "int8_dynamic":
        x = fake_quantize_tokens(x, scheme.activation_symmetric)
    elif scheme.activation != "none":
        raise NotImplementedError(f"no kernel for activation mode {scheme.activation!r}")
    return F.linear(x, layer.dequantized_weight(), layer.bias)


def embedding(ids: torch.Tensor, layer) -> torch.Tensor:
    """Gather the packed rows of ``ids`` and dequantize only those."""
    scheme = layer.scheme
    if scheme.is_kquant:
        from edgequant import kquants

        rows = kquants.dequantize(layer.blocks[ids.reshape(-1)], scheme.weight)
        return rows.reshape(*ids.shape, layer.cols)
    if not scheme.is_integer:
        return F.embedding(ids, layer.weight).float()
    flat = ids.reshape(-1)
    q = layer.qweight[flat]
    if scheme.bits in (2, 4):
        q = unpack(q, scheme.bits)
    if scheme.granularity == "per_tensor":
        scale, zp = layer.scale, layer.zero_point
    else:
        scale = layer.scale[flat]
        zp = None if layer.zero_point is None else layer.zero_point[flat]
    rows = dequantize(q, scale, zp, granularity=scheme.granularity, group_size=scheme.group_size)
    return rows.reshape(*ids.shape, layer.cols)
