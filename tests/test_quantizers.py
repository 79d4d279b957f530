"""The ExecuTorch-style source quantizer, as its users call it."""

from __future__ import annotations

import logging
import re

import pytest
import torch
import torch.nn as nn

import edgequant
from edgequant.layers import QuantizedLinear
from edgequant.quantizers import Int8DynActInt4WeightQuantizer
from edgequant.schemes import Scheme


def test_seed_snippet_runs_as_written(fresh_stories260k, story_ids):
    model, _ = fresh_stories260k()
    model = Int8DynActInt4WeightQuantizer(precision=torch.float32, groupsize=32).quantize(model)
    wq = model.layers[0].attention.wq
    assert isinstance(wq, QuantizedLinear)
    assert wq.scheme == Scheme("int4", "per_group", 32, activation="int8_dynamic")
    # as in torchao: Linears only (the embedding stays float), and w2 (172 inputs, not a
    # multiple of 32) is left in float
    assert isinstance(model.tok_embeddings, nn.Embedding)
    assert isinstance(model.layers[0].feed_forward.w2, nn.Linear)
    assert isinstance(model.output, QuantizedLinear)
    with torch.no_grad():
        assert model(story_ids).shape == (1, 256, 512)


def test_same_integers_as_the_preset_with_fp32_scales(fresh_stories260k):
    a, _ = fresh_stories260k()
    b, _ = fresh_stories260k()
    Int8DynActInt4WeightQuantizer(groupsize=32).quantize(a)
    edgequant.quantize(b, _linears_only())
    assert torch.equal(a.layers[1].attention.wk.qweight, b.layers[1].attention.wk.qweight)
    assert torch.equal(a.layers[1].attention.wk.scale, b.layers[1].attention.wk.scale)


def _linears_only():
    from edgequant.recipe import Recipe, Rule

    # the original quantizer rounds min-max (the preset's default is hqq)
    scheme = edgequant.recipes.get("8da4w", scale_dtype="fp32", algorithm="minmax").rules[0].scheme
    return Recipe(
        (
            Rule(scheme, role="default"),
            Rule(None, role="embedding"),
            Rule(None, module=r"re:layers\.\d+\.feed_forward\.w2"),
        )
    )


def test_layers_the_group_does_not_divide_stay_float_with_a_warning(caplog):
    model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 8))
    with caplog.at_level(logging.WARNING):
        Int8DynActInt4WeightQuantizer(groupsize=32).quantize(model)
    assert isinstance(model[0], QuantizedLinear) and isinstance(model[1], nn.Linear)
    assert "1: in_features 48 is not a multiple of groupsize 32; left in float" in caplog.text


def test_unsupported_arguments_are_refused():
    with pytest.raises(
        NotImplementedError, match=re.escape("precision torch.bfloat16 is not supported")
    ):
        Int8DynActInt4WeightQuantizer(precision=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="padding_allowed=True is not supported"):
        Int8DynActInt4WeightQuantizer(padding_allowed=True)
    with pytest.raises(ValueError, match="scales_precision must be one of"):
        Int8DynActInt4WeightQuantizer(scales_precision=torch.int8)
