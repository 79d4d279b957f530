"""Packed modules: storage bytes, layouts, from_float, repr, Conv1D, cache invalidation."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

from edgequant.layers import QuantizedEmbedding, QuantizedLinear, layout_bytes, pack_weight
from edgequant.primitives import choose_qparams, quantize, sqnr, unpack
from edgequant.schemes import Scheme


def state_bytes(module: nn.Module, skip=("bias",)) -> int:
    return sum(
        t.numel() * t.element_size()
        for name, t in module.state_dict().items()
        if name.split(".")[-1] not in skip
    )


@pytest.mark.parametrize(
    ("scheme", "expected"),
    [
        # 128 x 256 weight: values + one scale (+ zero point) per group
        (Scheme("int4", "per_group", 32, scale_dtype="fp16"), 128 * 256 // 2 + 128 * 8 * 2),
        (Scheme("int4", "per_group", 32, symmetric=False), 128 * 256 // 2 + 128 * 8 * (4 + 1)),
        (Scheme("int2", "per_group", 64, scale_dtype="bf16"), 128 * 256 // 4 + 128 * 4 * 2),
        (Scheme("int8"), 128 * 256 + 128 * 4),
        (Scheme("int6", "per_channel"), 128 * 256 + 128 * 4),  # 3..7 bits: one int8 each
        (Scheme("int8", "per_tensor"), 128 * 256 + 4),
        (Scheme("fp16"), 128 * 256 * 2),
    ],
)
def test_state_dict_bytes_are_the_scheme_bytes(scheme, expected):
    layer = QuantizedLinear.from_float(nn.Linear(256, 128), scheme)
    assert state_bytes(layer) == expected == layer.weight_bytes() == layout_bytes(128, 256, scheme)


def test_int4_is_really_two_per_byte_and_matches_primitives():
    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    scheme = Scheme("int4", "per_group", 32)
    layer = QuantizedLinear.from_float(lin, scheme)
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.shape == (16, 32)
    scale, zp = choose_qparams(
        lin.weight, bits=4, symmetric=True, granularity="per_group", group_size=32
    )
    q = quantize(lin.weight, scale, zp, bits=4, granularity="per_group", group_size=32)
    assert torch.equal(unpack(layer.qweight, 4), q)
    assert torch.equal(layer.scale, scale)
    assert torch.equal(layer.bias, lin.bias.detach())


def test_repr_shows_the_scheme():
    layer = QuantizedLinear.from_float(
        nn.Linear(64, 8, bias=False), Scheme("int8", activation="int8_dynamic")
    )
    assert repr(layer) == (
        "QuantizedLinear(in_features=64, out_features=8, bias=False, "
        "scheme=int8 per-channel sym, act int8 dynamic asym)"
    )
    emb = QuantizedEmbedding.from_float(nn.Embedding(10, 64), Scheme("int4", "per_group", 32))
    assert repr(emb) == "QuantizedEmbedding(10, 64, scheme=int4 g32 sym)"


def test_fp16_layer_is_a_cast():
    torch.manual_seed(0)
    lin = nn.Linear(32, 8)
    layer = QuantizedLinear.from_float(lin, Scheme("fp16"))
    assert layer.weight.dtype == torch.float16
    x = torch.randn(4, 32)
    assert sqnr(lin(x), layer(x)) > 60


class Conv1D(nn.Module):
    """Stand-in for Hugging Face's GPT-2 Conv1D: weight [in, out], y = x @ W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


def test_conv1d_is_quantized_as_a_transposed_linear():
    conv = Conv1D(nf=16, nx=64)
    layer = QuantizedLinear.from_float(conv, Scheme("int8"))
    assert (layer.in_features, layer.out_features) == (64, 16)
    x = torch.randn(3, 64)
    assert sqnr(conv(x), layer(x)) > 35


def test_nan_weights_are_refused_by_name():
    lin = nn.Linear(32, 4)
    with torch.no_grad():
        lin.weight[1, 2] = float("nan")
        lin.weight[0, 0] = float("inf")
    with pytest.raises(
        ValueError,
        match=re.escape("layers.3.attention.wq: the weight has 2 NaN/Inf value(s) out of 128"),
    ):
        pack_weight(lin.weight, Scheme("int8"), "layers.3.attention.wq")


def test_shape_errors_name_the_layer_and_fitting_sizes():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "lin: group_size 48 does not divide its 64 input features; "
            "group sizes that fit: [8, 16, 32, 64]"
        ),
    ):
        QuantizedLinear.from_float(nn.Linear(64, 4), Scheme("int4", "per_group", 48), name="lin")
    with pytest.raises(
        ValueError, match=re.escape("lin: int4 packs 2 values per byte, but a row has 63 values")
    ):
        QuantizedLinear.from_float(nn.Linear(63, 4), Scheme("int4"), name="lin")


def test_load_state_dict_refreshes_kernel_caches():
    torch.manual_seed(0)
    scheme = Scheme("int4", "per_group", 32, activation="int8_dynamic")
    a = QuantizedLinear.from_float(nn.Linear(64, 32), scheme)
    b = QuantizedLinear.from_float(nn.Linear(64, 32), scheme)
    x = torch.randn(2, 64)
    b(x)  # builds b's prepacked weights
    b.load_state_dict(a.state_dict())
    assert torch.equal(b(x), a(x))


def test_set_packed_checks_shapes():
    layer = QuantizedLinear(64, 8, Scheme("int8"))
    with pytest.raises(
        ValueError, match=re.escape("buffer qweight: expected (8, 64) torch.int8, got (8, 32)")
    ):
        layer.set_packed({"qweight": torch.zeros(8, 32, dtype=torch.int8)})
