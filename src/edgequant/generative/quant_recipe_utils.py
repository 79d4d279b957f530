"""Builders of single-layer recipes (`LayerQuantRecipe`), with AI Edge's names."""

from __future__ import annotations

from edgequant.generative.quant_attrs import Algorithm, Dtype, Granularity, Mode
from edgequant.generative.quant_recipe import LayerQuantRecipe


def create_layer_quant_dynamic(
    weight_dtype: Dtype = Dtype.INT8,
    granularity: Granularity = Granularity.CHANNELWISE,
    block_size: int = 0,
) -> LayerQuantRecipe:
    """Dynamic range: integer weights, activations int8 per token at run time."""
    return LayerQuantRecipe(
        Dtype.FP32, weight_dtype, Mode.DYNAMIC_RANGE, Algorithm.MIN_MAX, granularity, block_size
    )


def create_layer_quant_weight_only(
    weight_dtype: Dtype = Dtype.INT8,
    granularity: Granularity = Granularity.CHANNELWISE,
    block_size: int = 0,
) -> LayerQuantRecipe:
    """Weight-only: integer weights, float activations and compute."""
    return LayerQuantRecipe(
        Dtype.FP32, weight_dtype, Mode.WEIGHT_ONLY, Algorithm.MIN_MAX, granularity, block_size
    )


def create_layer_quant_int8_dynamic() -> LayerQuantRecipe:
    """int8 per-channel weights, int8 dynamic per-token activations."""
    return create_layer_quant_dynamic(Dtype.INT8, Granularity.CHANNELWISE)


def create_layer_quant_int8_weight_only() -> LayerQuantRecipe:
    """int8 per-channel weights, float compute."""
    return create_layer_quant_weight_only(Dtype.INT8, Granularity.CHANNELWISE)


def create_layer_quant_int4_dynamic_block(block_size: int = 32) -> LayerQuantRecipe:
    """int4 block-wise weights (fp16 scales), int8 dynamic per-token activations (8da4w)."""
    return create_layer_quant_dynamic(Dtype.INT4, Granularity.BLOCKWISE, block_size)


def create_layer_quant_int4_weight_only_block(block_size: int = 32) -> LayerQuantRecipe:
    """int4 block-wise weights (fp16 scales), float compute."""
    return create_layer_quant_weight_only(Dtype.INT4, Granularity.BLOCKWISE, block_size)


def create_layer_quant_fp16() -> LayerQuantRecipe:
    """fp16 weights, fp32 activations and compute."""
    return LayerQuantRecipe(
        Dtype.FP32, Dtype.FP16, Mode.WEIGHT_ONLY, Algorithm.FLOAT_CAST, Granularity.NONE
    )
