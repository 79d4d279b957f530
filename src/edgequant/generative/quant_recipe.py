"""`LayerQuantRecipe` and `GenerativeQuantRecipe`: AI Edge's selective recipes over the IR.

>>> from edgequant.generative import quant_recipe_utils as u
>>> r = GenerativeQuantRecipe(default=u.create_layer_quant_fp16(),
...                           attention={0: u.create_layer_quant_int8_dynamic()})
>>> print(r.to_recipe().describe())
[0] role=default -> fp16
[1] role=attention layers=[0] -> int8 per-channel sym, act int8 dynamic asym
"""

from __future__ import annotations

from dataclasses import dataclass

from edgequant.generative.quant_attrs import BLOCK_SIZES, Algorithm, Dtype, Granularity, Mode
from edgequant.recipe import Recipe, Rule
from edgequant.schemes import Scheme


@dataclass(frozen=True)
class LayerQuantRecipe:
    """How one layer kind is quantized, in AI Edge's terms; ``to_scheme()`` gives the IR.

    ``block_size`` goes with ``Granularity.BLOCKWISE`` (``BLOCKWISE_32`` etc. carry their own).
    Blockwise scales are fp16, channelwise scales fp32.
    """

    activation_dtype: Dtype
    weight_dtype: Dtype
    mode: Mode
    algorithm: Algorithm
    granularity: Granularity
    block_size: int = 0

    def __post_init__(self) -> None:
        for name, enum_type in (
            ("activation_dtype", Dtype),
            ("weight_dtype", Dtype),
            ("mode", Mode),
            ("algorithm", Algorithm),
            ("granularity", Granularity),
        ):
            value = getattr(self, name)
            if not isinstance(value, enum_type):
                allowed = [f"{enum_type.__name__}.{m.name}" for m in enum_type]
                raise TypeError(f"LayerQuantRecipe.{name} must be one of {allowed}, got {value!r}")
        try:  # refuse unsupported combinations when built, not when used
            self.to_scheme()
        except (ValueError, NotImplementedError) as e:
            raise type(e)(f"LayerQuantRecipe: {e}") from None

    def to_recipe(self) -> Recipe:
        """This layer recipe applied to every module (one ``role: default`` rule)."""
        return Recipe(rules=(Rule(self.to_scheme(), role="default"),), name="layer")

    def to_scheme(self) -> Scheme | None:
        """The equivalent `Scheme`; ``None`` for FP32 weights (left float)."""
        if self.activation_dtype is not Dtype.FP32:
            raise NotImplementedError(
                f"activation_dtype {self.activation_dtype.name} is not supported; edgequant's "
                "generative recipes keep FP32 activations (quantized per token in DYNAMIC_RANGE)"
            )
        if self.weight_dtype is Dtype.FP32:
            return None
        if self.weight_dtype is Dtype.FP16:
            if self.algorithm is not Algorithm.FLOAT_CAST or self.mode is not Mode.WEIGHT_ONLY:
                raise ValueError(
                    "FP16 weights need algorithm FLOAT_CAST and mode WEIGHT_ONLY, got "
                    f"{self.algorithm.name} and {self.mode.name}"
                )
            return Scheme("fp16")
        if self.algorithm is not Algorithm.MIN_MAX:
            raise ValueError(f"{self.weight_dtype.name} weights need algorithm MIN_MAX")
        activation = "int8_dynamic" if self.mode is Mode.DYNAMIC_RANGE else "none"
        weight = self.weight_dtype.name.lower()
        if self.granularity is Granularity.CHANNELWISE:
            return Scheme(weight, "per_channel", activation=activation)
        if self.granularity is Granularity.BLOCKWISE:
            block = self.block_size
        elif self.granularity in BLOCK_SIZES:
            block = BLOCK_SIZES[self.granularity]
        else:
            raise ValueError(
                f"{self.weight_dtype.name} weights need granularity CHANNELWISE or BLOCKWISE*, "
                f"got {self.granularity.name}"
            )
        if not isinstance(block, int) or block <= 0:
            raise ValueError(f"Granularity.BLOCKWISE needs block_size > 0, got {block!r}")
        return Scheme(weight, "per_group", block, scale_dtype="fp16", activation=activation)


LayerRecipes = LayerQuantRecipe | dict[int, LayerQuantRecipe] | None


@dataclass
class GenerativeQuantRecipe:
    """Recipes per layer kind; ``attention`` and ``feedforward`` may map layer index -> recipe.

    ``default`` covers every module no other field covers; a more specific field wins
    (the IR's precedence: role with layer indices > role > default). A tied lm_head shares the
    embedding's storage only when both resolve to the same scheme.
    """

    default: LayerQuantRecipe | None = None
    embedding: LayerQuantRecipe | None = None
    attention: LayerRecipes = None
    feedforward: LayerRecipes = None
    lm_head: LayerQuantRecipe | None = None

    def __post_init__(self) -> None:
        self.to_recipe()  # refuse bad fields when built, not when used

    def to_recipe(self) -> Recipe:
        rules = []
        for role in ("default", "embedding", "attention", "feedforward", "lm_head"):
            value = getattr(self, role)
            if value is None:
                continue
            if isinstance(value, dict):
                if role not in ("attention", "feedforward"):
                    raise TypeError(f"GenerativeQuantRecipe.{role} takes one LayerQuantRecipe")
                for index, layer_recipe in sorted(value.items()):
                    if type(index) is not int or index < 0:
                        raise ValueError(
                            f"GenerativeQuantRecipe.{role}: layer index {index!r} must be an "
                            "int >= 0"
                        )
                    rules.append(_rule(layer_recipe, role, f"{role}[{index}]", (index,)))
            else:
                rules.append(_rule(value, role, role))
        return Recipe(rules=tuple(rules), name="generative")


def _rule(value, role: str, where: str, layers: tuple[int, ...] | None = None) -> Rule:
    if not isinstance(value, LayerQuantRecipe):
        raise TypeError(f"GenerativeQuantRecipe.{where} must be a LayerQuantRecipe, got {value!r}")
    try:
        scheme = value.to_scheme()
    except (ValueError, NotImplementedError) as e:
        raise type(e)(f"GenerativeQuantRecipe.{where}: {e}") from None
    return Rule(scheme, role=role, layers=layers)
