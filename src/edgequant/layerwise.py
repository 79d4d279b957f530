"""Run calibration data through a model one decoder layer at a time (for GPTQ).

The inputs of the first decoder layer are caught once for every calibration batch; then, layer
by layer, the inputs of its linears are gathered into Hessians, the linears the recipe gives to
GPTQ are quantized, their weights replaced by the dequantized result, and the layer is run again
to give the next layer its inputs: every layer is calibrated on what the quantized layers before
it produce, and memory holds one layer's activations for the calibration set. Linears outside
the decoder layers (an lm_head) get their Hessians from one last full pass.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from edgequant import algorithms
from edgequant.eval import progress_bar
from edgequant.layers import is_conv1d, linear_weight
from edgequant.schemes import Scheme


class _Caught(Exception):
    pass


def run_model(model: nn.Module, ids: torch.Tensor) -> None:
    """One forward pass without a KV cache (Hugging Face models would grow one per batch)."""
    import inspect

    if "use_cache" in inspect.signature(model.forward).parameters:
        model(ids, use_cache=False)
    else:
        model(ids)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(fqn, ModuleList)`` of the model's decoder layers (``layers``, ``model.layers``,
    ``transformer.h``, ...): the longest ModuleList of numbered children."""
    best = None
    for fqn, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and re.search(r"(^|\.)(layers|h|blocks|layer)$", fqn):
            if best is None or len(module) > len(best[1]):
                best = (fqn, module)
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no decoder-layer list (layers, model.layers, "
            "transformer.h) for layer-by-layer calibration"
        )
    return best


class _Hessian:
    """Sums ``x^T x`` of a linear's inputs (fp64) and counts rows."""

    def __init__(self, cols: int) -> None:
        self.sum = torch.zeros(cols, cols, dtype=torch.float64)
        self.rows = 0

    def __call__(self, module, args, output) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        self.sum += x.T @ x
        self.rows += x.shape[0]

    def value(self) -> torch.Tensor:
        return 2.0 * self.sum / max(self.rows, 1)


def _gptq(module: nn.Module, scheme: Scheme, h: _Hessian) -> algorithms.Quantized:
    weight = linear_weight(module)
    result = algorithms.gptq(weight, scheme, h.value(), **scheme.params)
    g = algorithms.group_size_of(scheme, weight.shape[1])
    dequantized = result.dequantize(g)
    if is_conv1d(module):  # HF Conv1D keeps [in, out]
        dequantized = dequantized.T
    # a new tensor: the old one may be shared (an lm_head tied to an embedding kept float)
    module.weight = nn.Parameter(dequantized.to(module.weight.dtype), requires_grad=False)
    return result


@torch.no_grad()
def run_gptq(
    model: nn.Module, schemes: dict[str, Scheme], calibration
) -> dict[str, algorithms.Quantized]:
    """GPTQ for every linear named in ``schemes`` (fqn -> scheme), layer by layer on the
    ``calibration`` batches; returns fqn -> `Quantized`. The model's float weights of those
    linears are left at their dequantized values (the caller swaps in packed modules)."""
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration has no batches")
    prefix, layers = decoder_layers(model)
    inputs: list[tuple[tuple, dict]] = []

    def catch(module, args, kwargs):
        inputs.append((args, kwargs))
        raise _Caught

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for ids in progress_bar(batches, len(batches), "calibration inputs", "batch"):
            try:
                run_model(model, ids)
            except _Caught:
                pass
    finally:
        handle.remove()
    results: dict[str, algorithms.Quantized] = {}
    for i in progress_bar(range(len(layers)), len(layers), "gptq", "layer"):
        layer = layers[i]
        todo = {
            name: (module, schemes[f"{prefix}.{i}.{name}"])
            for name, module in layer.named_modules()
            if f"{prefix}.{i}.{name}" in schemes
        }
        if todo:
            hessians = {name: _Hessian(linear_weight(m).shape[1]) for name, (m, _) in todo.items()}
            handles = [m.register_forward_hook(hessians[n]) for n, (m, _) in todo.items()]
            try:
                for args, kwargs in inputs:
                    layer(*args, **kwargs)
            finally:
                for h in handles:
                    h.remove()
            for name, (module, scheme) in todo.items():
                results[f"{prefix}.{i}.{name}"] = _gptq(module, scheme, hessians[name])
        inputs = [(_next_args(layer(*args, **kwargs), args), kwargs) for args, kwargs in inputs]
    rest = {fqn: s for fqn, s in schemes.items() if fqn not in results}
    if rest:
        _outside_layers(model, rest, batches, results)
    return results


def _next_args(output, args: tuple) -> tuple:
    hidden = output[0] if isinstance(output, (tuple, list)) else output
    return (hidden, *args[1:])


def _outside_layers(model, schemes, batches, results) -> None:
    modules = {fqn: model.get_submodule(fqn) for fqn in schemes}
    hessians = {fqn: _Hessian(linear_weight(m).shape[1]) for fqn, m in modules.items()}
    handles = [m.register_forward_hook(hessians[f]) for f, m in modules.items()]
    try:
        for ids in progress_bar(batches, len(batches), "gptq: layers outside the blocks", "batch"):
            run_model(model, ids)
    finally:
        for h in handles:
            h.remove()
    for fqn, module in modules.items():
        results[fqn] = _gptq(module, schemes[fqn], hessians[fqn])
