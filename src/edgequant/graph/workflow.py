"""Export, annotate, prepare, calibrate, convert: torchao's PT2E workflow driven by a recipe."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e
from torchao.quantization.pt2e.quantizer import Quantizer

from edgequant._progress import progress_bar
from edgequant.graph.quantizer import RecipeQuantizer


def _signature(model: nn.Module) -> str:
    try:
        return f"{type(model).__name__}.forward{inspect.signature(model.forward)}"
    except (TypeError, ValueError):
        return f"{type(model).__name__}.forward(...)"


def _describe(args: tuple) -> str:
    def one(a: Any) -> str:
        if isinstance(a, torch.Tensor):
            return f"Tensor{list(a.shape)} {str(a.dtype).removeprefix('torch.')}"
        return type(a).__name__

    return "(" + ", ".join(one(a) for a in args) + ")"


def capture(
    model: nn.Module, example_inputs: tuple, *, train: bool = False, dynamic_shapes=None
) -> GraphModule:
    """``torch.export.export(model, example_inputs).module()``, with an error that shows the
    model's expected signature when the inputs do not fit it."""
    if not isinstance(example_inputs, tuple):
        raise TypeError(
            f"example_inputs must be a tuple of the model's positional arguments, got "
            f"{type(example_inputs).__name__} (wrap one tensor as (x,))"
        )
    was_training = model.training
    model.train(train)
    try:
        return _export(model, example_inputs, dynamic_shapes)
    finally:
        model.train(was_training)  # the user's module keeps its mode


def _export(model: nn.Module, example_inputs: tuple, dynamic_shapes) -> GraphModule:
    try:
        inspect.signature(model.forward).bind(*example_inputs)
    except TypeError as e:
        raise ValueError(
            f"example inputs {_describe(example_inputs)} do not match {_signature(model)}: {e}"
        ) from None
    except ValueError:  # no signature to check (a builtin forward)
        pass
    try:
        program = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes)
    except Exception as e:  # noqa: BLE001  (any tracing failure is the user's input to fix)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"torch.export could not run {_signature(model)} on example inputs "
            f"{_describe(example_inputs)}: {first}"
        ) from e
    return program.module()


def prepare(
    model: nn.Module,
    example_inputs: tuple,
    recipe: Any = None,
    *,
    backend: str = "xnnpack",
    quantizer: Quantizer | None = None,
    is_qat: bool = False,
) -> GraphModule:
    """The exported graph with observers (or, with ``is_qat=True``, fake-quant modules to
    fine-tune through) where ``recipe`` (or ``quantizer``) annotates it."""
    quantizer = _quantizer(recipe, backend, quantizer, is_qat)
    gm = capture(model, example_inputs, train=is_qat)
    prepared = prepare_qat_pt2e(gm, quantizer) if is_qat else prepare_pt2e(gm, quantizer)
    prepared.meta["edgequant_qat"] = is_qat  # convert() moves a QAT graph to eval first
    return prepared


def _quantizer(recipe: Any, backend: str, quantizer: Quantizer | None, is_qat: bool) -> Quantizer:
    if quantizer is None:
        if recipe is None:
            raise ValueError("pass a recipe (a preset name, a file, a Recipe) or a quantizer")
        return RecipeQuantizer(recipe, backend, is_qat=is_qat)
    if recipe is not None:
        raise ValueError("pass recipe or quantizer, not both")
    for q in getattr(quantizer, "quantizers", [quantizer]):
        if isinstance(q, RecipeQuantizer) and q.is_qat != is_qat:
            raise ValueError(
                f"the quantizer was made with is_qat={q.is_qat} but prepare got is_qat={is_qat}; "
                "make them agree (QAT needs fake-quant modules, PTQ observers)"
            )
    return quantizer


def calibrate(prepared: GraphModule, calibration: Iterable, *, desc: str = "calibrating") -> int:
    """Run every batch of ``calibration`` through ``prepared`` (read lazily: a generator or a
    DataLoader works); returns the count. A batch is a tuple or list of positional arguments,
    a dict of keyword arguments, or one tensor."""
    try:
        total = len(calibration)  # type: ignore[arg-type]
    except TypeError:  # a generator, or a DataLoader over an IterableDataset
        total = None
    count = 0
    with torch.no_grad():
        for batch in progress_bar(calibration, total=total, desc=desc, unit="batch"):
            if isinstance(batch, dict):
                prepared(**batch)
            elif isinstance(batch, (tuple, list)):
                prepared(*batch)
            else:
                prepared(batch)
            count += 1
    if count == 0:
        raise ValueError(
            "calibration is empty: static activations need at least one batch of example "
            "arguments to observe their ranges"
        )
    return count


def convert(prepared: GraphModule) -> GraphModule:
    """The converted graph of a prepared (and calibrated, or QAT fine-tuned) one; a QAT graph is
    moved to eval mode first (dropout off, batch norms on their running statistics)."""
    from torchao.quantization.pt2e import move_exported_model_to_eval

    if prepared.meta.get("edgequant_qat"):
        prepared = move_exported_model_to_eval(prepared)
    return convert_pt2e(prepared)


def quantize(
    model: nn.Module,
    example_inputs: tuple,
    recipe: Any = None,
    calibration: Iterable | None = None,
    *,
    backend: str = "xnnpack",
    quantizer: Quantizer | None = None,
) -> GraphModule:
    """Export ``model``, annotate it from ``recipe`` for ``backend``, prepare, run
    ``calibration`` (an iterable of argument tuples; needed when a scheme has static
    activations), convert, and return the converted graph module."""
    quantizer = _quantizer(recipe, backend, quantizer, is_qat=False)
    prepared = prepare(model, example_inputs, quantizer=quantizer)
    static = _has_static(quantizer)
    if calibration is None and static:
        raise ValueError(
            "the recipe has static activations (int8_static): pass calibration=[(args...), ...] "
            "to observe their ranges"
        )
    # Weight observers see their weights on a forward; with dynamic (or no) activations the
    # example inputs are all the observation needed.
    calibrate(prepared, [example_inputs] if calibration is None else calibration)
    return convert(prepared)


def _has_static(quantizer: Quantizer) -> bool:
    quantizers = getattr(quantizer, "quantizers", [quantizer])
    for q in quantizers:
        if isinstance(q, RecipeQuantizer):
            if any(
                d.scheme is not None and d.scheme.activation == "int8_static" for d in q.decisions
            ):
                return True
        else:
            return True  # a user's quantizer: assume it may need ranges
    return False


def to_pte(converted: GraphModule, example_inputs: tuple, path, *, overwrite: bool = False):
    """Write a converted graph as an ExecuTorch program lowered to XNNPACK (run it with
    `edgequant.export.pte_runtime.PteProgram`)."""
    from edgequant.export.common import check_out
    from edgequant.export.pte import lower_to_pte

    check_out(path, overwrite)
    program = torch.export.export(converted, example_inputs)
    return lower_to_pte(program, path, overwrite=overwrite)
