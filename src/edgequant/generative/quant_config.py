"""`QuantConfig`: what ``convert(..., quant_config=...)`` and `edgequant.quantize` take."""

from __future__ import annotations

from dataclasses import dataclass

from edgequant.generative.quant_recipe import GenerativeQuantRecipe
from edgequant.recipe import Recipe


@dataclass
class QuantConfig:
    """Wraps a `GenerativeQuantRecipe` (AI Edge's shape); ``to_recipe()`` gives the IR."""

    generative_recipe: GenerativeQuantRecipe | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.generative_recipe, GenerativeQuantRecipe):
            raise TypeError(
                "QuantConfig needs generative_recipe=GenerativeQuantRecipe(...), got "
                f"{self.generative_recipe!r}"
            )

    def to_recipe(self) -> Recipe:
        return self.generative_recipe.to_recipe()
