"""Mixed precision under a byte budget: a scheme per module, from what a runtime runs exactly.

1. `candidates` lists the schemes each target runs exactly (`TARGET_SCHEMES`; with several
   targets, only the schemes every one of them runs), for linears and for embeddings.
2. `sensitivity` measures, for every group of modules sharing one weight (a module, or a tied
   embedding and head) and every candidate, the model's mean KL divergence against the float
   model on calibration windows when that group alone takes that scheme. The float model's
   hidden states at each decoder layer's input are kept, so a module of layer ``l`` is measured
   by running layers ``l..`` only.
3. `allocate` picks one candidate per group so that the stored bytes fit the budget and the
   summed KL is least: a multiple-choice knapsack, solved exactly by dynamic programming over
   bytes counted in `UNITS` steps of the budget (each option's bytes rounded up, so the choice
   always fits; it can miss the optimum by at most one step per group).
4. `recipe` writes the choice as an ordinary recipe of FQN rules.

Budgets (`parse_budget`): bits per weight (``4.5bpw``, of the weights the allocator decides, a
tied tensor counted once) or bytes (``92.5MB``, ``88MiB``: decimal and binary units).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from edgequant.schemes import Scheme

log = logging.getLogger(__name__)

UNITS = 100_000  # steps of the budget in the knapsack
# calibration windows the sensitivity is measured on: WikiText-2 past the evaluation windows
# (`edgequant.calibration.wikitext`), seed 1
SENSITIVITY_WINDOWS, SENSITIVITY_TOKENS = 4, 256

_INT4_GROUPS = (32, 64, 128, 256)


def _int4(group: int, activation: str) -> Scheme:
    return Scheme("int4", "per_group", group, scale_dtype="fp16", activation=activation)


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
    "tflite": {  # LiteRT: int4 blocks dynamic, int8 dynamic or weight-only, fp16
        "linear": (
            *(_int4(g, "int8_dynamic") for g in _INT4_GROUPS),
            Scheme("int8", activation="int8_dynamic"),
            Scheme("int8"),
            Scheme("fp16"),
        ),  # fmt: skip
        "embedding": (Scheme("int8"), Scheme("fp16")),
    },
    "gguf": {  # the types edgequant writes bit-exactly: Q4_0, Q8_0, F16
        "linear": (
            _int4(32, "none"),
            Scheme("int8", "per_group", 32, scale_dtype="fp16"),
            Scheme("fp16"),
        ),  # fmt: skip
        "embedding": (
            _int4(32, "none"),
            Scheme("int8", "per_group", 32, scale_dtype="fp16"),
            Scheme("fp16"),
        ),  # fmt: skip
    },
}


def candidates(targets: list[str], kind: str) -> list[Scheme]:
    """The schemes every one of ``targets`` runs exactly for a module of ``kind`` (``linear``
    or ``embedding``), in the first target's order.

    >>> [s.describe() for s in candidates(["gguf"], "linear")]
    ['int4 g32 sym fp16-scales', 'int8 g32 sym fp16-scales', 'fp16']
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


def reachable(groups: dict[str, list[Option]]) -> tuple[int, int]:
    """The fewest and the most bytes any choice of ``groups``' options stores."""
    return (sum(min(o.bytes for o in opts) for opts in groups.values()),
            sum(max(o.bytes for o in opts) for opts in groups.values()))  # fmt: skip


def allocate(groups: dict[str, list[Option]], budget: int, units: int = UNITS) -> dict[str, int]:
    """The option (its index) for every group with the least summed cost whose bytes fit
    ``budget``: exact up to the rounding of each option's bytes up to ``budget / units``.
    Ties go to the fewer bytes, then to the earlier option; the result is deterministic.

    >>> allocate({"a": [Option(None, 4, 0.0), Option(None, 1, 1.0)],
    ...           "b": [Option(None, 4, 0.0), Option(None, 1, 3.0)]}, budget=5)
    {'a': 1, 'b': 0}
    """
    low, high = reachable(groups)
    if budget < low or budget > high:
        raise ValueError(
            f"a budget of {budget:,} bytes is outside what these modules can store: from "
            f"{low:,} (every module at its smallest scheme) to {high:,} bytes (at its largest)"
        )
    step = max(budget / units, 1.0)
    size = int(budget // step)
    best = np.zeros(size + 1)  # least cost of the groups so far within b steps
    picks = []
    for opts in groups.values():
        cost = np.full(size + 1, np.inf)
        pick = np.zeros(size + 1, dtype=np.int16)
        order = sorted(range(len(opts)), key=lambda k: (opts[k].bytes, k))
        for k in order:
            w = math.ceil(opts[k].bytes / step)
            if w > size:
                continue
            shifted = np.full(size + 1, np.inf)
            shifted[w:] = best[: size + 1 - w] + opts[k].cost
            better = shifted < cost
            cost[better], pick[better] = shifted[better], k
        best = cost
        picks.append(pick)
    if not np.isfinite(best[size]):  # every module at its smallest rounds over the budget
        raise ValueError(
            f"a budget of {budget:,} bytes leaves no room once each option is rounded up to "
            f"{step:,.0f} bytes; raise it a little (the smallest choice is {low:,} bytes)"
        )
    b = int(np.flatnonzero(best == best[size])[0])  # the fewest bytes at the least cost
    chosen: dict[str, int] = {}
    for name, opts, pick in reversed(list(zip(groups, groups.values(), picks, strict=True))):
        k = int(pick[b])
        chosen[name] = k
        b -= math.ceil(opts[k].bytes / step)
    return dict(reversed(list(chosen.items())))


# ---- sensitivity -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """Modules that share one weight and so one scheme (a tied embedding and head) or a module
    alone: their FQNs, the first one's kind, shape, role and decoder layer (None outside the
    layers)."""

    fqns: tuple[str, ...]
    kind: str  # "linear" or "embedding"
    shape: tuple[int, int]
    role: str | None
    layer: int | None

    @property
    def name(self) -> str:
        return self.fqns[0]

    @property
    def n_weights(self) -> int:
        return self.shape[0] * self.shape[1]


def groups_of(model: nn.Module) -> list[Group]:
    """Every quantizable module of ``model`` in module order, modules sharing a weight in one
    group (under the first one's name)."""
    from edgequant.quantize import Plan, _weight, plan
    from edgequant.recipe import Recipe, Rule

    p: Plan = plan(model, Recipe([Rule(None, role="default")]))  # every module, float
    by_storage: dict[int, list] = {}
    for lp in p:
        weight = _weight(model.get_submodule(lp.fqn))
        by_storage.setdefault(id(weight.untyped_storage()), []).append(lp)
    return [Group(tuple(lp.fqn for lp in lps), lps[0].kind if lps[0].kind == "embedding"
                  else "linear", lps[0].shape, lps[0].role, lps[0].layer)
            for lps in by_storage.values()]  # fmt: skip


def group_recipe(choice: dict[Group, Scheme | None], name: str = "mixed"):
    """A recipe of FQN rules giving every module of each group its scheme (None: float)."""
    from edgequant.recipe import Recipe, Rule

    rules = [Rule(None, role="default")]
    for group, scheme in choice.items():
        rules += [Rule(scheme, module=fqn) for fqn in group.fqns]
    return Recipe(rules, name=name)


def stored_bytes(group: Group, scheme: Scheme | None) -> int:
    """Bytes ``group``'s weight takes stored as ``scheme`` (float: 4 bytes a weight)."""
    from edgequant.layers import layout_bytes

    rows, cols = group.shape
    return 4 * rows * cols if scheme is None else layout_bytes(rows, cols, scheme)


@torch.no_grad()
def sensitivity(
    model: nn.Module,
    options: dict[Group, list[Scheme | None]],
    windows: torch.Tensor,
) -> dict[Group, list[float]]:
    """The mean KL divergence (nats/token) of ``model`` against itself in float on
    ``windows [n, L]`` when one group alone takes each of its ``options`` (None: float,
    cost 0). The float model's hidden states at each decoder layer's input are kept, so a
    module in layer ``l`` runs layers ``l..`` only; an embedding (and a head tied to it) runs
    the whole model, an untied head only the head."""
    from edgequant._progress import progress_bar
    from edgequant.eval import Comparison
    from edgequant.models.families import decoder_of
    from edgequant.quantize import _set_module, pack, plan

    decoder = decoder_of(model)
    names = {id(m): n for n, m in decoder.named_modules()}
    ropes, attend = decoder.eager_context(windows.shape[1], device=windows.device)
    n_layers = len(decoder.layers)
    inputs = [[decoder.tok_embeddings(w[None]) for w in windows]]
    for i in range(n_layers):
        inputs.append([decoder.run_layer(i, h, ropes, attend) for h in inputs[-1]])
    reference = [decoder.head(h).float()[0] for h in inputs[-1]]

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

    work = [(g, s) for g, schemes in options.items() for s in schemes if s is not None]
    measured: dict[tuple[Group, Scheme], float] = {}
    for group, scheme in progress_bar(work, len(work), "sensitivity", "option"):
        p = plan(model, group_recipe({group: scheme}))
        packed: dict[str, nn.Module] = {}
        saved = {}
        for lp in (lp for lp in p if lp.scheme is not None):
            packed[lp.fqn] = pack(model, lp, None, packed)
            where = names[id(model.get_submodule(lp.fqn))]
            saved[where] = decoder.get_submodule(where)
            _set_module(decoder, where, packed[lp.fqn])
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


# ---- the recipe for a budget -----------------------------------------------------------------


def options_for(group: Group, targets: list[str], algorithm: str | None = None) -> list:
    """``group``'s candidate schemes (`candidates` whose groups divide its rows), float last
    (None). A tied embedding and head takes the linear schemes whose storage every target
    also looks up as an embedding. ``algorithm`` replaces each scheme's (minmax)."""
    import dataclasses

    from edgequant.layers import shape_problem

    if group.kind == "embedding" and len(group.fqns) > 1:
        lookups = {_storage(s) for s in candidates(targets, "embedding")}
        schemes = [s for s in candidates(targets, "linear") if _storage(s) in lookups]
    else:
        schemes = candidates(targets, group.kind)
    if algorithm is not None:
        schemes = [dataclasses.replace(s, algorithm=algorithm) if s.is_integer else s
                   for s in schemes]  # fmt: skip
    return [*(s for s in schemes if shape_problem(s, group.shape[1]) is None), None]


def _storage(scheme: Scheme) -> Scheme:
    import dataclasses

    return dataclasses.replace(scheme, activation="none", activation_symmetric=False)


def budget_recipe(
    model: nn.Module,
    budget: str | Budget,
    targets: list[str],
    windows: torch.Tensor,
    *,
    algorithm: str | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The recipe (FQN rules) whose stored weight bytes fit ``budget`` with the least summed
    `sensitivity` on ``windows`` (calibration text, disjoint from the evaluation windows),
    choosing for each module among the schemes all ``targets`` run exactly (and float);
    ``algorithm`` rounds the integer schemes (minmax by default). Returns the recipe and the
    allocation's facts (budget, bytes, the predicted KL as the sum of the chosen costs, and
    each module's choice)."""
    if isinstance(budget, str):
        budget = parse_budget(budget)
    groups = groups_of(model)
    options = {g: options_for(g, targets, algorithm) for g in groups}
    n_weights = sum(g.n_weights for g in groups)
    limit = budget.bytes_for(n_weights)
    table = {g.name: [Option(s, stored_bytes(g, s), 0.0) for s in options[g]] for g in groups}
    low, high = reachable(table)
    if not low <= limit <= high:
        allocate(table, limit)  # raises, naming the reachable range
    costs = sensitivity(model, options, windows)
    table = {g.name: [Option(s, stored_bytes(g, s), c) for s, c in zip(options[g], costs[g],
                                                                       strict=True)]
             for g in groups}  # fmt: skip
    chosen = allocate(table, limit)
    picks = {g: table[g.name][chosen[g.name]] for g in groups}
    recipe = group_recipe({g: o.scheme for g, o in picks.items()}, name=f"budget-{budget}")
    facts = {
        "budget": str(budget),
        "budget_bytes": limit,
        "targets": list(targets),
        "reachable_bytes": [low, high],
        "allocated_bytes": sum(o.bytes for o in picks.values()),
        "predicted_kl": sum(o.cost for o in picks.values()),
        "sensitivity_windows": list(windows.shape),
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


def sensitivity_windows(tokenizer) -> torch.Tensor:
    """``[SENSITIVITY_WINDOWS, SENSITIVITY_TOKENS]`` token ids of WikiText-2 past the
    evaluation windows (the job's `budget_recipe` measures on them)."""
    from edgequant.calibration import wikitext

    batches = wikitext(tokenizer, SENSITIVITY_WINDOWS, SENSITIVITY_TOKENS, seed=1).batches
    return torch.cat(list(batches))
