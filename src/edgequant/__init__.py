"""edgequant: one declarative recipe -> a quantized on-device LLM artifact, measured.

>>> import torch.nn as nn, edgequant
>>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
>>> model, plan = edgequant.quantize(model, edgequant.recipes.get("8da4w"))
>>> [lp.scheme.describe() for lp in plan][0]
'int4 g32 sym fp16-scales, act int8 dynamic asym, hqq'
"""

__version__ = "0.1.0"

from edgequant import recipes  # noqa: E402
from edgequant.artifact import load, save  # noqa: E402
from edgequant.quantize import Plan, plan, quantize  # noqa: E402
from edgequant.recipe import Recipe, Rule  # noqa: E402
from edgequant.schemes import Scheme  # noqa: E402

__all__ = [
    "Plan",
    "Recipe",
    "Rule",
    "Scheme",
    "__version__",
    "load",
    "plan",
    "quantize",
    "recipes",
    "save",
]
