"""Post-training algorithms that choose a packed weight's integers and scales.

Each takes a float weight ``[rows, cols]`` and its `Scheme` and returns `Quantized` on edgequant's
grid (`edgequant.primitives`: the same integer ranges, scale dtypes and layouts), so every
exporter writes an algorithm's result unchanged:

- ``minmax``: each group's scale from its range (`primitives.choose_qparams`).
- ``mse``: per group, the scale (and, for narrow grids, the sign that puts the largest-magnitude
  weight on the grid's longer side, as GGUF's Q4_0 does) minimising the reconstruction error,
  weighted per input column by activation statistics when given, and otherwise (below 8 bits)
  by each weight's size (`default_magnitude`).
- ``hqq``: half-quadratic optimisation of the scales (symmetric) or zero points (asymmetric)
  against an l_p (p < 1) error that tolerates outliers, weighted as ``mse``'s; calibration-free.
- ``gptq``: column by column rounding with Hessian-based compensation of the error in the
  columns not yet quantized (needs the layer's input Hessian ``X^T X`` from calibration data).
- ``awq`` and ``smoothquant``: a per-input-channel scale ``s`` for the linears that read one
  input (`awq_scales`, `smoothquant_scales`), searched on calibration inputs; the weights'
  columns are multiplied by ``s`` and the op that produces the input is divided by it
  (`edgequant.smoothing` folds it into a norm or the preceding linear), so the float model
  computes the same function and the exported graph is unchanged. AWQ's candidates are
  ``mean|x|^a`` (salient inputs get finer weights), SmoothQuant's ``max|x|^a / max|w|^(1-a)``
  (activation outliers move into the weights, for int8 activations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgequant.kernels.reference import fake_quantize_tokens
from edgequant.primitives import (
    BLOCK_ELEMENTS,
    FLOAT_DTYPES,
    choose_qparams,
    quantize,
    rows_per_block,
    stored_range,
)
from edgequant.schemes import Scheme


def default_magnitude(scheme: Scheme, importance: torch.Tensor | None = None) -> float:
    """The ``magnitude`` that `mse` and `hqq` (and the ``mse`` inside `gptq` and `awq`) weigh
    errors by unless told: 1 (each weight's squared error times its size) on grids narrower than
    8 bits when no activation statistics (``importance``) are given, since without data a
    weight's size is the best sign of how much its rounding costs; otherwise 0 (plain squared
    error): int8's loss is in the activations, and measured activation energies say more than
    sizes do (SmolLM2, docs/algorithms.md)."""
    return 1.0 if scheme.bits < 8 and importance is None else 0.0


@dataclass(frozen=True)
class Quantized:
    """A weight's integers ``q`` (int8, ``[rows, cols]``), ``scale`` (``[rows, n_groups]`` in the
    scheme's scale dtype) and ``zero_point`` (int8 like ``scale``; None when symmetric)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None

    def dequantize(self, group_size: int) -> torch.Tensor:
        s = self.scale.float().repeat_interleave(group_size, dim=1)
        z = (
            0
            if self.zero_point is None
            else self.zero_point.float().repeat_interleave(group_size, dim=1)
        )
        return (self.q.float() - z) * s


def group_size_of(scheme: Scheme, cols: int) -> int:
    """Columns per scale: the group, or the whole row (per channel)."""
    if scheme.granularity == "per_group":
        return int(scheme.group_size)
    if scheme.granularity == "per_channel":
        return cols
    raise ValueError(f"algorithms work per channel or per group, not {scheme.granularity!r}")


def grid(scheme: Scheme) -> tuple[int, int]:
    """The integers a scheme stores: int8 symmetric is narrow-range [-127, 127]."""
    return stored_range(scheme.bits, scheme.symmetric)


def _groups(x: torch.Tensor, g: int) -> torch.Tensor:
    rows, cols = x.shape
    return x.reshape(rows, cols // g, g)


def _store(scale: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """fp32 scales (any sign, never 0) in the scheme's scale dtype."""
    tiny = torch.finfo(torch.float32).eps
    scale = torch.where(scale.abs() < tiny, torch.full_like(scale, tiny), scale)
    return scale.to(FLOAT_DTYPES[scheme.scale_dtype])


def _round(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    scheme: Scheme,
    out: torch.Tensor | None = None,
):
    """Integers of ``w`` ``[rows, n, g]`` on the stored ``scale`` (and ``zero``) ``[rows, n]``
    (into ``out``, shaped like ``w``, when given)."""
    qmin, qmax = grid(scheme)
    q = torch.div(w, scale.float()[..., None], out=out).round_()
    if zero is not None:
        q.add_(zero.float()[..., None])
    return q.clamp_(qmin, qmax)


def _result(q: torch.Tensor, scale, zero, shape) -> Quantized:
    return Quantized(q.reshape(shape).to(torch.int8), scale, zero)


def minmax(weight: torch.Tensor, scheme: Scheme) -> Quantized:
    """edgequant's default: each group's range onto the grid (`primitives.choose_qparams`)."""
    kw = {"granularity": scheme.granularity, "group_size": scheme.group_size}
    scale, zero = choose_qparams(
        weight, bits=scheme.bits, symmetric=scheme.symmetric,
        scale_dtype=scheme.torch_scale_dtype, **kw,
    )  # fmt: skip
    q = quantize(weight, scale, zero, bits=scheme.bits, **kw)
    return Quantized(q, scale, None if scheme.symmetric else zero)


def mse(
    weight: torch.Tensor,
    scheme: Scheme,
    *,
    importance: torch.Tensor | None = None,
    steps: int = 64,
    min_ratio: float = 0.5,
    signed_scales: bool = False,
    magnitude: float | None = None,
) -> Quantized:
    """Per group, the scale among ``steps`` candidates that minimises ``sum_j importance_j *
    |w_j|^magnitude * (w_j - dequantized_j)^2``; ``importance`` (``[cols]``, e.g. the mean
    squared activation of each input feature) defaults to 1. ``magnitude`` weighs each weight's
    error by its size (0: plain squared error; None: `default_magnitude`).

    Symmetric candidates are ``base * r`` for ratios ``r`` from ``min_ratio`` (clipping) to 1,
    where ``base`` puts ``m``, the group's weight of largest magnitude, exactly on the grid's end:
    on -8 of [-8, 7] when ``m`` is negative, on 7 when it is positive. With ``signed_scales``,
    ``m`` always lands on -8 (GGUF Q4_0's choice, a negative scale when ``m`` is positive): a
    finer grid, but XNNPACK (ExecuTorch, LiteRT) refuses negative scales, so only GGUF can run
    it. min-max's own scale is a candidate too, so the result is never worse than min-max on
    this error. Asymmetric candidates shrink the group's range ``[lo, hi]`` by ``r``."""
    w = weight.detach().float()
    rows, cols = w.shape
    g = group_size_of(scheme, cols)
    wg = _groups(w, g)
    imp = _importance(importance, wg, magnitude, scheme)
    qmin, qmax = grid(scheme)
    best = minmax(weight, scheme)
    best_scale = best.scale.clone()
    best_zero = None if best.zero_point is None else best.zero_point.clone()
    # several candidates at once where the weight is small (GPTQ asks for one group of columns
    # at a time: per candidate, the calls would cost more than the arithmetic)
    at_once = min(steps, max(1, MSE_ELEMENTS // wg.numel()))
    buffer = torch.empty((at_once, *wg.shape))
    err = _error(wg, best_scale, best_zero, imp, scheme, buffer[0])
    ratios = torch.linspace(min_ratio, 1.0, steps)
    if scheme.symmetric:
        idx = wg.abs().argmax(dim=-1, keepdim=True)
        m = torch.gather(wg, -1, idx)[..., 0]  # signed, largest magnitude
        if qmin == -qmax:  # narrow int8: both ends alike
            base = m.abs() / qmax
        elif signed_scales:
            base = m / qmin
        else:
            base = m.abs() / torch.where(m < 0, float(-qmin), float(qmax))
    else:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    for c in range(0, steps, at_once):
        r = ratios[c : c + at_once].view(-1, 1, 1)  # [k, 1, 1] over the groups' [rows, n]
        if scheme.symmetric:
            scale, zero = _store(base * r, scheme), None
        else:
            scale = _store(((hi - lo) * r / (qmax - qmin)).clamp(min=1e-12), scheme)
            zero = (qmin - torch.round(lo * r / scale.float())).clamp(qmin, qmax)
        e = _error(wg, scale, zero, imp, scheme, buffer[: r.shape[0]])
        # the first of the smallest, and only when strictly better: as one candidate at a time
        e, k = e.min(0)
        better = e < err
        err = torch.where(better, e, err)
        best_scale = torch.where(better, scale.gather(0, k[None])[0], best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero.gather(0, k[None])[0].to(torch.int8), best_zero)
    q = _round(wg, best_scale, best_zero, scheme, buffer[0])
    return _result(q, best_scale, best_zero, w.shape)


# values `mse` computes its candidates' errors on at once (64 candidates of a 1,536-row group)
MSE_ELEMENTS = 1 << 22


def _importance(
    importance: torch.Tensor | None, wg: torch.Tensor, magnitude: float | None, scheme: Scheme
) -> torch.Tensor | None:
    """Each weight's share of the error, shaped like the groups ``wg`` ``[rows, n, g]`` (or
    broadcast to it): per-input-column ``importance`` ``[cols]`` times ``|w|^magnitude``; None
    when both are off (plain squared error)."""
    _, n, g = wg.shape
    imp = None
    if importance is not None:
        imp = importance.detach().float().clamp(min=0)
        if imp.shape != (n * g,):
            raise ValueError(f"importance must have shape ({n * g},), got {tuple(imp.shape)}")
        imp = imp.view(1, n, g)
    if magnitude is None:
        magnitude = default_magnitude(scheme, importance)
    if magnitude < 0:
        raise ValueError(f"magnitude must be >= 0, got {magnitude}")
    if magnitude:
        size = wg.abs().pow(magnitude)
        imp = size if imp is None else imp * size
    return imp


def _error(wg, scale, zero, imp, scheme, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per group ``sum imp * (w - dequantized)^2`` (``imp`` None: 1), in place on one buffer
    (``out``, shaped like ``wg``, when given; this runs once per candidate scale: allocations
    cost more than the arithmetic)."""
    q = _round(wg, scale, zero, scheme, out)
    if zero is not None:
        q.sub_(zero.float()[..., None])
    q.mul_(scale.float()[..., None]).sub_(wg).square_()
    if imp is not None:
        q.mul_(imp)
    return q.sum(-1)


def hqq(
    weight: torch.Tensor,
    scheme: Scheme,
    *,
    iters: int = 20,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    start: str = "mse",
    importance: torch.Tensor | None = None,
    magnitude: float | None = None,
) -> Quantized:
    """Half-quadratic quantization (Badri & Shaji, 2023), calibration-free: alternate rounding,
    an l_p shrinkage of the residual (which lets outliers go) and a closed-form update of the
    scale (symmetric: least squares of the kept part on the integers) or zero point
    (asymmetric). Starts from `mse`'s scales (``start="minmax"``: from min-max's, as torchao's
    scale-only HQQ does); keeps the iterate with the lowest error. The least-squares update and
    that error are weighted as `mse`'s (``importance`` per input column, ``|w|^magnitude``)."""
    if start not in ("mse", "minmax"):
        raise ValueError(f"hqq start must be 'mse' or 'minmax', got {start!r}")
    w = weight.detach().float()
    rows, cols = w.shape
    g = group_size_of(scheme, cols)
    wg = _groups(w, g)
    imp = _importance(importance, wg, magnitude, scheme)
    start = (
        mse(weight, scheme, importance=importance, magnitude=magnitude)
        if start == "mse"
        else minmax(weight, scheme)
    )
    scale = start.scale.float()
    zero = None if start.zero_point is None else start.zero_point.float()
    best_scale, best_zero = start.scale, start.zero_point
    # four buffers shaped like the weight, reused by every step (each op writes into one: a
    # new tensor per op cost more than its arithmetic); the arithmetic is the one written in
    # the comments, op for op
    qb, rb, ab, tb = (torch.empty_like(wg) for _ in range(4))
    best_err = _error(wg, best_scale, best_zero, imp, scheme, qb)
    share = torch.ones(1, cols // g, g) if imp is None else imp
    qmin, qmax = grid(scheme)
    for _ in range(iters):
        z = 0.0 if zero is None else zero[..., None]
        s = scale[..., None]
        # q = (round(wg / s) + z).clamp(qmin, qmax)
        q = torch.div(wg, s, out=qb).round_().add_(z).clamp_(qmin, qmax)
        # residual = wg - (q - z) * s
        residual = torch.sub(wg, torch.sub(q, z, out=rb).mul_(s), out=rb)
        # kept = wg - _shrink(residual, beta, p)
        kept = torch.sub(wg, _shrink(residual, beta, p, ab, tb), out=rb)
        if zero is None:
            # num = (share * kept * q).sum(-1), den = (share * q * q).sum(-1)
            num = torch.mul(share, kept, out=ab).mul_(q).sum(-1)
            den = torch.mul(share, q, out=tb).mul_(q).sum(-1)
            scale = torch.where(den > 0, num / den.clamp(min=1e-12), scale)
        else:
            # shift = (share * (q - kept / s)).sum(-1)
            shift = torch.sub(q, kept.div_(s), out=rb).mul_(share).sum(-1)
            zero = (shift / share.sum(-1).clamp(min=1e-12)).round().clamp(qmin, qmax)
        beta *= kappa
        stored = _store(scale, scheme)
        zq = None if zero is None else zero.to(torch.int8)
        e = _error(wg, stored, zq, imp, scheme, qb)
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best_scale = torch.where(better, stored, best_scale)
        if zq is not None:
            best_zero = torch.where(better, zq, best_zero)
    return _result(_round(wg, best_scale, best_zero, scheme, qb), best_scale, best_zero, w.shape)


def _shrink(x: torch.Tensor, beta: float, p: float, a: torch.Tensor, t: torch.Tensor):
    """The proximal step of the l_p (p < 1) norm, ``sign(x) * relu(|x| - |x|.clamp(min=1e-12)
    ^ (p - 1) / beta)``: small residuals go to 0, large ones stay. Computed in the buffers
    ``a`` and ``t`` (shaped like ``x``); returns ``t``."""
    torch.abs(x, out=a)
    torch.clamp(a, min=1e-12, out=t).pow_(p - 1).div_(beta)
    a.sub_(t).relu_()
    return torch.sign(x, out=t).mul_(a)


def gptq(
    weight: torch.Tensor,
    scheme: Scheme,
    hessian: torch.Tensor,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    block: int = 128,
    scales: str = "mse",
    magnitude: float | None = None,
    sequential: bool = False,
    overwrite_hessian: bool = False,
) -> Quantized:
    """GPTQ (Frantar et al., 2022): quantize columns in order (by decreasing Hessian diagonal
    with ``act_order``), pushing each column's rounding error onto the columns not yet quantized
    through the inverse Hessian ``(2 X^T X + damp * mean(diag) * I)^-1``. Each group's scale is
    chosen (``scales``: ``mse`` weighted by the Hessian's diagonal, and by ``|w|^magnitude``
    when ``magnitude`` is given, or ``minmax``) from the updated weights when the group is
    reached, or from the original weights up front with ``act_order`` (groups keep their
    columns either way, so the layout is the scheme's). With an identity Hessian nothing
    propagates: the result is round-to-nearest on the chosen scales. ``sequential`` is
    `edgequant.layerwise`'s (which inputs the Hessian is gathered from); one matrix ignores it.

    Memory: the inverse Hessian is computed in one ``[cols, cols]`` float64 matrix (a copy of
    ``hessian``, or ``hessian`` itself with ``overwrite_hessian``: 640 MB for 8,960 inputs) and
    used as float32 a block of rows at a time, and the weight in one float32 copy beside its
    int8 integers."""
    w = weight.detach()  # copied as float32 a block of rows at a time, below
    rows, cols = w.shape
    g = group_size_of(scheme, cols)
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian must be [{cols}, {cols}], got {tuple(hessian.shape)}")
    if scales not in ("mse", "minmax"):
        raise ValueError(f"scales must be 'mse' or 'minmax', got {scales!r}")
    H = hessian.detach().double()
    if not overwrite_hessian:
        H = H.clone()
    importance = torch.diag(H).float().clamp(min=0)

    def choose(part: torch.Tensor, sub: Scheme, cols: torch.Tensor) -> Quantized:
        if scales == "minmax":
            return minmax(part, sub)
        # weighted by each input's energy
        return mse(part, sub, importance=importance[cols], magnitude=magnitude)

    dead = _damped(H, damp)
    order = torch.arange(cols)
    if act_order:
        order = torch.argsort(torch.diag(H), descending=True)
        H = H[order][:, order]
    # each step in place, on the column-major view of H, the layout LAPACK works in: given a
    # row-major ``out`` torch computes into a column-major copy (640 MB more for 8,960 inputs)
    # and copies back. H made symmetric from its lower triangle (what the Cholesky reads; a
    # float x^T x need not be symmetric bit for bit), its transpose is the same matrix: the
    # same LAPACK calls on the same values, the same bits
    H = _mirror_lower(H).T
    try:
        torch.linalg.cholesky(H, out=H)
        torch.cholesky_inverse(H, out=H)
        Hinv = torch.linalg.cholesky(H, upper=True, out=H)  # float32 a block of rows at a time
        del H
    except torch.linalg.LinAlgError as e:
        raise ValueError(
            f"GPTQ: the Hessian is not positive definite even with damp={damp}; raise damp "
            "(e.g. 0.1) or give more calibration data"
        ) from e
    n_groups = cols // g
    scale = torch.zeros(rows, n_groups, dtype=FLOAT_DTYPES[scheme.scale_dtype])
    zero = None if scheme.symmetric else torch.zeros(rows, n_groups, dtype=torch.int8)
    if g < cols:  # whole groups per block, so a group's scale sees all its updates
        block = g * max(1, block // g)
    q_out = torch.zeros(rows, cols, dtype=torch.int8)
    qmin, qmax = grid(scheme)
    # rows are independent given Hinv: a block of rows at a time (a 151,936-row head's float32
    # copy is 0.9 GB); a model's decoder linears fit one block
    step = rows_per_block(cols, GPTQ_ROWS_ELEMENTS)
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        w_rows = w[r0:r1].float().clone()
        w_rows[:, dead] = 0.0
        s_rows, z_rows = scale[r0:r1], None if zero is None else zero[r0:r1]
        if act_order:  # static groups: scales from the original weights
            start = choose(w_rows, scheme, torch.arange(cols))
            s_rows.copy_(start.scale)
            if z_rows is not None:
                z_rows.copy_(start.zero_point)
        wp = w_rows[:, order] if act_order else w_rows
        q_rows = q_out[r0:r1]
        for i1 in range(0, cols, block):
            i2 = min(i1 + block, cols)
            W1 = wp[:, i1:i2].clone()
            Err = torch.zeros_like(W1)
            Hrows = Hinv[i1:i2].float()  # the rows of this block, as float32
            Hinv1 = Hrows[:, i1:i2]
            for i in range(i2 - i1):
                col = int(order[i1 + i])
                grp = col // g
                if not act_order and col % g == 0:  # entering a group: its scale from W now
                    if i + g <= W1.shape[1]:  # the group within the block (a view, no copy)
                        part = W1[:, i : i + g]
                    else:  # a group wider than the block (per channel)
                        part = torch.cat([W1[:, i:], wp[:, i2:]], dim=1)[:, :g]
                    chosen = choose(part, _per_channel(scheme), torch.arange(col, col + g))
                    s_rows[:, grp] = chosen.scale[:, 0]
                    if z_rows is not None:
                        z_rows[:, grp] = chosen.zero_point[:, 0]
                sc = s_rows[:, grp].float()
                z = 0.0 if z_rows is None else z_rows[:, grp].float()
                x = W1[:, i]
                q = (torch.round(x / sc) + z).clamp(qmin, qmax)
                q_rows[:, col] = q
                e = (x - (q - z) * sc) / Hinv1[i, i]
                W1[:, i:] -= e[:, None] * Hinv1[i, i:][None, :]
                Err[:, i] = e
            wp[:, i2:] -= Err @ Hrows[:, i2:]
    return Quantized(q_out, scale, zero)


def gptaq_target(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    shift: torch.Tensor,
    alpha: float,
    damp: float = 0.01,
    gap: torch.Tensor | None = None,
    beta: float = 0.0,
) -> torch.Tensor:
    """The weight GPTQ should round for GPTAQ's asymmetric calibration (Li et al., 2025,
    "GPTQv2"): a linear of the model being rounded reads ``x_q``, its float twin read ``x_f``;
    the weight that best maps ``x_q`` to the float output ``W x_f`` (least squares over the
    calibration rows) is ``W + W D H^-1``, with ``H = 2 X_q^T X_q / n`` (GPTQ's Hessian, damped
    as `gptq` damps it) and ``D = 2 (X_f - X_q)^T X_q / n`` (``shift``). Rounding that weight
    on ``H`` then minimizes the error against the float model's output, not against this
    linear's own float output on the rounded model's inputs. ``alpha`` takes that fraction of
    the step (``alpha = 0`` is ``weight``): the whole step fits the calibration rows' rounding
    noise too, shrinking every direction the inputs carry little energy in (measured on
    SmolLM2: KL 1.30 at 1, 0.085 at 0.25, against 0.101 without; docs/algorithms.md).

    ``gap`` (``G = 2 R^T X_q / n``, ``[rows, cols]``) with ``beta``: the linear's output is added
    to the residual stream, which differs by ``R`` between the float model and the model being
    rounded just before it; ``beta`` of the step ``G H^-1`` towards the weight that best maps
    ``x_q`` to the float output plus that difference moves the stream back towards the float
    model's. Returns float32."""
    rows, cols = weight.shape
    if hessian.shape != (cols, cols) or shift.shape != (cols, cols):
        raise ValueError(
            f"hessian and shift must be [{cols}, {cols}], got {tuple(hessian.shape)} and "
            f"{tuple(shift.shape)}"
        )
    if gap is not None and gap.shape != (rows, cols):
        raise ValueError(f"gap must be [{rows}, {cols}], got {tuple(gap.shape)}")
    w = weight.detach().double()
    if gap is None:
        beta = 0.0
    if alpha == 0 and beta == 0:
        return w.float()
    h = hessian.detach().double().clone()
    _damped(h, damp)
    # (alpha W D + beta G) H^-1, transposed: H^-1 (alpha D^T W^T + beta G^T), H symmetric
    right = alpha * (shift.detach().double().T @ w.T)
    if beta:
        right += beta * gap.detach().double().T
    step = torch.cholesky_solve(right, torch.linalg.cholesky(h))
    return w.add_(step.T).float()


def _damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    """GPTQ's damping of a Hessian, in place: a dead input's (no energy) diagonal set to 1,
    then ``damp`` x the mean diagonal added to every diagonal entry. Returns the dead mask."""
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * torch.diag(h).mean())
    return dead


# values of the weight GPTQ copies as float32 at once: every decoder linear of a 1.5B model
# fits, a 151,936-row head is done in 14 blocks
GPTQ_ROWS_ELEMENTS = 16 * BLOCK_ELEMENTS


def _mirror_lower(h: torch.Tensor) -> torch.Tensor:
    """``h`` with its strict upper triangle replaced by its lower one, in place, a block of rows
    at a time (no copy of the whole matrix)."""
    n = h.shape[0]
    step = rows_per_block(n, BLOCK_ELEMENTS)
    for i in range(0, n, step):
        j = min(i + step, n)
        d = h[i:j, i:j]
        d.copy_(d.tril() + d.tril(-1).T)
        h[i:j, j:] = h[j:, i:j].T
    return h


@dataclass(frozen=True)
class InputStats:
    """A linear's inputs, per input channel: ``mean_abs``, ``max_abs`` and ``mean_sq`` over every
    calibration row, and ``sample``, a subset of the rows ``[n, cols]`` for searching."""

    sample: torch.Tensor
    mean_abs: torch.Tensor
    max_abs: torch.Tensor
    mean_sq: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor) -> InputStats:
        """From all the rows ``x [n, cols]`` (all of them are the sample)."""
        x = x.reshape(-1, x.shape[-1]).float()
        a = x.abs()
        return cls(x, a.mean(0), a.amax(0), (x * x).mean(0))


def tie_heads(v: torch.Tensor, tie: tuple[int, int] | None) -> torch.Tensor:
    """``v`` over ``n_heads * head_dim`` channels averaged over the ``n_rep`` heads that share
    one key/value head (``tie = (n_rep, head_dim)``), so one scale serves them all."""
    if tie is None:
        return v
    n_rep, head_dim = tie
    return v.view(-1, n_rep, head_dim).mean(1, keepdim=True).expand(-1, n_rep, -1).reshape(-1)


def awq_scales(
    stats: InputStats,
    weights: list[torch.Tensor],
    schemes: list[Scheme],
    *,
    grid: int = 20,
    tie: tuple[int, int] | None = None,
) -> torch.Tensor:
    """AWQ (Lin et al., 2023): the per-input-channel scale ``s = mean|x|^a`` (normalised, ``a``
    in ``grid`` steps over [0, 1]; ``a = 0`` is no scaling) minimising the summed squared output
    error of the linears ``weights`` on ``stats.sample`` when each weight is quantized by
    min-max on its scheme as ``W * s`` and its input is ``x / s`` (quantized per token too when
    the scheme's activations are int8). ``tie`` keeps the scales of heads sharing a key/value
    head equal."""
    base = tie_heads(stats.mean_abs.float(), tie).clamp(min=1e-5)

    def candidate(a: float) -> torch.Tensor:
        s = base.pow(a)
        return s / (s.amax() * s.amin()).sqrt()

    return _best_scale(stats, weights, schemes, [candidate(float(a)) for a in _alphas(grid)])


def smoothquant_scales(
    stats: InputStats,
    weights: list[torch.Tensor],
    schemes: list[Scheme],
    *,
    alpha: float | None = None,
    grid: int = 11,
    tie: tuple[int, int] | None = None,
) -> torch.Tensor:
    """SmoothQuant (Xiao et al., 2023): ``s = max|x|^a / max|w|^(1-a)`` per input channel, which
    moves activation outliers into the weights so that per-token int8 activations lose less.
    ``alpha`` fixes ``a``; otherwise ``a`` is searched in ``grid`` steps over [0, 1] (no scaling
    is a candidate too) on the output error of the quantized linears, as in `awq_scales`."""
    xmax = tie_heads(stats.max_abs.float(), tie).clamp(min=1e-5)
    wmax = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)
    wmax = tie_heads(wmax, tie).clamp(min=1e-5)

    def candidate(a: float) -> torch.Tensor:
        return xmax.pow(a) / wmax.pow(1.0 - a)

    if alpha is not None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"smoothquant alpha must be in [0, 1], got {alpha!r}")
        return candidate(alpha)
    candidates = [torch.ones_like(xmax)] + [candidate(float(a)) for a in _alphas(grid)]
    return _best_scale(stats, weights, schemes, candidates)


def _alphas(grid: int) -> torch.Tensor:
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
        raise ValueError(f"grid must be an integer >= 2 (steps over [0, 1]), got {grid!r}")
    return torch.linspace(0.0, 1.0, grid)


def _best_scale(stats, weights, schemes, candidates) -> torch.Tensor:
    x = stats.sample.float()
    # linears with one scheme are quantized row by row alike: stack them into one matmul
    stacks: dict[Scheme, list[torch.Tensor]] = {}
    for w, scheme in zip(weights, schemes, strict=True):
        stacks.setdefault(scheme, []).append(w.detach().float())
    work = [(scheme, torch.cat(ws)) for scheme, ws in stacks.items()]
    refs = [x @ w.T for _, w in work]
    best, best_err = candidates[0], float("inf")
    for s in candidates:
        inputs: dict[tuple, torch.Tensor] = {}  # x / s as each activation mode sees it
        err = 0.0
        for (scheme, w), ref in zip(work, refs, strict=True):
            mode = (scheme.activation, scheme.activation_symmetric)
            if mode not in inputs:
                xs = x / s
                if scheme.activation == "int8_dynamic":
                    xs = fake_quantize_tokens(xs, scheme.activation_symmetric)
                inputs[mode] = xs
            wq = minmax(w * s, scheme).dequantize(group_size_of(scheme, w.shape[1]))
            out = inputs[mode] @ wq.T
            err += float(out.sub_(ref).square_().sum())
        if err < best_err:
            best, best_err = s, err
    return best


# mse and hqq work group by group, so a large weight is quantized a block of rows at a time
# (`primitives.BLOCK_ELEMENTS` values): the same integers and scales. Whole-tensor temporaries
# (113 MB each for SmolLM2's 49152 x 576 embedding, a dozen per step) were mapped and unmapped by
# the kernel on every step.


def by_rows(fn, weight: torch.Tensor, scheme: Scheme, **kwargs) -> Quantized:
    """``fn(rows, scheme, **kwargs)`` on blocks of about `BLOCK_ELEMENTS` weights (whole rows),
    the results stacked: equal to ``fn(weight, ...)`` for an algorithm that works per group."""
    rows, cols = weight.shape
    step = rows_per_block(cols, BLOCK_ELEMENTS)
    if rows <= step:
        return fn(weight, scheme, **kwargs)
    out: Quantized | None = None
    for i in range(0, rows, step):  # each block written into the result: no list to concatenate
        part = fn(weight[i : i + step], scheme, **kwargs)
        if out is None:

            def like(t: torch.Tensor | None) -> torch.Tensor | None:
                return None if t is None else t.new_empty((rows, *t.shape[1:]))

            out = Quantized(like(part.q), like(part.scale), like(part.zero_point))
        out.q[i : i + step] = part.q
        out.scale[i : i + step] = part.scale
        if out.zero_point is not None:
            out.zero_point[i : i + step] = part.zero_point
    return out


def quantize_weight(
    weight: torch.Tensor,
    scheme: Scheme,
    *,
    hessian: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
    name: str = "weight",
) -> Quantized:
    """``weight`` quantized by ``scheme.algorithm`` with ``scheme.params``; ``hessian`` (GPTQ)
    and ``importance`` (mse) come from calibration data."""
    params = scheme.params
    if scheme.algorithm == "minmax":
        return minmax(weight, scheme)
    if scheme.algorithm == "mse":
        return by_rows(mse, weight, scheme, importance=importance, **params)
    if scheme.algorithm == "hqq":
        return by_rows(hqq, weight, scheme, importance=importance, **params)
    if scheme.algorithm == "gptq":
        if hessian is None:
            raise ValueError(
                f"{name}: GPTQ needs calibration data; pass calibration= to edgequant.quantize "
                "(e.g. edgequant.calibration.wikitext(tokenizer)) or --calibration wikitext:128x512"
            )
        return gptq(weight, scheme, hessian, **params)
    if scheme.algorithm in ("awq", "smoothquant"):
        raise ValueError(
            f"{name}: {scheme.algorithm} scales a layer's inputs from calibration data and folds "
            "the scales into the op before it; run it through edgequant.quantize(model, recipe, "
            "calibration=...)"
        )
    raise ValueError(f"{name}: no algorithm {scheme.algorithm!r}")


def _per_channel(scheme: Scheme) -> Scheme:
    import dataclasses

    return dataclasses.replace(scheme, granularity="per_channel", group_size=None)


def output_error(weight: torch.Tensor, result: Quantized, scheme: Scheme, x: torch.Tensor):
    """``||x W^T - x W_q^T||^2 / ||x W^T||^2`` of a layer's outputs on inputs ``x [n, cols]``."""
    deq = result.dequantize(group_size_of(scheme, weight.shape[1]))
    ref = x.float() @ weight.float().T
    return float(((ref - x.float() @ deq.T) ** 2).sum() / (ref**2).sum().clamp(min=1e-30))


def hessian(x: torch.Tensor) -> torch.Tensor:
    """``2 X^T X / n`` of inputs ``x [n, cols]`` (GPTQ's Hessian of the squared output error)."""
    x = x.reshape(-1, x.shape[-1]).double()
    return (2.0 / max(x.shape[0], 1)) * (x.T @ x)


__all__ = [
    "InputStats",
    "Quantized",
    "awq_scales",
    "default_magnitude",
    "gptq",
    "grid",
    "group_size_of",
    "hessian",
    "hqq",
    "minmax",
    "mse",
    "output_error",
    "quantize_weight",
    "smoothquant_scales",
    "tie_heads",
]
