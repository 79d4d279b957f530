"""`Scheme`: valid constructions, refusals naming field / value / allowed values, derived numbers,
file form, human labels."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from edgequant.schemes import ACTIVATIONS, INT_DTYPES, WEIGHT_DTYPES, Scheme

FIELDS = [
    "weight",
    "granularity",
    "group_size",
    "symmetric",
    "scale_dtype",
    "activation",
    "activation_symmetric",
    "algorithm",
    "algorithm_params",
]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(weight="int8"),
        dict(weight="int4", granularity="per_group", group_size=32, scale_dtype="fp16"),
        dict(weight="int2", granularity="per_group", group_size=2, scale_dtype="bf16"),
        dict(weight="int8", granularity="per_tensor", symmetric=False),
        dict(weight="int8", activation="int8_dynamic", activation_symmetric=True),
        dict(weight="int8", activation="int8_static"),
        dict(weight="fp16"),
        dict(weight="bf16"),
        dict(weight="fp32"),
    ]
    + [dict(weight=w) for w in INT_DTYPES],
)
def test_valid_schemes_construct_and_keep_their_fields(kwargs):
    scheme = Scheme(**kwargs)
    for key, value in kwargs.items():
        assert getattr(scheme, key) == value
    with pytest.raises(dataclasses.FrozenInstanceError):
        scheme.weight = "int2"


def test_defaults():
    s = Scheme("int8")
    assert (s.granularity, s.group_size, s.symmetric, s.scale_dtype) == (
        "per_channel",
        None,
        True,
        "fp32",
    )
    assert (s.activation, s.activation_symmetric, s.algorithm) == ("none", False, "minmax")
    assert [f.name for f in dataclasses.fields(Scheme)] == FIELDS


def test_derived_facts():
    assert [Scheme(w).bits for w in WEIGHT_DTYPES] == [2, 3, 4, 5, 6, 7, 8, 16, 16, 32,
                                                       2, 3, 4, 5, 6]  # fmt: skip
    assert [Scheme(w).is_integer for w in WEIGHT_DTYPES] == [True] * 7 + [False] * 8
    assert [Scheme(w).is_kquant for w in WEIGHT_DTYPES] == [False] * 10 + [True] * 5
    assert Scheme("int4", "per_group", 32, scale_dtype="bf16").torch_scale_dtype == torch.bfloat16
    assert Scheme("int8").torch_scale_dtype == torch.float32


WEIGHTS = (
    "['int2', 'int3', 'int4', 'int5', 'int6', 'int7', 'int8', 'fp16', 'bf16', 'fp32', 'q2_k', "
    "'q3_k', 'q4_k', 'q5_k', 'q6_k']"
)


INVALID = [
    (dict(weight="int9"), f"Scheme: weight 'int9' is not allowed; allowed: {WEIGHTS}"),
    (dict(weight="INT8"), f"Scheme: weight 'INT8' is not allowed; allowed: {WEIGHTS}"),
    (
        dict(weight="int8", activation="dyn"),
        "Scheme: activation 'dyn' is not allowed; allowed: ['none', 'int8_dynamic', 'int8_static']",
    ),
    (
        dict(weight="int8", granularity="per_row"),
        "Scheme: granularity 'per_row' is not allowed; "
        "allowed: ['per_tensor', 'per_channel', 'per_group']",
    ),
    (
        dict(weight="int8", scale_dtype="fp8"),
        "Scheme: scale_dtype 'fp8' is not allowed; allowed: ['fp32', 'fp16', 'bf16']",
    ),
    (
        dict(weight="int4", granularity="per_group", group_size=0),
        "Scheme: group_size 0 is not allowed; allowed: a positive even integer",
    ),
    (
        dict(weight="int4", granularity="per_group", group_size=-32),
        "Scheme: group_size -32 is not allowed; allowed: a positive even integer",
    ),
    (
        dict(weight="int4", granularity="per_group", group_size=33),
        "Scheme: group_size 33 is not allowed; allowed: a positive even integer",
    ),
    (
        dict(weight="int4", granularity="per_group", group_size=32.0),
        "Scheme: group_size 32.0 is not allowed; allowed: a positive integer",
    ),
    (
        dict(weight="int4", granularity="per_group", group_size=True),
        "Scheme: group_size True is not allowed; allowed: a positive integer",
    ),
    (
        dict(weight="int4", granularity="per_group"),
        "Scheme: granularity 'per_group' needs a group_size (e.g. 32)",
    ),
    (
        dict(weight="int8", granularity="per_channel", group_size=32),
        "Scheme: group_size 32 is only meaningful with granularity 'per_group', not 'per_channel'",
    ),
    (
        dict(weight="int8", granularity="per_tensor", group_size=32),
        "Scheme: group_size 32 is only meaningful with granularity 'per_group', not 'per_tensor'",
    ),
    (
        dict(weight="fp16", activation="int8_dynamic"),
        "Scheme: a fp16 weight computes in float; activation 'int8_dynamic' needs an "
        "integer weight (e.g. weight='int8')",
    ),
    (
        dict(weight="int8", algorithm="gptx"),
        "Scheme: algorithm 'gptx' is not allowed; allowed: ['minmax', 'mse', 'hqq', 'gptq', "
        "'awq', 'smoothquant', 'imatrix']",
    ),
    (
        dict(weight="int8", granularity="per_tensor", algorithm="mse"),
        "Scheme: algorithm 'mse' works per channel or per group, not per_tensor",
    ),
    (
        dict(weight="int8", algorithm="gptq", algorithm_params={"dampen": 0.1}),
        "Scheme: algorithm 'gptq' takes no parameter 'dampen'; it takes ['act_order', 'block', "
        "'damp', 'gptaq', 'gptaq_head', 'gptaq_residual', 'magnitude', 'scales', 'sequential']",
    ),
    (
        dict(weight="int8", symmetric="yes"),
        "Scheme: symmetric 'yes' is not allowed; allowed: [True, False]",
    ),
    (
        dict(weight="int8", activation_symmetric=1),
        "Scheme: activation_symmetric 1 is not allowed; allowed: [True, False]",
    ),
]


def _kwargs_id(kwargs: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in kwargs.items())


@pytest.mark.parametrize(("kwargs", "msg"), INVALID, ids=[_kwargs_id(kw) for kw, _ in INVALID])
def test_invalid_field_refused_with_field_value_and_allowed(kwargs, msg):
    with pytest.raises(ValueError) as info:
        Scheme(**kwargs)
    assert str(info.value) == msg


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        (
            dict(weight="fp16", granularity="per_row"),
            "Scheme: granularity 'per_row' is not allowed; "
            "allowed: ['per_tensor', 'per_channel', 'per_group']",
        ),
        (
            dict(weight="fp32", scale_dtype="fp8"),
            "Scheme: scale_dtype 'fp8' is not allowed; allowed: ['fp32', 'fp16', 'bf16']",
        ),
    ],
    ids=["weight=fp16,granularity=per_row", "weight=fp32,scale_dtype=fp8"],
)
def test_invalid_field_refused_for_float_weights_too(kwargs, msg):
    # a value that is allowed for no weight dtype must not be stored silently
    with pytest.raises(ValueError, match=re.escape(msg)):
        Scheme(**kwargs)


def test_activation_modes_are_exactly():
    assert ACTIVATIONS == ("none", "int8_dynamic", "int8_static")


@pytest.mark.parametrize(
    ("scheme", "cols", "expected"),
    [
        (Scheme("int4", "per_group", 32, scale_dtype="fp16"), 4096, 4.5),
        (Scheme("int4", "per_group", 32, scale_dtype="fp16"), 64, 4.5),
        (Scheme("int4", "per_group", 32), 4096, 4 + 32 / 32),
        (Scheme("int4", "per_group", 32, scale_dtype="bf16"), 4096, 4.5),
        (Scheme("int8"), 4096, 8 + 32 / 4096),
        (Scheme("int8", scale_dtype="fp16"), 4096, 8 + 16 / 4096),
        # asymmetric: one int8 zero point per group on top of the scale
        (Scheme("int4", "per_group", 32, symmetric=False, scale_dtype="fp16"), 4096, 4.75),
        (Scheme("int8", symmetric=False), 4096, 8 + 40 / 4096),
        (Scheme("int2", "per_group", 64, symmetric=False), 128, 2 + 40 / 64),
        (Scheme("int8", "per_tensor"), 4096, 8 + 32 / (16 * 4096)),
        # int3 and int5..int7 are stored one per byte
        (Scheme("int3", "per_group", 32), 4096, 8 + 32 / 32),
        (Scheme("int6", scale_dtype="fp16"), 4096, 8 + 16 / 4096),
        (Scheme("fp16"), 4096, 16.0),
        (Scheme("bf16"), 4096, 16.0),
        (Scheme("fp32"), 4096, 32.0),
    ],
)
def test_bits_per_weight(scheme, cols, expected):
    assert scheme.bits_per_weight(16, cols) == expected
    assert isinstance(scheme.bits_per_weight(16, cols), float)


ALL_FIELDS = Scheme(
    "int4",
    "per_group",
    64,
    symmetric=False,
    scale_dtype="bf16",
    activation="int8_dynamic",
    activation_symmetric=True,
)


def test_to_dict_has_every_field():
    assert ALL_FIELDS.to_dict() == {
        "weight": "int4",
        "granularity": "per_group",
        "group_size": 64,
        "symmetric": False,
        "scale_dtype": "bf16",
        "activation": "int8_dynamic",
        "activation_symmetric": True,
        "algorithm": "minmax",
        "algorithm_params": {},
    }


@pytest.mark.parametrize(
    "scheme",
    [ALL_FIELDS, Scheme("int8"), Scheme("fp16"), Scheme("int8", "per_tensor", symmetric=False)],
)
def test_dict_round_trip(scheme):
    assert Scheme.from_dict(scheme.to_dict()) == scheme
    assert Scheme.from_dict({"weight": scheme.weight, **scheme.to_dict()}) == scheme


def test_from_dict_fills_defaults():
    assert Scheme.from_dict({"weight": "int8"}) == Scheme("int8")


def test_from_dict_unknown_key_names_it_and_lists_allowed():
    msg = f"scheme: unknown key(s) ['groupsize']; allowed: {FIELDS}"
    with pytest.raises(ValueError) as info:
        Scheme.from_dict({"weight": "int4", "groupsize": 32})
    assert str(info.value) == msg
    with pytest.raises(ValueError) as info:
        Scheme.from_dict({"weight": "int4", "zeta": 1, "bits": 4}, where="rules[2].scheme")
    assert str(info.value) == f"rules[2].scheme: unknown key(s) ['bits', 'zeta']; allowed: {FIELDS}"


def test_from_dict_other_errors_name_where():
    with pytest.raises(ValueError) as info:
        Scheme.from_dict({"granularity": "per_channel"}, where="x")
    assert str(info.value) == f"x: missing 'weight' (one of {WEIGHTS})"
    with pytest.raises(ValueError) as info:
        Scheme.from_dict({"weight": "int9"}, where="x")
    assert str(info.value) == f"x: Scheme: weight 'int9' is not allowed; allowed: {WEIGHTS}"
    with pytest.raises(TypeError) as info:
        Scheme.from_dict("int8", where="x")
    assert str(info.value) == "x: expected a mapping of scheme fields, got 'int8'"


@pytest.mark.parametrize(
    ("scheme", "text"),
    [
        (Scheme("int8"), "int8 per-channel sym"),
        (Scheme("int8", activation="int8_dynamic"), "int8 per-channel sym, act int8 dynamic asym"),
        (
            Scheme("int4", "per_group", 32, scale_dtype="fp16", activation="int8_dynamic"),
            "int4 g32 sym fp16-scales, act int8 dynamic asym",
        ),
        (Scheme("int4", "per_group", 128, scale_dtype="fp16"), "int4 g128 sym fp16-scales"),
        (Scheme("int8", "per_tensor", symmetric=False), "int8 per-tensor asym"),
        (
            Scheme("int8", activation="int8_static", activation_symmetric=True),
            "int8 per-channel sym, act int8 static sym",
        ),
        (ALL_FIELDS, "int4 g64 asym bf16-scales, act int8 dynamic sym"),
        (Scheme("fp16"), "fp16"),
        (Scheme("bf16"), "bf16"),
        (Scheme("fp32"), "fp32"),
    ],
)
def test_describe(scheme, text):
    assert scheme.describe() == text


@pytest.mark.parametrize(
    ("algorithm", "name", "value", "allowed"),
    [
        ("mse", "steps", 0, "an integer in [1, 4096]"),
        ("mse", "steps", 10**9, "an integer in [1, 4096]"),
        ("mse", "min_ratio", float("nan"), "a number in (0.0, 1.0]"),
        ("mse", "min_ratio", 0.0, "a number in (0.0, 1.0]"),
        ("mse", "magnitude", -1.0, "a number in [0.0, 8.0]"),
        ("hqq", "iters", -3, "an integer in [0, 1000]"),
        ("hqq", "p", float("inf"), "a number in (0.0, 2.0]"),
        ("hqq", "start", "zeros", "one of ['mse', 'minmax']"),
        ("gptq", "damp", -0.01, "a number in (0.0, 10.0]"),
        ("gptq", "scales", "max", "one of ['mse', 'minmax']"),
        ("gptq", "gptaq", 1.5, "a number in [0.0, 1.0]"),
        ("awq", "gptaq", -0.25, "a number in [0.0, 1.0]"),
        ("gptq", "gptaq_residual", 2.0, "a number in [0.0, 1.0]"),
        ("gptq", "gptaq_head", -1.0, "a number in [0.0, 1.0]"),
        ("awq", "tokens", 0, "an integer in [1, 1000000]"),
        ("smoothquant", "alpha", 1.5, "a number in [0.0, 1.0]"),
    ],
)
def test_algorithm_parameters_out_of_range_are_refused(algorithm, name, value, allowed):
    activation = "int8_dynamic" if algorithm == "smoothquant" else "none"
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"Scheme: {algorithm} parameter {name} {value!r} is not allowed; allowed: {allowed}"
        ),
    ):
        Scheme("int8", activation=activation, algorithm=algorithm, algorithm_params={name: value})


def test_algorithm_parameters_at_their_bounds_are_accepted():
    Scheme("int8", algorithm="mse", algorithm_params={"steps": 1, "min_ratio": 1.0})
    Scheme("int8", algorithm="hqq", algorithm_params={"iters": 0, "magnitude": 8})
    Scheme("int8", activation="int8_dynamic", algorithm="smoothquant",
           algorithm_params={"alpha": 0.0})  # fmt: skip


@pytest.mark.parametrize("name", ["gptaq_residual", "gptaq_head"])
def test_gptaq_residual_and_head_need_gptaq(name):
    with pytest.raises(ValueError) as e:
        Scheme("int4", "per_group", 32, algorithm="gptq", algorithm_params={name: 0.5})
    assert str(e.value) == (
        f"Scheme: gptq parameter {name} works with GPTAQ's float twin: it needs gptaq > 0"
    )
    scheme = Scheme("int4", "per_group", 32, algorithm="gptq",
                    algorithm_params={"gptaq": 0.25, name: 0.5})  # fmt: skip
    assert scheme.params == {"gptaq": 0.25, name: 0.5}


def test_awq_takes_gptaq_only_with_its_gptq_rounding():
    with pytest.raises(ValueError) as e:
        Scheme("int4", "per_group", 32, algorithm="awq", algorithm_params={"gptaq": 0.25})
    assert str(e.value) == (
        "Scheme: awq parameter gptaq applies to the GPTQ rounding after AWQ's scales: it needs "
        "gptq: true"
    )
    scheme = Scheme("int4", "per_group", 32, algorithm="awq",
                    algorithm_params={"gptaq": 0.25, "gptq": True})  # fmt: skip
    assert scheme.params == {"gptaq": 0.25, "gptq": True}


@pytest.mark.parametrize(
    ("text", "name", "params"),
    [
        ("gptq", "gptq", {}),
        ("gptq@gptaq=0.25@sequential", "gptq", {"gptaq": 0.25, "sequential": True}),
        ("gptq@scales=minmax@act_order=false", "gptq", {"scales": "minmax", "act_order": False}),
        ("awq@gptq@grid=10", "awq", {"gptq": True, "grid": 10}),
    ],
)
def test_an_algorithm_and_its_parameters_are_read_from_one_word(text, name, params):
    from edgequant.schemes import parse_algorithm

    assert parse_algorithm(text) == (name, params)
    got = Scheme("int4", "per_group", 32).rounded_by(name, **params)
    assert got.algorithm == name and got.params == params
