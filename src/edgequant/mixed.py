"""Mixed precision under a byte budget: a scheme per module, from what a runtime runs exactly.

1. `candidates` lists the schemes each target runs exactly (`TARGET_SCHEMES`; with several
   targets, only the schemes every one of them runs), for linears and for embeddings.
2. `sensitivity` gives, for every group of modules sharing one weight (a module, or a tied
   embedding and head) and every candidate, the model's mean KL divergence against the float
   model on calibration windows when that group alone takes that scheme: measured for
   embeddings and heads (the model run with the group quantized), estimated for the decoder
   layers' linears from one forward and backward pass (`fisher_estimates`).
3. `allocate` picks one candidate per group so that the bytes the targets' files spend on
   the weights fit the budget (`written_bytes`: a ``.pte`` stores a tied embedding and head
   twice) and the summed KL is least: a multiple-choice knapsack, solved exactly by dynamic
   programming over the bytes each option takes beyond its group's smallest, counted in
   `UNITS` steps of what the budget leaves above the smallest total (rounded up, so the choice
   always fits; it can miss the optimum by at most one step per group).
4. `choose` (or `budget_recipe`, all of it) writes the choice as an ordinary recipe of FQN
   rules (`group_recipe`).

Budgets (`parse_budget`): bits per weight (``4.5bpw``, of the weights the allocator decides, a
tied tensor counted once) or bytes of those weights in the file (``92.5MB``, ``88MiB``:
decimal and binary units; the file adds its program, norms and metadata, about 1 MB).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from edgequant.schemes import Scheme, parse_algorithm

log = logging.getLogger(__name__)

UNITS = 100_000  # steps of the budget in the knapsack
# calibration windows the sensitivity is measured on: WikiText-2 past the evaluation windows
# (`edgequant.calibration.wikitext`), seed 1
SENSITIVITY_WINDOWS, SENSITIVITY_TOKENS = 4, 256

_INT4_GROUPS = (32, 64, 128, 256)


def _int4(group: int, activation: str) -> Scheme:
    return Scheme("int4", "per_group", group, scale_dtype="fp16", activation=activation)


def _gguf_block(weight: str) -> Scheme:
    """Symmetric blocks of 32 with fp16 scales: GGUF's Q4_0, Q5_0, Q8_0."""
    return Scheme(weight, "per_group", 32, scale_dtype="fp16")


# llama.cpp's K-quants among a GGUF's candidates (q2_k, 2.6 bits a weight, is left out: each
# candidate lengthens the sensitivity, and its loss is far from the budgets measured here)
_KQUANTS = tuple(Scheme(k) for k in ("q3_k", "q4_k", "q5_k", "q6_k"))
# GGUF stores a lookup table in the same types as a linear
_GGUF = (*(_gguf_block(b) for b in ("int4", "int5", "int8")), *_KQUANTS, Scheme("fp16"))


# target -> {"linear": schemes, "embedding": schemes}: what each runtime runs exactly (the
# writers' own checks, `edgequant.targets.check`, have the last word on every packed module)
TARGET_SCHEMES: dict[str, dict[str, tuple[Scheme, ...]]] = {
    "pte": {  # XNNPACK: int4 groups or int8 per-channel, both with int8 dynamic activations
        "linear": (
            *(_int4(g, "int8_dynamic") for g in _INT4_GROUPS),
            Scheme("int8", activation="int8_dynamic"),
            Scheme("fp16"),
        ),  # fmt: skip
        "embedding": (*(_int4(g, "none") for g in _INT4_GROUPS), Scheme("int8"), Scheme("fp16")),
    },
    "tflite": {  # LiteRT: int4 blocks dynamic, int8 dynamic or weight-only, fp16; lookups of
        # int4 block tables (one tensor with a tied head's: tests/test_mixed.py)
        "linear": (
            *(_int4(g, "int8_dynamic") for g in _INT4_GROUPS),
            Scheme("int8", activation="int8_dynamic"),
            Scheme("int8"),
            Scheme("fp16"),
        ),  # fmt: skip
        "embedding": (*(_int4(g, "none") for g in _INT4_GROUPS), Scheme("int8"), Scheme("fp16")),
    },
    "gguf": {  # the types edgequant writes bit-exactly: Q4_0, Q5_0, Q8_0, F16, and llama.cpp's
        # own K-quants (rows of a multiple of 256 values; rounded by its quantizer)
        "linear": _GGUF,
        "embedding": _GGUF,
    },
}


def candidates(targets: list[str], kind: str) -> list[Scheme]:
    """The schemes every one of ``targets`` runs exactly for a module of ``kind`` (``linear``
    or ``embedding``), in the first target's order.

    >>> [s.describe() for s in candidates(["gguf"], "linear")]  # doctest: +NORMALIZE_WHITESPACE
    ['int4 g32 sym fp16-scales', 'int5 g32 sym fp16-scales', 'int8 g32 sym fp16-scales',
     'q3_k', 'q4_k', 'q5_k', 'q6_k', 'fp16']
    >>> [s.describe() for s in candidates(["pte", "gguf"], "linear")]
    ['fp16']
    """
    unknown = [t for t in targets if t not in TARGET_SCHEMES]
    if unknown or not targets:
        raise ValueError(f"targets {targets!r}: choose one or more of {sorted(TARGET_SCHEMES)}")
    if kind not in ("linear", "embedding"):
        raise ValueError(f"kind {kind!r} is not 'linear' or 'embedding'")
    first, *rest = (TARGET_SCHEMES[t][kind] for t in targets)
    return [s for s in first if all(s in other for other in rest)]


# ---- budgets ---------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)\s*$", re.IGNORECASE)
_UNIT_BYTES = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
               "kib": 2**10, "mib": 2**20, "gib": 2**30}  # fmt: skip


@dataclass(frozen=True)
class Budget:
    """A budget as given: ``bpw`` bits per weight, or ``bytes``."""

    value: float
    unit: str  # "bpw" or "bytes"

    def bytes_for(self, n_weights: int) -> int:
        """The budget in bytes for ``n_weights`` weights."""
        if self.unit == "bpw":
            return int(self.value * n_weights / 8)
        return int(self.value)

    def __str__(self) -> str:
        return f"{self.value:g}bpw" if self.unit == "bpw" else f"{self.value / 1e6:g}MB"


def parse_budget(text: str) -> Budget:
    """``4.5bpw`` (bits per weight) or a size (``92.5MB``, ``88MiB``, ``1.2GB``, ``500000B``).

    >>> parse_budget("4.5bpw"), parse_budget("92.5MB").value, parse_budget("1 KiB").value
    (Budget(value=4.5, unit='bpw'), 92500000.0, 1024.0)
    >>> parse_budget("4.5 bits")
    Traceback (most recent call last):
    ...
    ValueError: budget '4.5 bits': give bits per weight (e.g. 4.5bpw) or a size in B, KB, MB, \
GB, KiB, MiB or GiB (e.g. 92.5MB)
    """
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or (unit != "bpw" and unit not in _UNIT_BYTES) or float(m.group(1)) <= 0:
        raise ValueError(
            f"budget {text!r}: give bits per weight (e.g. 4.5bpw) or a size in B, KB, MB, GB, "
            "KiB, MiB or GiB (e.g. 92.5MB)"
        )
    value = float(m.group(1))
    if unit == "bpw":
        return Budget(value, "bpw")
    return Budget(value * _UNIT_BYTES[unit], "bytes")


# ---- allocation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One way to store a group: its scheme (None: float), stored bytes and cost (KL)."""

    scheme: Scheme | None
    bytes: int
    cost: float


def check_reachable(sizes, budget: int) -> tuple[int, int]:
    """The fewest and the most bytes a choice among ``sizes`` (each group's options' bytes)
    stores; a ``budget`` outside them is refused, naming the range."""
    sizes = [list(s) for s in sizes]
    low, high = sum(min(s) for s in sizes), sum(max(s) for s in sizes)
    if budget < low or budget > high:
        raise ValueError(
            f"a budget of {budget:,} bytes is outside what these modules can store: from "
            f"{low:,} (every module at its smallest scheme) to {high:,} bytes (at its largest)"
        )
    return low, high


def allocate(groups: dict[str, list[Option]], budget: int, units: int = UNITS) -> dict[str, int]:
    """The option (its index) for every group with the least summed cost whose bytes fit
    ``budget``. The knapsack runs over the bytes each option takes beyond its group's smallest,
    rounded up to steps of ``(budget - smallest total) / units``: exact up to that rounding,
    and a budget of exactly the smallest total is every group at its smallest. Ties go to the
    fewer bytes, then to the earlier option; the result is deterministic.

    >>> allocate({"a": [Option(None, 4, 0.0), Option(None, 1, 1.0)],
    ...           "b": [Option(None, 4, 0.0), Option(None, 1, 3.0)]}, budget=5)
    {'a': 1, 'b': 0}
    >>> allocate({"a": [Option(None, 4, 0.0), Option(None, 1, 1.0)],
    ...           "b": [Option(None, 4, 0.0), Option(None, 1, 3.0)]}, budget=2)
    {'a': 1, 'b': 1}
    """
    low, _ = check_reachable(([o.bytes for o in opts] for opts in groups.values()), budget)
    step = max((budget - low) / units, 1.0)
    size = int((budget - low) // step)
    best = np.zeros(size + 1)  # least cost of the groups so far within b steps
    picks = []
    extra = {name: [o.bytes - min(p.bytes for p in opts) for o in opts]
             for name, opts in groups.items()}  # fmt: skip
    for name, opts in groups.items():
        cost = np.full(size + 1, np.inf)
        pick = np.zeros(size + 1, dtype=np.int16)
        order = sorted(range(len(opts)), key=lambda k: (opts[k].bytes, k))
        for k in order:
            w = math.ceil(extra[name][k] / step)
            if w > size:
                continue
            shifted = np.full(size + 1, np.inf)
            shifted[w:] = best[: size + 1 - w] + opts[k].cost
            better = shifted < cost
            cost[better], pick[better] = shifted[better], k
        best = cost
        picks.append(pick)
    assert np.isfinite(best[size])  # every group at its smallest takes no step
    b = int(np.flatnonzero(best == best[size])[0])  # the fewest bytes at the least cost
    chosen: dict[str, int] = {}
    for name, pick in reversed(list(zip(groups, picks, strict=True))):
        k = int(pick[b])
        chosen[name] = k
        b -= math.ceil(extra[name][k] / step)
    return dict(reversed(list(chosen.items())))


# ---- sensitivity -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """Modules that share one weight and so one scheme (a tied embedding and head) or a module
    alone: their FQNs, the first one's kind, shape, role and decoder layer (None outside the
    layers). ``tied_with``: the module whose weight this one shares when `groups_of` decides
    them apart (its weights are not counted again in bits per weight)."""

    fqns: tuple[str, ...]
    kind: str  # "linear" or "embedding"
    shape: tuple[int, int]
    role: str | None
    layer: int | None
    tied_with: str | None = None

    @property
    def name(self) -> str:
        return self.fqns[0]

    @property
    def n_weights(self) -> int:
        return self.shape[0] * self.shape[1]


def groups_of(model: nn.Module, apart: bool = False) -> list[Group]:
    """Every quantizable module of ``model`` in module order, modules sharing a weight in one
    group (under the first one's name), or with ``apart`` each in a group of its own (for a
    target that stores a copy for each module anyway: `written_bytes`)."""
    from edgequant.quantize import plan, sharing_one_weight
    from edgequant.recipe import Recipe, Rule

    entries = {lp.fqn: lp for lp in plan(model, Recipe([Rule(None, role="default")]))}
    shared = sharing_one_weight({fqn: model.get_submodule(fqn) for fqn in entries})
    groups = []
    for fqns in shared:
        for k, members in enumerate([[f] for f in fqns] if apart else [fqns]):
            lp = entries[members[0]]
            kind = "embedding" if lp.kind == "embedding" else "linear"
            tied = fqns[0] if k > 0 else None
            groups.append(Group(tuple(members), kind, lp.shape, lp.role, lp.layer, tied))
    return groups


def counted_weights(groups) -> int:
    """The weights of ``groups``, a shared tensor once (what bits per weight divide by)."""
    return sum(g.n_weights for g in groups if g.tied_with is None)


def decided_apart(targets: list[str]) -> bool:
    """Whether every one of ``targets`` stores a shared weight once for each module reading it,
    so that a tied embedding and head can take two schemes at no cost (the ``.pte``)."""
    return all(t == "pte" for t in targets)


def group_recipe(choice: dict[Group, Scheme | None], name: str = "mixed"):
    """A recipe of FQN rules giving every module of each group its scheme (None: float)."""
    from edgequant.recipe import Recipe, Rule

    rules = [Rule(None, role="default")]
    for group, scheme in choice.items():
        rules += [Rule(scheme, module=fqn) for fqn in group.fqns]
    return Recipe(rules, name=name)


def stored_bytes(group: Group, scheme: Scheme | None, targets: list[str] | None = None) -> int:
    """Bytes ``group``'s weight takes stored as ``scheme`` (float: 4 bytes a weight): in the
    bundle (one copy of a shared weight), or, with ``targets``, in the largest of their files
    (`written_bytes`)."""
    if targets:
        return max(written_bytes(group, scheme, t) for t in targets)
    from edgequant.layers import layout_bytes

    rows, cols = group.shape
    return 4 * rows * cols if scheme is None else layout_bytes(rows, cols, scheme)


# bytes a GGUF block of 32 weights takes (fp16 scale and the integers: ggml's block_q4_0,
# block_q5_0, block_q8_0); the bundle keeps int5 one byte a value
GGUF_BLOCK_BYTES = {"int4": 18, "int5": 22, "int8": 34}

# bytes a .tflite adds to each row of an int8 per-channel weight beyond its int8 values and
# float32 scale (an int64 zero point and more; measured: tests/test_mixed.py)
TFLITE_INT8_ROW = 20


def written_bytes(group: Group, scheme: Scheme | None, target: str) -> int:
    """Bytes the ``target``'s file spends on ``group``'s weight stored as ``scheme``, measured
    on exported files (tests/test_mixed.py): the ``.pte`` keeps a copy of a shared weight for
    every module reading it (XNNPACK packs the head's; the embedding's lookup reads its own),
    so a tied embedding and head cost twice; LiteRT and GGUF store it once. Each stores a
    scheme's integers and scales as the bundle does (within 1 %), but for the ``.tflite``'s
    `TFLITE_INT8_ROW` bytes more a row of an int8 per-channel weight and GGUF's blocks of 32
    (`GGUF_BLOCK_BYTES`: Q5_0 packs int5 in 5.5 bits a weight)."""
    if target not in TARGET_SCHEMES:
        raise ValueError(f"target {target!r}: choose one of {sorted(TARGET_SCHEMES)}")
    once = stored_bytes(group, scheme)
    rows, cols = group.shape
    if target == "gguf" and scheme is not None and scheme.weight in GGUF_BLOCK_BYTES:
        as_block = dataclasses.replace(scheme, activation="none", algorithm="minmax",
                                       algorithm_params=())  # fmt: skip
        if as_block == _gguf_block(scheme.weight):  # whatever chose its values
            return rows * cols // 32 * GGUF_BLOCK_BYTES[scheme.weight]
    if target == "pte":
        return once * len(group.fqns)
    if target == "tflite" and scheme is not None and scheme.weight == "int8":
        if scheme.granularity == "per_channel":
            return once + TFLITE_INT8_ROW * group.shape[0]
    return once


def recipe_bytes(model: nn.Module, recipe, targets: list[str] | None = None) -> int:
    """`stored_bytes` of every weight of ``model`` as ``recipe`` stores it (float where it
    leaves a module float), a weight shared by several modules once where the plan keeps it
    shared (`edgequant.quantize.storage_groups`: the same stored scheme, and not a head the
    recipe's rotation unties), each module's on its own otherwise: what an allocation at the
    same budget may spend."""
    from edgequant.quantize import _stored_as, plan, storage_groups

    layers = {lp.fqn: lp for lp in plan(model, recipe)}
    whole = {g.fqns: g for g in groups_of(model)}
    alone = {g.name: g for g in groups_of(model, apart=True)}
    modules = {fqn: model.get_submodule(fqn) for fqn in alone}
    total = 0
    for members in storage_groups(model, modules, recipe.rotate):
        found = [_stored_as(layers[f].scheme if f in layers else None) for f in members]
        if len(set(found)) == 1:  # one storage, as `edgequant.quantize.plan` ties them
            # a shared weight, or one module (a head the rotation unties is one of its own)
            group = whole[tuple(members)] if len(members) > 1 else alone[members[0]]
            total += stored_bytes(group, found[0], targets)
            continue
        for fqn, scheme in zip(members, found, strict=True):
            total += stored_bytes(alone[fqn], scheme, targets)
    return total


def _packed(model: nn.Module, group: Group, scheme: Scheme) -> dict[str, nn.Module]:
    """The packed modules of ``group`` (by FQN) as ``scheme`` makes them, without calibration
    (gptq and awq round as mse does: `edgequant.quantize.pack`)."""
    from edgequant.quantize import pack, plan

    packed: dict[str, nn.Module] = {}
    for lp in plan(model, group_recipe({group: scheme})):
        if lp.scheme is not None:
            packed[lp.fqn] = pack(model, lp, None, packed)
    return packed


MEASURES = ("fisher", "every")
FISHER_SEED = 0  # the labels the Fisher pass samples


@torch.no_grad()
def sensitivity(
    model: nn.Module,
    options: dict[Group, list[Scheme | None]],
    windows: torch.Tensor,
    *,
    measure: str = "fisher",
    calibration=None,
) -> dict[Group, list[float]]:
    """The mean KL divergence (nats/token) of ``model`` against itself in float on
    ``windows [n, L]`` when one group alone takes each of its ``options`` (None: float,
    cost 0), measured or estimated. The GPTQ candidates of a decoder-layer linear and of an
    untied head are rounded by GPTQ on ``calibration`` batches when given (`gptq_rounded`), as
    mse rounds otherwise.

    ``measure="every"`` runs the model for every group and option. The float model's hidden
    states at each decoder layer's input are kept, so a module in layer ``l`` runs layers
    ``l..`` only; an embedding (and a head tied to it) runs the whole model, an untied head only
    the head.

    ``measure="fisher"`` (the default) runs embeddings and heads so, and estimates every decoder
    layer's linear from one backward pass of the float model (`fisher_estimates`)."""
    from edgequant._progress import progress_bar
    from edgequant.eval import Comparison
    from edgequant.models.families import decoder_of
    from edgequant.quantize import _set_module

    if measure not in MEASURES:
        raise ValueError(f"measure {measure!r}: choose one of {list(MEASURES)}")
    decoder = decoder_of(model)
    names = {id(m): n for n, m in decoder.named_modules()}
    ropes, attend = decoder.eager_context(windows.shape[1], device=windows.device)
    n_layers = len(decoder.layers)
    estimated: dict[tuple[Group, Scheme], float] = {}
    in_layers = {g: options[g] for g in options if g.kind == "linear" and g.layer is not None}
    rounded = {} if calibration is None else gptq_rounded(model, options, calibration)
    if measure == "fisher":
        estimated = fisher_estimates(model, in_layers, windows, rounded)
    work = [(g, s) for g, schemes in options.items() for s in schemes
            if s is not None and (g, s) not in estimated]  # fmt: skip
    starts = {g.layer for g, _ in work if g.kind != "embedding" and g.layer is not None}
    hidden = [decoder.tok_embeddings(w[None]) for w in windows]
    inputs: dict[int, list] = {}  # the float hidden states entering the layers measured from
    for i in range(n_layers):
        if i in starts:
            inputs[i] = hidden
        hidden = [decoder.run_layer(i, h, ropes, attend) for h in hidden]
    inputs[n_layers] = hidden
    reference = [decoder.head(h).float()[0] for h in hidden]

    def kl(start: int | None) -> float:  # None: from the embedding
        if start is None:
            start, hidden = 0, [decoder.tok_embeddings(w[None]) for w in windows]
        else:
            hidden = inputs[start]
        for i in range(start, n_layers):
            hidden = [decoder.run_layer(i, h, ropes, attend) for h in hidden]
        totals = Comparison()
        for k, h in enumerate(hidden):
            totals.add(reference[k], decoder.head(h).float()[0], windows[k])
        return totals.result()["kl_divergence"]

    measured: dict[tuple[Group, Scheme], float] = dict(estimated)
    for group, scheme in progress_bar(work, len(work), "sensitivity", "run"):
        saved = {}
        packed = {group.name: rounded[group, scheme]} if (group, scheme) in rounded else None
        for fqn, module in (packed or _packed(model, group, scheme)).items():
            where = names[id(model.get_submodule(fqn))]
            saved[where] = decoder.get_submodule(where)
            _set_module(decoder, where, module)
        start = None if group.kind == "embedding" else group.layer
        if start is None and group.kind != "embedding":
            start = n_layers  # a head: the last hidden states
        try:
            measured[group, scheme] = kl(start)
        finally:
            for where, module in saved.items():
                _set_module(decoder, where, module)
    return {g: [0.0 if s is None else measured[g, s] for s in schemes]
            for g, schemes in options.items()}  # fmt: skip


def gptq_rounded(
    model: nn.Module, options: dict[Group, list[Scheme | None]], calibration
) -> dict[tuple[Group, Scheme], nn.Module]:
    """The packed module of every decoder-layer linear in ``options`` (and of an untied head:
    a head sharing the embedding's weight is rounded as mse does) for each of its candidates
    whose algorithm is ``gptq`` (or a K-quant's ``imatrix``), rounded by GPTQ (llama.cpp's
    quantizer weighing columns by the Hessian's diagonal) on the Hessian of the inputs the float
    model gives it on the ``calibration`` batches (`edgequant.layerwise.float_hessians`: every layer
    float, so each module is rounded as if it alone were quantized, as the sensitivity asks).
    Without it the sensitivity of a GPTQ candidate is that of mse rounding, which after a
    rotation over-states what GPTQ leaves several times over (SmolLM2's rotated head at int4
    g32: KL 0.069 mse-rounded)."""
    from edgequant import layerwise
    from edgequant.layers import QuantizedLinear, linear_weight

    heads = [g for g in options if g.kind == "linear" and g.layer is None and g.tied_with is None
             and len(g.fqns) == 1 and layerwise.head_norm(model, g.fqns) is not None]  # fmt: skip
    in_layers = [g for g in options if g.kind == "linear" and g.layer is not None]
    wanted = {g: [s for s in options[g] if s is not None and s.algorithm in ("gptq", "imatrix")]
              for g in in_layers + heads}  # fmt: skip
    by_fqn = {g.name: g for g, schemes in wanted.items() if schemes}
    rounded: dict[tuple[Group, Scheme], nn.Module] = {}
    for hessians in layerwise.float_hessians(model, list(by_fqn), calibration):
        for fqn, h in hessians.items():
            group, module = by_fqn[fqn], model.get_submodule(fqn)
            for scheme in wanted[group]:
                result = layerwise.hessian_rounded(linear_weight(module), scheme, h)
                rounded[group, scheme] = QuantizedLinear.from_float(
                    module, scheme, name=fqn, result=result
                )
    return rounded


def fisher_estimates(
    model: nn.Module,
    options: dict[Group, list[Scheme | None]],
    windows: torch.Tensor,
    rounded: dict[tuple[Group, Scheme], nn.Module] | None = None,
) -> dict[tuple[Group, Scheme], float]:
    """The KL each linear of ``options`` would cost alone in each of its schemes, estimated
    from one forward and backward pass of the float model on ``windows [n, L]``.

    For a small change ``d`` of a module's outputs, the mean KL of the model's next-token
    distributions is about ``d^T F d / 2`` per position (``F``: their Fisher information with
    respect to those outputs). With one label per position drawn from the float model's own
    distribution (seed `FISHER_SEED`), the gradient ``g`` of the labels' log-likelihood has
    ``E[g g^T] = F``; the estimate keeps the diagonal, ``sum(g^2 d^2) / 2``, where ``d`` is
    the change of the module's outputs on its float inputs when it takes the scheme (weights
    and, where the scheme has them, quantized activations): the packed module in ``rounded``
    (`gptq_rounded`) when there is one, rounded without calibration otherwise. Positions are
    those `edgequant.eval.compare` counts (all but each window's last)."""
    from edgequant.models.families import decoder_of

    decoder = decoder_of(model)
    errors: dict[tuple[Group, Scheme], float] = {}
    positions = windows.shape[0] * (windows.shape[1] - 1)

    def on_forward(group: Group):
        def hook(module, args, output):
            x, y = args[0].detach(), output.detach()

            def on_grad(grad):
                g2 = grad.detach().float().square()
                for scheme in (s for s in options[group] if s is not None):
                    packed = rounded.get((group, scheme)) if rounded else None
                    packed = packed or _packed(model, group, scheme)[group.name]
                    d2 = (packed(x) - y).float().square()
                    errors[group, scheme] = float((g2 * d2).sum(dtype=torch.float64))
                    errors[group, scheme] /= 2 * positions

            output.register_hook(on_grad)

        return hook

    hooks = [model.get_submodule(g.name).register_forward_hook(on_forward(g)) for g in options]
    frozen = [p for p in model.parameters() if p.requires_grad]  # no weight gradients
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            ropes, attend = decoder.eager_context(windows.shape[1], device=windows.device)
            h0 = decoder.tok_embeddings(windows).detach().requires_grad_()
            h = h0
            for i in range(len(decoder.layers)):
                h = decoder.run_layer(i, h, ropes, attend)
            log_p = torch.log_softmax(decoder.head(h).float()[:, :-1], -1).flatten(0, 1)
            generator = torch.Generator(device=windows.device).manual_seed(FISHER_SEED)
            with torch.no_grad():
                labels = torch.multinomial(log_p.exp(), 1, generator=generator)
            total = log_p.gather(-1, labels).sum()
            del log_p
            torch.autograd.grad(total, h0)
    finally:
        for handle in hooks:
            handle.remove()
        for p in frozen:
            p.requires_grad_(True)
    return errors


def rank_correlation(a, b) -> float:
    """Spearman's rank correlation of two equally long sequences (ties take their mean rank)."""

    def ranks(values) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        order = np.argsort(values, kind="stable")
        r = np.empty(len(values))
        r[order] = np.arange(len(values), dtype=np.float64)
        for value in np.unique(values):  # ties: their mean rank
            tied = values == value
            r[tied] = r[tied].mean()
        return r

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


# ---- the recipe for a budget -----------------------------------------------------------------


def options_for(
    group: Group, targets: list[str], algorithm: str | None = None, **params: Any
) -> list:
    """``group``'s candidate schemes (`candidates` whose groups divide its rows), float last
    (None). A tied embedding and head takes the linear schemes whose storage every target
    also looks up as an embedding. ``algorithm`` (with its ``params``) replaces each scheme's
    (minmax)."""
    from edgequant.layers import shape_problem

    if group.kind == "embedding" and len(group.fqns) > 1:
        lookups = {_storage(s) for s in candidates(targets, "embedding")}
        schemes = [s for s in candidates(targets, "linear") if _storage(s) in lookups]
    else:
        schemes = candidates(targets, group.kind)
    if algorithm is not None:
        schemes = [s.rounded_by(algorithm, **params) for s in schemes]
    return [*(s for s in schemes if shape_problem(s, group.shape[1]) is None), None]


def _storage(scheme: Scheme) -> Scheme:
    import dataclasses

    return dataclasses.replace(scheme, activation="none", activation_symmetric=False)


def option_table(
    model: nn.Module,
    options: dict[Group, list[Scheme | None]],
    windows: torch.Tensor,
    *,
    measure: str = "fisher",
    targets: list[str] | None = None,
    calibration=None,
) -> dict[Group, list[Option]]:
    """Every group's ``options`` with their `stored_bytes` (in the largest of the ``targets``'
    files when given) and `sensitivity` on ``windows`` (GPTQ candidates rounded on
    ``calibration`` when given)."""
    costs = sensitivity(model, options, windows, measure=measure, calibration=calibration)
    return {g: [Option(s, stored_bytes(g, s, targets), c)
                for s, c in zip(schemes, costs[g], strict=True)]
            for g, schemes in options.items()}  # fmt: skip


def choose(table: dict[Group, list[Option]], budget: str | Budget) -> tuple[Any, dict[str, Any]]:
    """The recipe (FQN rules) of the options in ``table`` whose bytes fit ``budget`` with the
    least summed cost (`allocate`), and the allocation's facts: budget, bytes, the predicted KL
    (the sum of the chosen costs) and each group's choice."""
    if isinstance(budget, str):
        budget = parse_budget(budget)
    limit = budget.bytes_for(counted_weights(table))
    low, high = check_reachable(([o.bytes for o in opts] for opts in table.values()), limit)
    chosen = allocate({g.name: opts for g, opts in table.items()}, limit)
    picks = {g: opts[chosen[g.name]] for g, opts in table.items()}
    recipe = group_recipe({g: o.scheme for g, o in picks.items()}, name=f"budget-{budget}")
    facts = {
        "budget": str(budget),
        "budget_bytes": limit,
        "reachable_bytes": [low, high],
        "allocated_bytes": sum(o.bytes for o in picks.values()),
        "predicted_kl": sum(o.cost for o in picks.values()),
        "modules": [
            {
                "fqns": list(g.fqns),
                "scheme": None if o.scheme is None else o.scheme.describe(),
                "bytes": o.bytes,
                "kl": o.cost,
            }
            for g, o in picks.items()
        ],  # fmt: skip
    }
    return recipe, facts


CURVE_POINTS = 8  # budgets of `predicted_curve`, over the reachable range


def predicted_curve(table: dict[Group, list[Option]], points: int = CURVE_POINTS) -> list[dict]:
    """What other budgets would buy, from the same table: the allocator's choice (`allocate`)
    at ``points`` budgets spread evenly from the fewest bytes the modules can store to every
    module at its largest integer scheme (8 bits; beyond it only float is left, which costs
    next to nothing), each as its budget, its allocated bytes and its predicted KL (the recipe
    card plots it).

    >>> from edgequant.schemes import Scheme
    >>> table = {Group(("a",), "linear", (1, 8), None, 0): [
    ...     Option(Scheme("int4", "per_group", 4), 1, 1.0), Option(Scheme("int8"), 2, 0.1),
    ...     Option(None, 8, 0.0)]}
    >>> [(p["allocated_bytes"], p["predicted_kl"]) for p in predicted_curve(table, 2)]
    [(1, 1.0), (2, 0.1)]
    """
    by_name = {g.name: opts for g, opts in table.items()}
    low = sum(min(o.bytes for o in opts) for opts in by_name.values())
    high = sum(
        max((o.bytes for o in opts if o.scheme is not None
             and (o.scheme.is_integer or o.scheme.is_kquant)),
            default=max(o.bytes for o in opts))
        for opts in by_name.values()
    )  # fmt: skip
    curve = []
    for k in range(points):
        budget = low + (high - low) * k // max(points - 1, 1)
        chosen = allocate(by_name, budget)
        picks = [by_name[name][i] for name, i in chosen.items()]
        curve.append({"budget_bytes": budget,
                      "allocated_bytes": sum(o.bytes for o in picks),
                      "predicted_kl": sum(o.cost for o in picks)})  # fmt: skip
    return curve


def budget_recipe(
    model: nn.Module,
    budget: str | Budget,
    targets: list[str],
    windows: torch.Tensor,
    *,
    algorithm: str | None = None,
    measure: str = "fisher",
    calibration=None,
) -> tuple[Any, dict[str, Any]]:
    """The recipe (FQN rules) whose weights, as the ``targets``' files store them
    (`stored_bytes`), fit ``budget`` with the least summed `sensitivity` (``measure``) on
    ``windows`` (calibration text, disjoint from the evaluation windows), choosing for each
    module among the schemes all ``targets`` run exactly (and float); ``algorithm`` (with any
    parameters after ``@``, `parse_algorithm`) rounds the integer schemes (minmax by default;
    gptq's candidates are rounded by GPTQ on ``calibration`` for the sensitivity when given).
    Returns the recipe and `choose`'s facts, with the targets, how the sensitivity was found
    and the `predicted_curve`."""
    if isinstance(budget, str):
        budget = parse_budget(budget)
    groups = groups_of(model, apart=decided_apart(targets))
    name, params = parse_algorithm(algorithm) if algorithm is not None else (None, {})
    options = {g: options_for(g, targets, name, **params) for g in groups}
    limit = budget.bytes_for(counted_weights(groups))
    sizes = ([stored_bytes(g, s, targets) for s in options[g]] for g in groups)
    check_reachable(sizes, limit)  # before measuring
    table = option_table(model, options, windows, measure=measure, targets=targets,
                         calibration=calibration)  # fmt: skip
    recipe, facts = choose(table, budget)
    return recipe, {**facts, "targets": list(targets), "sensitivity": measure,
                    "sensitivity_windows": list(windows.shape),
                    "curve": predicted_curve(table)}  # fmt: skip


def sensitivity_windows(tokenizer) -> torch.Tensor:
    """``[SENSITIVITY_WINDOWS, SENSITIVITY_TOKENS]`` token ids of WikiText-2 past the
    evaluation windows (the job's `budget_recipe` measures on them)."""
    from edgequant.calibration import wikitext

    batches = wikitext(tokenizer, SENSITIVITY_WINDOWS, SENSITIVITY_TOKENS, seed=1).batches
    return torch.cat(list(batches))
