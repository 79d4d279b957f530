"""Quantization algorithms on one linear layer with outlier-heavy synthetic inputs: each beats
min-max on the layer's output error, GPTQ with an identity Hessian is round-to-nearest, and the
results are deterministic and on edgequant's grid."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from edgequant import algorithms as alg
from edgequant.schemes import Scheme

INT4 = Scheme("int4", "per_group", 32, scale_dtype="fp16")
INT4_ASYM = Scheme("int4", "per_group", 32, symmetric=False, scale_dtype="fp16")
INT8 = Scheme("int8")


@pytest.fixture(scope="module")
def layer():
    """A 128x256 weight with one heavy column and inputs with 4 outlier features."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 256, generator=g)
    x[:, :4] *= 20.0
    w = torch.randn(128, 256, generator=g) * 0.05
    w[:, 7] *= 8.0
    return w, x, alg.hessian(x)


def _run(name: str, w, x, h, scheme):
    if name == "minmax":
        return alg.minmax(w, scheme)
    if name == "mse":
        return alg.mse(w, scheme)
    if name == "mse-weighted":
        return alg.mse(w, scheme, importance=torch.diag(h).float())
    if name == "hqq":
        return alg.hqq(w, scheme)
    return alg.gptq(w, scheme, h)


@pytest.mark.parametrize("scheme", [INT4, INT4_ASYM, INT8], ids=lambda s: s.describe())
def test_each_algorithm_beats_minmax_on_the_layer_output(layer, scheme):
    w, x, h = layer
    err = {
        name: alg.output_error(w, _run(name, w, x, h, scheme), scheme, x)
        for name in ("minmax", "mse", "mse-weighted", "hqq", "gptq")
    }
    # measured (relative squared output error x 1e4), int4 sym / asym / int8:
    # minmax 837 / 295 / 3.30, mse 770 / 289 / 3.28, mse weighted by the inputs' energy
    # 232 / 141 / 2.45, hqq 770 / 289 / 3.22, gptq 204 / 125 / 2.19 (this layer's weights are
    # random, so their sizes say nothing of their salience: plain squared error, magnitude 0,
    # gives mse 691 / 280)
    for name in ("mse", "mse-weighted", "hqq", "gptq"):
        assert err[name] < err["minmax"], (name, err)
    assert err["gptq"] < 0.3 * err["minmax"] if scheme.bits == 4 and scheme.symmetric else True
    assert err["gptq"] <= min(err["mse"], err["hqq"])


def test_results_are_on_the_schemes_grid_and_layout(layer):
    w, x, h = layer
    for scheme in (INT4, INT4_ASYM, INT8):
        for name in ("minmax", "mse", "hqq", "gptq"):
            r = _run(name, w, x, h, scheme)
            qmin, qmax = alg.grid(scheme)
            assert r.q.dtype == torch.int8 and r.q.shape == w.shape
            assert qmin <= int(r.q.min()) and int(r.q.max()) <= qmax, (name, scheme)
            groups = 256 // alg.group_size_of(scheme, 256)
            assert r.scale.shape == (128, groups) and r.scale.dtype == scheme.torch_scale_dtype
            assert (r.zero_point is None) == scheme.symmetric
    assert alg.grid(INT8) == (-127, 127)  # narrow range, as every int8 runtime


def test_mse_puts_the_largest_weight_on_the_grids_end_or_on_minus_8_as_q4_0_does():
    w = torch.zeros(1, 32)
    w[0, :8] = torch.linspace(-0.5, 0.5, 8)
    w[0, 9] = 1.0  # the largest magnitude is positive: scale -1/8 maps it to -8 exactly
    r = alg.mse(w, INT4, min_ratio=1.0, steps=1)  # no clipping: positive scales only
    assert float(r.scale) > 0 and int(r.q[0, 9]) == 7
    r = alg.mse(w, INT4, min_ratio=1.0, steps=1, signed_scales=True)  # m/-8 (Q4_0)
    assert float(r.scale) == pytest.approx(-1.0 / 8, rel=1e-3)
    assert int(r.q[0, 9]) == -8
    assert torch.allclose(r.dequantize(32)[0, 9], torch.tensor(1.0), atol=1e-3)


def test_magnitude_weighs_each_error_by_the_weights_size():
    """``magnitude: 1`` minimises ``sum |w| (w - w_q)^2``: it clips a group's largest weights
    less than the plain squared error does (what SmolLM2's KL rewards, docs/algorithms.md)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 64, generator=g) * 0.02
    w[torch.arange(64), torch.randint(0, 64, (64,), generator=g)] = 0.2  # one outlier per row
    wg = w.view(64, 2, 32)

    def errors(r: alg.Quantized) -> tuple[float, float, float]:
        d = (r.dequantize(32) - w).view(64, 2, 32)
        big = wg.abs() >= 0.2
        return float((d**2).sum()), float((wg.abs() * d**2).sum()), float(d[big].abs().mean())

    plain, sized, mm = (
        errors(alg.mse(w, INT4, magnitude=0.0)),
        errors(alg.mse(w, INT4, magnitude=1.0)),
        errors(alg.minmax(w, INT4)),
    )
    # measured (plain / magnitude / minmax): squared error 0.1339 / 0.1404 / 0.1377,
    # |w|-weighted 0.00365 / 0.00241 / 0.00442, the outliers' mean error 0.0098 / 0.0009 / 0.0133
    assert plain[0] < sized[0]
    assert sized[1] < 0.7 * plain[1] < mm[1]
    assert sized[2] < 0.2 * plain[2] < mm[2]
    hqq = errors(alg.hqq(w, INT4, magnitude=1.0))  # 0.1402 / 0.00240 / 0.0010
    assert hqq[1] <= sized[1] and hqq[2] < 0.2 * plain[2]
    # the default: by size on int4 without data; plain with activation statistics, and on int8
    assert torch.equal(alg.mse(w, INT4).scale, alg.mse(w, INT4, magnitude=1.0).scale)
    assert alg.default_magnitude(INT4) == 1.0
    assert alg.default_magnitude(INT4, importance=torch.ones(64)) == 0.0
    assert alg.default_magnitude(INT8) == 0.0
    for fn in (alg.mse, alg.hqq):
        with pytest.raises(ValueError, match="magnitude must be >= 0, got -1.0"):
            fn(w, INT4, magnitude=-1.0)


def test_gptq_with_an_identity_hessian_is_round_to_nearest(layer):
    w, _, _ = layer
    # GPTQ's mse is weighted by the Hessian's diagonal (here all ones), not by the weights' sizes
    rtn_mse = alg.mse(w, INT4, magnitude=0.0)
    for scales, rtn in (("minmax", alg.minmax(w, INT4)), ("mse", rtn_mse)):
        r = alg.gptq(w, INT4, torch.eye(256), scales=scales)
        assert torch.equal(r.scale, rtn.scale) and torch.equal(r.q, rtn.q)


def test_results_are_deterministic(layer):
    w, x, h = layer
    for name in ("mse", "hqq", "gptq"):
        a, b = _run(name, w, x, h, INT4), _run(name, w, x, h, INT4)
        assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)


def test_bad_input_is_named(layer):
    w, _, _ = layer
    with pytest.raises(ValueError, match=r"hessian must be \[256, 256\], got \(8, 8\)"):
        alg.gptq(w, INT4, torch.eye(8))
    with pytest.raises(ValueError, match=r"importance must have shape \(256,\), got \(3,\)"):
        alg.mse(w, INT4, importance=torch.ones(3))
    with pytest.raises(ValueError, match="scales must be 'mse' or 'minmax', got 'x'"):
        alg.gptq(w, INT4, torch.eye(256), scales="x")


INT4_8DA = Scheme("int4", "per_group", 32, scale_dtype="fp16", activation="int8_dynamic")
INT8_DYN = Scheme("int8", activation="int8_dynamic")


def _scaled_error(w, x, s, result, scheme) -> float:
    """Relative squared output error of a layer whose columns were scaled by ``s`` and inputs
    divided by it, quantized to ``result`` (activations per token when the scheme says so)."""
    from edgequant.kernels.reference import fake_quantize_tokens

    xs = x / s
    if scheme.activation == "int8_dynamic":
        xs = fake_quantize_tokens(xs, scheme.activation_symmetric)
    ref = x @ w.T
    got = xs @ result.dequantize(alg.group_size_of(scheme, w.shape[1])).T
    return float(((ref - got) ** 2).sum() / (ref**2).sum())


@pytest.mark.parametrize("scheme", [INT4, INT4_8DA], ids=lambda s: s.describe())
def test_awq_beats_minmax_on_the_layer_output(layer, scheme):
    w, x, _ = layer
    stats = alg.InputStats.of(x)
    ones = torch.ones(256)
    plain = _scaled_error(w, x, ones, alg.minmax(w, scheme), scheme)
    s = alg.awq_scales(stats, [w], [scheme])
    assert s.shape == (256,) and bool((s > 0).all())
    scaled_minmax = _scaled_error(w, x, s, alg.minmax(w * s, scheme), scheme)
    # what awq stores: mse clipping weighted by the scaled inputs' energy
    awq = _scaled_error(w, x, s, alg.mse(w * s, scheme, importance=stats.mean_sq / s**2), scheme)
    # measured (x 1e4): int4 g32 minmax 837.2, scaled 85.2, scaled + clipping 59.6;
    # with int8 per-token activations 841.6, 85.4, 59.8
    assert scaled_minmax < 0.15 * plain and awq < 0.8 * scaled_minmax, (plain, scaled_minmax, awq)


def test_smoothquant_beats_plain_int8_dynamic_on_the_layer_output(layer):
    w, x, _ = layer
    x = x.clone()
    x[:, :4] *= 5.0  # activation outliers 100x the rest: what per-token int8 loses to
    stats = alg.InputStats.of(x)
    plain = _scaled_error(w, x, torch.ones(256), alg.minmax(w, INT8_DYN), INT8_DYN)
    s = alg.smoothquant_scales(stats, [w], [INT8_DYN])
    smooth = _scaled_error(w, x, s, alg.minmax(w * s, INT8_DYN), INT8_DYN)
    fixed = alg.smoothquant_scales(stats, [w], [INT8_DYN], alpha=0.5)
    half = _scaled_error(w, x, fixed, alg.minmax(w * fixed, INT8_DYN), INT8_DYN)
    # measured (x 1e4): plain 8.33, alpha 0.5 0.28, searched 0.28
    assert smooth < 0.1 * plain and smooth <= half, (plain, half, smooth)


def test_smoothing_scales_are_tied_across_heads_sharing_a_value_head():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 4 * 8, generator=g) * torch.rand(32, generator=g) * 10
    w = torch.randn(16, 32, generator=g)
    for s in (
        alg.awq_scales(alg.InputStats.of(x), [w], [INT8_DYN], tie=(2, 8)),
        alg.smoothquant_scales(alg.InputStats.of(x), [w], [INT8_DYN], tie=(2, 8)),
    ):
        heads = s.view(2, 2, 8)  # [kv head, head sharing it, channel]
        assert torch.equal(heads[:, 0], heads[:, 1])


def test_smoothing_is_deterministic_and_checks_its_arguments(layer):
    w, x, _ = layer
    stats = alg.InputStats.of(x)
    assert torch.equal(alg.awq_scales(stats, [w], [INT4]), alg.awq_scales(stats, [w], [INT4]))
    with pytest.raises(
        ValueError, match=r"grid must be an integer >= 2 \(steps over \[0, 1\]\), got 1"
    ):
        alg.awq_scales(stats, [w], [INT4], grid=1)
    with pytest.raises(ValueError, match=r"smoothquant alpha must be in \[0, 1\], got 1.5"):
        alg.smoothquant_scales(stats, [w], [INT8_DYN], alpha=1.5)
    with pytest.raises(ValueError, match="awq scales a layer's inputs from calibration data"):
        alg.quantize_weight(w, dataclasses.replace(INT4, algorithm="awq"))
    with pytest.raises(ValueError, match="smoothquant' moves activation outliers"):
        Scheme("int8", algorithm="smoothquant")


@pytest.mark.parametrize("scheme", [INT4, INT4_ASYM, INT8], ids=lambda s: s.describe())
@pytest.mark.parametrize("name", ["mse", "hqq"])
def test_blocks_of_rows_give_the_whole_weights_result(layer, scheme, name, monkeypatch):
    w, _, h = layer
    algorithm = {"mse": alg.mse, "hqq": alg.hqq}[name]
    whole = algorithm(w, scheme, importance=torch.diag(h).float())
    monkeypatch.setattr(alg, "BLOCK_ELEMENTS", 256 * 10)  # blocks of 10 rows, the last of 8
    blocks = alg.by_rows(algorithm, w, scheme, importance=torch.diag(h).float())
    assert torch.equal(blocks.q, whole.q) and torch.equal(blocks.scale, whole.scale)
    assert (blocks.zero_point is None) == (whole.zero_point is None)
    if whole.zero_point is not None:
        assert torch.equal(blocks.zero_point, whole.zero_point)
    # and through the dispatcher, which blocks every mse / hqq weight
    via = alg.quantize_weight(w, dataclasses.replace(scheme, algorithm=name))
    assert torch.equal(via.q, algorithm(w, dataclasses.replace(scheme, algorithm=name)).q)


def test_gptq_reads_the_hessians_lower_triangle_in_blocks(monkeypatch):
    # the Cholesky runs in place on the column-major view of H after H's upper triangle is
    # made its lower one's mirror, a block of rows at a time (a float x^T x need not be
    # symmetric bit for bit): the same result as on the mirrored matrix, however it is cut
    torch.manual_seed(5)
    w = torch.randn(64, 96)
    x = torch.randn(400, 96) * torch.rand(96)
    h = (2 * x.T @ x / 400).double()
    skewed = h + torch.randn_like(h).tril(-1) * 1e-3  # lower triangle differs from the upper
    mirrored = skewed.tril() + skewed.tril(-1).T
    want = alg.gptq(w, INT4, mirrored)
    monkeypatch.setattr(alg, "BLOCK_ELEMENTS", 96 * 7)  # blocks of 7 rows, the last of 5
    assert torch.equal(alg._mirror_lower(skewed.clone()), mirrored)
    got = alg.gptq(w, INT4, skewed.clone(), overwrite_hessian=True)
    assert torch.equal(got.q, want.q) and torch.equal(got.scale, want.scale)
    other = alg.gptq(w, INT4, skewed.triu() + skewed.triu(1).T)  # the upper one: not the same
    assert not torch.equal(other.q, want.q)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_a_block_of_rows_at_a_time_is_the_same_rounding(monkeypatch, act_order):
    # rows are independent given the inverse Hessian: GPTQ copies a block of rows at a time
    # (a 151,936-row head's float32 copy is 0.9 GB); only the update GEMM's row split may
    # round differently on some CPU, so the integers are held to (nearly) all equal
    torch.manual_seed(6)
    w = torch.randn(300, 96)
    x = torch.randn(500, 96) * torch.rand(96)
    h = (2 * x.T @ x / 500).double()
    whole = alg.gptq(w, INT4_ASYM, h, act_order=act_order)
    monkeypatch.setattr(alg, "GPTQ_ROWS_ELEMENTS", 96 * 64)  # blocks of 64 rows, the last 44
    blocks = alg.gptq(w, INT4_ASYM, h, act_order=act_order)
    assert (blocks.q != whole.q).float().mean() < 1e-3
    assert torch.allclose(blocks.scale.float(), whole.scale.float(), rtol=1e-3)
    assert (blocks.zero_point != whole.zero_point).float().mean() < 1e-3


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_weighing_many_candidates_at_once_chooses_as_one_at_a_time(symmetric, monkeypatch):
    # the first strictly best candidate after min-max's, whatever how many are weighed at once
    torch.manual_seed(0)
    w = torch.randn(96, 128) * torch.rand(128) * 0.05
    w[:, :32] = torch.round(w[:, :32] * 200) / 200  # ties between candidates
    importance = torch.rand(128) * 3
    scheme = Scheme("int4", "per_group", 32, symmetric=symmetric)
    found = []
    for at_once in (64, 7, 1):
        monkeypatch.setattr(alg, "MSE_ELEMENTS", at_once * w.numel())
        found.append(alg.mse(w, scheme, importance=importance, magnitude=1.0))
    for other in found[1:]:
        assert torch.equal(other.q, found[0].q) and torch.equal(other.scale, found[0].scale)
        if not symmetric:
            assert torch.equal(other.zero_point, found[0].zero_point)


def test_gptaq_target_maps_the_rounded_inputs_to_the_float_outputs_by_least_squares():
    g = torch.Generator().manual_seed(0)
    xf = torch.randn(512, 16, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, 16)
    xq = xf + 0.2 * torch.randn(512, 16, generator=g, dtype=torch.float64)
    w = torch.randn(8, 16, generator=g)
    n = xf.shape[0]
    hessian, shift = 2 * xq.T @ xq / n, 2 * (xf - xq).T @ xq / n
    best = torch.linalg.lstsq(xq, xf @ w.double().T).solution.T  # argmin |X_q W'^T - X_f W^T|
    whole = alg.gptaq_target(w, hessian, shift, 1.0, damp=1e-12)
    assert whole.dtype == torch.float32
    assert torch.allclose(whole.double(), best, atol=1e-5)
    assert (whole - w).abs().max() > 0.05  # a real step, not the weight again
    half = alg.gptaq_target(w, hessian, shift, 0.5, damp=1e-12)
    assert torch.allclose(half.double(), (w.double() + best) / 2, atol=1e-5)
    assert torch.equal(alg.gptaq_target(w, hessian, shift, 0.0), w)
    # the damping GPTQ adds to the Hessian (a fraction of its mean diagonal) shortens the step
    damped = alg.gptaq_target(w, hessian, shift, 1.0, damp=1.0)
    assert (damped - w).norm() < (whole - w).norm()
    with pytest.raises(ValueError) as e:
        alg.gptaq_target(w, hessian, shift[:4], 1.0)
    assert str(e.value) == "hessian and shift must be [16, 16], got (16, 16) and (4, 16)"


def test_gptaq_target_with_the_streams_gap_maps_to_the_float_outputs_plus_that_gap():
    # gap G = 2 R^T X_q / n: the weight that best maps X_q to X_f W^T + R at alpha = beta = 1
    g = torch.Generator().manual_seed(1)
    xf = torch.randn(512, 16, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, 16)
    xq = xf + 0.2 * torch.randn(512, 16, generator=g, dtype=torch.float64)
    w = torch.randn(8, 16, generator=g)
    r = 0.3 * torch.randn(512, 8, generator=g, dtype=torch.float64)
    n = xf.shape[0]
    hessian, shift, gap = 2 * xq.T @ xq / n, 2 * (xf - xq).T @ xq / n, 2 * r.T @ xq / n
    best = torch.linalg.lstsq(xq, xf @ w.double().T + r).solution.T
    got = alg.gptaq_target(w, hessian, shift, 1.0, damp=1e-12, gap=gap, beta=1.0)
    assert torch.allclose(got.double(), best, atol=1e-5)
    # beta 0 (or no gap) is GPTAQ's own target; the gap's step adds to it linearly
    plain = alg.gptaq_target(w, hessian, shift, 1.0, damp=1e-12)
    assert torch.equal(alg.gptaq_target(w, hessian, shift, 1.0, damp=1e-12, gap=gap), plain)
    quarter = alg.gptaq_target(w, hessian, shift, 1.0, damp=1e-12, gap=gap, beta=0.25)
    assert torch.allclose(quarter.double(), plain.double() + 0.25 * (best - plain.double()),
                          atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError) as e:
        alg.gptaq_target(w, hessian, shift, 1.0, gap=gap[:, :4], beta=1.0)
    assert str(e.value) == "gap must be [8, 16], got (8, 4)"
