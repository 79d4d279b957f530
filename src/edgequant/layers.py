"""Packed quantized modules: `QuantizedLinear` and `QuantizedEmbedding`.

Storage (buffers, so ``state_dict`` bytes are the scheme's bytes):

- integer schemes: ``qweight`` holds the integers of the ``[rows, cols]`` weight (a Linear's
  ``[out_features, in_features]``, an Embedding's ``[num_embeddings, embedding_dim]``):
  int4 packed two per byte and int2 four per byte along ``cols`` (layout in
  `edgequant.primitives.pack`), other widths one int8 per value; ``scale`` is
  ``[rows, n_groups]`` in the scheme's scale dtype; ``zero_point`` (int8, same shape) only when
  asymmetric;
- fp16 / bf16 schemes: ``weight`` in that dtype;
- K-quant schemes (``q2_k`` .. ``q6_k``): ``blocks``, llama.cpp's bytes of each row, uint8
  ``[rows, cols // 256 * block bytes]`` (`edgequant.kquants`);
- ``bias`` (Linear only) stays float32.

Modules built from one tied tensor (embedding shared with lm_head) share these buffers.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from edgequant import kernels
from edgequant.primitives import (
    PACKABLE_BITS,
    cast_float,
    count_nonfinite,
    dequantize,
    fitting_group_sizes,
    pack,
    unpack,
)
from edgequant.schemes import Scheme

_FLOAT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def shape_problem(scheme: Scheme, cols: int, what: str = "input features") -> str | None:
    """Why ``scheme`` cannot store rows of ``cols`` values (``what`` they are), or None."""
    if scheme.is_kquant:
        from edgequant import kquants

        return kquants.shape_problem(scheme.weight, cols, what)
    if not scheme.is_integer:
        return None
    if scheme.granularity == "per_group" and cols % scheme.group_size:
        return (
            f"group_size {scheme.group_size} does not divide its {cols} {what}; "
            f"group sizes that fit: {fitting_group_sizes(cols)}"
        )
    if scheme.bits in PACKABLE_BITS and cols % (8 // scheme.bits):
        return (
            f"int{scheme.bits} packs {8 // scheme.bits} values per byte, but a row has "
            f"{cols} values (not a multiple of {8 // scheme.bits})"
        )
    return None


def check_shape(scheme: Scheme, cols: int, name: str, what: str = "input features") -> None:
    """Refuse a scheme that cannot store rows of ``cols`` values, naming the layer."""
    problem = shape_problem(scheme, cols, what)
    if problem:
        raise ValueError(f"{name}: {problem}")


def packed_layout(rows: int, cols: int, scheme: Scheme) -> dict[str, tuple[tuple, torch.dtype]]:
    """``{buffer name: (shape, dtype)}`` of a ``[rows, cols]`` weight stored per ``scheme``.

    >>> packed_layout(8, 64, Scheme("int4", "per_group", 32))["qweight"]
    ((8, 32), torch.uint8)
    """
    if scheme.is_kquant:
        from edgequant.kquants import row_bytes

        return {"blocks": ((rows, row_bytes(scheme.weight, cols)), torch.uint8)}
    if not scheme.is_integer:
        return {"weight": ((rows, cols), _FLOAT[scheme.weight])}
    per_byte = 8 // scheme.bits if scheme.bits in PACKABLE_BITS else 1
    if scheme.granularity == "per_tensor":
        groups = (1, 1)
    elif scheme.granularity == "per_channel":
        groups = (rows, 1)
    else:
        groups = (rows, cols // scheme.group_size)
    out = {
        "qweight": ((rows, cols // per_byte), torch.uint8 if per_byte > 1 else torch.int8),
        "scale": (groups, scheme.torch_scale_dtype),
    }
    if not scheme.symmetric:
        out["zero_point"] = (groups, torch.int8)
    return out


def layout_bytes(rows: int, cols: int, scheme: Scheme) -> int:
    """Bytes of the buffers in `packed_layout` (what ``state_dict`` will hold)."""
    total = 0
    for shape, dtype in packed_layout(rows, cols, scheme).values():
        total += shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()
    return total


def pack_weight(
    weight: torch.Tensor,
    scheme: Scheme,
    name: str,
    what: str = "input features",
    result=None,
) -> dict[str, torch.Tensor]:
    """Quantize a float ``[rows, cols]`` weight into the buffers a packed module stores, with
    the scheme's algorithm (`edgequant.algorithms`), or store ``result`` (an
    `algorithms.Quantized` computed elsewhere, e.g. by GPTQ with calibration data)."""
    weight = weight.detach().contiguous()
    bad = count_nonfinite(weight)
    if bad:
        raise ValueError(
            f"{name}: the weight has {bad} NaN/Inf value(s) out of {weight.numel()}; "
            "edgequant cannot quantize it (check the checkpoint it was loaded from)"
        )
    check_shape(scheme, weight.shape[1], name, what)
    if scheme.is_kquant:  # llama.cpp's rounding, or blocks rounded with calibration data
        from edgequant import kquants

        blocks = kquants.quantize(weight, scheme.weight) if result is None else result.blocks
        return {"blocks": blocks}
    if not scheme.is_integer:
        return {"weight": cast_float(weight.float(), _FLOAT[scheme.weight], name=name).contiguous()}
    if result is None:
        from edgequant import algorithms

        result = algorithms.quantize_weight(weight, scheme, name=name)
    q = result.q
    out = {"qweight": pack(q, scheme.bits) if scheme.bits in PACKABLE_BITS else q}
    out["scale"] = result.scale
    if not scheme.symmetric:
        out["zero_point"] = result.zero_point
    return out


class _Packed(nn.Module):
    """Shared storage and dequantization of a ``[rows, cols]`` packed weight."""

    def __init__(self, rows: int, cols: int, scheme: Scheme) -> None:
        super().__init__()
        self.rows, self.cols, self.scheme = rows, cols, scheme
        check_shape(scheme, cols, type(self).__name__)
        for name, (shape, dtype) in packed_layout(rows, cols, scheme).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))
        if scheme.is_integer and scheme.symmetric:
            self.register_buffer("zero_point", None)
        # Kernel-specific copies (prepacked weights) built on first use; never saved.
        self._kernel_cache: dict[str, object] = {}

    def set_packed(self, buffers: dict[str, torch.Tensor]) -> None:
        """Adopt buffers from `pack_weight` (shared, not copied: tied modules stay tied)."""
        for key, value in buffers.items():
            current = getattr(self, key)
            if current is None or current.shape != value.shape or current.dtype != value.dtype:
                raise ValueError(
                    f"buffer {key}: expected {None if current is None else tuple(current.shape)} "
                    f"{None if current is None else current.dtype}, got {tuple(value.shape)} "
                    f"{value.dtype}"
                )
            setattr(self, key, value)
        self._kernel_cache.clear()

    def packed_buffers(self) -> dict[str, torch.Tensor]:
        """The stored weight tensors by name (what `set_packed` takes)."""
        names = ("qweight", "scale", "zero_point", "weight", "blocks")
        return {n: t for n in names if isinstance(t := getattr(self, n, None), torch.Tensor)}

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: D401 - torch hook
        self._kernel_cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def int_weight(self) -> torch.Tensor:
        """The stored integers, unpacked, as int8 ``[rows, cols]``."""
        return self.int_rows(0, self.rows)

    def int_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of `int_weight`, unpacked from those rows only."""
        if not self.scheme.is_integer:
            raise TypeError(f"a {self.scheme.weight} weight has no integers with scales")
        q = self.qweight[start:stop]
        return unpack(q, self.scheme.bits) if self.scheme.bits in PACKABLE_BITS else q

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight this module computes with, ``[rows, cols]``."""
        if self.scheme.is_kquant:
            from edgequant import kquants

            return kquants.dequantize(self.blocks, self.scheme.weight).to(dtype)
        if not self.scheme.is_integer:
            return self.weight.to(dtype)
        return dequantize(
            self.int_weight(),
            self.scale,
            self.zero_point,
            granularity=self.scheme.granularity,
            group_size=self.scheme.group_size,
            dtype=dtype,
        )

    def dequantized_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of `dequantized_weight` (float32), computed from those rows only."""
        if self.scheme.is_kquant:
            from edgequant import kquants

            return kquants.dequantize(self.blocks[start:stop], self.scheme.weight)
        if not self.scheme.is_integer:
            return self.weight[start:stop].float()
        q = self.int_rows(start, stop)

        def rows(t: torch.Tensor | None) -> torch.Tensor | None:
            return t[start:stop] if t is not None and t.dim() and t.shape[0] == self.rows else t

        return dequantize(
            q, rows(self.scale), rows(self.zero_point), granularity=self.scheme.granularity,
            group_size=self.scheme.group_size,
        )  # fmt: skip

    def weight_bytes(self) -> int:
        """Bytes of the stored weight, scales and zero points (bias excluded)."""
        return sum(t.numel() * t.element_size() for t in self.packed_buffers().values())


class QuantizedLinear(_Packed):
    """A Linear whose weight is stored per a `Scheme`; computes ``x @ W^T + b`` in float32.

    >>> lin = nn.Linear(64, 8)
    >>> q = QuantizedLinear.from_float(lin, Scheme("int4", "per_group", 32))
    >>> q
    QuantizedLinear(in_features=64, out_features=8, bias=True, scheme=int4 g32 sym)
    >>> q(torch.randn(2, 64)).shape
    torch.Size([2, 8])
    """

    def __init__(self, in_features: int, out_features: int, scheme: Scheme, bias: bool = True):
        super().__init__(out_features, in_features, scheme)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(
        cls, module: nn.Module, scheme: Scheme, name: str = "linear", result=None
    ) -> QuantizedLinear:
        """Quantize an ``nn.Linear`` (or Hugging Face's transposed ``Conv1D``); ``result``: an
        `algorithms.Quantized` to store instead of running the scheme's algorithm."""
        weight = linear_weight(module)
        packed = pack_weight(weight, scheme, name, result=result)  # checks the shape, names it
        out = cls(weight.shape[1], weight.shape[0], scheme, bias=module.bias is not None)
        out.set_packed(packed)
        if module.bias is not None:
            out.bias = module.bias.detach().float().clone()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, scheme={self.scheme.describe()}"
        )


class QuantizedEmbedding(_Packed):
    """An Embedding whose table is stored per a `Scheme`; looks up float32 rows.

    Each token's row is one "channel": per-channel scales are per token. An activation mode in
    the scheme does not apply (a lookup has no input activations to quantize).

    >>> emb = QuantizedEmbedding.from_float(nn.Embedding(10, 64), Scheme("int8"))
    >>> emb(torch.tensor([[1, 2]])).shape
    torch.Size([1, 2, 64])
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        scheme: Scheme,
        embed_scale: float | None = None,
    ):
        super().__init__(num_embeddings, embedding_dim, scheme)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        # Scaled embeddings (Gemma: rows * sqrt(hidden)) keep their factor; not a saved tensor,
        # the model definition provides it.
        self.embed_scale = embed_scale

    @classmethod
    def from_float(
        cls, module: nn.Embedding, scheme: Scheme, name: str = "embedding", result=None
    ) -> QuantizedEmbedding:
        packed = pack_weight(module.weight, scheme, name, "embedding dims", result=result)
        out = cls(module.num_embeddings, module.embedding_dim, scheme, embed_scale_of(module))
        out.set_packed(packed)
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = kernels.embedding(ids, self)
        return rows if self.embed_scale is None else rows * self.embed_scale

    def extra_repr(self) -> str:
        scaled = "" if self.embed_scale is None else f", embed_scale={self.embed_scale:g}"
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme.describe()}{scaled}"
        )


def embed_scale_of(module: nn.Module) -> float | None:
    """The output factor of a scaled embedding (transformers' ``*ScaledWordEmbedding``)."""
    scale = getattr(module, "embed_scale", None)
    if scale is None:
        return None
    return float(scale.item() if isinstance(scale, torch.Tensor) else scale)


def embedding_is_plain(module: nn.Module) -> bool:
    """An ``nn.Embedding`` whose forward is a plain lookup, or a known scaled one."""
    plain = type(module).forward is nn.Embedding.forward
    return plain or embed_scale_of(module) is not None


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a Linear with a transposed ``[in, out]`` weight."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``[out_features, in_features]`` weight of an ``nn.Linear`` or ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.weight
    if is_conv1d(module):
        return module.weight.t()
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")
