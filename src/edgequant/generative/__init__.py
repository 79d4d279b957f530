"""The AI Edge (LiteRT) generative front door: recipes with the names its users know.

``quant_recipes.full_int8_dynamic_recipe()`` and friends, ``quant_recipe_utils``'s
``create_layer_quant_*``, ``LayerQuantRecipe``, ``GenerativeQuantRecipe`` and ``QuantConfig``;
each converts to an edgequant `Recipe` with ``.to_recipe()``; ``convert(model, sample_args,
quant_config=...)`` writes LiteRT.
"""

from edgequant.generative.quant_config import QuantConfig
from edgequant.generative.quant_recipe import GenerativeQuantRecipe, LayerQuantRecipe


def convert(*args, **kwargs):
    """See `edgequant.generative.converter.convert` (LiteRT; needs the ``litert`` extra)."""
    from edgequant.generative.converter import convert as _convert

    return _convert(*args, **kwargs)


__all__ = ["GenerativeQuantRecipe", "LayerQuantRecipe", "QuantConfig", "convert"]
