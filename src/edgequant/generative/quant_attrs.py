"""Attribute enums of a `LayerQuantRecipe`, with the names AI Edge users know."""

from __future__ import annotations

import enum


@enum.unique
class Dtype(enum.Enum):
    """Data type of a tensor."""

    FP32 = enum.auto()
    FP16 = enum.auto()
    INT8 = enum.auto()
    INT4 = enum.auto()


@enum.unique
class Algorithm(enum.Enum):
    """How quantization parameters are chosen. MIN_MAX maps edgequant's ``minmax``."""

    MIN_MAX = enum.auto()
    FLOAT_CAST = enum.auto()


@enum.unique
class Mode(enum.Enum):
    """DYNAMIC_RANGE: activations quantized per token at run time, integer matmul.
    WEIGHT_ONLY: weights dequantized at run time, float matmul."""

    DYNAMIC_RANGE = enum.auto()
    WEIGHT_ONLY = enum.auto()


@enum.unique
class Granularity(enum.Enum):
    """Granularity of weight scales. BLOCKWISE takes its size from ``block_size``."""

    NONE = enum.auto()
    CHANNELWISE = enum.auto()
    BLOCKWISE = enum.auto()
    BLOCKWISE_32 = enum.auto()
    BLOCKWISE_64 = enum.auto()
    BLOCKWISE_128 = enum.auto()
    BLOCKWISE_256 = enum.auto()


BLOCK_SIZES = {
    Granularity.BLOCKWISE_32: 32,
    Granularity.BLOCKWISE_64: 64,
    Granularity.BLOCKWISE_128: 128,
    Granularity.BLOCKWISE_256: 256,
}
