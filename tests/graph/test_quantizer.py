"""RecipeQuantizer: the recipe decides every node; setters, composition and backend checks."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, Quantizer

import edgequant
from edgequant import graph
from edgequant.recipe import Recipe, Rule
from edgequant.schemes import Scheme

INT8_STATIC = Scheme("int8", activation="int8_static")
INT8_DYNAMIC = Scheme("int8", activation="int8_dynamic")


def _float_linears(gm) -> set[str]:
    """Linear/conv nodes whose weight is not fed by a dequantize (left float)."""
    out = set()
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (
            torch.ops.aten.linear.default,
            torch.ops.aten.conv2d.default,
        ):
            w = n.args[1]
            if not (w.op == "call_function" and "dequantize" in str(w.target)):
                out.add(n.meta["nn_module_stack"][next(reversed(n.meta["nn_module_stack"]))][0])
    return out


def test_a_regex_rule_leaves_exactly_those_nodes_float(cnn, images):
    x, calibration = images
    recipe = Recipe(
        (Rule(INT8_STATIC, role="default"), Rule(None, module="re:.*classifier.*")),
    )
    q = graph.RecipeQuantizer(recipe)
    converted = graph.quantize(cnn, (x,), quantizer=q, calibration=calibration)
    assert _float_linears(converted) == {"classifier"}
    decided = {d.module: (d.scheme, d.rule) for d in q.decisions if d.kind in ("conv", "linear")}
    assert decided["classifier"] == (None, "rules[1] (module=re:.*classifier.*)")
    assert decided["features.1.conv"] == (INT8_STATIC, "rules[0] (role=default)")
    # the classifier's weight is the float parameter and its output is not quantized
    linear = next(n for n in converted.graph.nodes if n.target == torch.ops.aten.linear.default)
    assert linear.args[1].op == "get_attr"
    assert torch.equal(converted.get_parameter(linear.args[1].target), cnn.classifier.weight)
    assert not any("quantize" in str(u.target) for u in linear.users)


def test_source_and_graph_mode_resolve_the_same_schemes(mlp):
    recipe = Recipe(
        (
            Rule(INT8_DYNAMIC, role="default"),
            Rule(Scheme("int8", "per_tensor", activation="int8_dynamic"), module="down"),
            Rule(None, module="re:class.*"),
        )
    )
    source = {lp.fqn: lp.scheme for lp in edgequant.plan(mlp, recipe)}
    q = graph.RecipeQuantizer(recipe)
    graph.quantize(mlp, (torch.randn(2, 64),), quantizer=q)
    graph_plan = {d.module: d.scheme for d in q.decisions if d.kind == "linear"}
    assert (
        graph_plan
        == source
        == {
            "up": INT8_DYNAMIC,
            "down": Scheme("int8", "per_tensor", activation="int8_dynamic"),
            "classifier": None,
        }
    )


def test_setters_map_to_rules_with_the_xnnpack_quantizer_precedence(cnn, images):
    x, calibration = images
    q = (
        graph.RecipeQuantizer(backend="generic")
        .set_global(INT8_STATIC)
        .set_operator_type(torch.ops.aten.linear.default, None)
        .set_module_type(nn.Conv2d, Scheme("int8", "per_tensor", activation="int8_static"))
        .set_module_name("features.2", None)
    )
    assert [r.selector() for r in q.recipe.rules] == [
        "role=default",
        "module=re:features\\.2(?:\\..*)?",
    ]
    converted = graph.quantize(cnn, (x,), quantizer=q, calibration=calibration)
    decided = {d.module: d for d in q.decisions if d.kind in ("conv", "linear")}
    weights = {  # what feeds each convolution's weight in the converted graph
        n.name: n.args[1] for n in converted.graph.nodes if "conv2d" in str(n.target)
    }
    assert str(weights["conv2d"].target).endswith("dequantize_per_tensor.default")  # type rule
    assert weights["conv2d_2"].op == "get_attr"  # features.2 by name: a float weight
    assert decided["features.0.conv"].scheme.granularity == "per_tensor"  # module type
    assert decided["features.0.conv"].rule == "module_type torch.nn.modules.conv.Conv2d"
    assert decided["features.2.conv"].scheme is None  # module name beats module type
    assert decided["classifier"].scheme is None  # operator type beats global
    assert decided["classifier"].rule == "operator_type aten.linear.default"


class AddOnly(Quantizer):
    """A user's quantizer: annotates every add with int8 static activations."""

    def annotate(self, model):
        spec = graph.RecipeQuantizer("int8-static").config(INT8_STATIC).input_activation
        for n in model.graph.nodes:
            if n.target == torch.ops.aten.add.Tensor:
                n.meta["quantization_annotation"] = QuantizationAnnotation(
                    input_qspec_map={a: spec for a in n.args[:2]},
                    output_qspec=spec,
                    _annotated=True,
                )
        return model

    def validate(self, model):
        pass


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return x + self.fc(x)


def test_composes_with_a_users_quantizer():
    model = Residual().eval()
    x = torch.randn(4, 16)
    ours = graph.RecipeQuantizer("int8-dynamic")
    composed = graph.ComposableQuantizer([AddOnly(), ours])
    converted = graph.quantize(model, (x,), quantizer=composed, calibration=[(x,)])
    targets = [str(n.target) for n in converted.graph.nodes]
    assert "torchao.choose_qparams_affine" in targets  # ours: per-token dynamic linear
    assert "quantized_decomposed.quantize_per_tensor.default" in targets  # theirs: static add
    add = next(d for d in ours.decisions if d.kind == "add")
    assert add.rule == "another quantizer" and add.scheme is None


def test_a_scheme_the_backend_cannot_run_is_refused_naming_nodes(cnn, images):
    x, calibration = images
    recipe = Recipe((Rule(Scheme("int4", activation="int8_static"), role="default"),))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "the recipe asks backend 'xnnpack' for what it cannot run: conv2d, conv2d_1, "
            "conv2d_2, linear: xnnpack takes int8 weights, not int4 (rules[0] (role=default))"
        ),
    ):
        graph.quantize(cnn, (x,), recipe, calibration=calibration)
    grouped = edgequant.recipes.get("8da4w")
    with pytest.raises(ValueError, match="group-wise schemes: use edgequant.quantize"):
        graph.quantize(cnn, (x,), grouped, backend="generic", calibration=calibration)
    asymmetric = Recipe((Rule(Scheme("int8", symmetric=False), role="default"),))
    with pytest.raises(ValueError, match="generic takes symmetric weights only"):
        graph.quantize(cnn, (x,), asymmetric, backend="generic")
    weight_only = edgequant.recipes.get("int8-weight-only")
    with pytest.raises(ValueError, match="xnnpack runs conv with activation int8_static, int8_dy"):
        graph.quantize(cnn, (x,), weight_only)
    # the generic backend takes weight-only int8: the reference representation computes it
    converted = graph.quantize(cnn, (x,), weight_only, backend="generic")
    with torch.no_grad():
        assert torch.allclose(converted(x), cnn(x), atol=0.05)


class AudioAttention(nn.Module):
    """A 1-D convolution front end and a matmul/bmm attention, as in small audio encoders."""

    def __init__(self) -> None:
        super().__init__()
        self.frontend = nn.Conv1d(8, 16, 3, padding=1)
        self.qk = nn.Linear(16, 32)

    def forward(self, x):
        h = torch.relu(self.frontend(x)).transpose(1, 2)  # [B, T, 16]
        q, k = self.qk(h).split(16, dim=-1)
        scores = torch.matmul(q, k.transpose(1, 2)).softmax(-1)
        return torch.bmm(scores, h)


def test_conv1d_matmul_and_bmm_are_annotated_on_the_generic_backend():
    torch.manual_seed(0)
    model = AudioAttention().eval()
    x = torch.randn(2, 8, 20)
    q = graph.RecipeQuantizer("int8-static", backend="generic")
    converted = graph.quantize(model, (x,), quantizer=q, calibration=[(torch.randn(2, 8, 20),)])
    kinds = {d.kind: d for d in q.decisions}
    assert set(kinds) == {"conv", "linear", "matmul"}
    assert all(d.annotated for d in q.decisions)
    with torch.no_grad():
        assert edgequant.primitives.sqnr(model(x), converted(x)) > 25.0  # measured 40.5 dB
    # XNNPACK's table does not quantize matmul: there it stays float, said so in the decision
    q = graph.RecipeQuantizer("int8-static")
    graph.quantize(model, (x,), quantizer=q, calibration=[(x,)])
    matmuls = [d for d in q.decisions if d.kind == "matmul"]
    assert len(matmuls) == 2 and all(d.scheme is None for d in matmuls)
    assert matmuls[0].note == "xnnpack does not quantize matmul"
