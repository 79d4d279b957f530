"""``convert(model, sample_args, quant_config=...)``: AI Edge's conversion call, writing LiteRT.

The recipe semantics are edgequant's (`QuantConfig.to_recipe()`); the file is written by
`edgequant.export.litert` (litert-torch conversion, ai-edge-quantizer keeping edgequant's values).
Before anything is quantized, every `LayerQuantRecipe` of the config is checked against the
layer schemes LiteRT's runtime supports.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgequant.generative.quant_attrs import Algorithm, Dtype, Granularity, Mode
from edgequant.generative.quant_config import QuantConfig
from edgequant.generative.quant_recipe import LayerQuantRecipe

_BLOCKWISE = (
    Granularity.BLOCKWISE_32,
    Granularity.BLOCKWISE_64,
    Granularity.BLOCKWISE_128,
    Granularity.BLOCKWISE_256,
)
# (weight dtype, mode, algorithm, granularity) LiteRT's runtime runs, as litert-torch lists them
SUPPORTED = (
    (Dtype.INT8, Mode.DYNAMIC_RANGE, Algorithm.MIN_MAX, Granularity.CHANNELWISE),
    (Dtype.INT8, Mode.WEIGHT_ONLY, Algorithm.MIN_MAX, Granularity.CHANNELWISE),
    (Dtype.FP16, Mode.WEIGHT_ONLY, Algorithm.FLOAT_CAST, Granularity.NONE),
    *((Dtype.INT4, Mode.DYNAMIC_RANGE, Algorithm.MIN_MAX, g) for g in _BLOCKWISE),
)


def _describe(t: tuple) -> str:
    return "/".join(x.name for x in t)


def check_layer_recipe(layer: LayerQuantRecipe, where: str) -> None:
    """Refuse a layer recipe LiteRT's runtime does not run, listing the ones it does."""
    if layer.weight_dtype is Dtype.FP32:
        return
    granularity = layer.granularity
    if granularity is Granularity.BLOCKWISE:  # a free block size: LiteRT's named ones only
        granularity = {
            32: Granularity.BLOCKWISE_32,
            64: Granularity.BLOCKWISE_64,
            128: Granularity.BLOCKWISE_128,
            256: Granularity.BLOCKWISE_256,
        }.get(layer.block_size, granularity)
    key = (layer.weight_dtype, layer.mode, layer.algorithm, granularity)
    if layer.activation_dtype is not Dtype.FP32 or key not in SUPPORTED:
        supported = ", ".join(_describe(s) for s in SUPPORTED)
        raise ValueError(
            f"{where}: {layer.activation_dtype.name} activations with "
            f"{_describe(key)} weights (dtype/mode/algorithm/granularity) is not a scheme "
            f"LiteRT runs; supported with FP32 activations: {supported}"
        )


@dataclass
class ConvertedModel:
    """The converted program: ``export(path)`` writes it; ``tflite`` holds its bytes."""

    tflite: bytes

    def export(self, path: str | Path, overwrite: bool = False) -> Path:
        from edgequant.export.litert import write

        return write(self.tflite, path, overwrite=overwrite)


def convert(
    model: nn.Module,
    sample_args: tuple | None = None,
    quant_config: QuantConfig | None = None,
    *,
    max_seq_len: int = 256,
    allow_fallback: bool = False,
) -> ConvertedModel:
    """Quantize ``model`` (a float llama2.c `Transformer`, or a Hugging Face model of a family
    in `edgequant.models.families`) with ``quant_config`` and convert it to LiteRT with
    ``prefill`` and ``decode`` signatures.

    ``sample_args`` is ``(tokens [1, P] int, input_pos [P] int)`` for the prefill signature
    (``P`` tokens a call; None: 32)."""
    prefill_len = _prefill_len(sample_args, max_seq_len)
    if quant_config is not None:
        if not isinstance(quant_config, QuantConfig):
            raise TypeError(
                f"quant_config must be a QuantConfig, got {type(quant_config).__name__}"
            )
        recipe = quant_config.generative_recipe
        for role in ("default", "embedding", "attention", "feedforward", "lm_head"):
            value = getattr(recipe, role)
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for index, layer in items:
                if layer is not None:
                    check_layer_recipe(layer, role if index is None else f"{role}[{index}]")
        import edgequant

        model, _ = edgequant.quantize(copy.deepcopy(model), quant_config.to_recipe())
    from edgequant.export.litert import convert as to_bytes

    data = to_bytes(
        model, max_seq_len=max_seq_len, prefill_len=prefill_len, allow_fallback=allow_fallback
    )
    return ConvertedModel(data)


def _prefill_len(sample_args, max_seq_len: int) -> int:
    if sample_args is None:
        return min(32, max_seq_len)
    if not isinstance(sample_args, tuple) or len(sample_args) != 2:
        raise ValueError(
            "sample_args must be (tokens [1, P] int tensor, input_pos [P] int tensor), got "
            f"{type(sample_args).__name__}"
            + (f" of {len(sample_args)}" if isinstance(sample_args, tuple) else "")
        )
    tokens, input_pos = sample_args
    for name, t, dims in (("tokens", tokens, 2), ("input_pos", input_pos, 1)):
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"sample_args {name} must be an int32/int64 tensor, got {t!r:.80}")
        if t.dim() != dims:
            raise ValueError(
                f"sample_args {name} must have {dims} dims, got shape {tuple(t.shape)}"
            )
    if tokens.shape[0] != 1 or input_pos.shape[0] != tokens.shape[1]:
        raise ValueError(
            f"sample_args must be tokens [1, P] and input_pos [P]; got {tuple(tokens.shape)} and "
            f"{tuple(input_pos.shape)}"
        )
    return int(tokens.shape[1])
