"""Kernels for the packed modules: a pure-torch reference for every scheme, fast paths on CPU.

`linear` and `embedding` dispatch per layer. Set ``EDGEQUANT_KERNELS=reference`` (or call
``use_reference(True)``) to force the reference kernels everywhere, e.g. when debugging.
"""

from __future__ import annotations

import os

import torch

from edgequant.kernels import cpu, reference

_force_reference = os.environ.get("EDGEQUANT_KERNELS", "auto") == "reference"


def use_reference(flag: bool) -> None:
    """Force (True) or stop forcing (False) the reference kernels for every layer."""
    global _force_reference
    _force_reference = bool(flag)


@torch.no_grad()
def reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """``model(ids)`` with the reference kernels forced (restored afterwards): what every
    scheme computes by definition, to compare an exported program against."""
    global _force_reference
    before = _force_reference
    _force_reference = True
    try:
        return model(ids)
    finally:
        _force_reference = before


def kernel_name(layer) -> str:
    """The kernel a layer runs: a name from `cpu.KERNELS`, or ``reference``."""
    if _force_reference:
        return "reference"
    name = layer._kernel_cache.get("name")
    if name is None:
        name = cpu.choose(layer) or "reference"
        layer._kernel_cache["name"] = name
    return name


def linear(x: torch.Tensor, layer) -> torch.Tensor:
    name = kernel_name(layer)
    if name == "reference" or x.device.type != "cpu":
        return reference.linear(x, layer)
    return cpu.KERNELS[name](x, layer)


def embedding(ids: torch.Tensor, layer) -> torch.Tensor:
    return reference.embedding(ids, layer)
