"""Fast CPU kernels, each the same computation as its `reference` twin (tests compare them).

Which one a layer uses is decided once per layer by `choose` (measured choices, see
``benchmarks/kernels.py`` and docs/kernels.md):

- ``int8_dynamic`` (int8 per-channel symmetric weights, int8 per-token activations):
  one token -> fbgemm's dynamic quantized linear (with one token, its per-call activation range
  *is* the per-token range) where fbgemm is exact (`fbgemm_is_exact`: CPUs with VNNI; on AVX2
  alone its kernel adds pairs of uint8 x int8 products in int16 and saturates); otherwise and
  for several tokens -> per-token int8 quantization + ``torch._int_mm`` (exact int32
  accumulation) + the zero-point correction;
- ``int8_weight_only`` (int8 per-channel symmetric, float activations):
  ``torch._weight_int8pack_mm`` on bf16 activations, the fp32 per-channel scales applied after;
- ``int4_weight_only`` (int4 per-group): ``torch._weight_int4pack_mm_for_cpu`` on bf16
  activations with bf16 scales / zeros;
- ``int4_dynamic`` (8da4w): activations quantized per token; the integers ``q - zero_point``
  (exact in bf16, |v| <= 255) go through the int4 kernel, the token scales are applied after;
- ``upcast_cached`` (fp16 / bf16 and K-quant weights): the reference computation with the fp32
  weight made once and cached (bit-exact with the reference; run-time memory of a float layer).

bf16 appears only where the result of a kernel is rounded (about 3 significant digits); the
tests hold every fast kernel to an SQNR floor against its reference.
"""

from __future__ import annotations

import functools
import warnings

import torch

from edgequant.kernels.reference import quantize_tokens
from edgequant.primitives import by_row_blocks, rows_per_block

_HAS_INT4 = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
_HAS_INT8 = hasattr(torch.ops.aten, "_weight_int8pack_mm")
_HAS_FBGEMM = "fbgemm" in torch.backends.quantized.supported_engines


# Shape limits of torch 2.13's CPU kernels, found by trial here: _weight_int8pack_mm returns
# garbage (or crashes) unless in_features % 16 == 0; the int4 kernel needs out_features % 16 == 0
# and a group size of 32, 64, 128 or 256. Layers outside these limits use the reference.
_INT4_GROUPS = (32, 64, 128, 256)


def choose(layer) -> str | None:
    """Name of the fast kernel for this layer's scheme and shape, or None for the reference."""
    s = layer.scheme
    if s.weight in ("fp16", "bf16") or s.is_kquant:
        return "upcast_cached"
    if not s.is_integer:
        return None
    per_channel_sym8 = s.bits == 8 and s.granularity == "per_channel" and s.symmetric
    if s.activation == "int8_dynamic" and per_channel_sym8:
        return "int8_dynamic"
    if s.activation == "none" and per_channel_sym8 and _HAS_INT8 and layer.cols % 16 == 0:
        return "int8_weight_only"
    int4_groups = (
        _HAS_INT4
        and s.bits == 4
        and s.granularity == "per_group"
        and s.group_size in _INT4_GROUPS
        and layer.rows % 16 == 0
    )
    if int4_groups and s.activation == "none":
        return "int4_weight_only"
    if int4_groups and s.activation == "int8_dynamic":
        return "int4_dynamic"
    return None


def _cached(layer, key: str, build):
    cache = layer._kernel_cache
    if key not in cache:
        cache[key] = build()
    return cache[key]


def _fbgemm_packed(layer):
    return _fbgemm_pack(layer.qweight, layer.scale.float().reshape(-1).double())


def _fbgemm_pack(qweight: torch.Tensor, scale: torch.Tensor):
    zp = torch.zeros(qweight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated, fbgemm's kernel is not
        warnings.simplefilter("ignore")
        wq = torch._make_per_channel_quantized_tensor(qweight, scale, zp, 0)
        return torch.ops.quantized.linear_prepack(wq, None)


@functools.cache
def fbgemm_is_exact() -> bool:
    """Whether fbgemm's dynamic int8 linear sums this CPU's products exactly. Without VNNI
    (AVX2 alone) it adds each pair of uint8 x int8 products in int16, which saturates: one token
    of 255s against weights of 127 gives 4,112 a row instead of 8,128 (seen on an AVX2 machine
    here). Probed once, on that worst case."""
    if not _HAS_FBGEMM:
        return False
    cols = 64
    packed = _fbgemm_pack(torch.full((16, cols), 127, dtype=torch.int8), torch.ones(16).double())
    y = torch.ops.quantized.linear_dynamic(torch.ones(1, cols), packed, False)
    return bool(torch.allclose(y, torch.full_like(y, 127.0 * cols), rtol=1e-3))


def _finish(y: torch.Tensor, layer, shape) -> torch.Tensor:
    if layer.bias is not None:
        y = y + layer.bias
    return y.reshape(*shape[:-1], layer.rows)


def int8_dynamic(x: torch.Tensor, layer) -> torch.Tensor:
    shape = x.shape
    x2d = x.reshape(-1, shape[-1]).float()
    if x2d.shape[0] == 1 and not layer.scheme.activation_symmetric and fbgemm_is_exact():
        packed = _cached(layer, "fbgemm", lambda: _fbgemm_packed(layer))
        y = torch.ops.quantized.linear_dynamic(x2d, packed, False)
        return _finish(y, layer, shape)
    q, s_x, z_x = quantize_tokens(x2d, layer.scheme.activation_symmetric)
    w_t = layer.qweight.t()  # [K, N] view; _int_mm reads the [N, K] storage directly
    acc = torch._int_mm(q, w_t)  # [M, N] int32, exact
    row_sums = _cached(layer, "row_sums", lambda: layer.qweight.sum(1, dtype=torch.int32))
    acc = acc - z_x.to(torch.int32) * row_sums  # sum_k (q_x - z_x) q_w
    y = acc.float() * s_x * layer.scale.float().reshape(1, -1)
    return _finish(y, layer, shape)


def int8_weight_only(x: torch.Tensor, layer) -> torch.Tensor:
    shape = x.shape
    x2d = x.reshape(-1, shape[-1]).to(torch.bfloat16)
    ones = _cached(layer, "ones", lambda: torch.ones(layer.rows, dtype=torch.bfloat16))
    y = torch.ops.aten._weight_int8pack_mm(x2d, layer.qweight, ones).float()
    return _finish(y * layer.scale.float().reshape(1, -1), layer, shape)


def _int4_packed(layer):
    """Weights and ``[n_groups, N, 2]`` bf16 scales/zeros in the layout of torch's int4 kernel.

    The kernel computes ``(u - 8) * scale + zero`` with ``u = q + 8``; our value is
    ``(q - zero_point) * scale``, so ``zero = -zero_point * scale``.
    """
    # converted a block of rows at a time (the layout packs tiles of 64 rows: a block must
    # start at a multiple of 64, checked in tests/kernels): the int32 copy of a whole
    # 151,936-row head took 0.9 GB for a moment
    step = max(64, rows_per_block(layer.cols) // 64 * 64)

    def converted(start: int, stop: int) -> torch.Tensor:
        u = (layer.int_rows(start, stop).to(torch.int32) + 8).contiguous()
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)

    prepacked = by_row_blocks(layer.rows, step, converted)
    scale = layer.scale.float()
    zero = torch.zeros_like(scale) if layer.zero_point is None else -layer.zero_point * scale
    sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    return prepacked, sz


def _int4_mm(x2d_bf16: torch.Tensor, layer) -> torch.Tensor:
    prepacked, sz = _cached(layer, "int4", lambda: _int4_packed(layer))
    return torch.ops.aten._weight_int4pack_mm_for_cpu(
        x2d_bf16, prepacked, layer.scheme.group_size, sz
    ).float()


def int4_weight_only(x: torch.Tensor, layer) -> torch.Tensor:
    shape = x.shape
    y = _int4_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), layer)
    return _finish(y, layer, shape)


def int4_dynamic(x: torch.Tensor, layer) -> torch.Tensor:
    shape = x.shape
    q, s_x, z_x = quantize_tokens(
        x.reshape(-1, shape[-1]).float(), layer.scheme.activation_symmetric
    )
    ints = (q.to(torch.int16) - z_x.to(torch.int16)).to(torch.bfloat16)  # exact: |v| <= 255
    return _finish(_int4_mm(ints, layer) * s_x, layer, shape)


def upcast_cached(x: torch.Tensor, layer) -> torch.Tensor:
    """fp16 / bf16 (and K-quant) weights with fp32 activations and compute, exactly as the
    reference, but the fp32 weight is made once and kept: upcasting on every call was 7-8x
    slower than fp32 here, and a matmul in fp16 would round the activations (logits SQNR 72 ->
    66 dB on stories260K). Run-time memory is therefore that of the float layer; the bundle
    stores the 16-bit weight (a K-quant's blocks)."""
    weight = _cached(layer, "fp32_weight", lambda: layer.dequantized_weight())
    return torch.nn.functional.linear(x.float(), weight, layer.bias)


KERNELS = {
    "upcast_cached": upcast_cached,
    "int8_dynamic": int8_dynamic,
    "int8_weight_only": int8_weight_only,
    "int4_weight_only": int4_weight_only,
    "int4_dynamic": int4_dynamic,
}
