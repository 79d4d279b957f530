"""Quantization math: round-trip bounds, ranges, exact zero, packing layout, errors."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgequant.primitives import (
    FLOAT_DTYPES,
    GRANULARITIES,
    cast_float,
    choose_qparams,
    dequantize,
    fake_quantize,
    fitting_group_sizes,
    pack,
    qrange,
    quantize,
    sqnr,
    unpack,
)

GROUP_SIZES = (2, 4, 8, 16, 32)
# 0.0 makes all-zero rows; 1e-6 drives the scale to its floor; 1e4 is a large weight/activation.
MAGNITUDES = (0.0, 1e-6, 1e-2, 1.0, 1e4)
PROPERTY = settings(max_examples=60, deadline=None, database=None)


@st.composite
def matrices(draw) -> tuple[torch.Tensor, int]:
    """``(x, group_size)``: float32 ``[rows, cols]`` with ``cols`` a multiple of ``group_size``;
    each row has its own magnitude (mixed in per_tensor) and sign pattern."""
    rows = draw(st.integers(1, 8))
    group_size = draw(st.sampled_from(GROUP_SIZES))
    cols = group_size * draw(st.integers(1, 4))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    x = torch.randn(rows, cols, generator=gen)
    for r in range(rows):
        sign = draw(st.sampled_from(("mixed", "positive", "negative")))
        if sign != "mixed":
            x[r] = x[r].abs() if sign == "positive" else -x[r].abs()
        x[r] *= draw(st.sampled_from(MAGNITUDES))
    return x.float(), group_size


def qparams(x, bits, symmetric, granularity, group_size, scale_dtype):
    """``(q, scale, zero_point, dequantized)`` with min-max qparams."""
    kw = dict(granularity=granularity, group_size=group_size)
    scale, zp = choose_qparams(
        x, bits=bits, symmetric=symmetric, scale_dtype=FLOAT_DTYPES[scale_dtype], **kw
    )
    q = quantize(x, scale, zp, bits=bits, **kw)
    return q, scale, zp, dequantize(q, scale, zp, **kw)


def per_element(t: torch.Tensor, granularity: str, group_size: int, shape) -> torch.Tensor:
    """Expand a ``[rows, n_groups]`` scale / zero point to one value per element of ``shape``."""
    t = t.double()
    if granularity == "per_group":
        return t.repeat_interleave(group_size, dim=1)
    return t.expand(*shape)


def expected_qparam_shape(granularity, rows, cols, group_size):
    return {"per_tensor": (1, 1), "per_channel": (rows, 1)}.get(
        granularity, (rows, cols // group_size)
    )


# ---- properties ------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("scale_dtype", list(FLOAT_DTYPES))
@PROPERTY
@given(case=matrices(), bits=st.integers(2, 8), granularity=st.sampled_from(GRANULARITIES))
def test_round_trip_error_at_most_half_a_step(case, bits, granularity, symmetric, scale_dtype):
    x, group_size = case
    q, scale, zp, xhat = qparams(x, bits, symmetric, granularity, group_size, scale_dtype)
    rows, cols = x.shape
    assert scale.shape == zp.shape == expected_qparam_shape(granularity, rows, cols, group_size)
    assert scale.dtype == FLOAT_DTYPES[scale_dtype]
    assert zp.dtype == torch.int8
    if symmetric:
        assert not zp.any()
    assert (scale.float() > 0).all()
    # the scale actually stored (after rounding to scale_dtype), per element
    step = per_element(scale, granularity, group_size, x.shape)
    err = (x.double() - xhat.double()).abs()
    # float slack: 1e-6 of a step, plus 1e-6 relative to the value for the float32 product
    bound = step / 2 + 1e-6 * step + 1e-6 * x.double().abs()
    worst = int(torch.argmax(err - bound))
    assert (err <= bound).all(), (
        f"error {err.flatten()[worst].item():.9g} > half a step "
        f"{step.flatten()[worst].item() / 2:.9g} at x={x.flatten()[worst].item():.9g} "
        f"(q={q.flatten()[worst].item()})"
    )


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@PROPERTY
@given(
    case=matrices(),
    bits=st.integers(2, 8),
    granularity=st.sampled_from(GRANULARITIES),
    scale_dtype=st.sampled_from(list(FLOAT_DTYPES)),
)
def test_quantized_values_lie_in_qrange(case, bits, granularity, symmetric, scale_dtype):
    x, group_size = case
    q, _, zp, _ = qparams(x, bits, symmetric, granularity, group_size, scale_dtype)
    qmin, qmax = qrange(bits)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    assert int(zp.min()) >= qmin and int(zp.max()) <= qmax


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@PROPERTY
@given(
    case=matrices(),
    bits=st.integers(2, 8),
    granularity=st.sampled_from(GRANULARITIES),
    scale_dtype=st.sampled_from(list(FLOAT_DTYPES)),
    seed=st.integers(0, 2**32 - 1),
)
def test_zero_round_trips_exactly(case, bits, granularity, symmetric, scale_dtype, seed):
    x, group_size = case
    zeros = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed)) < 0.3
    zeros[0, 0] = True
    x = x.masked_fill(zeros, 0.0)
    q, _, zp, xhat = qparams(x, bits, symmetric, granularity, group_size, scale_dtype)
    assert torch.equal(xhat[zeros], torch.zeros(int(zeros.sum())))
    # and 0.0 is stored as the zero point itself
    zp_el = per_element(zp, granularity, group_size, x.shape).to(torch.int8)
    assert torch.equal(q[zeros], zp_el[zeros])


@PROPERTY
@given(
    bits=st.sampled_from((2, 4)),
    lead=st.lists(st.integers(1, 3), max_size=3),
    n_bytes=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
)
def test_pack_unpack_round_trip_and_size(bits, lead, n_bytes, seed):
    qmin, qmax = qrange(bits)
    per_byte = 8 // bits
    shape = (*lead, n_bytes * per_byte)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(qmin, qmax + 1, shape, generator=gen).to(torch.int8)
    packed = pack(q, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*lead, n_bytes)
    assert packed.numel() * packed.element_size() == q.numel() * bits // 8
    assert torch.equal(unpack(packed, bits), q)


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_layout_every_byte(bits):
    """Every combination of in-range values in one byte: the first value in the lowest bits."""
    qmin, qmax = qrange(bits)
    per_byte = 8 // bits
    combos = list(itertools.product(range(qmin, qmax + 1), repeat=per_byte))  # 256 of them
    q = torch.tensor(combos, dtype=torch.int8)  # [256, per_byte]
    expected = [sum((v - qmin) << (bits * i) for i, v in enumerate(c)) for c in combos]
    packed = pack(q, bits)
    assert packed.flatten().tolist() == expected
    assert sorted(expected) == list(range(256))
    assert torch.equal(unpack(packed, bits), q)


# ---- worked numbers --------------------------------------------------------------------------
def test_symmetric_int4_worked_example():
    x = torch.tensor([[-1.0, 0.0, 0.5, 1.5]])
    scale, zp = choose_qparams(x, bits=4, symmetric=True)
    assert scale.dtype == torch.float32
    assert torch.equal(scale, torch.tensor([[1.5 / 7.5]]))
    assert torch.equal(scale, torch.tensor([[0.2]]))
    assert torch.equal(zp, torch.tensor([[0]], dtype=torch.int8))
    q = quantize(x, scale, zp, bits=4)
    assert torch.equal(q, torch.tensor([[-5, 0, 2, 7]], dtype=torch.int8))
    xhat = dequantize(q, scale, zp)
    assert torch.equal(xhat, torch.tensor([[-5, 0, 2, 7]]) * torch.tensor(0.2))
    assert torch.equal(fake_quantize(x, bits=4, symmetric=True), xhat)


def test_asymmetric_int4_worked_example():
    x = torch.tensor([[-1.0, 0.0, 0.5, 1.5]])
    scale, zp = choose_qparams(x, bits=4, symmetric=False)
    assert torch.equal(scale, torch.tensor([[2.5 / 15]]))
    assert torch.equal(zp, torch.tensor([[-2]], dtype=torch.int8))  # -8 - round(-6)
    q = quantize(x, scale, zp, bits=4)
    assert torch.equal(q, torch.tensor([[-8, -2, 1, 7]], dtype=torch.int8))


def test_int8_symmetric_is_narrow_range_max_over_127():
    x = torch.tensor([[127.0, -3.0, 0.0, 64.0], [-127.0, 1.0, 2.0, 3.0], [-2.54, 0.0, 0.0, 1.0]])
    scale, zp = choose_qparams(x, bits=8, symmetric=True)
    assert torch.equal(scale[:2], torch.ones(2, 1))
    assert torch.equal(zp, torch.zeros(3, 1, dtype=torch.int8))
    q = quantize(x, scale, zp, bits=8)
    # both extremes land on +-127 exactly; -128 is never used (LiteRT's and Q8_0's grid)
    assert q.tolist() == [[127, -3, 0, 64], [-127, 1, 2, 3], [-127, 0, 0, 50]]


def test_int8_asymmetric_over_0_255():
    x = torch.tensor([[0.0, 1.0, 128.0, 255.0]])
    scale, zp = choose_qparams(x, bits=8, symmetric=False)
    assert torch.equal(scale, torch.tensor([[1.0]]))
    assert torch.equal(zp, torch.tensor([[-128]], dtype=torch.int8))
    q = quantize(x, scale, zp, bits=8)
    assert q.tolist() == [[-128, -127, 0, 127]]
    assert torch.equal(dequantize(q, scale, zp), x)


def test_per_group_scales_one_per_group():
    x = torch.tensor([[1.0, -2.0, 3.0, 7.5], [0.0, 0.0, -15.0, 0.0]])
    scale, _ = choose_qparams(x, bits=4, symmetric=True, granularity="per_group", group_size=2)
    eps = torch.finfo(torch.float32).eps  # an all-zero group gets the smallest scale
    assert torch.equal(scale, torch.tensor([[2.0 / 7.5, 1.0], [eps, 2.0]]))
    scale, _ = choose_qparams(x, bits=4, symmetric=True, granularity="per_tensor")
    assert torch.equal(scale, torch.tensor([[2.0]]))


def test_pack_worked_layout():
    q = torch.tensor([[-8, 7, 0, 1]], dtype=torch.int8)  # unsigned: [0, 15, 8, 9]
    packed = pack(q, 4)
    assert torch.equal(packed, torch.tensor([[240, 152]], dtype=torch.uint8))
    assert torch.equal(unpack(packed, 4), q)
    q2 = torch.tensor([[-2, -1, 0, 1]], dtype=torch.int8)  # unsigned: [0, 1, 2, 3]
    assert torch.equal(
        pack(q2, 2), torch.tensor([[0 | 1 << 2 | 2 << 4 | 3 << 6]], dtype=torch.uint8)
    )


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize(
    ("scale_dtype", "top"),
    # max|x| / 7.5 rounds *down* in these dtypes (1 / 7.5 -> 0.13330078125 in fp16,
    # 0.1 / 7.5 -> 0.0133056640625 in bf16), so the max lands above 7.5 steps and clamps to 7
    [(torch.float16, 1.0), (torch.bfloat16, 0.1)],
    ids=["fp16", "bf16"],
)
def test_rounded_scale_keeps_the_max_within_half_a_step(scale_dtype, top, symmetric):
    x = torch.tensor([[-top, top]])
    scale, zp = choose_qparams(x, bits=4, symmetric=symmetric, scale_dtype=scale_dtype)
    xhat = dequantize(quantize(x, scale, zp, bits=4), scale, zp)
    err = (x.double() - xhat.double()).abs().max().item()
    half_step = scale.double().item() / 2
    assert err <= half_step * (1 + 1e-6), f"error {err} > half a step {half_step}"


def test_qrange_and_fitting_group_sizes():
    assert [qrange(b) for b in range(2, 9)] == [
        (-2, 1),
        (-4, 3),
        (-8, 7),
        (-16, 15),
        (-32, 31),
        (-64, 63),
        (-128, 127),
    ]
    assert fitting_group_sizes(64) == [8, 16, 32, 64]
    assert fitting_group_sizes(172) == [86, 172]


def test_cast_float_and_sqnr():
    assert torch.equal(
        cast_float(torch.tensor([65504.0]), torch.float16), torch.tensor([65504.0]).half()
    )
    assert sqnr(torch.tensor([1.0, 1.0]), torch.tensor([1.1, 0.9])) == pytest.approx(20.0)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    assert sqnr(x, x.clone()) == math.inf
    assert sqnr(torch.zeros(3), torch.zeros(3)) == math.inf


# ---- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [9, 1, 0, 4.0])
def test_bits_out_of_range_refused(bits):
    msg = f"bits must be an integer from 2 to 8, got {bits!r}"
    with pytest.raises(ValueError, match=re.escape(msg)):
        qrange(bits)
    with pytest.raises(ValueError, match=re.escape(msg)):
        choose_qparams(torch.ones(1, 4), bits=bits, symmetric=True)
    with pytest.raises(ValueError, match=re.escape(msg)):
        quantize(torch.ones(1, 4), torch.ones(1, 1), torch.zeros(1, 1), bits=bits)


@pytest.mark.parametrize(
    ("group_size", "cols", "msg"),
    [
        (48, 64, "group_size 48 does not divide the 64 columns; sizes that fit: [8, 16, 32, 64]"),
        (
            None,
            64,
            "group_size None does not divide the 64 columns; sizes that fit: [8, 16, 32, 64]",
        ),
        (0, 24, "group_size 0 does not divide the 24 columns; sizes that fit: [8, 12, 24]"),
        (-8, 16, "group_size -8 does not divide the 16 columns; sizes that fit: [8, 16]"),
    ],
)
def test_group_size_that_does_not_divide_names_the_fitting_sizes(group_size, cols, msg):
    x = torch.ones(2, cols)
    with pytest.raises(ValueError, match=re.escape(msg)):
        choose_qparams(x, bits=4, symmetric=True, granularity="per_group", group_size=group_size)
    with pytest.raises(ValueError, match=re.escape(msg)):
        quantize(
            x,
            torch.ones(2, 1),
            torch.zeros(2, 1),
            bits=4,
            granularity="per_group",
            group_size=group_size,
        )


def test_bad_granularity_and_shape_refused():
    msg = "granularity must be one of ('per_tensor', 'per_channel', 'per_group'), got 'per_row'"
    with pytest.raises(ValueError, match=re.escape(msg)):
        choose_qparams(torch.ones(2, 4), bits=8, symmetric=True, granularity="per_row")
    msg = "expected a 2-D tensor [rows, cols], got shape (4,)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        choose_qparams(torch.ones(4), bits=8, symmetric=True)


def test_pack_errors():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "the last dimension (3) must be a multiple of 2 to pack int4 values 2 per byte"
        ),
    ):
        pack(torch.zeros(2, 3, dtype=torch.int8), 4)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "the last dimension (6) must be a multiple of 4 to pack int2 values 4 per byte"
        ),
    ):
        pack(torch.zeros(6, dtype=torch.int8), 2)
    with pytest.raises(ValueError, match=re.escape("values out of the int4 range [-8, 7]")):
        pack(torch.tensor([[0, 8]], dtype=torch.int8), 4)
    with pytest.raises(ValueError, match=re.escape("values out of the int4 range [-8, 7]")):
        pack(torch.tensor([[-9, 0]], dtype=torch.int8), 4)
    with pytest.raises(ValueError, match=re.escape("values out of the int2 range [-2, 1]")):
        pack(torch.tensor([[0, 0, 2, 0]], dtype=torch.int8), 2)
    with pytest.raises(ValueError, match=re.escape("pack supports bits in (2, 4), got 3")):
        pack(torch.zeros(1, 8, dtype=torch.int8), 3)
    with pytest.raises(ValueError, match=re.escape("unpack supports bits in (2, 4), got 8")):
        unpack(torch.zeros(1, 8, dtype=torch.uint8), 8)
    with pytest.raises(TypeError, match=re.escape("packed data must be uint8, got torch.int8")):
        unpack(torch.zeros(1, 8, dtype=torch.int8), 4)


def test_cast_float_overflow_names_the_value():
    msg = (
        "tensor has values up to 1e+06, beyond the largest torch.float16 (65504); "
        "keep it in a wider dtype"
    )
    with pytest.raises(ValueError, match=re.escape(msg)):
        cast_float(torch.tensor([1.0, -1e6]), torch.float16)
    with pytest.raises(ValueError, match=re.escape("scales has values up to 1e+06")):
        cast_float(torch.tensor([1e6]), torch.float16, name="scales")
    msg = "dtype must be one of [torch.float32, torch.float16, torch.bfloat16], got torch.int8"
    with pytest.raises(ValueError, match=re.escape(msg)):
        cast_float(torch.tensor([1.0]), torch.int8)
