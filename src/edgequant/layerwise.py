"""Run calibration data through a model one decoder layer at a time (AWQ, SmoothQuant, GPTQ).

The inputs of the first decoder layer are caught once for every calibration batch, with what
the model gives each layer besides (its mask, RoPE tables, index); then, layer by layer:

1. AWQ / SmoothQuant: the inputs of the layer's linears are gathered (per-channel statistics and
   a sample of rows), each group of linears reading one input (`edgequant.smoothing`) gets its
   searched scale folded in, and those linears are quantized (AWQ: mse clipping weighted by the
   scaled inputs' energy; SmoothQuant: min-max);
2. GPTQ: the inputs of its linears are gathered into Hessians and those linears quantized;
3. every quantized linear's weight is replaced by its dequantized values and the layer is run
   again to give the next layer its inputs.

So every layer is calibrated on what the quantized layers before it produce, and memory holds
one layer's activations for the calibration set. Linears outside the decoder layers (an
lm_head) are calibrated from one last full pass (GPTQ; AWQ there is mse weighted by its inputs'
energy, SmoothQuant min-max: no op before them to fold into that the model does not share).
"""

from __future__ import annotations

import copy
import logging
import math
import re

import torch
from torch import nn
from torch.nn import functional as F

from edgequant import algorithms, smoothing
from edgequant._memory import give_back
from edgequant._progress import progress_bar
from edgequant.kernels.reference import fake_quantize_tokens
from edgequant.layers import is_conv1d, linear_weight
from edgequant.primitives import rows_per_block
from edgequant.schemes import SMOOTHING, Scheme

log = logging.getLogger(__name__)


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


# the largest ``x^T x`` (values) made whole and shared by the linears reading one input
SHARED_PRODUCT = 4096 * 4096
# GPTAQ by stages: the float twin's inputs to a layer's linears are kept for every batch (the
# twin runs once instead of once per stage) up to this many bytes, else the twin runs again
# for each stage (SmolLM2 on 128 x 512 calibration tokens: 0.9 GB)
TWIN_ROWS_BYTES = 2 << 30


class _Hessian:
    """Sums ``x^T x`` of a linear's inputs in fp64 and counts rows. Each batch's product is made
    in fp32 and added into the sum a block of rows at a time (adding it whole makes a fp64 copy
    of it). A product of up to `SHARED_PRODUCT` values is made whole once and shared, through
    ``shared``, by the linears reading the same input tensor (q/k/v, gate/up); a bigger one (a
    1.5B model's down projection: 8,960 x 8,960, 321 MB) is made a block of rows at a time too,
    the same values (each row of a product is the same sums whichever rows are made with it;
    tests)."""

    def __init__(self, cols: int, shared: dict) -> None:
        self.sum = torch.zeros(cols, cols, dtype=torch.float64)
        self.rows = 0
        self.shared = shared

    def __call__(self, module, args, output) -> None:
        x = args[0]
        cols = self.sum.shape[0]
        if self.shared.get("input") is not x:
            self.shared.clear()
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            whole = x2.T @ x2 if cols * cols <= SHARED_PRODUCT else None
            self.shared.update(input=x, x2=x2, product=whole)
        x2, product = self.shared["x2"], self.shared["product"]
        step = rows_per_block(cols)
        for i in range(0, cols, step):
            part = x2[:, i : i + step].T @ x2 if product is None else product[i : i + step]
            self.sum[i : i + step] += part
        self.rows += x2.shape[0]

    def value(self) -> torch.Tensor:
        return 2.0 * self.sum / max(self.rows, 1)

    def take(self) -> torch.Tensor:
        """`value` computed in the sum's own memory, which is handed over (for GPTQ to
        overwrite): the down projection of a 1.5B model has a 640 MB sum."""
        h, self.sum = self.sum, None
        return h.mul_(2.0).div_(max(self.rows, 1))


class _Shift:
    """Sums ``(x_f - x_q)^T x_q`` in fp64 (GPTAQ's asymmetric term, `algorithms.gptaq_target`):
    ``x_q`` is what a linear reads in the model being rounded (this hook's input), ``x_f`` what
    its float twin read on the same batch (put in ``stash`` under ``name`` by `_stasher`'s
    hook on the float layer, run just before). Linears reading one input share the product
    through ``shared``, as `_Hessian`'s do."""

    def __init__(self, cols: int, stash: dict, name: str, shared: dict) -> None:
        self.sum = torch.zeros(cols, cols, dtype=torch.float64)
        self.rows = 0
        self.stash, self.name, self.shared = stash, name, shared

    def __call__(self, module, args, output) -> None:
        x = args[0]
        if self.shared.get("input") is not x:
            self.shared.clear()
            xq = x.detach().reshape(-1, x.shape[-1]).float()
            self.shared.update(input=x, product=(self.stash[self.name] - xq).T @ xq)
        self.sum += self.shared["product"]
        self.rows += x.numel() // x.shape[-1]

    def value(self) -> torch.Tensor:
        """``D = 2 (X_f - X_q)^T X_q / n``, on the scale of `_Hessian.value`."""
        return 2.0 * self.sum / max(self.rows, 1)


def _stasher(stash: dict, name: str):
    """A forward hook keeping a linear's input rows (``[n, cols]``, float32) in ``stash``."""

    def hook(module, args, output) -> None:
        stash[name] = args[0].detach().reshape(-1, args[0].shape[-1]).float()

    return hook


# GPTAQ's parameters, which `hessian_rounded` reads and does not pass on to `algorithms.gptq`
GPTAQ_PARAMS = ("gptaq", "gptaq_residual", "gptaq_head")


def gptaq_param(scheme: Scheme, name: str = "gptaq") -> float:
    """One of `GPTAQ_PARAMS` of a rule GPTQ rounds (0: none; ``gptaq`` 0 is plain GPTQ)."""
    return float(scheme.params.get(name, 0.0)) if _rounds_by_gptq(scheme) else 0.0


class _Gap:
    """Sums ``r^T x_q`` in fp64 for a layer's last linear (``gptaq_residual``,
    `algorithms.gptaq_target`'s ``gap``): ``x_q`` is what it reads in the model being rounded,
    ``r`` what the residual stream it writes into differs by, float model less the model being
    rounded, just before its output is added (each layer's output less the linear's own)."""

    def __init__(self, rows: int, cols: int) -> None:
        self.sum = torch.zeros(rows, cols, dtype=torch.float64)
        self.rows = 0

    def add(self, r: torch.Tensor, x: torch.Tensor) -> None:
        r2 = r.detach().reshape(-1, r.shape[-1]).float()
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        self.sum += r2.T @ x2
        self.rows += x2.shape[0]

    def value(self) -> torch.Tensor:
        """``G = 2 R^T X_q / n``, on the scale of `_Hessian.value`."""
        return 2.0 * self.sum / max(self.rows, 1)


class _Inputs:
    """Per-channel sums of ``|x|`` and ``x^2``, the max of ``|x|``, and ``keep`` evenly spaced
    rows of every batch, of a linear's inputs."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.sum_abs = self.sum_sq = self.max_abs = None
        self.rows = 0
        self.sample: list[torch.Tensor] = []

    def __call__(self, module, args, output) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        a = x.abs()
        if self.sum_abs is None:
            self.sum_abs, self.sum_sq, self.max_abs = a.sum(0), (x * x).sum(0), a.amax(0)
        else:
            self.sum_abs += a.sum(0)
            self.sum_sq += (x * x).sum(0)
            self.max_abs = torch.maximum(self.max_abs, a.amax(0))
        self.rows += x.shape[0]
        n = min(self.keep, x.shape[0])
        self.sample.append(x[torch.linspace(0, x.shape[0] - 1, n).round().long()])

    def stats(self) -> algorithms.InputStats:
        return algorithms.InputStats(
            torch.cat(self.sample), self.sum_abs / self.rows, self.max_abs, self.sum_sq / self.rows
        )


def _write(module: nn.Module, result: algorithms.Quantized, scheme: Scheme) -> None:
    """Replace ``module``'s weight by ``result`` dequantized (what the next layers will see)."""
    cols = linear_weight(module).shape[1]
    _set_weight(module, result.dequantize(algorithms.group_size_of(scheme, cols)))


def _set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Give ``module`` the ``[out, in]`` ``weight`` (in its own dtype and layout) as a new
    tensor: the old one may be shared (an lm_head tied to an embedding kept float)."""
    if is_conv1d(module):  # HF Conv1D keeps [in, out]
        weight = weight.T
    module.weight = nn.Parameter(weight.to(module.weight.dtype), requires_grad=False)


def _rounds_by_gptq(scheme: Scheme) -> bool:
    """Its inputs' Hessian rounds it: a ``gptq`` rule, ``awq`` with ``gptq: true`` (AWQ's
    scales, then GPTQ on the scaled inputs), or a K-quant's ``imatrix`` (llama.cpp's quantizer
    weighing each column by the Hessian's diagonal)."""
    return scheme.algorithm in ("gptq", "imatrix") or (
        scheme.algorithm == "awq" and scheme.params.get("gptq", False)
    )


def hessian_rounded(weight: torch.Tensor, scheme: Scheme, hessian: torch.Tensor,
                    overwrite: bool = False, shift: torch.Tensor | None = None,
                    gap: torch.Tensor | None = None):  # fmt: skip
    """``weight`` rounded as a rule that `_rounds_by_gptq` rounds on its inputs' Hessian: a
    K-quant's ``imatrix`` by llama.cpp's quantizer with the Hessian's diagonal, the others by
    GPTQ (``overwrite``: it may use the Hessian's memory); with ``shift`` (`_Shift.value`) and
    a ``gptaq`` strength, GPTQ rounds `algorithms.gptaq_target` instead of ``weight`` (moved by
    ``gap``, `_Gap.value`, too with a ``gptaq_residual``)."""
    if scheme.algorithm == "imatrix":
        return imatrix_rounded(weight, scheme, hessian)
    params = {k: v for k, v in scheme.params.items() if k not in GPTAQ_PARAMS}
    if scheme.algorithm != "gptq":  # awq with gptq: true passes on its magnitude only
        params = {k: v for k, v in params.items() if k == "magnitude"}
    alpha = gptaq_param(scheme)
    if shift is not None and alpha > 0:
        damp = params.get("damp", 0.01)
        weight = algorithms.gptaq_target(weight, hessian, shift, alpha, damp, gap=gap,
                                         beta=gptaq_param(scheme, "gptaq_residual"))  # fmt: skip
    return algorithms.gptq(weight, scheme, hessian, overwrite_hessian=overwrite, **params)


def _gptq(module: nn.Module, scheme: Scheme, h: _Hessian, write: bool = True,
          shift: _Shift | None = None, gap: _Gap | None = None):  # fmt: skip
    d = None if shift is None else shift.value()
    g = None if gap is None else gap.value()
    result = hessian_rounded(linear_weight(module), scheme, h.take(), overwrite=True, shift=d,
                             gap=g)  # fmt: skip
    del d, g
    if write:
        _write(module, result, scheme)
    return result


def imatrix_rounded(weight: torch.Tensor, scheme: Scheme, hessian: torch.Tensor):
    """A K-quant ``imatrix`` rule's rounding: llama.cpp's quantizer with each input column's
    mean square input (``diag(H) / 2``, ``H = 2 X^T X / n``: what ``llama-imatrix`` gathers) as
    its importance."""
    from edgequant import kquants

    return kquants.rounded(weight, scheme.weight, torch.diagonal(hessian).float() / 2)


def _layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: list) -> tuple[list, list]:
    """``(args, kwargs)`` of the first decoder layer for every batch, and what the model gives
    every layer besides its hidden states (``(args[1:], kwargs)`` for every batch): a model may
    give its layers different masks and RoPE tables (Gemma 3's sliding-window layers) or a
    layer index. Each layer's forward is replaced for the pass by one that records its inputs
    and hands its hidden states on unchanged, the last one stopping the pass: nothing runs but
    what comes before the first layer (the layers may be on the meta device)."""
    inputs: list[tuple[tuple, dict]] = []
    contexts: list[list[tuple[tuple, dict]]] = [[] for _ in layers]

    def recorder(i: int):
        def forward(*args, **kwargs):
            if i == 0:
                inputs.append((args, kwargs))
            contexts[i].append((args[1:], kwargs))
            if i == len(layers) - 1:
                raise _Caught
            return args[0]

        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)  # an instance attribute, over the class's forward
    try:
        for ids in progress_bar(batches, len(batches), "calibration inputs", "batch"):
            try:
                run_model(model, ids)
            except _Caught:
                pass
    finally:
        for layer in layers:
            del layer.forward
    return inputs, contexts


def _run_layer(
    layer: nn.Module,
    inputs: list,
    hooks: dict,
    stop_at: list[nn.Module] | None = None,
    advance: bool = False,
) -> None:
    """Run ``layer`` on every input with forward ``hooks`` (module -> hook) in place; with
    ``advance``, each input is replaced by the next layer's, as `_advance` does (the layer's
    weights are what the next layer should see: nothing is rounded between the two passes).
    With ``stop_at`` (the linears of one `_stages` stage, which read one input tensor), each
    run stops as the first of them is about to run: every hook is called then with that input
    (the hooks gather inputs, never outputs) and nothing of the stage or after it runs."""
    if advance and stop_at:
        raise ValueError("a run stopped part way through the layer gives no next inputs")
    if stop_at:

        def reached(module, args) -> None:
            for m, hook in hooks.items():
                hook(m, args, None)
            raise _Caught

        handles = [m.register_forward_pre_hook(reached) for m in stop_at]
    else:
        handles = [m.register_forward_hook(h) for m, h in hooks.items()]
    try:
        for k, (args, kwargs) in enumerate(inputs):
            try:
                output = layer(*args, **kwargs)
            except _Caught:
                continue
            if advance:
                inputs[k] = (_next_args(output, args), kwargs)
    finally:
        for h in handles:
            h.remove()


def _twin_rows(twin, floats: list, names: list[str],
               writer: str | None = None) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """Run the float ``twin`` once on every batch (``floats`` become the next layer's), keeping
    what its linears ``names`` read: one dict per batch, which `_paired_pass` reads instead of
    running the twin again for each stage (linears reading one tensor keep it once); with
    ``writer`` (the layer's last linear), also the stream before its output is added, under
    `STREAM`."""
    rows: list[dict[str, torch.Tensor]] = []
    stash: dict = {}
    keep = {twin.get_submodule(n): _stasher(stash, n) for n in names}
    if writer is not None:
        linear = twin.get_submodule(writer)
        keep[linear] = _keeping(stash, STREAM, keep.get(linear))
    for k in range(len(floats)):
        pair = floats[k : k + 1]
        _run_layer(twin, pair, keep, advance=True)
        floats[k] = pair[0]
        if writer is not None:  # the layer's output less the linear's
            stash[STREAM] = floats[k][0][0] - stash[STREAM]
        rows.append(dict(stash))
        stash.clear()
    return rows


STREAM = "(the residual stream before the layer's last linear adds its output)"


def _twin_rows_bytes(floats: list, modules: dict, stages: list[list[str]], stream: int = 0) -> int:
    """What `_twin_rows` keeps for ``stages``' linears: each stage's one input, every batch;
    and ``stream`` values a row of the stream (its width, with a ``writer``)."""
    widths = [linear_weight(modules[stage[0]]).shape[1] for stage in stages if stage]
    return 4 * _rows(floats) * (sum(widths) + stream)


def _rows(inputs: list) -> int:
    """The hidden-state rows (tokens) of every batch of ``inputs`` (``(args, kwargs)`` pairs)."""
    return sum(args[0].numel() // args[0].shape[-1] for args, _ in inputs)


def _rest_fits(inputs: list, linear: nn.Module) -> bool:
    """Whether the rows `_paired_pass`'s ``rest`` keeps for ``linear`` (the layer's last) fit
    `TWIN_ROWS_BYTES`: each batch's layer output and the linear's input."""
    return 4 * _rows(inputs) * sum(linear_weight(linear).shape) <= TWIN_ROWS_BYTES


def _paired_pass(layer, twin, inputs: list, floats: list, hessians: dict, asym: list[str],
                 stop: list[str] | None, twin_rows: list | None = None,
                 writer: tuple[str, _Gap] | None = None,
                 rest: list | None = None) -> dict:  # fmt: skip
    """GPTAQ's gathering pass: each batch through the float ``twin`` (on the float model's
    hidden states ``floats``; its linears ``asym`` keep their inputs), then through ``layer``
    (on ``inputs``) with ``hessians``' hooks and a `_Shift` for each of ``asym``; with ``stop``
    (a stage's linears' names) both runs stop where the stage begins (`_run_layer`), else
    ``floats`` become the next layer's. With ``twin_rows`` (`_twin_rows`), the twin does not
    run: its inputs are read from there (and dropped). With ``writer`` (the layer's last
    linear, whose output `_adds_to_stream`, and its `_Gap`; runs of the whole layer only), the
    gap is summed too, and ``rest`` (a list) gets each batch's layer output less that linear's
    and the linear's input (`LayerByLayer.step` then makes the next layer's inputs from them).
    Returns name -> `_Shift`."""
    stash: dict = {}
    paired: dict = {}
    shifts = {
        n: _Shift(linear_weight(layer.get_submodule(n)).shape[1], stash, n, paired) for n in asym
    }

    def both(hessian, shift):
        def hook(module, args, output) -> None:
            hessian(module, args, output)
            if shift is not None:
                shift(module, args, output)

        return hook

    hooks = {layer.get_submodule(n): both(h, shifts.get(n)) for n, h in hessians.items()}
    keep = {twin.get_submodule(n): _stasher(stash, n) for n in asym}
    seen: dict = {}
    if writer is not None:
        if stop is not None:
            raise ValueError("the residual stream's gap is gathered on whole runs of the layer")
        in_layer, in_twin = layer.get_submodule(writer[0]), twin.get_submodule(writer[0])
        hooks[in_layer] = _keeping(seen, "written", hooks.get(in_layer), inputs=True)
        hooks[layer] = _keeping(seen, "layer")
        keep[in_twin] = _keeping(seen, "float written", keep.get(in_twin))
    for k in range(len(inputs)):
        if twin_rows is not None:
            kept = twin_rows[k]  # a linear the layer never runs kept nothing
            stash.update({n: kept.pop(n) for n in asym if n in kept})
        else:
            pair = floats[k : k + 1]
            _run_layer(twin, pair, keep, stop_at=stop and [twin.get_submodule(n) for n in stop],
                       advance=stop is None)  # fmt: skip
            floats[k] = pair[0]
        _run_layer(layer, inputs[k : k + 1], hooks,
                   stop_at=stop and [layer.get_submodule(n) for n in stop])  # fmt: skip
        if writer is not None:  # the stream before the write: the layer's output less it
            if twin_rows is not None:
                before = twin_rows[k].pop(STREAM)
            else:
                before = floats[k][0][0] - seen["float written"]
            without = seen["layer"] - seen["written"]
            writer[1].add(before - without, seen["written input"])
            if rest is not None:
                rest.append((without, seen["written input"]))
            seen.clear()
        stash.clear()
    paired.clear()
    return shifts


@torch.no_grad()
def _adds_to_stream(layer: nn.Module, name: str, args: tuple, kwargs: dict) -> bool:
    """Whether ``layer``'s output is its linear ``name``'s output added to what does not depend
    on it (Llama's down projection; not Gemma's, a norm follows it): the layer run on ``args``
    as it is and with that output zeroed differ by exactly that output."""
    seen: dict = {}
    linear = layer.get_submodule(name)
    handle = linear.register_forward_hook(_keeping(seen, "written"))
    try:
        whole = _hidden(layer(*args, **kwargs))
    finally:
        handle.remove()
    handle = linear.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    try:
        without = _hidden(layer(*args, **kwargs))
    finally:
        handle.remove()
    tolerance = 1e-5 * float(whole.abs().max())
    return torch.allclose(whole - without, seen["written"], rtol=1e-4, atol=tolerance)


def _stages(layer: nn.Module, inputs: list, modules: dict[str, nn.Module],
            ran_only: bool = False) -> list[list[str]]:  # fmt: skip
    """``modules``' names in the order ``layer`` runs them (on the first input), those reading
    one input tensor together: Llama's q/k/v, then o, then gate/up, then down (then, unless
    ``ran_only``, those the first input does not run, a stage each). GPTQ's
    ``sequential`` rounds a stage on the inputs the stages before it (rounded) give it, as
    AutoGPTQ's ``true_sequential`` does."""
    calls: list[tuple[str, torch.Tensor]] = []
    names = {m: n for n, m in modules.items()}

    def record(module, args, output) -> None:
        calls.append((names[module], args[0]))

    handles = [m.register_forward_hook(record) for m in modules.values()]
    try:
        args, kwargs = inputs[0]
        layer(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    stages: list[list[str]] = []
    seen: set[str] = set()
    last = None
    for name, x in calls:
        if name not in seen:  # a module run twice keeps its first place
            if stages and x is last:
                stages[-1].append(name)
            else:
                stages.append([name])
            seen.add(name)
        last = x
    # linears the first input does not run: a stage each (they may read different tensors)
    return stages + ([] if ran_only else [[n] for n in modules if n not in seen])


@torch.no_grad()
def smooth(model: nn.Module, schemes: dict[str, Scheme], calibration) -> dict[str, torch.Tensor]:
    """Only the AWQ / SmoothQuant scale search and fold of `run`, no quantization: the model
    computes the same function afterwards (up to float rounding). Returns fqn -> the scale
    folded into that linear's input columns."""
    scales: dict[str, torch.Tensor] = {}
    run(model, schemes, calibration, _scales=scales)
    return scales


@torch.no_grad()
def run(
    model: nn.Module, schemes: dict[str, Scheme], calibration, _scales: dict | None = None
) -> dict[str, algorithms.Quantized]:
    """The calibrated algorithms (GPTQ, AWQ, SmoothQuant) for every linear named in ``schemes``
    (fqn -> scheme), layer by layer on the ``calibration`` batches; returns fqn -> `Quantized`.
    The model's float weights of the decoder layers' linears are left at their dequantized
    values (a linear after the layers keeps its float weight; the caller swaps in packed
    modules); AWQ's and SmoothQuant's scales are folded into the model's norms
    and linears (the float function is unchanged)."""
    steps = LayerByLayer(model, schemes, calibration)
    results: dict[str, algorithms.Quantized] = {}
    for i in progress_bar(range(len(steps.layers)), len(steps.layers), steps.label, "layer"):
        results.update(steps.step(i, _scales))
    rest = {fqn: s for fqn, s in schemes.items() if fqn not in results}
    if _scales is None:
        steps.fit_float_head(model)  # before `outside` lets go of the hidden states
    if rest and _scales is None:
        final = head_norm(model, rest)
        if final is not None:  # the head: from the last layer's hidden states, already here
            results.update(steps.outside(model, rest, final))
        else:
            _outside_layers(model, rest, steps.batches, results)
    return results


def head_norm(model: nn.Module, fqns) -> nn.Module | None:
    """The model's final norm when the linears ``fqns`` are its head alone (which reads that
    norm's output); None for any other linear outside the layers, or a model no family knows."""
    from edgequant.models.families import module_name

    try:
        norm, head = module_name(model, "norm"), module_name(model, "output")
    except ValueError:
        return None
    if norm is None or set(fqns) != {head}:
        return None
    return model.get_submodule(norm)


@torch.no_grad()
def float_hessians(model: nn.Module, fqns: list[str], calibration):
    """GPTQ's Hessians (`_Hessian`: ``2 X^T X / n``) of the inputs the float model gives the
    linears ``fqns`` on the ``calibration`` batches, no layer rounded: yields ``{fqn: Hessian}``
    for each decoder layer holding some of them, in order, one layer's at a time, then the
    head's when it is among them (from the last layer's outputs through the final norm). Any
    other linear outside the layers is refused."""
    prefix, layers = decoder_layers(model)
    fqns = set(fqns)
    outside = {f for f in fqns if not f.startswith(f"{prefix}.")}
    final = head_norm(model, outside) if outside else None
    if outside and final is None:
        raise ValueError(
            f"float_hessians: {sorted(outside)} are outside the decoder layers and are not the "
            "model's head (the linear reading its final norm)"
        )
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration has no batches")
    inputs, contexts = _layer_inputs(model, layers, batches)
    last = (
        len(layers) - 1
        if outside
        else max(
            (i for i in range(len(layers)) if any(f.startswith(f"{prefix}.{i}.") for f in fqns)),
            default=-1,
        )
    )
    for i in progress_bar(range(last + 1), last + 1, "hessians", "layer"):
        layer = layers[i]
        # layer i's own masks, RoPE tables and index with the hidden states it is given
        pairs = zip(inputs, contexts[i], strict=True)
        inputs = [((args[0], *rest), kwargs) for (args, _), (rest, kwargs) in pairs]
        named = ((f"{prefix}.{i}.{n}", m) for n, m in layer.named_modules())
        here = {fqn: m for fqn, m in named if fqn in fqns}
        if not here:
            _advance(layer, inputs)
            continue
        shared: dict = {}
        hessians = {f: _Hessian(linear_weight(m).shape[1], shared) for f, m in here.items()}
        # the float layer: the pass that gathers its Hessians also gives the next layer's inputs
        _run_layer(layer, inputs, {m: hessians[f] for f, m in here.items()}, advance=True)
        shared.clear()
        yield {f: h.value() for f, h in hessians.items()}
    if outside:
        modules = {f: model.get_submodule(f) for f in outside}
        hessians, _ = _hessians_after(final, modules, (args[0] for args, _ in inputs))
        yield {f: h.value() for f, h in hessians.items()}


def _hessians_after(final: nn.Module, modules: dict[str, nn.Module], hidden,
                    floats=None) -> tuple[dict, dict]:  # fmt: skip
    """fqn -> `_Hessian` of the linears ``modules`` reading ``final``'s output (the model's last
    norm) on each of the last layer's ``hidden`` states; with ``floats`` (the float model's
    hidden states of the same batches), also fqn -> `_Shift` (else an empty dict)."""
    shared: dict = {}
    hessians = {fqn: _Hessian(linear_weight(m).shape[1], shared) for fqn, m in modules.items()}
    stash: dict = {}
    paired: dict = {}
    shifts = {}
    if floats is not None:
        shifts = {fqn: _Shift(linear_weight(m).shape[1], stash, fqn, paired)
                  for fqn, m in modules.items()}  # fmt: skip
    hidden = list(hidden)
    for h, f in zip(hidden, floats if floats is not None else [None] * len(hidden), strict=True):
        x = final(h)
        if f is not None:
            xf = final(f)
            stash.update({fqn: xf.reshape(-1, xf.shape[-1]).float() for fqn in modules})
        for fqn, m in modules.items():
            hessians[fqn](m, (x,), None)
            if fqn in shifts:
                shifts[fqn](m, (x,), None)
        del x
    return hessians, shifts


class LayerByLayer:
    """The calibrated algorithms one decoder layer at a time: built, it has caught the first
    layer's inputs for every calibration batch (the model's layers may still be on the meta
    device: only what runs before the first layer must hold values); ``step(i)`` calibrates and
    rounds layer ``i``'s linears and runs the layer (at its rounded values) to give layer
    ``i + 1`` its inputs. `run` takes every step in turn; `edgequant.stream` fills each layer
    from the checkpoint just before its step."""

    def __init__(self, model: nn.Module, schemes: dict[str, Scheme], calibration) -> None:
        self.batches = list(calibration)
        if not self.batches:
            raise ValueError("calibration has no batches")
        self.schemes = schemes
        self.prefix, self.layers = decoder_layers(model)
        outside = {f for f in schemes if not f.startswith(f"{self.prefix}.")}
        asym = sorted(f for f in outside if gptaq_param(schemes[f]) > 0)
        if asym and head_norm(model, outside) is None:  # before any layer runs
            raise ValueError(
                f"gptaq: {asym} are outside the decoder layers and are not the model's head (the "
                "linear reading its final norm); GPTAQ rounds only those; drop gptaq for them"
            )
        self.inputs, self.contexts = _layer_inputs(model, self.layers, self.batches)
        self.label = " + ".join(sorted({s.algorithm for s in schemes.values()}))
        # GPTAQ: the float model's hidden states of the batches too (the first layer's inputs
        # are the same in both), each layer's float twin taking them on
        self.gptaq = any(gptaq_param(s) > 0 for s in schemes.values())
        self.floats: list[torch.Tensor] | None = self.hidden() if self.gptaq else None

    def hidden(self) -> list[torch.Tensor]:
        """The next layer's input hidden states, one per batch."""
        return [args[0] for args, _ in self.inputs]

    def set_hidden(self, hidden: list[torch.Tensor], floats: list[torch.Tensor] | None = None):
        """Replace the next layer's input hidden states (resuming a stopped run), and with GPTAQ
        the float model's (``floats``, which it then needs)."""
        if self.gptaq and floats is None:
            raise ValueError("gptaq needs the float model's hidden states to resume from")
        self.inputs = [((h, *args[1:]), kw) for h, (args, kw) in zip(hidden, self.inputs,
                                                                     strict=True)]  # fmt: skip
        if self.gptaq:
            self.floats = list(floats)

    def step(self, i: int, _scales: dict | None = None) -> dict[str, algorithms.Quantized]:
        """Calibrate and round layer ``i``; returns fqn -> `Quantized` for its linears."""
        prefix, layer, schemes = self.prefix, self.layers[i], self.schemes
        # layer i's own masks, RoPE tables and index with the hidden states it is given
        inputs = self.inputs = [
            ((args[0], *rest), kwargs)
            for (args, _), (rest, kwargs) in zip(self.inputs, self.contexts[i], strict=True)
        ]
        local = {
            name: schemes[f"{prefix}.{i}.{name}"]
            for name, _ in layer.named_modules()
            if f"{prefix}.{i}.{name}" in schemes
        }
        where = f"{prefix}.{i}"
        n_batches = len(self.batches)
        if _scales is not None:  # fold only
            for n, s in _smooth_layer(layer, local, inputs, n_batches, where, False).items():
                _scales[f"{where}.{n}"] = s
            _advance(layer, inputs)
            return {}
        # the float layer, before anything is rounded (AWQ's scales are folded into it too)
        twin = copy.deepcopy(layer) if self.gptaq else None
        done = _smooth_layer(layer, local, inputs, n_batches, where, twin=twin)
        # from here on the layer's linears read their inputs as the deployed kernels do
        handles = _round_activations(layer, local)
        try:
            done.update(self._round(i, layer, local, inputs, twin))
        finally:
            for h in handles:
                h.remove()
        return {f"{prefix}.{i}.{n}": r for n, r in done.items()}

    def _round(self, i: int, layer: nn.Module, local: dict[str, Scheme], inputs: list,
               twin: nn.Module | None) -> dict[str, algorithms.Quantized]:  # fmt: skip
        """`step`'s GPTQ of layer ``i`` (its AWQ / SmoothQuant done) and its run to give the next
        layer its inputs; returns name -> `Quantized` of what GPTQ rounded."""
        where = f"{self.prefix}.{i}"
        done: dict[str, algorithms.Quantized] = {}
        floats = None
        if twin is not None:
            floats = [((f, *args[1:]), kw) for f, (args, kw) in zip(self.floats, inputs,
                                                                    strict=True)]  # fmt: skip
        gptq = {n: s for n, s in local.items() if _rounds_by_gptq(s)}
        twin_advanced = advanced = False
        if gptq:
            modules = {n: layer.get_submodule(n) for n in gptq}
            sequential = any(s.params.get("sequential", False) for s in gptq.values())
            stages = _stages(layer, inputs, modules) if sequential else [list(gptq)]
            asyms = [[n for n in stage if gptaq_param(gptq[n]) > 0] for stage in stages]
            writer = self._writer(layer, gptq, modules, inputs, where)
            twin_rows = None
            if sequential and any(asyms):
                width = 0 if writer is None else linear_weight(modules[writer[0]]).shape[0]
                if _twin_rows_bytes(floats, modules, asyms, width) <= TWIN_ROWS_BYTES:
                    twin_rows = _twin_rows(twin, floats, [n for a in asyms for n in a],
                                           writer and writer[0])  # fmt: skip
                    twin_advanced = True
            for stage, asym in zip(stages, asyms, strict=True):
                shared: dict = {}
                hessians = {n: _Hessian(linear_weight(modules[n]).shape[1], shared) for n in stage}
                # by stages, each run stops where its stage begins; the last linear's with a
                # gap to gather runs the whole layer (only that linear and the addition more)
                last = writer is not None and stage == [writer[0]]
                stop = stage if sequential and not last else None
                # by stages, the last run has everything but the last linear rounded: the
                # next layer's inputs are what it gives less that linear's output plus the
                # rounded linear's (no run more), when they fit
                rest = [] if sequential and last and _rest_fits(inputs, modules[stage[0]]) \
                    else None  # fmt: skip
                shifts = {}
                if asym:
                    shifts = _paired_pass(layer, twin, inputs, floats, hessians, asym, stop,
                                          twin_rows, writer if stop is None else None,
                                          rest)  # fmt: skip
                    twin_advanced = twin_advanced or stop is None
                else:
                    hooks = {modules[n]: hessians[n] for n in stage}
                    _run_layer(layer, inputs, hooks, stop_at=stop and [modules[n] for n in stop])
                shared.clear()
                give_back()  # the pass's activations, before the inverse Hessians
                for n in stage:
                    gap = writer[1] if writer is not None and writer[0] == n else None
                    done[n] = _gptq(modules[n], gptq[n], hessians[n], shift=shifts.get(n), gap=gap)
                    shifts.pop(n, None)
                    give_back()
                if rest is not None:
                    linear = modules[stage[0]]
                    for k, (without, x) in enumerate(rest):
                        args, kwargs = inputs[k]
                        y = F.linear(x, linear_weight(linear), linear.bias)  # x: as it read it
                        inputs[k] = (_next_args(without + y, args), kwargs)
                    rest.clear()
                    advanced = True
        if twin is not None:
            if not twin_advanced:
                _advance(twin, floats)
            self.floats = [args[0] for args, _ in floats]
        if not advanced:
            _advance(layer, inputs)
        return done

    @staticmethod
    def _writer(layer, gptq: dict, modules: dict, inputs: list,
                where: str) -> tuple[str, _Gap] | None:  # fmt: skip
        """The layer's last linear and a `_Gap` for it when its rule has a ``gptaq_residual``
        (and GPTAQ), else None; refused where the gap cannot be gathered."""
        if not any(gptaq_param(s, "gptaq_residual") > 0 for s in gptq.values()):
            return None
        # the last of all the layer's linears that run (rounded by GPTQ or not)
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        last = _stages(layer, inputs, {**linears, **modules}, ran_only=True)[-1]
        name = last[-1]
        rule = gptq.get(name)
        if rule is None or gptaq_param(rule, "gptaq_residual") == 0 or gptaq_param(rule) == 0:
            log.info("gptaq_residual: %s.%s, the layer's last linear, has no gptaq_residual",
                     where, name)  # fmt: skip
            return None
        args, kwargs = inputs[0]
        if len(last) > 1 or not _adds_to_stream(layer, name, args, kwargs):
            raise ValueError(
                f"gptaq_residual: {where}.{name}, the layer's last linear, does not add its "
                "output to the residual stream (a norm or another op follows it); drop "
                "gptaq_residual"
            )
        weight = linear_weight(modules[name])
        return name, _Gap(weight.shape[0], weight.shape[1])

    @torch.no_grad()
    def fit_float_head(self, model: nn.Module) -> None:
        """``gptaq_head`` (the largest of the rules'): a head the recipe keeps float moves that
        fraction of the way to the weight that maps the rounded model's final hidden states
        (through the final norm) to the float model's logits by least squares:
        `algorithms.gptaq_target` with the whole ``gptaq_head`` as its fraction, from the last
        layer's hidden states of both models, which are already here. Nothing is rounded, so
        nothing of the rounding's noise is fitted, unlike a rounded linear's step; the fit is
        damped toward the head's own weight as GPTQ damps (``damp``, 0.01). A head rounded by
        its own rule, or none, is left alone; a head tied to the embedding is refused (its
        lookups would change too)."""
        alpha = max((gptaq_param(s, "gptaq_head") for s in self.schemes.values()), default=0.0)
        if alpha == 0:
            return
        from edgequant.models.families import module_name

        fqn, norm = module_name(model, "output"), module_name(model, "norm")
        if fqn is None or norm is None or fqn in self.schemes:
            why = "rounded by its own rule" if fqn in self.schemes else "not after a final norm"
            log.info("gptaq_head: the model's head is %s; nothing to fit", why)
            return
        from edgequant.quantize import sharing_one_weight

        head = model.get_submodule(fqn)
        embedding = module_name(model, "tok_embeddings")
        if embedding is not None and len(sharing_one_weight(
            {fqn: head, embedding: model.get_submodule(embedding)}
        )) == 1:  # fmt: skip
            raise ValueError(
                f"gptaq_head: {fqn} is tied to the embedding, whose lookups would change too; "
                "untie the head (a rotation unties it where the final norm has a weight) or "
                "drop gptaq_head"
            )
        modules = {fqn: head}
        hessians, shifts = _hessians_after(model.get_submodule(norm), modules, self.hidden(),
                                           self.floats)  # fmt: skip
        _set_weight(head, algorithms.gptaq_target(linear_weight(head), hessians[fqn].value(),
                                                  shifts[fqn].value(), alpha))  # fmt: skip

    def outside(
        self, model: nn.Module, schemes: dict[str, Scheme], final: nn.Module
    ) -> dict[str, algorithms.Quantized]:
        """The linears after the last layer (an lm_head reading ``final``'s output, the model's
        last norm), from the hidden states the last `step` left: what `run` computes with one
        more pass of the whole model."""
        results: dict[str, algorithms.Quantized] = {}
        modules = {fqn: model.get_submodule(fqn) for fqn in schemes}
        hessians, shifts = _hessians_after(final, modules, self.hidden(), self.floats)
        # the batches' hidden states: their last use (a 1.5B model's: 0.2 GB)
        self.inputs, self.floats = [], None
        give_back()
        _round_outside(modules, schemes, hessians, results, shifts)
        return results


def _smooth_layer(
    layer, local: dict[str, Scheme], inputs, n_batches: int, where: str, quantize: bool = True,
    twin: nn.Module | None = None,
) -> dict:  # fmt: skip
    """AWQ / SmoothQuant for the linears of one layer: gather inputs, search and fold each
    group's scale (into ``twin`` too, a float copy of ``layer``), quantize. Returns name ->
    `Quantized` (without ``quantize``: name -> the scale folded into its input columns)."""
    wanted = {n: s for n, s in local.items() if s.algorithm in SMOOTHING}
    if not wanted:
        return {}
    found = smoothing.groups(layer)
    if not found:
        raise ValueError(
            f"{wanted[next(iter(wanted))].algorithm} needs to know which op produces each "
            f"linear's input to fold its scales into; {where} ({type(layer).__name__}) is none "
            f"of the known layouts: {', '.join(smoothing.family_names())}"
        )
    tokens = max(s.params.get("tokens", 4096) for s in wanted.values())
    # linears of one group read one input: gather it once, on the group's first linear
    owner = {n: n for n in wanted}
    for group in found:
        for c in group.consumers:
            if c in owner:
                owner[c] = group.consumers[0] if group.consumers[0] in wanted else c
    gathered = {o: _Inputs(math.ceil(tokens / n_batches)) for o in set(owner.values())}
    _run_layer(layer, inputs, {layer.get_submodule(o): g for o, g in gathered.items()})
    owned = {o: g.stats() for o, g in gathered.items()}
    stats = {n: owned[owner[n]] for n in wanted}
    applied = {n: None for n in wanted}  # the scale folded into each linear's input columns
    for group in found:
        members = [wanted.get(c) for c in group.consumers]
        first = members[0]
        if first is None or any(m is None or m.algorithm != first.algorithm for m in members):
            continue  # not every reader of this input asked for the same smoothing
        weights = [layer.get_submodule(c).weight for c in group.consumers]
        schemes = [wanted[c] for c in group.consumers]
        params = first.params
        st = stats[group.consumers[0]]
        if first.algorithm == "awq":
            s = algorithms.awq_scales(
                st, weights, schemes, grid=params.get("grid", 20), tie=group.tie
            )
        else:
            s = algorithms.smoothquant_scales(
                st, weights, schemes, alpha=params.get("alpha"), grid=params.get("grid", 11),
                tie=group.tie,
            )  # fmt: skip
        smoothing.fold(layer, group, s)
        if twin is not None:
            smoothing.fold(twin, group, s)
        for c in group.consumers:
            applied[c] = s
    skipped = [n for n, s in applied.items() if s is None]
    if skipped:
        log.info("%s: %s have no foldable group; rounded without scaling", where, skipped)
    if not quantize:
        return {n: s for n, s in applied.items() if s is not None}
    done = {}
    for n, scheme in wanted.items():
        if _rounds_by_gptq(scheme):
            continue  # rounded by the GPTQ pass that follows, on the scaled inputs
        module = layer.get_submodule(n)
        done[n] = _smoothed_rounding(module, scheme, stats[n], applied[n])
        _write(module, done[n], scheme)
    return done


def _smoothed_rounding(module, scheme: Scheme, stats, s) -> algorithms.Quantized:
    """AWQ: mse clipping weighted by the (scaled) inputs' energy (``clip``, default on; with
    ``signed_scales`` as `algorithms.mse` has it); SmoothQuant and AWQ without ``clip``:
    min-max."""
    weight = linear_weight(module)
    if scheme.algorithm == "awq" and scheme.params.get("clip", True):
        energy = stats.mean_sq if s is None else stats.mean_sq / (s * s)
        signed = scheme.params.get("signed_scales", False)
        magnitude = scheme.params.get("magnitude")
        return algorithms.by_rows(
            algorithms.mse, weight, scheme, importance=energy, signed_scales=signed,
            magnitude=magnitude,
        )  # fmt: skip
    return algorithms.minmax(weight, scheme)


class _TokenRounding:
    """A forward pre-hook giving a linear its input as an int8 dynamic kernel reads it
    (quantized per token, dequantized); linears reading one tensor get one rounded tensor."""

    def __init__(self, symmetric: bool) -> None:
        self.symmetric = symmetric
        self.last: tuple | None = None

    def __call__(self, module, args):
        x = args[0]
        if self.last is None or self.last[0] is not x:
            self.last = (x, fake_quantize_tokens(x, self.symmetric).to(x.dtype))
        return (self.last[1], *args[1:])


def _round_activations(layer: nn.Module, local: dict[str, Scheme]) -> list:
    """`_TokenRounding` hooks on ``layer``'s linears whose rules quantize their inputs per token
    (int8 dynamic); returns the handles."""
    shared: dict[bool, _TokenRounding] = {}
    handles = []
    for n, s in local.items():
        if s.activation == "int8_dynamic":
            hook = shared.setdefault(s.activation_symmetric, _TokenRounding(s.activation_symmetric))
            handles.append(layer.get_submodule(n).register_forward_pre_hook(hook))
    return handles


def _advance(layer: nn.Module, inputs: list) -> None:
    """Run ``layer`` on every input and put the next layer's in its place, one batch at a time
    (so only one batch's hidden states exist twice: 64 x 512 of a 1.5B model's are 200 MB)."""
    _run_layer(layer, inputs, {}, advance=True)


def _hidden(output) -> torch.Tensor:
    """A module's output tensor (a decoder layer's may be a tuple: its first)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _keeping(store: dict, key: str, then=None, inputs: bool = False):
    """A forward hook running ``then`` (another hook, or None), then keeping the module's output
    in ``store`` under ``key`` (and with ``inputs``, its input under ``key + " input"``)."""

    def hook(module, args, out) -> None:
        if then is not None:
            then(module, args, out)
        store[key] = _hidden(out)
        if inputs:
            store[f"{key} input"] = args[0]

    return hook


def _next_args(output, args: tuple) -> tuple:
    return (_hidden(output), *args[1:])


def _outside_layers(model, schemes, batches, results) -> None:
    modules = {fqn: model.get_submodule(fqn) for fqn in schemes}
    shared: dict = {}
    hessians = {fqn: _Hessian(linear_weight(m).shape[1], shared) for fqn, m in modules.items()}
    handles = [m.register_forward_hook(hessians[f]) for f, m in modules.items()]
    names = sorted({s.algorithm for s in schemes.values()})
    try:
        for ids in progress_bar(
            batches, len(batches), f"{'+'.join(names)}: layers outside the blocks", "batch"
        ):
            run_model(model, ids)
    finally:
        for h in handles:
            h.remove()
    _round_outside(modules, schemes, hessians, results)


def _round_outside(modules, schemes, hessians, results, shifts=None) -> None:
    for fqn, module in modules.items():
        scheme = schemes[fqn]
        # nothing runs after these: their dequantized weights are not written back (a
        # 151,936-row head's would be 0.9 GB)
        if _rounds_by_gptq(scheme):
            shift = (shifts or {}).get(fqn)
            results[fqn] = _gptq(module, scheme, hessians[fqn], write=False, shift=shift)
            give_back()
            continue
        energy = torch.diag(hessians[fqn].value()).float() / 2
        stats = algorithms.InputStats(torch.empty(0), energy, energy, energy)
        results[fqn] = _smoothed_rounding(module, scheme, stats, None)
