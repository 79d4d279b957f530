"""`plan` and `quantize`: resolve each module's scheme from a recipe, then swap it in place.

``plan(model, recipe)`` changes nothing and says, per module, which rule decided its scheme and
what it will cost; ``quantize(model, recipe)`` does it and returns the same plan. Both check the
whole recipe against the model first, so a bad recipe fails before any weight is touched.

Tied weights (an embedding shared with the lm_head) are quantized once when their rules agree,
and the two packed modules share one storage; when the rules give them different schemes each
gets its own copy, and the plan says so.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn
from tqdm.auto import tqdm

from edgequant import algorithms
from edgequant.layers import (
    QuantizedEmbedding,
    QuantizedLinear,
    embed_scale_of,
    embedding_is_plain,
    layout_bytes,
    linear_weight,
    shape_problem,
)
from edgequant.primitives import count_nonfinite
from edgequant.recipe import Recipe
from edgequant.roles import infer_roles, is_quantizable, is_quantized
from edgequant.schemes import NEEDS_CALIBRATION, Scheme

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerPlan:
    """What the recipe decided for one module. Bytes count weights, scales and zero points."""

    fqn: str
    kind: str  # "linear", "conv1d" or "embedding"
    role: str | None
    layer: int | None
    shape: tuple[int, int]  # [rows, cols] = [out, in] for linears, [vocab, dim] for embeddings
    scheme: Scheme | None  # None: left float
    rule: int | None  # index of the deciding rule in the recipe, None if no rule matched
    bytes_before: int
    bytes_after: int
    tied_to: str | None = None  # FQN of the module whose packed storage this one shares

    def to_dict(self) -> dict[str, Any]:
        return {
            "fqn": self.fqn,
            "kind": self.kind,
            "role": self.role,
            "layer": self.layer,
            "shape": list(self.shape),
            "scheme": None if self.scheme is None else self.scheme.to_dict(),
            "rule": self.rule,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "tied_to": self.tied_to,
        }


@dataclass
class Plan:
    """Per-module decisions of a recipe on a model, in module order."""

    recipe: Recipe
    layers: list[LayerPlan]
    bytes_before: int  # float bytes of all weights, a tied tensor counted once
    bytes_after: int  # stored bytes after quantization, shared storage counted once
    n_weights: int = 0  # weight values, a tied tensor counted once
    # role -> [weights, bytes before, bytes after], counted as the totals are (a tied tensor
    # under the role of its first module, usually the embedding)
    by_role: dict[str, list[int]] = field(default_factory=dict)

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, fqn: str) -> LayerPlan:
        for lp in self.layers:
            if lp.fqn == fqn:
                return lp
        raise KeyError(f"no quantizable module {fqn!r} in the plan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.to_dict(),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "n_weights": self.n_weights,
            "by_role": {
                role: dict(zip(("n_weights", "bytes_before", "bytes_after"), v, strict=True))
                for role, v in self.by_role.items()
            },
            "layers": [lp.to_dict() for lp in self.layers],
        }

    def table(self) -> str:
        """A fixed-width table, one module per line, with totals."""
        labels = []
        for lp in self.layers:
            scheme = "float (kept)" if lp.scheme is None else lp.scheme.describe()
            labels.append(scheme + (f" [tied to {lp.tied_to}]" if lp.tied_to else ""))
        w_fqn = max([len("module")] + [len(lp.fqn) for lp in self.layers])
        w_scheme = max([len("scheme")] + [len(label) for label in labels])
        head = f"{'module':<{w_fqn}}  {'role':<11} {'shape':>12}  {'scheme':<{w_scheme}} {'MiB':>8}"
        lines = [head, "-" * len(head)]
        for lp, label in zip(self.layers, labels, strict=True):
            shape = "x".join(map(str, lp.shape))
            lines.append(
                f"{lp.fqn:<{w_fqn}}  {lp.role or '-':<11} {shape:>12}  {label:<{w_scheme}} "
                f"{lp.bytes_after / 2**20:>8.3f}"
            )
        lines.append("-" * len(head))
        ratio = self.bytes_before / max(self.bytes_after, 1)
        lines.append(
            f"weights: {self.bytes_before / 2**20:.3f} MiB -> {self.bytes_after / 2**20:.3f} MiB "
            f"({ratio:.2f}x smaller)"
        )
        if self.by_role:
            lines += ["", self.role_table()]
        return "\n".join(lines)

    def role_table(self) -> str:
        """Weights and bytes per role, with each role's share of the stored bytes: how much of
        the model the embedding is (most of a small Gemma's, with its 262,144 tokens)."""
        head = f"{'role':<12} {'weights':>12} {'float MiB':>10} {'stored MiB':>11} {'share':>6}"
        lines = [head, "-" * len(head)]
        for role, (n, before, after) in self.by_role.items():
            share = 100 * after / max(self.bytes_after, 1)
            lines.append(
                f"{role:<12} {n:>12,} {before / 2**20:>10.3f} {after / 2**20:>11.3f} {share:>5.1f}%"
            )
        return "\n".join(lines)


def as_recipe(recipe: Any) -> Recipe:
    """Accept a `Recipe`, a preset name, a recipe file path, or an object with ``to_recipe()``."""
    if isinstance(recipe, Recipe):
        return recipe
    if hasattr(recipe, "to_recipe"):
        return recipe.to_recipe()
    if isinstance(recipe, str):
        from edgequant import recipes

        if recipe in recipes.names():
            return recipes.get(recipe)
        if recipe.endswith((".json", ".yaml", ".yml")):
            return Recipe.load(recipe)
        raise ValueError(
            f"recipe {recipe!r} is neither a preset ({', '.join(recipes.names())}) nor a "
            ".json/.yaml recipe file"
        )
    raise TypeError(
        "recipe must be a Recipe, a preset name, a recipe file path or a QuantConfig / "
        f"GenerativeQuantRecipe, got {type(recipe).__name__}"
    )


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Embedding):
        return "embedding"
    return "linear" if isinstance(module, nn.Linear) else "conv1d"


def _weight(module: nn.Module):
    return module.weight if isinstance(module, nn.Embedding) else linear_weight(module)


def _after_bytes(scheme: Scheme | None, rows: int, cols: int, before: int) -> int:
    if scheme is None or scheme.weight == "fp32":
        return before
    return layout_bytes(rows, cols, scheme)


def _label(scheme: Scheme | None) -> str:
    return "float" if _stored_as(scheme) is None else scheme.describe()


def _stored_as(scheme: Scheme | None) -> Scheme | None:
    """What a module keeps: ``None`` when the float weight stays as it is (no rule, or fp32)."""
    return None if scheme is None or scheme.weight == "fp32" else scheme


def sharing_one_weight(modules: dict[str, nn.Module]) -> list[list[str]]:
    """The FQNs of ``modules`` grouped by the weight storage they read (a tied embedding and
    head in one group), in module order."""
    groups: dict[int, list[str]] = {}
    for fqn, module in modules.items():
        groups.setdefault(id(_weight(module).untyped_storage()), []).append(fqn)
    return list(groups.values())


def storage_groups(
    model: nn.Module, modules: dict[str, nn.Module], rotate: str | None = None
) -> list[list[str]]:
    """`sharing_one_weight` of ``modules`` once the recipe's rotation (``rotate``) has run: a
    tied head the rotation unties reads a weight of its own. What `plan` ties and what
    `edgequant.mixed.recipe_bytes` counts once."""
    groups = sharing_one_weight(modules)
    if rotate is None:
        return groups
    from edgequant.rotation import unties_head

    head = unties_head(model)  # also refuses a model that cannot be rotated
    split = [[[f for f in g if f != head], [head]] if head in g else [g] for g in groups]
    return [part for parts in split for part in parts if part]


def _check_rules(model: nn.Module, recipe: Recipe, candidates: dict[str, nn.Module], roles) -> None:
    """Refuse rules aimed at modules edgequant cannot quantize; warn on rules matching nothing."""
    leaves = {
        fqn: m
        for fqn, m in model.named_modules()
        if fqn and not list(m.children()) and list(m.parameters(recurse=False))
    }
    for i, rule in enumerate(recipe.rules):
        if rule.module is not None:
            hits = [f for f in leaves if rule.matches(f, None, None)]
            wrong = [f for f in hits if f not in candidates]
            if wrong and rule.scheme is not None:
                names = ", ".join(f"{f} ({type(leaves[f]).__name__})" for f in wrong[:5])
                raise ValueError(
                    f"rules[{i}] ({rule.selector()}) targets {names}: edgequant quantizes "
                    "nn.Linear, nn.Embedding and Conv1D modules only; narrow the selector or "
                    "map it to null"
                )
        else:
            hits = [f for f in candidates if rule.matches(f, *roles[f])]
        if not hits:
            key = rule.module[3:] if rule.module and rule.module.startswith("re:") else rule.module
            near = difflib.get_close_matches(
                key or rule.role or "", list(candidates), n=5, cutoff=0.3
            )
            log.warning(
                "rules[%d] (%s) matches no module%s",
                i,
                rule.selector(),
                f"; did you mean one of: {', '.join(near)}" if near else "",
            )


def plan(model: nn.Module, recipe: Any) -> Plan:
    """What `quantize` would do, without changing the model.

    Raises ValueError for a scheme a module's shape cannot hold (naming the rule, the module and
    the group sizes that fit) and for rules aimed at module types edgequant cannot quantize.
    """
    recipe = as_recipe(recipe)
    already = [fqn for fqn, m in model.named_modules() if is_quantized(m)]
    if already:
        raise ValueError(
            f"the model is already quantized ({len(already)} packed modules, e.g. {already[0]}); "
            "quantize a float model"
        )
    roles = infer_roles(model)
    candidates = {fqn: m for fqn, m in model.named_modules() if is_quantizable(m)}
    _check_rules(model, recipe, candidates, roles)

    decided: dict[str, tuple[Scheme | None, int | None]] = {}
    problems: dict[tuple[int, str], list[str]] = {}  # (rule, what is wrong) -> modules
    for fqn, module in candidates.items():
        scheme, rule = recipe.resolve(fqn, *roles[fqn])
        decided[fqn] = (scheme, rule)
        if scheme is None:
            continue
        if isinstance(module, nn.Embedding) and not embedding_is_plain(module):
            raise ValueError(
                f"rules[{rule}] would quantize {fqn}, a {type(module).__name__} whose forward is "
                "not a plain lookup; edgequant cannot tell what it computes. Map it to null "
                f"(e.g. a rule with module: {fqn!r} and scheme: null)"
            )
        if scheme.activation == "int8_static":
            raise NotImplementedError(
                f"rules[{rule}] gives {fqn} activation 'int8_static', which needs calibrated "
                "activation ranges; eager quantize() supports 'none' and 'int8_dynamic'"
            )
        what = "embedding dims" if _kind(module) == "embedding" else "input features"
        problem = shape_problem(scheme, _weight(module).shape[1], what)
        if problem:
            problems.setdefault((rule, problem), []).append(fqn)
    if problems:
        messages = []
        for (rule, problem), fqns in problems.items():
            names = ", ".join(fqns[:4]) + (f" and {len(fqns) - 4} more" if len(fqns) > 4 else "")
            messages.append(f"rules[{rule}] ({recipe.rules[rule].selector()}): {names}: {problem}")
        raise ValueError("; ".join(messages))

    # Tied weights: one tensor used by several modules (first in module order owns it).
    groups = storage_groups(model, candidates, recipe.rotate)
    tied_to: dict[str, str] = {}
    for members in groups:
        stored = {_stored_as(decided[f][0]) for f in members}
        if len(members) < 2 or stored == {None}:  # untied, or the float tensor stays shared
            continue
        if len(stored) == 1:
            tied_to.update({f: members[0] for f in members[1:]})
        else:
            log.warning(
                "%s share one weight but the recipe gives them different schemes (%s); each "
                "scheme is stored on its own",
                " and ".join(members),
                " / ".join(f"{f}: {_label(decided[f][0])}" for f in members),
            )

    layers = []
    before_total = after_total = n_weights = 0
    by_role: dict[str, list[int]] = {}
    for members in groups:
        float_counted = False
        for i, fqn in enumerate(members):
            module = candidates[fqn]
            weight = _weight(module)
            rows, cols = weight.shape
            before = weight.numel() * weight.element_size()
            scheme, rule = decided[fqn]
            after = _after_bytes(scheme, rows, cols, before)
            counted = [rows * cols, before, 0] if i == 0 else [0, 0, 0]
            if _stored_as(scheme) is None:  # the float tensor is held once however many use it
                counted[2] = 0 if float_counted else after
                float_counted = True
            elif fqn not in tied_to:
                counted[2] = after
            n_weights += counted[0]
            before_total += counted[1]
            after_total += counted[2]
            role = by_role.setdefault(roles[fqn][0] or "other", [0, 0, 0])
            role[:] = [a + b for a, b in zip(role, counted, strict=True)]
            layers.append(
                LayerPlan(
                    fqn=fqn,
                    kind=_kind(module),
                    role=roles[fqn][0],
                    layer=roles[fqn][1],
                    shape=(rows, cols),
                    scheme=scheme,
                    rule=rule,
                    bytes_before=before,
                    bytes_after=after,
                    tied_to=tied_to.get(fqn),
                )
            )
    order = {fqn: i for i, fqn in enumerate(candidates)}
    layers.sort(key=lambda lp: order[lp.fqn])
    return Plan(
        recipe=recipe,
        layers=layers,
        bytes_before=before_total,
        bytes_after=after_total,
        n_weights=n_weights,
        by_role={role: v for role, v in by_role.items() if any(v)},
    )


def _set_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize(model: nn.Module, recipe: Any, calibration=None) -> tuple[nn.Module, Plan]:
    """Swap every module the recipe quantizes for its packed twin, in place.

    A recipe with ``rotate`` first folds the norms and rotations into the float weights
    (`edgequant.rotation.rotate`; a tied head it unties gets its own storage).

    Returns ``(model, plan)``; the recipe is kept as ``model.edgequant_recipe`` so that
    `edgequant.save` stores it in the artifact. ``calibration`` (token batches: an
    `edgequant.calibration.Calibration` or any iterable of ``[1, L]`` tensors) feeds the
    algorithms that need activations (GPTQ, AWQ, SmoothQuant), run layer by layer
    (`edgequant.layerwise`; AWQ and SmoothQuant fold their scales into the model's norms); its
    source is kept as ``model.edgequant_calibration``.

    >>> import torch
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    >>> model, p = quantize(model, "int8-dynamic")
    >>> type(model[0]).__name__, p["0"].scheme.weight
    ('QuantizedLinear', 'int8')
    """
    p = plan(model, recipe)
    check_finite(model)
    if p.recipe.rotate is not None:
        from edgequant.rotation import rotate

        rotate(model, p.recipe.rotate)
        p = plan(model, p.recipe)  # the same entries, over the rotated weights
    packed: dict[str, nn.Module] = {}
    todo = [lp for lp in p if lp.scheme is not None and lp.scheme.weight != "fp32"]
    results = _calibrated(model, todo, calibration)
    for lp in tqdm(todo, desc="quantize", unit="layer", disable=len(todo) < 50 or None):
        packed[lp.fqn] = pack(model, lp, results.get(lp.fqn), packed)
    for fqn, new in packed.items():
        _set_module(model, fqn, new)
    model.edgequant_recipe = p.recipe
    if calibration is not None:
        model.edgequant_calibration = getattr(calibration, "source", "token batches given")
    return model, p


def pack(model: nn.Module, lp: LayerPlan, result, packed: dict[str, nn.Module]) -> nn.Module:
    """The packed module for one entry of a plan: quantized from the model's module (with
    ``result``, what a calibrated algorithm found, when there is one), or, for a module tied to
    one already in ``packed``, sharing that one's storage."""
    module = model.get_submodule(lp.fqn)
    cls = QuantizedEmbedding if lp.kind == "embedding" else QuantizedLinear
    if lp.tied_to is None:
        if result is None and lp.scheme.algorithm in NEEDS_CALIBRATION and lp.scheme.is_integer:
            # a lookup table (or a linear tied to one) has no input Hessian: mse instead (a
            # K-quant: llama.cpp's quantizer without an importance)
            weight = module.weight if lp.kind == "embedding" else linear_weight(module)
            result = algorithms.quantize_weight(weight, _as_mse(lp.scheme), name=lp.fqn)
        return cls.from_float(module, lp.scheme, name=lp.fqn, result=result)
    owner = packed[lp.tied_to]
    if cls is QuantizedEmbedding:
        new = QuantizedEmbedding(lp.shape[0], lp.shape[1], lp.scheme, embed_scale_of(module))
    else:
        new = QuantizedLinear(lp.shape[1], lp.shape[0], lp.scheme, module.bias is not None)
        if module.bias is not None:
            new.bias = module.bias.detach().float().clone()
    new.set_packed(owner.packed_buffers())
    return new


def check_finite(model: nn.Module) -> None:
    """Refuse a model with a NaN or infinite value in any float parameter or buffer, naming the
    tensors: no result computed from it would mean anything.

    >>> import torch
    >>> m = nn.Linear(4, 2)
    >>> with torch.no_grad():
    ...     m.bias[1] = float("nan")
    >>> check_finite(m)
    Traceback (most recent call last):
    ...
    ValueError: the model has NaN/Inf values in bias (1 of 2); edgequant cannot quantize or \
evaluate it (check the checkpoint it was loaded from)
    """
    bad = []
    seen: set[int] = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in seen or not t.is_floating_point() or t.is_meta:
            continue
        seen.add(id(t))
        n = count_nonfinite(t)
        if n:
            bad.append(f"{name} ({n} of {t.numel()})")
    if bad:
        raise ValueError(
            f"the model has NaN/Inf values in {', '.join(bad[:4])}"
            f"{f' and {len(bad) - 4} more tensors' if len(bad) > 4 else ''}; edgequant cannot "
            "quantize or evaluate it (check the checkpoint it was loaded from)"
        )


def _as_mse(scheme):
    """A calibrated rule on a lookup table: `mse` with plain squared error (or the rule's own
    ``magnitude``), as the calibrated algorithms' rounding weighs errors by data, not by size."""
    import dataclasses

    magnitude = scheme.params.get("magnitude", 0.0)
    return dataclasses.replace(scheme, algorithm="mse", algorithm_params={"magnitude": magnitude})


def calibrated_schemes(todo: list) -> dict[str, Scheme]:
    """fqn -> scheme of the linears a calibrated algorithm rounds (see `_calibrated`)."""
    tied = {lp.tied_to for lp in todo if lp.tied_to is not None}
    return {
        lp.fqn: lp.scheme
        for lp in todo
        if lp.scheme.algorithm in NEEDS_CALIBRATION
        and lp.kind != "embedding"
        and lp.tied_to is None
        and lp.fqn not in tied
    }


def needs_calibration(schemes: dict[str, Scheme]) -> None:
    """Refuse to round ``schemes`` (fqn -> scheme of a calibrated algorithm) without data."""
    names = list(schemes)
    listed = ", ".join(names[:3]) + (" and more" if len(names) > 3 else "")
    algorithm = schemes[names[0]].algorithm
    raise ValueError(
        f"{algorithm} ({listed}) needs calibration data: pass calibration= "
        "to edgequant.quantize, e.g. edgequant.calibration.wikitext(tokenizer) (WikiText-2 "
        "past the evaluation windows) or calibration.from_model(model, tokenizer) (no data "
        "needed); on the command line --calibration wikitext:128x512"
    )


def _calibrated(model: nn.Module, todo: list, calibration) -> dict:
    """Results (fqn -> `algorithms.Quantized`) of the calibrated algorithms (GPTQ, AWQ,
    SmoothQuant) for the linears whose rule asks for one; a lookup table (or a linear tied to
    one) has no input to calibrate on and is left to the caller (mse)."""
    schemes = calibrated_schemes(todo)
    if not schemes:
        return {}
    if calibration is None:
        needs_calibration(schemes)
    from edgequant.layerwise import run

    return run(model, schemes, calibration)
