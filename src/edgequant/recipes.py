"""Named presets: ``edgequant.recipes.get(name, **overrides)`` and ``edgequant.recipes.names()``.

Every preset is one ``role: default`` rule, so it quantizes every Linear and Embedding (an
embedding lookup ignores the activation mode). ``int8-static`` needs calibrated activation
ranges, so it is for graph mode (`edgequant.graph.quantize`) only; ``names("source")`` lists the
presets `edgequant.quantize` runs. Keyword overrides replace scheme fields in every
rule, e.g. ``get("8da4w", group_size=64)`` or ``get("int8-dynamic", scale_dtype="fp16")``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace

from edgequant.recipe import Recipe, Rule
from edgequant.schemes import Scheme

_PRESETS: dict[str, tuple[Scheme, str]] = {
    "fp16": (Scheme("fp16"), "fp16 weights, fp32 activations and compute"),
    "int8-weight-only": (
        Scheme("int8"),
        "int8 per-channel symmetric weights, float activations and compute",
    ),
    "int8-dynamic": (
        Scheme("int8", activation="int8_dynamic"),
        "int8 per-channel symmetric weights, activations int8 per token at run time "
        "(dynamic range), integer matmul",
    ),
    # hqq: the best data-free algorithm measured on SmolLM2 (KL 0.489 against min-max's 0.651
    # and mse's 0.487, slower, on 8 WikiText-2 windows disjoint from the reported ones); the
    # tied embedding/head too (0.489 against 0.504 with min-max there, 0.496 with mse)
    "8da4w": (
        Scheme(
            "int4",
            "per_group",
            group_size=32,
            scale_dtype="fp16",
            activation="int8_dynamic",
            algorithm="hqq",
        ),  # fmt: skip
        "int4 symmetric group-wise weights (group 32, fp16 scales, HQQ rounding), activations "
        "int8 dynamic per token, asymmetric",
    ),
    "int4-weight-only": (
        Scheme("int4", "per_group", group_size=32, scale_dtype="fp16"),
        "int4 symmetric group-wise weights (group 32, fp16 scales), float activations",
    ),
    "int8-static": (
        Scheme("int8", activation="int8_static"),
        "int8 per-channel symmetric weights, int8 per-tensor activations from calibration "
        "(graph mode)",
    ),
}


def names(mode: str | None = None) -> list[str]:
    """The preset names, e.g. ``['fp16', 'int8-weight-only', 'int8-dynamic', '8da4w', ...]``;
    ``mode="source"`` keeps those `edgequant.quantize` runs, ``"graph"`` those graph mode runs.

    >>> names("source")[-1], names("graph")
    ('int4-weight-only', ['int8-weight-only', 'int8-dynamic', 'int8-static'])
    """
    if mode not in (None, "source", "graph"):
        raise ValueError(f"mode must be None, 'source' or 'graph', got {mode!r}")
    out = []
    for name, (scheme, _) in _PRESETS.items():
        graph_ok = scheme.is_integer and scheme.granularity != "per_group"
        source_ok = scheme.activation != "int8_static"
        if mode is None or (mode == "source" and source_ok) or (mode == "graph" and graph_ok):
            out.append(name)
    return out


def describe(name: str) -> str:
    """One line saying what a preset does."""
    return _PRESETS[_check(name)][1]


def _check(name: str) -> str:
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(_PRESETS)}")
    return name


def get(name: str, **overrides) -> Recipe:
    """The preset ``name`` as a `Recipe`, with scheme fields replaced by ``overrides``; the
    parameters of its ``algorithm`` may be given as keywords too.

    >>> get("8da4w", group_size=64).rules[0].scheme.group_size
    64
    >>> get("8da4w", algorithm="gptq", damp=0.1).rules[0].scheme.describe()
    'int4 g32 sym fp16-scales, act int8 dynamic asym, gptq(damp=0.1)'
    >>> get("8da4w", groupsize=64)
    Traceback (most recent call last):
    ...
    ValueError: preset '8da4w': unknown override(s) ['groupsize']; allowed: ['weight', \
'granularity', 'group_size', 'symmetric', 'scale_dtype', 'activation', 'activation_symmetric', \
'algorithm', 'algorithm_params'] and the parameters of algorithm 'hqq': ['beta', 'iters', \
'kappa', 'magnitude', 'p', 'start']
    """
    from edgequant.schemes import ALGORITHMS

    scheme, _ = _PRESETS[_check(name)]
    allowed = [f.name for f in dataclasses.fields(Scheme)]
    algorithm = overrides.get("algorithm", scheme.algorithm)
    takes = ALGORITHMS.get(algorithm, {})
    params = {k: overrides.pop(k) for k in list(overrides) if k in takes and k not in allowed}
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(
            f"preset {name!r}: unknown override(s) {unknown}; allowed: {allowed} and the "
            f"parameters of algorithm {algorithm!r}: {sorted(takes) or 'none'}"
        )
    if params:
        overrides["algorithm_params"] = {**dict(overrides.get("algorithm_params", {})), **params}
    try:
        scheme = replace(scheme, **overrides)
    except ValueError as e:
        raise ValueError(f"preset {name!r}: {e}") from None
    suffix = "".join(f",{k}={v}" for k, v in overrides.items() if k != "algorithm_params")
    suffix += "".join(f",{k}={v}" for k, v in params.items())
    return Recipe(rules=(Rule(scheme, role="default"),), name=name + suffix)
