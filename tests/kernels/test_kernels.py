"""Every fast kernel against its pure-torch reference, on shapes inside and outside its limits."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from edgequant import kernels
from edgequant.kernels import cpu, reference
from edgequant.layers import QuantizedEmbedding, QuantizedLinear
from edgequant.primitives import sqnr
from edgequant.schemes import Scheme

INT8_DYN = Scheme("int8", activation="int8_dynamic")
INT8_WO = Scheme("int8")
INT4_WO = Scheme("int4", "per_group", 32, scale_dtype="fp16")
INT4_WO_ASYM = Scheme("int4", "per_group", 64, symmetric=False)
W8DA4 = Scheme("int4", "per_group", 32, scale_dtype="fp16", activation="int8_dynamic")


def _layer(scheme, k=256, n=128, bias=True, seed=0):
    torch.manual_seed(seed)
    return QuantizedLinear.from_float(nn.Linear(k, n, bias=bias), scheme)


@pytest.mark.parametrize(
    ("scheme", "name", "floor_db"),
    [
        # int8 dynamic: exact int32 accumulation (several tokens) or fbgemm (one token).
        (INT8_DYN, "int8_dynamic", 100.0),
        # bf16 activations / outputs: about 3 significant digits.
        (INT8_WO, "int8_weight_only", 45.0),
        (INT4_WO, "int4_weight_only", 45.0),
        (INT4_WO_ASYM, "int4_weight_only", 45.0),
        (W8DA4, "int4_dynamic", 45.0),
        # the same computation as the reference, with the fp32 weight cached: bit-exact
        (Scheme("fp16"), "upcast_cached", float("inf")),
        (Scheme("bf16"), "upcast_cached", float("inf")),
    ],
)
@pytest.mark.parametrize("tokens", [1, 5, 33])
def test_fast_kernel_matches_reference(scheme, name, floor_db, tokens):
    layer = _layer(scheme)
    assert kernels.kernel_name(layer) == name
    x = torch.randn(tokens, 256) * 3
    ref = reference.linear(x, layer)
    fast = cpu.KERNELS[name](x, layer)
    assert fast.dtype == torch.float32 and fast.shape == ref.shape
    assert sqnr(ref, fast) >= floor_db


def test_int8_dynamic_is_per_token():
    """A batch whose tokens differ by 1000x in scale: each keeps its own activation range."""
    layer = _layer(INT8_DYN)
    x = torch.randn(2, 256)
    x[1] *= 1000.0
    fast = kernels.linear(x, layer)
    one_by_one = torch.cat([kernels.linear(x[i : i + 1], layer) for i in range(2)])
    # token 0 computed alone or beside a huge token gives the same result
    assert sqnr(one_by_one[0], fast[0]) > 100.0
    assert sqnr(reference.linear(x, layer)[0], fast[0]) > 100.0


def test_dynamic_reference_quantizes_activations_per_token():
    layer = _layer(INT8_DYN)
    x = torch.randn(4, 256)
    fq = reference.fake_quantize_tokens(x, symmetric=False)
    # error per token at most half its own step
    step = (x.amax(1).clamp(min=0) - x.amin(1).clamp(max=0)) / 255
    assert ((fq - x).abs() <= step[:, None] / 2 + 1e-6).all()
    assert not torch.equal(
        reference.linear(x, layer), nn.functional.linear(x, layer.dequantized_weight(), layer.bias)
    )


@pytest.mark.parametrize("scheme", [INT8_WO, INT4_WO, W8DA4])
def test_three_dim_input_and_no_bias(scheme):
    layer = _layer(scheme, bias=False)
    x = torch.randn(2, 3, 256)
    out = kernels.linear(x, layer)
    assert out.shape == (2, 3, 128)
    assert sqnr(reference.linear(x, layer), out) >= 45.0


@pytest.mark.parametrize(
    ("scheme", "k", "n"),
    [
        (INT8_WO, 172, 64),  # _weight_int8pack_mm is wrong unless in_features % 16 == 0
        (INT4_WO, 64, 172),  # the int4 kernel needs out_features % 16 == 0
        (Scheme("int4", "per_group", 96), 192, 64),  # and groups of 32/64/128/256
        (Scheme("int2", "per_group", 32), 64, 64),  # no fast int2 kernel
        (Scheme("int8", "per_group", 32, activation="int8_dynamic"), 64, 64),
    ],
)
def test_outside_kernel_limits_uses_reference(scheme, k, n):
    layer = _layer(scheme, k=k, n=n)
    assert cpu.choose(layer) is None
    assert kernels.kernel_name(layer) == "reference"
    x = torch.randn(3, k)
    assert torch.equal(kernels.linear(x, layer), reference.linear(x, layer))


def test_use_reference_forces_reference():
    layer = _layer(W8DA4)
    x = torch.randn(3, 256)
    kernels.use_reference(True)
    try:
        assert kernels.kernel_name(layer) == "reference"
        assert torch.equal(kernels.linear(x, layer), reference.linear(x, layer))
    finally:
        kernels.use_reference(False)
    assert kernels.kernel_name(layer) == "int4_dynamic"


@pytest.mark.parametrize(
    "scheme",
    [
        Scheme("int8"),
        Scheme("int4", "per_group", 16, symmetric=False),
        Scheme("int2", "per_group", 8),
        Scheme("int8", "per_tensor"),
        Scheme("bf16"),
    ],
)
def test_embedding_gathers_the_dequantized_rows(scheme):
    torch.manual_seed(0)
    emb = QuantizedEmbedding.from_float(nn.Embedding(50, 32), scheme)
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    out = emb(ids)
    assert out.shape == (2, 3, 32) and out.dtype == torch.float32
    assert torch.equal(out, emb.dequantized_weight()[ids])


def test_reference_logits_forces_the_reference_kernels_and_restores():
    layer = _layer(W8DA4)
    x = torch.randn(3, 256)
    assert torch.equal(kernels.reference_logits(layer, x), reference.linear(x, layer))
    assert kernels.kernel_name(layer) == "int4_dynamic"  # fast path again afterwards


def test_q8_0_activations_are_ggmls_own():
    from gguf import GGMLQuantizationType, quants

    torch.manual_seed(0)
    x = torch.randn(6, 128) * torch.logspace(-3, 2, 128)
    x[2, 32:64] = 0.0  # an all-zero block keeps its zeros
    ggml = quants.dequantize(
        quants.quantize(x.numpy(), GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    )
    assert torch.equal(reference.fake_quantize_q8_0(x), torch.from_numpy(ggml).float())
    with pytest.raises(ValueError, match="features divisible by 32, got 48"):
        reference.fake_quantize_q8_0(torch.ones(2, 48))


def test_computing_as_ggml_rounds_inputs_as_llama_cpp():
    torch.manual_seed(1)
    x = torch.randn(3, 256)
    layer = _layer(W8DA4)
    expected = torch.nn.functional.linear(
        reference.fake_quantize_q8_0(x), layer.dequantized_weight(), layer.bias
    )
    with kernels.computing_as("ggml"):
        assert torch.equal(layer(x), expected)
    assert not torch.equal(layer(x), expected)  # per-token int8 again outside
    half = _layer(Scheme("fp16"))
    with kernels.computing_as("ggml"):
        out = half(x)
    assert torch.equal(
        out, torch.nn.functional.linear(x.half().float(), half.dequantized_weight(), half.bias)
    )
    with pytest.raises(ValueError, match=r"unknown runtime arithmetic 'mlx'; known: \['ggml'\]"):
        with kernels.computing_as("mlx"):
            pass


def test_int4_layout_built_by_row_blocks_equals_one_conversion():
    """The int4 kernel's weight layout is built a block of rows at a time (a 151,936-row head
    needed a 0.9 GB int32 copy at once); torch packs tiles of 64 rows, so the blocks must start
    at multiples of 64 (blocks of 672 rows gave another layout)."""
    from edgequant.primitives import unpack

    torch.manual_seed(0)
    layer = QuantizedLinear.from_float(nn.Linear(1536, 1008, bias=False), W8DA4)
    assert 1008 > (1 << 20) // 1536  # more than one block
    prepacked, _ = cpu._int4_packed(layer)
    u = (unpack(layer.qweight, 4).to(torch.int32) + 8).contiguous()
    assert torch.equal(prepacked, torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1))


def test_one_token_int8_dynamic_without_fbgemm_matches_reference(monkeypatch):
    # where fbgemm saturates (AVX2 without VNNI) one token takes the exact int32 path
    monkeypatch.setattr(cpu, "fbgemm_is_exact", lambda: False)
    layer = _layer(INT8_DYN)
    x = torch.randn(1, 256) * 3
    x[0, 0] = 40.0  # a wide range: most tokens' integers near the middle, one at the edge
    assert sqnr(reference.linear(x, layer), cpu.int8_dynamic(x, layer)) >= 100.0
