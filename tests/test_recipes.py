"""Named presets: the list, each preset's scheme field by field, overrides and their errors."""

from __future__ import annotations

import pytest

from edgequant import recipes
from edgequant.recipe import Recipe, Rule
from edgequant.schemes import Scheme

NAMES = ["fp16", "int8-weight-only", "int8-dynamic", "8da4w", "int4-weight-only", "int8-static"]
ALLOWED = (
    "['weight', 'granularity', 'group_size', 'symmetric', 'scale_dtype', 'activation', "
    "'activation_symmetric', 'algorithm', 'algorithm_params']"
)

# name -> every scheme field, spelled out
EXPECTED = {
    "fp16": dict(
        weight="fp16",
        granularity="per_channel",
        group_size=None,
        symmetric=True,
        scale_dtype="fp32",
        activation="none",
        activation_symmetric=False,
        algorithm="minmax",
        algorithm_params={},
    ),
    "int8-weight-only": dict(
        weight="int8",
        granularity="per_channel",
        group_size=None,
        symmetric=True,
        scale_dtype="fp32",
        activation="none",
        activation_symmetric=False,
        algorithm="minmax",
        algorithm_params={},
    ),
    "int8-dynamic": dict(
        weight="int8",
        granularity="per_channel",
        group_size=None,
        symmetric=True,
        scale_dtype="fp32",
        activation="int8_dynamic",
        activation_symmetric=False,
        algorithm="minmax",
        algorithm_params={},
    ),
    "8da4w": dict(
        weight="int4",
        granularity="per_group",
        group_size=32,
        symmetric=True,
        scale_dtype="fp16",
        activation="int8_dynamic",
        activation_symmetric=False,
        algorithm="hqq",
        algorithm_params={},
    ),
    "int4-weight-only": dict(
        weight="int4",
        granularity="per_group",
        group_size=32,
        symmetric=True,
        scale_dtype="fp16",
        activation="none",
        activation_symmetric=False,
        algorithm="minmax",
        algorithm_params={},
    ),
    "int8-static": dict(
        weight="int8",
        granularity="per_channel",
        group_size=None,
        symmetric=True,
        scale_dtype="fp32",
        activation="int8_static",
        activation_symmetric=False,
        algorithm="minmax",
        algorithm_params={},
    ),
}


def test_names():
    assert recipes.names() == NAMES
    assert list(EXPECTED) == NAMES
    assert recipes.names("source") == NAMES[:-1]  # int8-static needs calibration: graph mode
    assert recipes.names("graph") == ["int8-weight-only", "int8-dynamic", "int8-static"]
    with pytest.raises(ValueError, match="mode must be None, 'source' or 'graph', got 'gpu'"):
        recipes.names("gpu")


@pytest.mark.parametrize("name", NAMES)
def test_preset_is_one_default_rule_with_the_expected_scheme(name):
    recipe = recipes.get(name)
    assert isinstance(recipe, Recipe)
    assert recipe.name == name
    assert len(recipe.rules) == 1
    (rule,) = recipe.rules
    assert (rule.role, rule.layers, rule.module) == ("default", None, None)
    assert rule.scheme.to_dict() == EXPECTED[name]
    assert recipe == Recipe((Rule(Scheme(**EXPECTED[name]), role="default"),), name=name)
    # every module resolves to that scheme
    for fqn, role, layer in [
        ("tok_embeddings", "embedding", None),
        ("layers.0.attention.wq", "attention", 0),
        ("output", "lm_head", None),
    ]:
        assert recipe.resolve(fqn, role, layer) == (rule.scheme, 0)
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("fp16", "fp16 weights, fp32 activations and compute"),
        ("int8-weight-only", "int8 per-channel symmetric weights, float activations and compute"),
        (
            "8da4w",
            "int4 symmetric group-wise weights (group 32, fp16 scales, HQQ rounding), activations "
            "int8 dynamic per token, asymmetric",
        ),
    ],
)
def test_describe(name, text):
    assert recipes.describe(name) == text


def test_every_preset_has_a_description():
    assert all(recipes.describe(n) for n in NAMES)


@pytest.mark.parametrize(
    ("name", "overrides", "changed", "recipe_name"),
    [
        ("8da4w", dict(group_size=64), dict(group_size=64), "8da4w,group_size=64"),
        (
            "int8-dynamic",
            dict(scale_dtype="fp16"),
            dict(scale_dtype="fp16"),
            "int8-dynamic,scale_dtype=fp16",
        ),
        (
            "int4-weight-only",
            dict(group_size=128, symmetric=False),
            dict(group_size=128, symmetric=False),
            "int4-weight-only,group_size=128,symmetric=False",
        ),
        (
            "8da4w",
            dict(activation_symmetric=True),
            dict(activation_symmetric=True),
            "8da4w,activation_symmetric=True",
        ),
        ("int8-weight-only", {}, {}, "int8-weight-only"),
    ],
)
def test_overrides(name, overrides, changed, recipe_name):
    recipe = recipes.get(name, **overrides)
    assert recipe.name == recipe_name
    assert recipe.rules[0].scheme.to_dict() == {**EXPECTED[name], **changed}
    # the preset itself is untouched
    assert recipes.get(name).rules[0].scheme.to_dict() == EXPECTED[name]


def test_unknown_override():
    with pytest.raises(ValueError) as info:
        recipes.get("8da4w", groupsize=64)
    assert (
        str(info.value) == f"preset '8da4w': unknown override(s) ['groupsize']; allowed: {ALLOWED}"
        " and the parameters of algorithm 'hqq': ['beta', 'iters', 'kappa', 'magnitude', 'p', "
        "'start']"
    )
    with pytest.raises(ValueError) as info:
        recipes.get("fp16", zeta=1, bits=4)
    assert (
        str(info.value)
        == f"preset 'fp16': unknown override(s) ['bits', 'zeta']; allowed: {ALLOWED}"
        " and the parameters of algorithm 'minmax': none"
    )
    with pytest.raises(ValueError, match=r"parameters of algorithm 'gptq': \['act_order', 'block'"):
        recipes.get("8da4w", algorithm="gptq", dampening=0.1)


def test_algorithm_and_its_parameters_as_overrides():
    recipe = recipes.get("8da4w", algorithm="gptq", damp=0.1, act_order=True)
    scheme = recipe.rules[0].scheme
    assert scheme.algorithm == "gptq" and scheme.params == {"damp": 0.1, "act_order": True}
    assert recipe.name == "8da4w,algorithm=gptq,damp=0.1,act_order=True"
    assert Recipe.from_json(recipe.to_json()) == recipe  # parameters round-trip
    message = "gptq parameter damp 'high' is not allowed; allowed: a float"
    with pytest.raises(ValueError, match=message):
        recipes.get("8da4w", algorithm="gptq", damp="high")


@pytest.mark.parametrize(
    ("name", "overrides", "msg"),
    [
        (
            "8da4w",
            dict(group_size=33),
            "preset '8da4w': Scheme: group_size 33 is not allowed; "
            "allowed: a positive even integer",
        ),
        (
            "8da4w",
            dict(weight="fp16", algorithm="minmax"),
            "preset '8da4w': Scheme: a fp16 weight computes in float; activation 'int8_dynamic' "
            "needs an integer weight (e.g. weight='int8')",
        ),
        (
            "int4-weight-only",
            dict(granularity="per_channel"),
            "preset 'int4-weight-only': Scheme: group_size 32 is only meaningful with granularity "
            "'per_group', not 'per_channel'",
        ),
    ],
)
def test_invalid_override_value(name, overrides, msg):
    with pytest.raises(ValueError) as info:
        recipes.get(name, **overrides)
    assert str(info.value) == msg


def test_unknown_preset():
    msg = (
        "unknown preset 'int3'; "
        "presets: fp16, int8-weight-only, int8-dynamic, 8da4w, int4-weight-only, int8-static"
    )
    with pytest.raises(ValueError) as info:
        recipes.get("int3")
    assert str(info.value) == msg
    with pytest.raises(ValueError) as info:
        recipes.describe("int3")
    assert str(info.value) == msg
