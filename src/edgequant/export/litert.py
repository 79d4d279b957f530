"""Export to LiteRT (``.tflite``) keeping edgequant's values.

The decoder is converted by litert-torch with its KV cache as explicit inputs and outputs and
two signatures, ``prefill`` (a chunk of ``prefill_len`` tokens) and ``decode`` (one token):

    (tokens [1, T] int32, input_pos [T] int32, k_0, v_0, ..., k_{L-1}, v_{L-1})
        -> (logits [1, T, vocab], k_0', v_0', ...)      caches [1, max_seq_len, kv_heads, head_dim]

Quantization keeps edgequant's integers: the model is converted with each packed module's
dequantized weights (its integers times its scales, exact in fp32), then ai-edge-quantizer's
dequantized-weight recovery lays out the quantized tensors op by op, and edgequant writes its own
integers and scales into them. Ops are matched to modules by weight content (tensor names in the
converted file are fused and do not name one module), and the written file is read back: every
packed module must come out with its values, or the export fails.

Supported: fp16 weights (weight-only); int8 symmetric per-channel weights (weight-only or with
int8 dynamic activations); int4 symmetric group-wise weights with groups of 32, 64, 128 or 256
and int8 dynamic activations (ai-edge-quantizer has no int4 weight-only layout for
FULLY_CONNECTED), and int4 group-wise embedding tables. int8 integers and fp32 scales are kept
exactly; LiteRT's int4 block scales are fp16 numbers rounded to bf16 precision (see
`block_scales`), so only ``scale_dtype: bf16`` int4 scales are kept bit for bit.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgequant._io import write_bytes_atomic
from edgequant._modules import shallow_copy
from edgequant.export.common import (
    check_out,
    default_max_seq_len,
    float_twin,
    negative_scales,
    packed_modules,
    refuse_or_warn,
    swap_module,
    unsupported,
)
from edgequant.layers import QuantizedEmbedding
from edgequant.models.decoder import RMSNorm
from edgequant.schemes import Scheme

_BLOCKS = (32, 64, 128, 256)


# ---- what LiteRT can hold exactly -----------------------------------------------------------
def litert_problem(module: nn.Module) -> tuple[str, str] | None:
    """Why this packed module cannot be written to LiteRT as stored, and the nearest scheme."""
    s = module.scheme
    if s.is_kquant:
        return (
            f"{s.weight} is llama.cpp's K-quant block format: only a GGUF runs it",
            "int4 blocks or int8 per-channel",
        )
    if s.weight == "fp16" and s.activation == "none":
        return None
    if not s.is_integer:
        return (f"{s.weight} weights are not written to LiteRT", "fp16")
    negative = negative_scales(module)
    if negative:
        return negative
    if s.bits == 8:
        if s.granularity != "per_channel" or not s.symmetric:
            return (f"{s.describe()} has no LiteRT kernel", "int8 symmetric per-channel")
        if s.activation == "int8_static":
            return ("static activations are not written to LiteRT", "activation int8_dynamic")
        return None
    if s.bits != 4 or s.granularity != "per_group" or not s.symmetric:
        return (f"{s.describe()} has no LiteRT kernel", "int4 symmetric group-wise or fp16")
    if s.group_size not in _BLOCKS:
        return (
            f"LiteRT's int4 blocks are 32, 64, 128 or 256 wide, not {s.group_size}",
            "a group of 32, 64, 128 or 256 that divides the layer's inputs",
        )
    if s.activation != "int8_dynamic" and not isinstance(module, QuantizedEmbedding):
        return (
            "ai-edge-quantizer writes int4 block-wise weights for LiteRT's dynamic-range kernels "
            f"only, not with activation {s.activation!r}",
            "activation int8_dynamic, or int8 per-channel weight-only",
        )
    return None


def check_litert(model: nn.Module):
    """Every packed module LiteRT cannot hold as stored (`edgequant.export.common.Unsupported`)."""
    return unsupported(model, litert_problem)


# ---- conversion ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Stored:
    """One packed module as edgequant stores it, and its float weights in the converted file."""

    scheme: Scheme
    content: tuple  # (shape, sha256 of the fp32 weights the float conversion holds)
    values: np.ndarray  # the integers (int8 array) or the fp16 weights
    scales: np.ndarray | None


def _content(weights: np.ndarray) -> tuple:
    """What identifies a weight tensor by its content, without holding a second copy of it."""
    return tuple(weights.shape), hashlib.sha256(np.ascontiguousarray(weights).data).digest()


def _dequantized_copy(model: nn.Module) -> tuple[nn.Module, dict[str, _Stored]]:
    """A float copy to convert (each packed module's dequantized weights), and what each packed
    module stores (to find its op in the converted file and to write and check its values).
    ai-edge-quantizer's recovery only lays the quantized tensors out; edgequant's own integers
    and scales replace what it recovers (`_restore`)."""
    model = shallow_copy(model)
    packed, weights = {}, {}
    for fqn, module in list(packed_modules(model)):
        twin = float_twin(module)
        if module.scheme.is_integer:
            values, scales = module.int_weight().numpy(), module.scale.float().numpy()
        else:
            values, scales = module.weight.numpy(), None
        content = _content(twin.weight.detach().numpy())
        # equal weights (a tied embedding and head packed twice) share one tensor, so that the
        # converter writes them once
        twin.weight = weights.setdefault(content, twin.weight)
        packed[fqn] = _Stored(module.scheme, content, values.copy(), scales)
        swap_module(model, fqn, twin)
    return model, packed


class _WeightFirstNorm(nn.Module):
    """An RMSNorm that multiplies by its weight before the normalisation: the same function,
    but the op feeding the next linear is no longer a multiplication by a constant. LiteRT's
    converter folds such a constant into the linear's weights when it is uniform (a norm whose
    weights are all 2), and the linear then no longer holds edgequant's values."""

    def __init__(self, norm: RMSNorm) -> None:
        super().__init__()
        self.eps, self.offset, self.weight = norm.eps, norm.offset, norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.weight if self.offset == 0 else self.offset + self.weight.float()
        return ((xf * weight) * scale).type_as(x)


def _op_config(scheme: Scheme, lookup: bool = False):
    """``(algorithm, OpQuantizationConfig)`` holding ``scheme`` in ai-edge-quantizer's terms."""
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    if not scheme.is_integer:  # fp16: a cast, exact for values that are fp16 already
        weight = qtyping.TensorQuantizationConfig(num_bits=16, dtype=qtyping.TensorDataType.FLOAT)
        config = qtyping.OpQuantizationConfig(
            weight_tensor_config=weight,
            compute_precision=qtyping.ComputePrecision.FLOAT,
            explicit_dequantize=True,
        )
        return AlgorithmName.FLOAT_CASTING, config
    granularity = (
        qtyping.QuantGranularity.CHANNELWISE
        if scheme.granularity == "per_channel"
        else getattr(qtyping.QuantGranularity, f"BLOCKWISE_{scheme.group_size}")
    )
    weight = qtyping.TensorQuantizationConfig(
        num_bits=scheme.bits, symmetric=True, granularity=granularity
    )
    # a lookup has no activations; its int4 table takes the dynamic-range layout, which
    # ai-edge-quantizer writes for EMBEDDING_LOOKUP (it has no weight-only one for int4)
    dynamic = scheme.activation == "int8_dynamic" or (lookup and scheme.bits == 4)
    config = qtyping.OpQuantizationConfig(
        weight_tensor_config=weight,
        compute_precision=(
            qtyping.ComputePrecision.INTEGER if dynamic else qtyping.ComputePrecision.FLOAT
        ),
        explicit_dequantize=not dynamic,
        # its recovery only lays the tensor out: its own check (every value within 1e-4 of a
        # step) fails on clipped groups whose smallest step is not the scale; edgequant writes
        # its own values afterwards and checks those (_restore, _check_written)
        skip_checks=True,
    )
    return AlgorithmName.DEQUANTIZED_WEIGHT_RECOVERY, config


def _weight_ops(model: bytes | Path):
    """``(subgraph index, subgraph, op, opname, weight tensor, weight array)`` of every
    FULLY_CONNECTED and
    EMBEDDING_LOOKUP op with a constant weight."""
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

    tfl = fb.read_model(model)  # a Path is memory-mapped: its buffers are not copied
    names = {"FULLY_CONNECTED": 1, "EMBEDDING_LOOKUP": 1}  # input index of the weight
    for sg_index, sg in enumerate(tfl.subgraphs):
        for op in sg.operators:
            opname = fb.TFL_OP_CODE_TO_NAME.get(tfl.operatorCodes[op.opcodeIndex].builtinCode)
            if opname not in names:
                continue
            tensor = sg.tensors[op.inputs[names[opname]]]
            data = fb.get_tensor_data(tensor, tfl.buffers)
            if data is None:
                continue
            yield sg_index, sg, op, qtyping.TFLOperationName(opname), tensor, data


def _quantize(float_path: Path, packed: dict[str, _Stored]) -> bytes:
    """The quantized ``.tflite`` bytes of the float file at ``float_path`` (read through a
    memory map: a float file several times the size of the result is not held in memory)."""
    from ai_edge_quantizer import quantizer as aeq
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

    by_content: dict[tuple, list[str]] = {}
    for fqn, stored in packed.items():
        by_content.setdefault(stored.content, []).append(fqn)
    weights: dict[tuple[int, str], str] = {}  # (subgraph, weight tensor name) -> module
    qt = aeq.Quantizer(float_path)
    found: set[str] = set()
    for sg_index, sg, op, opname, tensor, data in _weight_ops(float_path):
        fqns = by_content.get(_content(data))
        if not fqns:
            continue
        weights[(sg_index, fb.get_tensor_name(tensor))] = fqns[0]
        schemes = {packed[f].scheme for f in fqns}
        if len(schemes) > 1:
            raise ValueError(
                f"{', '.join(fqns)} hold the same weights with different schemes; LiteRT keeps "
                "one tensor for them: give them one scheme"
            )
        found.update(fqns)
        algorithm, config = _op_config(schemes.pop(), lookup=opname.value == "EMBEDDING_LOOKUP")
        scope = fb.get_op_scope(op, sg.tensors)
        qt.update_quantization_recipe(
            regex=f"^{re.escape(scope)}$",
            operation_name=opname,
            op_config=config,
            algorithm_key=algorithm,
        )
    missing = sorted(set(packed) - found)
    if missing:
        raise RuntimeError(
            f"no LiteRT op found holding the weights of {', '.join(missing[:4])}"
            f"{' and more' if len(missing) > 4 else ''}; the converter changed them"
        )
    quantized = qt.quantize(enable_progress_report=False).quantized_model
    del qt
    out = _restore(quantized, weights, packed)
    _check_written(out, weights, packed)
    return out


def _restore(model_bytes: bytes, weights: dict[tuple[int, str], str], packed) -> bytes:
    """Put edgequant's own integers and scales into the int4 and int8 tensors ai-edge-quantizer
    wrote.

    Its recovery takes a block's (or a channel's) scale to be the smallest step between its
    values, so a block whose values are, say, only 0 and 7 steps comes back as 0 and 1 with 7x
    the scale: the same weights, other integers, and a scale that rounds differently to bf16.
    The tensors keep their layout; only their bytes (and int8 scales) are replaced."""
    from ai_edge_litert.tools import flatbuffer_utils
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

    tfl = fb.read_model(model_bytes)
    for (sg_index, name), fqn in weights.items():
        stored = packed[fqn]
        if not stored.scheme.is_integer:
            continue
        sg = tfl.subgraphs[sg_index]
        for tensor in sg.tensors:
            if tensor.type not in (_INT4, _INT8) or fb.get_tensor_name(tensor) != name:
                continue
            if tensor.type == _INT8:  # per-channel: one fp32 scale per row
                tfl.buffers[tensor.buffer].data = stored.values.reshape(-1).view(np.uint8)
                tensor.quantization.scale = stored.scales.reshape(-1).astype(np.float32)
                continue
            u = (stored.values.reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
            if u.size % 2:
                u = np.append(u, np.uint8(0))
            tfl.buffers[tensor.buffer].data = (u[0::2] | (u[1::2] << 4)).astype(np.uint8)
            scales = sg.tensors[tensor.quantization.details.scales]
            tfl.buffers[scales.buffer].data = np.frombuffer(
                block_scales(stored.scales).tobytes(), dtype=np.uint8
            )
    return bytes(flatbuffer_utils.convert_object_to_bytearray(tfl))


_FLOAT32, _FLOAT16, _INT8, _INT4 = 0, 1, 9, 17  # tflite TensorType values


def _check_written(model_bytes: bytes, weights: dict[tuple[int, str], str], packed) -> None:
    """Read the quantized file back: every packed module's tensor must hold its values."""
    written: dict[tuple[int, str], list[WrittenTensor]] = {}
    for t in written_tensors(model_bytes):
        written.setdefault((t.subgraph, t.name), []).append(t)
    wrong = sorted(
        {
            fqn
            for key, fqn in weights.items()
            if not any(_holds(t, packed[fqn]) for t in written.get(key, []))
        }
    )
    if wrong:
        raise RuntimeError(
            f"the written .tflite does not hold edgequant's values for {', '.join(wrong[:4])}"
            f"{' and more' if len(wrong) > 4 else ''} (ai-edge-quantizer skipped or changed them)"
        )


@dataclass(frozen=True)
class WrittenTensor:
    """A constant int4, int8 or fp16 tensor of a ``.tflite`` file, decoded."""

    subgraph: int
    name: str
    values: np.ndarray  # int8 array of the int4 or int8 values, or the fp16 weights
    scales: np.ndarray | None  # fp16 block scales [rows, blocks] (int4), fp32 [rows, 1] (int8)
    block_size: int | None


def written_tensors(model_bytes: bytes):
    """Every constant INT4 (block-quantized), INT8 (per-channel) and FLOAT16 tensor of a
    ``.tflite``."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

    tfl = fb.read_model(model_bytes)
    for i, sg in enumerate(tfl.subgraphs):
        for tensor in sg.tensors:
            written = _decode(tfl, i, sg, tensor)
            if written is not None and written.values.dtype != np.float32:
                yield written


def _decode(tfl, sg_index: int, sg, tensor) -> WrittenTensor | None:
    """A constant tensor's values (and scales), or None for a tensor computed at run time."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

    raw = _buffer(tfl, tensor.buffer)
    if raw is None or tensor.type not in (_FLOAT32, _INT4, _INT8, _FLOAT16):
        return None
    shape = tuple(int(d) for d in tensor.shape)
    name = fb.get_tensor_name(tensor)
    if tensor.type in (_FLOAT32, _FLOAT16):
        dtype = "<f4" if tensor.type == _FLOAT32 else "<f2"
        return WrittenTensor(sg_index, name, raw.view(dtype).reshape(shape), None, None)
    if tensor.type == _INT8:
        scale = np.asarray(tensor.quantization.scale, np.float32).reshape(shape[0], -1)
        return WrittenTensor(sg_index, name, raw.view(np.int8).reshape(shape), scale, None)
    details = tensor.quantization.details
    ints = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(-1).astype(np.int8)
    ints = np.where(ints > 7, ints - 16, ints)[: int(np.prod(shape))].reshape(shape)
    scales = sg.tensors[details.scales]
    scale_values = np.frombuffer(_buffer(tfl, scales.buffer).tobytes(), "<f2")
    return WrittenTensor(
        sg_index, name, ints.astype(np.int8), scale_values.reshape(shape[0], -1),
        int(details.blockSize),
    )  # fmt: skip


@dataclass(frozen=True)
class WeightOp:
    """A FULLY_CONNECTED or EMBEDDING_LOOKUP op of a ``.tflite`` and the weight it computes
    with: ``dequantized`` when a DEQUANTIZE op widens the weight first (weight-only: float
    compute), False when the op takes the quantized weight itself (LiteRT's dynamic-range
    kernels for a FULLY_CONNECTED, a quantized table for an EMBEDDING_LOOKUP)."""

    subgraph: int
    op: str  # "FULLY_CONNECTED" or "EMBEDDING_LOOKUP"
    weight: WrittenTensor
    dequantized: bool

    @property
    def scheme(self) -> str:
        """``fp32``, ``fp16``, ``int8 per-channel`` or ``int4 g<block>``, then ``weight-only``
        or ``dynamic`` for quantized FULLY_CONNECTED weights."""
        w = self.weight
        kind = {np.dtype("<f4"): "fp32", np.dtype("<f2"): "fp16"}.get(w.values.dtype)
        if kind is None:
            kind = "int8 per-channel" if w.block_size is None else f"int4 g{w.block_size}"
            if self.op == "FULLY_CONNECTED":
                kind += " weight-only" if self.dequantized else " dynamic"
        return kind


def weight_ops(model_bytes: bytes):
    """Every FULLY_CONNECTED and EMBEDDING_LOOKUP op with a constant weight, as `WeightOp`s:
    what LiteRT will compute, read from the file."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

    tfl = fb.read_model(model_bytes)
    for i, sg in enumerate(tfl.subgraphs):
        names = [_op_name(tfl, op) for op in sg.operators]
        produced_by = {out: op for op in sg.operators for out in op.outputs}
        for op, name in zip(sg.operators, names, strict=True):
            if name not in ("FULLY_CONNECTED", "EMBEDDING_LOOKUP"):
                continue
            index, dequantized = op.inputs[1], False
            producer = produced_by.get(index)
            if producer is not None and _op_name(tfl, producer) == "DEQUANTIZE":
                index, dequantized = producer.inputs[0], True
            weight = _decode(tfl, i, sg, sg.tensors[index])
            if weight is not None:
                yield WeightOp(i, name, weight, dequantized)


def _op_name(tfl, op) -> str:
    """The op's builtin name (``FULLY_CONNECTED``, ``DEQUANTIZE``, ...) from LiteRT's schema."""
    code = tfl.operatorCodes[op.opcodeIndex]
    code = max(code.builtinCode, code.deprecatedBuiltinCode)
    return _builtin_names().get(code, str(code))


@functools.cache
def _builtin_names() -> dict[int, str]:
    from ai_edge_litert import schema_py_generated as schema

    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def _buffer(tfl, index: int) -> np.ndarray | None:
    data = tfl.buffers[index].data
    if data is None:
        return None
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(bytes(data), dtype=np.uint8)
    return np.asarray(data, dtype=np.uint8)


def _holds(t: WrittenTensor, stored: _Stored) -> bool:
    if not stored.scheme.is_integer:
        return t.scales is None and np.array_equal(t.values, stored.values.astype(np.float16))
    if stored.scheme.bits == 8:
        return (
            t.block_size is None
            and np.array_equal(t.values, stored.values)
            and np.array_equal(t.scales, stored.scales.astype(np.float32))
        )
    return (
        t.block_size == stored.scheme.group_size
        and np.array_equal(t.values, stored.values)
        and np.array_equal(t.scales, block_scales(stored.scales))
    )


def block_scales(scales: np.ndarray) -> np.ndarray:
    """The fp16 block scales LiteRT holds for edgequant's ``scales``: ai-edge-quantizer rounds
    them to bf16 precision first (as XNNPACK's int4 kernels do in ExecuTorch), so a scheme with
    ``scale_dtype: bf16`` is kept bit for bit and fp16/fp32 scales to 8 significant bits."""
    import ml_dtypes

    return np.asarray(scales, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float16)


def convert(
    model: nn.Module,
    *,
    max_seq_len: int | None = None,
    prefill_len: int = 32,
    allow_fallback: bool = False,
) -> bytes:
    """The ``.tflite`` bytes of ``model`` (any family's decoder, packed or float) with
    ``prefill`` and ``decode`` signatures; ``max_seq_len`` defaults to 512, or the model's
    context when shorter."""
    import litert_torch

    from edgequant.export.attention import LiteRTDecoder
    from edgequant.models.families import decoder_of

    decoder = decoder_of(model)
    if max_seq_len is None:
        max_seq_len = default_max_seq_len(decoder)
    problems = check_litert(decoder)
    refuse_or_warn(problems, "LiteRT", allow_fallback)
    if problems:
        decoder = shallow_copy(decoder)
        for p in problems:
            swap_module(decoder, p.fqn, float_twin(decoder.get_submodule(p.fqn)))
    if not 1 <= prefill_len <= max_seq_len:
        raise ValueError(f"prefill_len must be in [1, {max_seq_len}], got {prefill_len}")
    float_model, packed = _dequantized_copy(decoder)
    for fqn, module in list(float_model.named_modules()):
        if isinstance(module, RMSNorm):
            swap_module(float_model, fqn, _WeightFirstNorm(module))
    program = LiteRTDecoder(float_model.eval(), max_seq_len).eval()
    kv = [torch.zeros(program.cache_shape()) for _ in range(2 * decoder.spec.n_layers)]
    prefill = (torch.zeros(1, prefill_len, dtype=torch.int32), torch.arange(prefill_len), *kv)
    decode = (torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), *kv)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # lightweight: the converter references the float weights instead of copying them
        # into its IR (a 1.5B model at fp32 ran out of 24 GB without; the same ops and logits)
        converted = (
            litert_torch.signature("prefill", program, prefill)
            .signature("decode", program, decode)
            .convert(lightweight_conversion=True)
        )
    del program, float_model, kv  # the float weights are in the converted model now
    with tempfile.TemporaryDirectory() as tmp:
        float_path = Path(tmp) / "float.tflite"
        converted.export(str(float_path))
        del converted
        gc.collect()
        return _quantize(float_path, packed) if packed else float_path.read_bytes()


def to_tflite(model: nn.Module, path: str | Path, *, overwrite: bool = False, **options) -> Path:
    """Write `convert(model, **options)` as ``path`` (a temporary file renamed into place)."""
    check_out(path, overwrite, ".tflite")
    return write(convert(model, **options), path, overwrite=overwrite)


def write(data: bytes, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``.tflite`` bytes as ``path`` (a temporary file renamed into place)."""
    return write_bytes_atomic(check_out(path, overwrite, ".tflite"), data)
