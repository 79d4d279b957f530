"""Kernels for the packed modules: a pure-torch reference for every scheme, fast paths on CPU.

`linear` and `embedding` dispatch per layer. Set ``EDGEQUANT_KERNELS=reference`` (or call
``use_reference(True)``) to force the reference kernels everywhere, e.g. when debugging.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from edgequant.kernels import cpu, reference

_force_reference = os.environ.get("EDGEQUANT_KERNELS", "auto") == "reference"
_runtime: str | None = None  # set by `computing_as`


@contextmanager
def computing_as(runtime: str | None) -> Iterator[None]:
    """Inside, every packed linear rounds its input as ``runtime``'s kernels do
    (`reference.linear_as`; ``None`` changes nothing): an eager twin of a deployed file whose
    runtime quantizes activations differently from the scheme (llama.cpp: Q8_0 blocks)."""
    global _runtime
    if runtime is not None:
        reference.check_runtime(runtime)
    before = _runtime
    _runtime = runtime
    try:
        yield
    finally:
        _runtime = before


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


def counts(model) -> dict[str, int]:
    """How many of ``model``'s packed linears run each kernel (`kernel_name`); the choice
    reads only schemes and shapes, so a model on the meta device counts too."""
    from collections import Counter

    from edgequant.layers import QuantizedLinear

    return dict(Counter(kernel_name(m) for m in model.modules() if isinstance(m, QuantizedLinear)))


def linear(x: torch.Tensor, layer) -> torch.Tensor:
    if _runtime is not None:
        return reference.linear_as(x, layer, _runtime)
    name = kernel_name(layer)
    if name == "reference" or x.device.type != "cpu":
        return reference.linear(x, layer)
    return cpu.KERNELS[name](x, layer)


def embedding(ids: torch.Tensor, layer) -> torch.Tensor:
    return reference.embedding(ids, layer)
