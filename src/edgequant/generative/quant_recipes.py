"""Whole-model recipes (`QuantConfig`s), with AI Edge's names.

>>> from edgequant.generative import quant_recipes
>>> print(quant_recipes.full_int4_dynamic_block_recipe(64).to_recipe().describe())
[0] role=default -> int4 g64 sym fp16-scales, act int8 dynamic asym
"""

from __future__ import annotations

from edgequant.generative import quant_recipe_utils as utils
from edgequant.generative.quant_attrs import Dtype, Granularity
from edgequant.generative.quant_config import QuantConfig
from edgequant.generative.quant_recipe import GenerativeQuantRecipe, LayerQuantRecipe


def _everywhere(layer: LayerQuantRecipe) -> QuantConfig:
    return QuantConfig(generative_recipe=GenerativeQuantRecipe(default=layer))


def full_int8_dynamic_recipe() -> QuantConfig:
    """Every Linear/Embedding: int8 per-channel weights, int8 dynamic per-token activations."""
    return _everywhere(utils.create_layer_quant_int8_dynamic())


def full_int8_weight_only_recipe() -> QuantConfig:
    """Every Linear/Embedding: int8 per-channel weights, float compute."""
    return _everywhere(utils.create_layer_quant_int8_weight_only())


def full_fp16_recipe() -> QuantConfig:
    """Every Linear/Embedding: fp16 weights, fp32 compute."""
    return _everywhere(utils.create_layer_quant_fp16())


def full_int4_dynamic_block_recipe(block_size: int = 32) -> QuantConfig:
    """Every Linear/Embedding: int4 block-wise weights, int8 dynamic activations (8da4w)."""
    return _everywhere(utils.create_layer_quant_int4_dynamic_block(block_size))


def full_int4_weight_only_recipe(block_size: int = 32) -> QuantConfig:
    """Every Linear/Embedding: int4 block-wise weights, float compute."""
    return _everywhere(utils.create_layer_quant_int4_weight_only_block(block_size))


def full_dynamic_recipe(
    weight_dtype: Dtype = Dtype.INT8,
    granularity: Granularity = Granularity.CHANNELWISE,
    block_size: int = 0,
) -> QuantConfig:
    """litert-torch 0.10's spelling: dynamic range with a chosen weight dtype and granularity."""
    return _everywhere(utils.create_layer_quant_dynamic(weight_dtype, granularity, block_size))


def full_weight_only_recipe(
    weight_dtype: Dtype = Dtype.INT8,
    granularity: Granularity = Granularity.CHANNELWISE,
    block_size: int = 0,
) -> QuantConfig:
    """litert-torch 0.10's spelling: weight-only with a chosen weight dtype and granularity."""
    return _everywhere(utils.create_layer_quant_weight_only(weight_dtype, granularity, block_size))
