"""Export to ExecuTorch (``.pte``), lowered to XNNPACK, carrying edgequant's own values.

Each packed module is replaced, for export only, by the graph pattern XNNPACK's partitioner
recognises, built from edgequant's stored integers and scales (no re-quantization):

- 8da4w (int4 symmetric group-wise weights, int8 per-token asymmetric activations):
  ``choose_qparams_per_token_asymmetric -> quantize_per_token -> dequantize_per_token`` on the
  activations, ``dequantize_per_channel_group`` on the int4 values (held in int8), ``linear``;
- int8-dynamic (int8 per-channel symmetric weights): the same activation pattern and
  ``dequantize_per_channel`` on the weights;
- fp16 weights: the linear runs in fp16 (its input rounded to fp16, as XNNPACK's fp16 kernels
  do; edgequant's eager layer computes in fp32), the embedding looks up fp16 rows;
- int8 / int4 group-wise embeddings: ExecuTorch's ``embedding_byte`` / ``embedding_4bit``.

Schemes XNNPACK cannot run correctly are refused before anything is written, naming the layers
and the nearest scheme it can run; with ``allow_fallback`` they are kept in float (their
dequantized weights, float activations) with a warning listing them.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgequant._io import write_bytes_atomic
from edgequant.export.common import (
    Unsupported,
    check_out,
    default_max_seq_len,
    float_twin,
    negative_scales,
    packed_modules,
    refuse_or_warn,
    swap_module,
    unsupported,
)
from edgequant.layers import QuantizedEmbedding, QuantizedLinear


def xnnpack_problem(module: nn.Module) -> tuple[str, str] | None:
    """Why XNNPACK cannot run this packed module as stored, and the nearest scheme it can."""
    s = module.scheme
    if s.is_kquant:
        return (
            f"{s.weight} is llama.cpp's K-quant block format: only a GGUF runs it",
            "int4 g32 (8da4w) or int8 per-channel with activation int8_dynamic",
        )
    if s.weight == "bf16":
        return ("XNNPACK has no bf16 kernels here", "fp16")
    if s.weight == "fp16" and s.activation == "none":
        return None
    negative = negative_scales(module)
    if negative:
        return negative
    if isinstance(module, QuantizedEmbedding):  # ExecuTorch's quantized lookup kernels
        if (
            s.is_integer
            and s.symmetric
            and (
                (s.bits == 8 and s.granularity in ("per_channel", "per_group"))
                or (s.bits == 4 and s.granularity == "per_group")
            )
        ):
            return None
        return (
            f"ExecuTorch's quantized embedding kernels take symmetric int8 or int4 group-wise "
            f"rows, not {s.describe()}",
            "int8 per-channel or int4 group-wise symmetric",
        )
    if not s.is_integer:
        return (f"{s.describe()} is not exported", "fp16 or int8-dynamic")
    if s.activation != "int8_dynamic":
        return (
            "weight-only integer linears ran but gave wrong outputs on XNNPACK in a trial here",
            "the same weights with activation int8_dynamic (8da4w / int8-dynamic)",
        )
    if s.activation_symmetric:
        return ("XNNPACK's dynamic activations are asymmetric", "activation_symmetric: false")
    if s.bits == 4 and s.granularity == "per_group" and s.symmetric:
        if s.group_size % 32:
            return (
                f"XNNPACK's int4 kernels need a group size that is a multiple of 32, got "
                f"{s.group_size}",
                "a group of 32, 64, 128 or 256 that divides the layer's inputs",
            )
        return None
    if s.bits == 8 and s.granularity == "per_channel" and s.symmetric:
        return None
    return (f"{s.describe()} has no XNNPACK kernel", "8da4w or int8-dynamic")


def check_xnnpack(model: nn.Module) -> list[Unsupported]:
    """Every packed module XNNPACK cannot run as stored."""
    return unsupported(model, xnnpack_problem)


def _per_token_dynamic(x: torch.Tensor) -> torch.Tensor:
    qd = torch.ops.quantized_decomposed
    scale, zero_point = qd.choose_qparams_per_token_asymmetric(x, torch.int8)
    xq = qd.quantize_per_token(x, scale, zero_point, -128, 127, torch.int8)
    return qd.dequantize_per_token(xq, scale, zero_point, -128, 127, torch.int8, x.dtype)


class ExportLinear(nn.Module):
    """The XNNPACK-recognisable form of a packed 8da4w or int8-dynamic linear."""

    def __init__(self, layer: QuantizedLinear) -> None:
        super().__init__()
        s = layer.scheme
        self.bits, self.group_size = s.bits, s.group_size
        self.register_buffer("weight_int8", layer.int_weight().clone())  # our integers
        scale = layer.scale.float()  # fp16/bf16 -> fp32 is exact: our scales, bit for bit
        self.register_buffer("scales", scale.squeeze(1) if s.bits == 8 else scale)
        zeros = torch.zeros(self.scales.shape, dtype=torch.int64)
        self.register_buffer("zeros", zeros)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.clone(), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = torch.ops.quantized_decomposed
        if self.bits == 4:
            weight = qd.dequantize_per_channel_group(
                self.weight_int8,
                self.scales,
                self.zeros,
                -8,
                7,
                torch.int8,
                self.group_size,
                torch.float32,
            )
        else:
            weight = qd.dequantize_per_channel(
                self.weight_int8, self.scales, self.zeros, 0, -127, 127, torch.int8
            )
        return F.linear(_per_token_dynamic(x), weight, self.bias)


class ExportEmbedding(nn.Module):
    """A packed embedding as ExecuTorch's ``embedding_byte`` / ``embedding_4bit`` lookup.

    ``embedding_4bit`` packs two values per byte with the *even* column in the high nibble
    (``(q_even + 8) << 4 | (q_odd + 8)``); edgequant stores the even column in the low nibble,
    so the bytes are re-packed (same integers). Scales are edgequant's, in their own dtype."""

    def __init__(self, layer: QuantizedEmbedding) -> None:
        super().__init__()
        s = layer.scheme
        self.bits = s.bits
        q = layer.int_weight()
        if s.bits == 4:
            u = (q.to(torch.int16) + 8).to(torch.uint8)
            q = (u[:, 0::2] << 4) | u[:, 1::2]
        self.register_buffer("weight", q.contiguous())
        self.register_buffer("scales", layer.scale.clone())
        self.embed_scale = layer.embed_scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        qd = torch.ops.quantized_decomposed
        if self.bits == 4:
            rows = qd.embedding_4bit.dtype(
                self.weight, self.scales, None, -8, 7, ids, dtype=torch.float32
            )
        else:
            rows = qd.embedding_byte.dtype(
                self.weight, self.scales, None, -128, 127, ids, dtype=torch.float32
            )
        return rows if self.embed_scale is None else rows * self.embed_scale


class ExportHalfLinear(nn.Module):
    """An fp16 linear as XNNPACK runs it: fp16 input and weight, fp32 out."""

    def __init__(self, layer: QuantizedLinear) -> None:
        super().__init__()
        self.register_buffer("weight", layer.weight.clone())  # our fp16 values
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.half(), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.float16), self.weight, self.bias).to(torch.float32)


class ExportHalfEmbedding(nn.Module):
    """An fp16 table: rows looked up in fp16, returned in fp32 (exact)."""

    def __init__(self, layer: QuantizedEmbedding) -> None:
        super().__init__()
        self.register_buffer("weight", layer.weight.clone())
        self.embed_scale = layer.embed_scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight).to(torch.float32)
        return rows if self.embed_scale is None else rows * self.embed_scale


def _export_form(module: nn.Module) -> nn.Module:
    embedding = isinstance(module, QuantizedEmbedding)
    if not module.scheme.is_integer:
        return ExportHalfEmbedding(module) if embedding else ExportHalfLinear(module)
    return ExportEmbedding(module) if embedding else ExportLinear(module)


def prepare(model: nn.Module, allow_fallback: bool = False) -> nn.Module:
    """A copy of ``model`` with every packed module in its export form (checked first)."""
    problems = check_xnnpack(model)
    refuse_or_warn(problems, "XNNPACK", allow_fallback)
    model = copy.deepcopy(model)
    refused = {p.fqn for p in problems}
    for fqn, module in list(packed_modules(model)):
        swap_module(model, fqn, float_twin(module) if fqn in refused else _export_form(module))
    return model


def export_program(model: nn.Module, max_seq_len: int | None = None, allow_fallback: bool = False):
    """``(torch.export.ExportedProgram, DecoderSpec)`` of the model's decoder (any family in
    `edgequant.models.families`), before lowering; its constants are edgequant's stored
    integers and scales. ``max_seq_len`` defaults to
    `edgequant.export.common.default_max_seq_len`."""
    import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401  (embedding ops)
    import torchao  # noqa: F401  (registers the quantized_decomposed ops)

    from edgequant.export.attention import ExecuTorchDecoder
    from edgequant.models.families import decoder_of

    decoder = decoder_of(model)
    max_seq_len = default_max_seq_len(decoder) if max_seq_len is None else max_seq_len
    program_module = ExecuTorchDecoder(prepare(decoder, allow_fallback), max_seq_len).eval()
    example = (torch.zeros(1, 2, dtype=torch.long), torch.tensor([0], dtype=torch.long))
    seq = torch.export.Dim("seq", min=1, max=max_seq_len)
    with torch.no_grad():
        program = torch.export.export(
            program_module,
            example,
            dynamic_shapes={"tokens": {1: seq}, "input_pos": None},
            strict=False,
        )
    return program, decoder.spec


def to_pte(
    model: nn.Module,
    path: str | Path,
    *,
    max_seq_len: int | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
    allow_fallback: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (any family's decoder, packed or float) as a ``.pte``.

    The program's ``forward(tokens [1, T] int64, input_pos [1] int64) -> logits [1, T, vocab]``
    keeps a static KV cache of ``max_seq_len`` positions (default: 512, or the model's context
    when shorter); the constant methods ExecuTorch's LLM runner reads are included.
    """
    path = check_out(path, overwrite)
    if max_seq_len is None:
        max_seq_len = default_max_seq_len(model)
    with warnings.catch_warnings():  # torch/executorch deprecation chatter during export
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        program, spec = export_program(model, max_seq_len, allow_fallback)
    metadata = {
        "get_max_seq_len": max_seq_len,
        "get_max_context_len": max_seq_len,
        "get_vocab_size": spec.vocab_size,
        "get_n_layers": spec.n_layers,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": True,
        "enable_dynamic_shape": True,
    }
    if bos_id is not None:
        metadata["get_bos_id"] = bos_id
    if eos_id is not None:
        metadata["get_eos_ids"] = [eos_id]
    return lower_to_pte(program, path, constant_methods=metadata, overwrite=overwrite)


def lower_to_pte(
    program, path: str | Path, *, constant_methods: dict | None = None, overwrite: bool = False
) -> Path:
    """Lower a ``torch.export.ExportedProgram`` to XNNPACK and write it as ``path`` (a temporary
    file renamed into place)."""
    import executorch.kernels.quantized  # noqa: F401  (out variants of un-delegated q/dq ops)
    import torchao  # noqa: F401  (registers the quantized_decomposed ops)
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    path = check_out(path, overwrite)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        # the KV cache buffers are mutated by design; their initial values are not needed
        warnings.filterwarnings("ignore", message="Mutation on a buffer in the model")
        edge = to_edge_transform_and_lower(
            program,
            partitioner=[XnnpackPartitioner()],
            constant_methods=constant_methods,
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
        )
        buffer = edge.to_executorch().buffer
    return write_bytes_atomic(path, buffer)
