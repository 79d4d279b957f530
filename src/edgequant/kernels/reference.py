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
