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


def _check_mcfg(mcfg: object, fn: str) -> None:
    if isinstance(mcfg, (Dtype, Granularity)):
        raise TypeError(
            f"{fn}: the first argument is the model config (mcfg), as in AI Edge; pass "
            f"{'weight_dtype' if isinstance(mcfg, Dtype) else 'granularity'}={mcfg} by keyword"
        )


def _everywhere(layer: LayerQuantRecipe) -> QuantConfig:
    return QuantConfig(generative_recipe=GenerativeQuantRecipe(default=layer))


# ``mcfg`` (first, as in AI Edge) is accepted so positional calls port unchanged; edgequant reads
# roles from the model's module names, so it needs no model config and ignores it.


def full_int8_dynamic_recipe(mcfg: object = None) -> QuantConfig:
    """Every Linear/Embedding: int8 per-channel weights, int8 dynamic per-token activations."""
    return _everywhere(utils.create_layer_quant_int8_dynamic())


def full_int8_weight_only_recipe(mcfg: object = None) -> QuantConfig:
    """Every Linear/Embedding: int8 per-channel weights, float compute."""
    return _everywhere(utils.create_layer_quant_int8_weight_only())


def full_fp16_recipe(mcfg: object = None) -> QuantConfig:
    """Every Linear/Embedding: fp16 weights, fp32 compute."""
    return _everywhere(utils.create_layer_quant_fp16())


def full_int4_dynamic_block_recipe(block_size: int = 32) -> QuantConfig:
    """Every Linear/Embedding: int4 block-wise weights, int8 dynamic activations (8da4w)."""
    return _everywhere(utils.create_layer_quant_int4_dynamic_block(block_size))


def full_int4_weight_only_recipe(block_size: int = 32) -> QuantConfig:
    """Every Linear/Embedding: int4 block-wise weights, float compute."""
    return _everywhere(utils.create_layer_quant_int4_weight_only_block(block_size))


def full_dynamic_recipe(
    mcfg: object = None,
    weight_dtype: Dtype = Dtype.INT8,
    granularity: Granularity = Granularity.CHANNELWISE,
    block_size: int = 0,
) -> QuantConfig:
    """litert-torch 0.10's spelling: dynamic range with a chosen weight dtype and granularity."""
    _check_mcfg(mcfg, "full_dynamic_recipe")
    return _everywhere(utils.create_layer_quant_dynamic(weight_dtype, granularity, block_size))


def full_weight_only_recipe(
    mcfg: object = None,
    weight_dtype: Dtype = Dtype.INT8,
    granularity: Granularity = Granularity.CHANNELWISE,
    block_size: int = 0,
) -> QuantConfig:
    """litert-torch 0.10's spelling: weight-only with a chosen weight dtype and granularity."""
    _check_mcfg(mcfg, "full_weight_only_recipe")
    return _everywhere(utils.create_layer_quant_weight_only(weight_dtype, granularity, block_size))
