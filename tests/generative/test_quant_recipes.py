"""AI Edge front door: every ``full_*`` / ``create_layer_quant_*`` maps to the expected `Scheme`;
`GenerativeQuantRecipe` -> ordered rules; refusals name the field."""

from __future__ import annotations

import re

import pytest

from edgequant.generative import GenerativeQuantRecipe, LayerQuantRecipe, QuantConfig, quant_recipes
from edgequant.generative import quant_recipe_utils as utils
from edgequant.generative.quant_attrs import Algorithm, Dtype, Granularity, Mode
from edgequant.recipe import Recipe, Rule
from edgequant.schemes import Scheme

INT8_DYNAMIC = Scheme("int8", "per_channel", activation="int8_dynamic")
INT8_WEIGHT_ONLY = Scheme("int8", "per_channel")
FP16 = Scheme("fp16")


def int4_block(block: int, dynamic: bool) -> Scheme:
    activation = "int8_dynamic" if dynamic else "none"
    return Scheme("int4", "per_group", block, scale_dtype="fp16", activation=activation)


# (function, args, scheme of its one default rule)
FULL = [
    (quant_recipes.full_int8_dynamic_recipe, (), INT8_DYNAMIC),
    (quant_recipes.full_int8_weight_only_recipe, (), INT8_WEIGHT_ONLY),
    (quant_recipes.full_fp16_recipe, (), FP16),
    (quant_recipes.full_int4_dynamic_block_recipe, (), int4_block(32, dynamic=True)),
    (quant_recipes.full_int4_dynamic_block_recipe, (128,), int4_block(128, dynamic=True)),
    (quant_recipes.full_int4_weight_only_recipe, (), int4_block(32, dynamic=False)),
    (quant_recipes.full_int4_weight_only_recipe, (64,), int4_block(64, dynamic=False)),
    (quant_recipes.full_dynamic_recipe, (), INT8_DYNAMIC),
    (
        quant_recipes.full_dynamic_recipe,
        (None, Dtype.INT4, Granularity.BLOCKWISE_64),
        int4_block(64, dynamic=True),
    ),
    (
        quant_recipes.full_dynamic_recipe,
        (None, Dtype.INT4, Granularity.BLOCKWISE, 16),
        int4_block(16, dynamic=True),
    ),
    (
        quant_recipes.full_dynamic_recipe,
        (None, Dtype.INT8, Granularity.BLOCKWISE_256),
        Scheme("int8", "per_group", 256, scale_dtype="fp16", activation="int8_dynamic"),
    ),
    (quant_recipes.full_weight_only_recipe, (), INT8_WEIGHT_ONLY),
    (
        quant_recipes.full_weight_only_recipe,
        (None, Dtype.INT4, Granularity.BLOCKWISE_128),
        int4_block(128, dynamic=False),
    ),
    (
        quant_recipes.full_weight_only_recipe,
        (None, Dtype.INT4, Granularity.BLOCKWISE_32),
        int4_block(32, dynamic=False),
    ),
    (
        quant_recipes.full_weight_only_recipe,
        (None, Dtype.INT4, Granularity.CHANNELWISE),
        Scheme("int4", "per_channel"),
    ),
    (quant_recipes.full_weight_only_recipe, (None, Dtype.FP32), None),
]

# (function, args, scheme)
LAYER = [
    (utils.create_layer_quant_int8_dynamic, (), INT8_DYNAMIC),
    (utils.create_layer_quant_int8_weight_only, (), INT8_WEIGHT_ONLY),
    (utils.create_layer_quant_fp16, (), FP16),
    (utils.create_layer_quant_int4_dynamic_block, (), int4_block(32, dynamic=True)),
    (utils.create_layer_quant_int4_dynamic_block, (256,), int4_block(256, dynamic=True)),
    (utils.create_layer_quant_int4_weight_only_block, (), int4_block(32, dynamic=False)),
    (utils.create_layer_quant_int4_weight_only_block, (8,), int4_block(8, dynamic=False)),
    (utils.create_layer_quant_dynamic, (), INT8_DYNAMIC),
    (
        utils.create_layer_quant_dynamic,
        (Dtype.INT4, Granularity.BLOCKWISE_128),
        int4_block(128, dynamic=True),
    ),
    (utils.create_layer_quant_weight_only, (), INT8_WEIGHT_ONLY),
    (
        utils.create_layer_quant_weight_only,
        (Dtype.INT8, Granularity.BLOCKWISE, 64),
        Scheme("int8", "per_group", 64, scale_dtype="fp16"),
    ),
]


def _id(case) -> str:
    fn, args, _ = case
    return fn.__name__ + "".join(f"-{getattr(a, 'name', a)}" for a in args)


def test_tables_cover_every_public_builder():
    full = {n for n in dir(quant_recipes) if n.startswith("full_")}
    layer = {n for n in dir(utils) if n.startswith("create_layer_quant_")}
    assert {fn.__name__ for fn, _, _ in FULL} == full
    assert {fn.__name__ for fn, _, _ in LAYER} == layer


@pytest.mark.parametrize(("fn", "args", "scheme"), FULL, ids=[_id(c) for c in FULL])
def test_full_recipe_is_one_default_rule(fn, args, scheme):
    config = fn(*args)
    assert isinstance(config, QuantConfig)
    recipe = config.to_recipe()
    assert recipe == Recipe((Rule(scheme, role="default"),), name="generative")
    assert recipe.resolve("layers.0.attention.wq", "attention", 0) == (scheme, 0)


@pytest.mark.parametrize(("fn", "args", "scheme"), LAYER, ids=[_id(c) for c in LAYER])
def test_layer_recipe_to_scheme(fn, args, scheme):
    layer = fn(*args)
    assert isinstance(layer, LayerQuantRecipe)
    assert layer.activation_dtype is Dtype.FP32
    assert layer.to_scheme() == scheme


def test_layer_recipe_fields():
    assert utils.create_layer_quant_int4_dynamic_block(64) == LayerQuantRecipe(
        Dtype.FP32, Dtype.INT4, Mode.DYNAMIC_RANGE, Algorithm.MIN_MAX, Granularity.BLOCKWISE, 64
    )
    assert utils.create_layer_quant_fp16() == LayerQuantRecipe(
        Dtype.FP32, Dtype.FP16, Mode.WEIGHT_ONLY, Algorithm.FLOAT_CAST, Granularity.NONE, 0
    )


def test_fp32_weight_is_float():
    fp32 = LayerQuantRecipe(
        Dtype.FP32, Dtype.FP32, Mode.WEIGHT_ONLY, Algorithm.FLOAT_CAST, Granularity.NONE
    )
    assert fp32.to_scheme() is None
    recipe = GenerativeQuantRecipe(default=utils.create_layer_quant_fp16(), lm_head=fp32)
    rules = recipe.to_recipe().rules
    assert rules[1] == Rule(None, role="lm_head")
    assert recipe.to_recipe().resolve("output", "lm_head", None) == (None, 1)


def test_generative_recipe_rules_in_order():
    default = utils.create_layer_quant_int4_dynamic_block(32)
    embedding = utils.create_layer_quant_int8_weight_only()
    attn0 = utils.create_layer_quant_fp16()
    attn2 = utils.create_layer_quant_int8_dynamic()
    feedforward = utils.create_layer_quant_int4_weight_only_block(64)
    lm_head = utils.create_layer_quant_int8_dynamic()
    recipe = GenerativeQuantRecipe(
        default=default,
        embedding=embedding,
        attention={2: attn2, 0: attn0},  # given out of order: rules come sorted by index
        feedforward=feedforward,
        lm_head=lm_head,
    ).to_recipe()
    assert recipe.name == "generative"
    assert [(r.role, r.layers, r.module, r.scheme) for r in recipe.rules] == [
        ("default", None, None, default.to_scheme()),
        ("embedding", None, None, INT8_WEIGHT_ONLY),
        ("attention", (0,), None, FP16),
        ("attention", (2,), None, INT8_DYNAMIC),
        ("feedforward", None, None, int4_block(64, dynamic=False)),
        ("lm_head", None, None, INT8_DYNAMIC),
    ]
    assert [r.kind for r in recipe.rules] == [
        "default",
        "role",
        "role+layers",
        "role+layers",
        "role",
        "role",
    ]
    # attention outside layers 0 and 2 falls back to the default
    assert recipe.resolve("layers.1.attention.wq", "attention", 1) == (default.to_scheme(), 0)
    assert recipe.resolve("layers.2.attention.wq", "attention", 2) == (INT8_DYNAMIC, 3)
    assert recipe.resolve("layers.5.feed_forward.w1", "feedforward", 5)[1] == 4


def test_feedforward_per_layer_overrides_default():
    recipe = GenerativeQuantRecipe(
        default=utils.create_layer_quant_int8_weight_only(),
        feedforward={1: utils.create_layer_quant_fp16()},
    ).to_recipe()
    assert recipe.resolve("layers.1.feed_forward.w2", "feedforward", 1) == (FP16, 1)
    assert recipe.resolve("layers.0.feed_forward.w2", "feedforward", 0) == (INT8_WEIGHT_ONLY, 0)


def test_empty_generative_recipe_has_no_rules():
    assert GenerativeQuantRecipe().to_recipe() == Recipe((), name="generative")


def test_seed_snippet_resolves_to_its_schemes():
    config = QuantConfig(
        generative_recipe=GenerativeQuantRecipe(
            default=utils.create_layer_quant_fp16(),
            embedding=utils.create_layer_quant_int8_dynamic(),
            attention=utils.create_layer_quant_int8_weight_only(),
            feedforward=utils.create_layer_quant_int8_dynamic(),
        )
    )
    recipe = config.to_recipe()
    expected = {
        ("tok_embeddings", "embedding", None): (INT8_DYNAMIC, 1),
        ("layers.3.attention.wq", "attention", 3): (INT8_WEIGHT_ONLY, 2),
        ("layers.3.attention.wo", "attention", 3): (INT8_WEIGHT_ONLY, 2),
        ("layers.3.feed_forward.w1", "feedforward", 3): (INT8_DYNAMIC, 3),
        ("layers.0.feed_forward.w3", "feedforward", 0): (INT8_DYNAMIC, 3),
        ("output", "lm_head", None): (FP16, 0),
    }
    for (fqn, role, layer), want in expected.items():
        assert recipe.resolve(fqn, role, layer) == want, fqn


# ---- refusals --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "error", "msg"),
    [
        (
            lambda: GenerativeQuantRecipe(attention="int8"),
            TypeError,
            "GenerativeQuantRecipe.attention must be a LayerQuantRecipe, got 'int8'",
        ),
        (
            lambda: GenerativeQuantRecipe(default=Scheme("int8")),
            TypeError,
            "GenerativeQuantRecipe.default must be a LayerQuantRecipe, got Scheme(weight='int8'",
        ),
        (
            lambda: GenerativeQuantRecipe(feedforward={0: "int8"}),
            TypeError,
            "GenerativeQuantRecipe.feedforward[0] must be a LayerQuantRecipe, got 'int8'",
        ),
        (
            lambda: GenerativeQuantRecipe(embedding={0: utils.create_layer_quant_fp16()}),
            TypeError,
            "GenerativeQuantRecipe.embedding takes one LayerQuantRecipe",
        ),
        (
            lambda: GenerativeQuantRecipe(attention={-1: utils.create_layer_quant_fp16()}),
            ValueError,
            "attention: layer index -1 must be an int >= 0",
        ),
        (
            lambda: GenerativeQuantRecipe(
                default=utils.create_layer_quant_dynamic(Dtype.INT4, Granularity.BLOCKWISE)
            ),
            ValueError,
            "LayerQuantRecipe: Granularity.BLOCKWISE needs block_size > 0, got 0",
        ),
        (
            lambda: GenerativeQuantRecipe(
                lm_head=utils.create_layer_quant_weight_only(Dtype.INT8, Granularity.NONE)
            ),
            ValueError,
            "LayerQuantRecipe: INT8 weights need granularity CHANNELWISE or BLOCKWISE*, got NONE",
        ),
        (
            lambda: GenerativeQuantRecipe(
                attention={3: utils.create_layer_quant_int4_weight_only_block(33)}
            ),
            ValueError,
            "LayerQuantRecipe: Scheme: group_size 33 is not allowed; "
            "allowed: a positive even integer",
        ),
        (
            lambda: GenerativeQuantRecipe(default=utils.create_layer_quant_weight_only(Dtype.FP16)),
            ValueError,
            "LayerQuantRecipe: FP16 weights need algorithm FLOAT_CAST and mode "
            "WEIGHT_ONLY, got MIN_MAX and WEIGHT_ONLY",
        ),
        (
            lambda: GenerativeQuantRecipe(
                default=LayerQuantRecipe(
                    Dtype.INT8,
                    Dtype.INT8,
                    Mode.DYNAMIC_RANGE,
                    Algorithm.MIN_MAX,
                    Granularity.CHANNELWISE,
                )
            ),
            NotImplementedError,
            "LayerQuantRecipe: activation_dtype INT8 is not supported; edgequant's "
            "generative recipes keep FP32 activations (quantized per token in DYNAMIC_RANGE)",
        ),
        (
            lambda: GenerativeQuantRecipe(
                default=LayerQuantRecipe(
                    Dtype.FP32,
                    Dtype.INT8,
                    Mode.WEIGHT_ONLY,
                    Algorithm.FLOAT_CAST,
                    Granularity.CHANNELWISE,
                )
            ),
            ValueError,
            "LayerQuantRecipe: INT8 weights need algorithm MIN_MAX",
        ),
    ],
    ids=[
        "attention-str",
        "default-scheme",
        "feedforward-index-str",
        "embedding-dict",
        "negative-layer",
        "blockwise-0",
        "int8-granularity-none",
        "odd-block",
        "fp16-min-max",
        "int8-activation",
        "int8-float-cast",
    ],
)
def test_bad_generative_recipe_refused_naming_the_field(make, error, msg):
    # refused when built (LayerQuantRecipe and GenerativeQuantRecipe validate themselves)
    with pytest.raises(error, match=re.escape(msg)):
        QuantConfig(generative_recipe=make()).to_recipe()


def test_blockwise_block_size_0_refused():
    with pytest.raises(ValueError) as info:
        utils.create_layer_quant_dynamic(Dtype.INT4, Granularity.BLOCKWISE, 0)
    assert str(info.value) == "LayerQuantRecipe: Granularity.BLOCKWISE needs block_size > 0, got 0"
    with pytest.raises(ValueError) as info:
        quant_recipes.full_weight_only_recipe(None, Dtype.INT4, Granularity.BLOCKWISE).to_recipe()
    assert str(info.value) == (
        "LayerQuantRecipe: Granularity.BLOCKWISE needs block_size > 0, got 0"
    )


def test_layer_recipe_refuses_non_enum_fields():
    with pytest.raises(TypeError) as info:
        LayerQuantRecipe("FP32", Dtype.INT8, Mode.WEIGHT_ONLY, Algorithm.MIN_MAX, Granularity.NONE)
    assert str(info.value) == (
        "LayerQuantRecipe.activation_dtype must be one of ['Dtype.FP32', 'Dtype.FP16', "
        "'Dtype.INT8', 'Dtype.INT4'], got 'FP32'"
    )
    with pytest.raises(TypeError) as info:
        LayerQuantRecipe(Dtype.FP32, Dtype.INT8, Mode.WEIGHT_ONLY, Algorithm.MIN_MAX, "blockwise")
    assert str(info.value).startswith(
        "LayerQuantRecipe.granularity must be one of ['Granularity.NONE', "
        "'Granularity.CHANNELWISE', 'Granularity.BLOCKWISE', "
    )
    assert str(info.value).endswith("got 'blockwise'")


def test_quant_config_needs_a_recipe():
    msg = "QuantConfig needs generative_recipe=GenerativeQuantRecipe(...), got "
    with pytest.raises(TypeError) as info:
        QuantConfig()
    assert str(info.value) == msg + "None"
    with pytest.raises(TypeError) as info:
        QuantConfig(generative_recipe=quant_recipes.full_fp16_recipe().to_recipe())
    assert str(info.value).startswith(msg + "Recipe(rules=")


def test_first_positional_argument_is_mcfg_as_in_ai_edge():
    with pytest.raises(
        TypeError,
        match=re.escape(
            "full_dynamic_recipe: the first argument is the model config (mcfg), as in AI Edge; "
            "pass weight_dtype=Dtype.INT4 by keyword"
        ),
    ):
        quant_recipes.full_dynamic_recipe(Dtype.INT4)
    config = quant_recipes.full_int8_dynamic_recipe(object())  # an mcfg is accepted and unused
    assert config.to_recipe().rules[0].scheme == INT8_DYNAMIC


def test_layer_recipe_converts_to_a_whole_model_recipe():
    recipe = utils.create_layer_quant_int8_weight_only().to_recipe()
    assert [(r.role, r.layers, r.scheme) for r in recipe.rules] == [
        ("default", None, INT8_WEIGHT_ONLY)
    ]
