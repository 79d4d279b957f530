"""generative.convert: AI Edge's conversion call writing LiteRT from a QuantConfig (stories260K)."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

import edgequant
from edgequant.export import litert
from edgequant.export.litert_runtime import TfliteModel
from edgequant.generative import GenerativeQuantRecipe, QuantConfig, convert, quant_recipes
from edgequant.generative import quant_recipe_utils as qru
from edgequant.primitives import sqnr


def test_a_selective_recipe_converts_and_each_layer_holds_its_scheme(stories260k, tmp_path):
    model, _ = stories260k
    config = QuantConfig(
        GenerativeQuantRecipe(
            default=qru.create_layer_quant_fp16(),
            attention={
                0: qru.create_layer_quant_int4_dynamic_block(64),
                1: qru.create_layer_quant_int4_dynamic_block(32),
            },
        )
    )
    sample = (torch.zeros(1, 16, dtype=torch.int32), torch.arange(16, dtype=torch.int32))
    path = convert(model, sample, quant_config=config, max_seq_len=64).export(tmp_path / "m.tflite")
    written = list(litert.written_tensors(path.read_bytes()))
    int4 = [t for t in written if t.scales is not None]
    # per signature (prefill, decode): the 4 attention linears of layer 0 in blocks of 64 and
    # of layer 1 in blocks of 32; every other linear and the embedding table in fp16
    assert sorted(t.block_size for t in int4) == [32] * 8 + [64] * 8
    fp16_shapes = [t.values.shape for t in written if t.scales is None]
    assert fp16_shapes.count((172, 64)) == 20 and fp16_shapes.count((64, 172)) == 10  # w1/w3, w2
    w2 = model.layers[2].feed_forward.w2.weight.detach().half().numpy()
    assert any(np.array_equal(t.values, w2) for t in written if t.scales is None)
    program = TfliteModel(path)
    assert program.args.prefill_len == 16 and program.args.max_seq_len == 64
    ids = torch.tensor([[1, 400, 30, 8, 200]])
    with torch.no_grad():
        float_logits = model(ids)
    assert sqnr(float_logits, program(ids)) > 25.0  # measured 32.0 dB against float
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        convert(model, sample, quant_config=config, max_seq_len=64).export(path)


def test_the_readme_selective_recipe_writes_each_role_as_asked(
    stories260k, tmp_path, monkeypatch, readme_python_blocks
):
    """The README's AI Edge example (fp16 default, int8 dynamic embedding and feedforward, int8
    weight-only attention) runs as written; the ops of the file compute with those schemes."""
    (block,) = [b for b in readme_python_blocks if "convert(" in b]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    path = tmp_path / "stories260k.tflite"
    model, _ = stories260k
    recipe = namespace["custom_selective_quantization_recipe"]()
    quantized, _ = edgequant.quantize(copy.deepcopy(model), recipe)
    ops = list(litert.weight_ops(path.read_bytes()))
    for fqn, module in quantized.named_modules():
        if not hasattr(module, "int_weight") or not module.scheme.is_integer:
            continue
        schemes = {o.scheme for o in ops if np.array_equal(o.weight.values, module.int_weight())}
        if fqn == "tok_embeddings":
            asked = "int8 per-channel"  # the lookup table: no activations to quantize
        elif ".attention." in fqn:
            asked = "int8 per-channel weight-only"
        else:
            asked = "int8 per-channel dynamic"
        assert schemes == {asked}, fqn
    output = [o for o in ops if o.op == "FULLY_CONNECTED" and o.weight.values.shape == (512, 64)]
    assert {o.scheme for o in output} == {"fp16"}  # lm_head: the default
    assert len(ops) == 2 * (1 + 7 * len(model.layers) + 1)  # both signatures
    ids = torch.tensor([[1, 400, 30, 8, 200]])
    with torch.no_grad():
        float_logits = model(ids)
    assert sqnr(float_logits, TfliteModel(path)(ids)) > 25.0


def test_a_layer_recipe_litert_does_not_run_is_refused_listing_the_supported(stories260k):
    model, _ = stories260k
    config = quant_recipes.full_int4_weight_only_recipe(32)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "default: FP32 activations with INT4/WEIGHT_ONLY/MIN_MAX/BLOCKWISE_32 weights "
            "(dtype/mode/algorithm/granularity) is not a scheme LiteRT runs; supported with FP32 "
            "activations: INT8/DYNAMIC_RANGE/MIN_MAX/CHANNELWISE, "
        ),
    ):
        convert(model, quant_config=config)


@pytest.mark.parametrize(
    ("sample", "message"),
    [
        ((torch.zeros(1, 8),), "sample_args must be (tokens [1, P] int tensor, input_pos [P]"),
        ((torch.zeros(1, 8), torch.arange(8)), "sample_args tokens must be an int32/int64"),
        (
            (torch.zeros(8, dtype=torch.long), torch.arange(8)),
            "sample_args tokens must have 2 dims, got shape (8,)",
        ),
        (
            (torch.zeros(1, 8, dtype=torch.long), torch.arange(4)),
            "sample_args must be tokens [1, P] and input_pos [P]; got (1, 8) and (4,)",
        ),
    ],
)
def test_sample_args_of_the_wrong_shape_or_dtype(stories260k, sample, message):
    model, _ = stories260k
    with pytest.raises(ValueError, match=re.escape(message)):
        convert(model, sample, quant_config=quant_recipes.full_fp16_recipe())
