"""quantize / plan on the real stories260K model: quality floors, plan contents, ties, errors."""

from __future__ import annotations

import copy
import logging
import re

import pytest
import torch
import torch.nn as nn

import edgequant
from edgequant.layers import QuantizedEmbedding, QuantizedLinear
from edgequant.primitives import sqnr
from edgequant.recipe import Recipe, Rule
from edgequant.schemes import Scheme

STORIES_8DA4W = "examples/stories260k-8da4w.yaml"

# Logits SQNR against float on 256 tokens of a TinyStories-like passage. The floors sit just
# under what was measured here; the minimums are
# fp16 60, int8-weight-only 35, int8-dynamic 25, 8da4w 12.
FLOORS = {
    "fp16": 71.5,  # measured 72.08
    "int8-weight-only": 40.5,  # 41.57 (narrow-range int8; 40.96 with [-128, 127])
    "int8-dynamic": 38.0,  # 38.64 (38.41)
    STORIES_8DA4W: 17.0,  # 17.44
    "int4-weight-only": 17.0,  # 17.49
}


def _recipe(name):
    if name == "int4-weight-only":  # w2 has 172 inputs: group 86 where 32 cannot divide
        base = edgequant.recipes.get(name)
        w2 = Scheme("int4", "per_group", 86, scale_dtype="fp16")
        return Recipe(base.rules + (Rule(w2, module=r"re:layers\.\d+\.feed_forward\.w2"),))
    return name


@pytest.mark.parametrize("name", list(FLOORS))
def test_every_preset_keeps_logits_close_to_float(name, fresh_stories260k, story_ids):
    model, _ = fresh_stories260k()
    with torch.no_grad():
        reference = model(story_ids)
    model, plan = edgequant.quantize(model, _recipe(name))
    assert all(lp.scheme is not None for lp in plan), "the whole model is quantized"
    quantized = sum(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in model.modules())
    assert quantized == len(plan) == 37  # 1 embedding + 5 x 7 linears + lm_head
    with torch.no_grad():
        logits = model(story_ids)
    assert sqnr(reference, logits) >= FLOORS[name]


def test_plan_changes_nothing_and_reports_bytes(stories260k):
    model, _ = stories260k
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = edgequant.plan(model, "int8-weight-only")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    wq = plan["layers.0.attention.wq"]
    assert (wq.role, wq.layer, wq.shape, wq.kind, wq.rule) == (
        "attention",
        0,
        (64, 64),
        "linear",
        0,
    )
    assert (wq.bytes_before, wq.bytes_after) == (64 * 64 * 4, 64 * 64 + 64 * 4)
    # tied embedding / lm_head: one tensor before, one packed storage after
    assert plan["output"].tied_to == "tok_embeddings"
    n_params = sum(lp.shape[0] * lp.shape[1] for lp in plan if lp.tied_to is None)
    assert plan.bytes_before == n_params * 4
    assert plan.bytes_after == sum(lp.bytes_after for lp in plan if lp.tied_to is None)
    assert "weights: 0.989 MiB -> 0.261 MiB (3.79x smaller)" in plan.table()


def test_tied_embedding_is_quantized_once_and_shared(fresh_stories260k):
    model, _ = fresh_stories260k()
    model, plan = edgequant.quantize(model, "int8-dynamic")
    emb, head = model.tok_embeddings, model.output
    assert isinstance(emb, QuantizedEmbedding) and isinstance(head, QuantizedLinear)
    assert head.qweight is emb.qweight and head.scale is emb.scale
    assert head.scheme.activation == "int8_dynamic"


def test_tied_modules_with_different_schemes_are_stored_apart(fresh_stories260k, caplog):
    model, _ = fresh_stories260k()
    float_embedding = model.tok_embeddings.weight.detach().clone()
    recipe = Recipe((Rule(Scheme("int8"), role="default"), Rule(None, role="embedding")))
    with caplog.at_level(logging.WARNING):
        model, plan = edgequant.quantize(model, recipe)
    assert (
        "tok_embeddings and output share one weight but the recipe gives them different schemes"
        in caplog.text
    )
    assert isinstance(model.tok_embeddings, nn.Embedding)
    assert torch.equal(model.tok_embeddings.weight, float_embedding)
    assert isinstance(model.output, QuantizedLinear) and plan["output"].tied_to is None
    assert plan.bytes_after == plan["tok_embeddings"].bytes_after + sum(
        lp.bytes_after for lp in plan if lp.fqn != "tok_embeddings"
    )


@pytest.mark.parametrize("lm_head", [None, Scheme("fp32")])
def test_tied_modules_both_kept_float_stay_shared_without_warning(stories260k, caplog, lm_head):
    model, _ = stories260k
    recipe = Recipe(
        (
            Rule(Scheme("int8"), role="default"),
            Rule(None, role="embedding"),
            Rule(lm_head, role="lm_head"),
        )
    )
    with caplog.at_level(logging.WARNING):
        plan = edgequant.plan(model, recipe)
    assert "share one weight" not in caplog.text
    float_bytes = 512 * 64 * 4  # the tied float tensor, counted once
    quantized = sum(lp.bytes_after for lp in plan if lp.role not in ("embedding", "lm_head"))
    assert plan.bytes_after == float_bytes + quantized


def test_seed_generative_recipe_gives_exactly_its_schemes(fresh_stories260k):
    from edgequant.generative import GenerativeQuantRecipe, QuantConfig
    from edgequant.generative.quant_recipe_utils import (
        create_layer_quant_fp16,
        create_layer_quant_int8_dynamic,
        create_layer_quant_int8_weight_only,
    )

    config = QuantConfig(
        generative_recipe=GenerativeQuantRecipe(
            default=create_layer_quant_fp16(),
            embedding=create_layer_quant_int8_dynamic(),
            attention=create_layer_quant_int8_weight_only(),
            feedforward=create_layer_quant_int8_dynamic(),
        )
    )
    model, _ = fresh_stories260k()
    model, plan = edgequant.quantize(model, config)
    expected = {
        "embedding": Scheme("int8", activation="int8_dynamic"),
        "attention": Scheme("int8"),
        "feedforward": Scheme("int8", activation="int8_dynamic"),
        "lm_head": Scheme("fp16"),  # no lm_head field: the default applies
    }
    for lp in plan:
        assert lp.scheme == expected[lp.role], lp.fqn
        assert model.get_submodule(lp.fqn).scheme == expected[lp.role]
    # the tied lm_head follows its own rule (fp16), so it is stored apart from the embedding
    assert plan["output"].tied_to is None


def test_layer_indices_and_regex_rules(fresh_stories260k):
    model, _ = fresh_stories260k()
    recipe = Recipe(
        (
            Rule(Scheme("int8"), role="default"),
            Rule(None, role="attention", layers=(0, 4)),
            Rule(Scheme("fp16"), module=r"re:layers\.4\.attention\.w[qk]"),
            Rule(Scheme("int8", activation="int8_dynamic"), module="layers.4.attention.wq"),
        )
    )
    plan = edgequant.plan(model, recipe)
    assert plan["layers.0.attention.wv"].scheme is None
    assert plan["layers.1.attention.wv"].scheme == Scheme("int8")
    assert plan["layers.4.attention.wk"].scheme == Scheme("fp16")
    assert plan["layers.4.attention.wq"].scheme.activation == "int8_dynamic"
    assert plan["layers.4.attention.wq"].rule == 3


def test_group_size_that_does_not_divide_names_rule_layer_and_sizes(stories260k):
    model, _ = stories260k
    with pytest.raises(
        ValueError,
        match=re.escape(
            "rules[0] (role=default): layers.0.feed_forward.w2, layers.1.feed_forward.w2, "
            "layers.2.feed_forward.w2, layers.3.feed_forward.w2 and 1 more: group_size 32 does "
            "not divide its 172 input features; group sizes that fit: [86, 172]"
        ),
    ):
        edgequant.plan(model, "8da4w")
    recipe = Recipe((Rule(Scheme("int4", "per_group", 48), role="attention"),))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "rules[0] (role=attention): layers.0.attention.wq, layers.0.attention.wk, "
            "layers.0.attention.wv, layers.0.attention.wo and 16 more: group_size 48 does not "
            "divide its 64 input features; group sizes that fit: [8, 16, 32, 64]"
        ),
    ):
        edgequant.plan(model, recipe)


def test_regex_matching_nothing_warns_with_close_names(stories260k, caplog):
    model, _ = stories260k
    recipe = Recipe((Rule(Scheme("int8"), module=r"re:layers\.0\.attention\.q_proj"),))
    with caplog.at_level(logging.WARNING):
        edgequant.plan(model, recipe)
    assert (
        "rules[0] (module=re:layers\\.0\\.attention\\.q_proj) matches no module; "
        "did you mean one of: " in caplog.text
    )
    assert "layers.0.attention.wq" in caplog.text


def test_rule_aimed_at_a_norm_is_refused(stories260k):
    model, _ = stories260k
    recipe = Recipe((Rule(Scheme("int8"), module=r"re:layers\.0\..*norm"),))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "rules[0] (module=re:layers\\.0\\..*norm) targets layers.0.attention_norm (RMSNorm), "
            "layers.0.ffn_norm (RMSNorm): edgequant quantizes nn.Linear, nn.Embedding and Conv1D "
            "modules only"
        ),
    ):
        edgequant.plan(model, recipe)


def test_nan_weight_is_named(fresh_stories260k):
    model, _ = fresh_stories260k()
    with torch.no_grad():
        model.layers[2].feed_forward.w3.weight[0, 0] = float("nan")
    with pytest.raises(
        ValueError,
        match=re.escape(
            "the model has NaN/Inf values in layers.2.feed_forward.w3.weight (1 of 11008); "
        ),
    ):
        edgequant.quantize(model, "int8-dynamic")


def test_nan_outside_the_quantized_modules_is_refused_before_quantizing(fresh_stories260k):
    # a norm is not quantized, but every logit computed through it is NaN
    model, _ = fresh_stories260k()
    with torch.no_grad():
        model.norm.weight[3] = float("inf")
        model.layers[0].attention_norm.weight[:2] = float("nan")
    with pytest.raises(
        ValueError,
        match=re.escape(
            "NaN/Inf values in layers.0.attention_norm.weight (2 of 64), norm.weight (1 of 64);"
        ),
    ):
        edgequant.quantize(model, "int8-dynamic")
    assert type(model.layers[0].attention.wq).__name__ == "Linear"  # nothing was swapped


def test_quantizing_twice_is_refused(fresh_stories260k):
    model, _ = fresh_stories260k()
    edgequant.quantize(model, "fp16")
    with pytest.raises(ValueError, match="the model is already quantized"):
        edgequant.quantize(model, "fp16")


def test_static_activations_are_refused_for_now(stories260k):
    model, _ = stories260k
    recipe = Recipe((Rule(Scheme("int8", activation="int8_static"), role="feedforward"),))
    with pytest.raises(
        NotImplementedError, match="activation 'int8_static', which needs calibrated"
    ):
        edgequant.plan(model, recipe)


def test_recipe_arguments(stories260k, tmp_path):
    model, _ = stories260k
    path = tmp_path / "r.yaml"
    edgequant.recipes.get("int8-dynamic").save(path)
    assert edgequant.plan(model, str(path))["output"].scheme.activation == "int8_dynamic"
    with pytest.raises(ValueError, match="recipe 'int9' is neither a preset"):
        edgequant.plan(model, "int9")
    with pytest.raises(TypeError, match="recipe must be a Recipe"):
        edgequant.plan(model, 42)


def test_algorithms_through_quantize_beat_minmax_on_stories260k(stories260k):
    """The 8da4w recipe (g86 on w2) with each algorithm, 4 windows of 256 tokens of WikiText-2:
    KL against float (measured: minmax 0.376, mse 0.301, hqq 0.309, awq 0.267, smoothquant
    0.315, gptq 0.212; the calibrated ones on 32 x 256 calibration tokens). mse and hqq weigh
    each error by the weight's size by default (``magnitude`` 1), which SmolLM2 rewards and this
    toy model does not: with ``magnitude`` 0 they measured 0.270 and 0.267 here."""
    from edgequant import calibration
    from edgequant import eval as ev
    from edgequant.job import with_algorithm

    model, tok = stories260k
    w = ev.windows(ev.tokenize_file(tok, ev.default_text()), 256, 4)
    ref = ev.float_logits(model, w)
    base = Recipe.load(STORIES_8DA4W)
    cal = calibration.wikitext(tok, 32, 256)
    kl = {}
    for name in ("minmax", "mse", "hqq", "awq", "smoothquant", "gptq"):
        recipe = with_algorithm(base, name)
        calibrated = name in ("awq", "smoothquant", "gptq")
        q, _ = edgequant.quantize(
            copy.deepcopy(model), recipe, calibration=cal if calibrated else None
        )
        kl[name] = ev.compare(ref, ev.float_logits(q, w), w)["kl_divergence"]
        if calibrated:
            assert q.edgequant_calibration == cal.source
            assert q.layers[0].attention.wq.scheme.algorithm == name
    for name in ("mse", "hqq"):
        assert kl[name] < 0.85 * kl["minmax"], kl
    assert kl["awq"] < 0.75 * kl["minmax"], kl
    assert kl["smoothquant"] < kl["minmax"], kl
    assert kl["gptq"] < 0.6 * kl["minmax"], kl


def test_gptq_without_calibration_names_the_layers_and_a_source(stories260k):
    model, _ = stories260k
    recipe = edgequant.recipes.get("int8-dynamic", algorithm="gptq")
    with pytest.raises(ValueError, match=r"gptq \(layers.0.attention.wq, layers.0.attention.wk, "):
        edgequant.quantize(copy.deepcopy(model), recipe)
    with pytest.raises(ValueError, match="--calibration wikitext:128x512"):
        edgequant.quantize(copy.deepcopy(model), recipe)
    # a lookup table has no inputs to calibrate on: gptq there is mse, and needs no data
    only_embedding = Recipe((Rule(Scheme("int8", algorithm="gptq"), role="embedding"),))
    q, _ = edgequant.quantize(copy.deepcopy(model), only_embedding)
    assert q.tok_embeddings.scheme.algorithm == "gptq"
