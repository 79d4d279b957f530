"""ExecuTorch-style source quantizers: ``Quantizer(...).quantize(model)`` mutates and returns.

>>> import torch, torch.nn as nn
>>> model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
>>> model = Int8DynActInt4WeightQuantizer(precision=torch.float32, groupsize=32).quantize(model)
>>> model[0]
QuantizedLinear(in_features=64, out_features=32, bias=True, scheme=int4 g32 sym, act int8 \
dynamic asym)
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from edgequant.quantize import quantize
from edgequant.recipe import Recipe, Rule
from edgequant.roles import is_quantizable
from edgequant.schemes import Scheme

log = logging.getLogger(__name__)
_SCALE_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class Int8DynActInt4WeightQuantizer:
    """8da4w on every ``nn.Linear``: int4 symmetric group-wise weights, int8 per-token
    asymmetric dynamic activations (torchao / ExecuTorch semantics; embeddings untouched).

    As in torchao, a Linear whose ``in_features`` is not a multiple of ``groupsize`` is left in
    float (with a warning) unless ``padding_allowed``, which edgequant does not implement.
    """

    def __init__(
        self,
        groupsize: int = 256,
        padding_allowed: bool = False,
        precision: torch.dtype = torch.float32,
        scales_precision: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if precision != torch.float32:
            raise NotImplementedError(
                f"precision {precision} is not supported; edgequant computes in torch.float32"
            )
        if scales_precision not in _SCALE_DTYPES:
            raise ValueError(
                f"scales_precision must be one of {list(_SCALE_DTYPES)}, got {scales_precision}"
            )
        if padding_allowed:
            raise NotImplementedError(
                "padding_allowed=True is not supported; choose a groupsize that divides "
                "in_features (layers it does not divide are left in float)"
            )
        if torch.device(device).type != "cpu":
            raise NotImplementedError(f"device {device!r}: edgequant quantizes on the CPU")
        self.groupsize = groupsize
        self.scheme = Scheme(
            "int4",
            "per_group",
            groupsize,
            scale_dtype=_SCALE_DTYPES[scales_precision],
            activation="int8_dynamic",
        )

    def recipe(self, model: nn.Module) -> Recipe:
        """The recipe this quantizer applies to ``model`` (Linears only)."""
        rules = [Rule(self.scheme, role="default"), Rule(None, role="embedding")]
        for fqn, module in model.named_modules():
            if isinstance(module, nn.Linear) and module.in_features % self.groupsize:
                log.warning(
                    "%s: in_features %d is not a multiple of groupsize %d; left in float",
                    fqn,
                    module.in_features,
                    self.groupsize,
                )
                rules.append(Rule(None, module=fqn))
            elif is_quantizable(module) and not isinstance(module, nn.Linear):
                rules.append(Rule(None, module=fqn))
        return Recipe(rules=tuple(rules), name=f"8da4w,group_size={self.groupsize}")

    def quantize(self, model: nn.Module) -> nn.Module:
        """Swap every eligible ``nn.Linear`` in place; returns the same model."""
        model, _ = quantize(model, self.recipe(model))
        return model
