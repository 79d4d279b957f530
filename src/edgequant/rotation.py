"""Orthogonal rotations folded into a decoder's weights (QuaRot / SpinQuant's R1 and R2), so
that outliers spread across channels before rounding while the float model computes the same
function and every runtime runs the same graph.

`rotate(model, seed=0)` works in place on any model the decoder adopts (`decoder_of`):

1. **Norms folded**: each RMSNorm's weight (Gemma's ``offset + weight``) is multiplied into
   the columns of the linears that read it (q/k/v or qkv; gate/up or gate_up; the head), and
   the norm then multiplies by one. An RMSNorm without a weight commutes with any rotation:
   ``rms(x Q) = rms(x)``.
2. **R1, the residual stream**: ``Q`` (``dim x dim``, `orthogonal`) turns every hidden state
   ``x`` into ``x Q``: the embedding's rows ``E Q``; a linear reading the stream ``W Q``; one
   writing to it (attention output, down projection) ``Q^T W`` (its bias ``b Q``); the head
   ``W Q``.
3. **R2, each attention head's values**: ``R`` (``head_dim x head_dim``) turns each kv head's
   values into ``v R`` (the value projection's rows of that head ``R^T W_v``, its bias
   ``b R``) and the output projection's columns of every head ``W_o R``: attention mixes
   whole value vectors, so ``(sum a v R) R^T = sum a v``.

A tied embedding and head cannot share one matrix once the final norm's weight is folded into
the head: the head is untied (a tensor of its own, counted in the plan's bytes) unless that
weight is all ones. Gemma 3's sandwich norms (a norm on each branch's output before it joins
the stream) multiply the stream elementwise, which no rotation passes through: refused.
"""

from __future__ import annotations

import dataclasses
import math
from functools import cache

import torch
from torch import nn

from edgequant.recipe import ROTATIONS

# ---- orthogonal matrices ---------------------------------------------------------------------


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % p for p in range(2, math.isqrt(n) + 1))


@cache
def _paley(q: int) -> torch.Tensor:
    """Paley's Hadamard matrix of order ``q + 1`` for a prime ``q = 3 (mod 4)``."""
    chi = torch.zeros(q, dtype=torch.float64)  # the quadratic character mod q
    for x in range(1, q):
        chi[x * x % q] = 1
    chi[1:][chi[1:] == 0] = -1
    idx = torch.arange(q)
    jacobsthal = chi[(idx[None, :] - idx[:, None]) % q]  # Q[i, j] = chi(j - i)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jacobsthal
    return s + torch.eye(q + 1, dtype=torch.float64)


@cache
def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order ``n`` (entries +-1, ``H H^T = n I``, float64) built as
    Kronecker products of Sylvester's order 2 and Paley's orders ``q + 1`` (``q`` a prime,
    ``3 mod 4``: 4, 8, 12, 20, 24, 32, 44, 48, ...); None when none of these builds it.

    >>> h = hadamard(12)
    >>> bool((h @ h.T == 12 * torch.eye(12, dtype=h.dtype)).all())
    True
    >>> [n for n in (576, 896, 1152, 1536, 2560, 3072, 36, 9) if hadamard(n) is None]
    [36, 9]
    """
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if n % 2:
        return None
    if n % 4 == 0 and _is_prime(n - 1) and (n - 1) % 4 == 3:
        return _paley(n - 1)
    for q in range(3, n, 4):  # a Paley factor times the rest
        if n % (q + 1) == 0 and _is_prime(q):
            rest = hadamard(n // (q + 1))
            if rest is not None:
                return torch.kron(_paley(q), rest)
    half = hadamard(n // 2)
    if half is None:
        return None
    return torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), half)


def orthogonal(n: int, kind: str = "hadamard", seed: int = 0) -> torch.Tensor:
    """A seeded ``n x n`` orthogonal matrix (float64): ``hadamard``, a Hadamard matrix with its
    rows' signs drawn at random, scaled by ``1 / sqrt(n)`` (refused when `hadamard` cannot
    build order ``n``); ``random``, the Q of a Gaussian matrix's QR (signs fixed by R's
    diagonal)."""
    if kind not in ROTATIONS:
        raise ValueError(f"rotation {kind!r}: choose one of {list(ROTATIONS)}")
    generator = torch.Generator().manual_seed(seed)
    if kind == "random":
        q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))[None, :]
    h = hadamard(n)
    if h is None:
        raise ValueError(
            f"no Hadamard matrix of order {n} is built here (Sylvester's 2^k times Paley's "
            "q + 1 for primes q = 3 mod 4); use the 'random' rotation for this width"
        )
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
    return signs[:, None] * h / math.sqrt(n)


# ---- folding into a model --------------------------------------------------------------------


def _scale_columns(linear: nn.Module, scale: torch.Tensor) -> None:
    w = linear.weight
    w.copy_((w.double() * scale[None, :]).to(w.dtype))


def _fold_norm(norm: nn.Module, readers: list[nn.Module]) -> None:
    """Multiply ``norm``'s effective weight into its ``readers``' input columns; the norm then
    multiplies by one."""
    scale = norm.weight.detach().double() + norm.offset
    for linear in readers:
        _scale_columns(linear, scale)
    norm.weight.copy_(torch.full_like(norm.weight, 1.0 - norm.offset))


def _readers(block: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    attention, mlp = block.attention, block.feed_forward
    qkv = [attention.wqkv] if attention.fused else [attention.wq, attention.wk, attention.wv]
    gate_up = [mlp.w13] if mlp.fused else [mlp.w1, mlp.w3]
    return qkv, gate_up


def _rotate_input(linear: nn.Module, q: torch.Tensor) -> None:  # reads the stream: W Q
    w = linear.weight
    w.copy_((w.double() @ q).to(w.dtype))


def _rotate_output(linear: nn.Module, q: torch.Tensor) -> None:  # writes to it: Q^T W, b Q
    w = linear.weight
    w.copy_((q.T @ w.double()).to(w.dtype))
    if linear.bias is not None:
        linear.bias.copy_((linear.bias.double() @ q).to(linear.bias.dtype))


def check(model: nn.Module) -> nn.Module:
    """The decoder of ``model`` (`decoder_of`) if `rotate` can turn it; else ValueError."""
    from edgequant.models.families import decoder_of
    from edgequant.quantize import is_quantized

    try:
        decoder = decoder_of(model)
    except (ValueError, TypeError) as e:
        raise ValueError(f"rotate needs a model edgequant's decoder runs: {e}") from None
    if decoder.spec.sandwich_norms:
        raise ValueError(
            "this model's family norms each branch's output before it joins the residual "
            "stream (Gemma 3's sandwich norms): an elementwise scale no rotation of the stream "
            "passes through, so it cannot be rotated"
        )
    quantized = [n for n, m in decoder.named_modules() if is_quantized(m)]
    if quantized:
        raise ValueError(f"rotate the float model, before quantizing ({quantized[0]} is packed)")
    return decoder


def unties_head(model: nn.Module) -> str | None:
    """The FQN of ``model``'s head when `rotate` will give it a weight of its own (a tied
    head whose final norm's weight is not all ones), else None."""
    decoder = check(model)
    if not _unties(decoder):
        return None
    return next(fqn for fqn, m in model.named_modules() if m is decoder.output)


def _tied(decoder: nn.Module) -> bool:
    """Whether the head reads the embedding's tensor (whatever the config says: a model may
    share the tensor without the flag)."""
    return decoder.output.weight is decoder.tok_embeddings.weight


def _unties(decoder: nn.Module) -> bool:
    return _tied(decoder) and not bool((decoder.norm.weight + decoder.norm.offset == 1).all())


@torch.no_grad()
def rotate(model: nn.Module, kind: str = "hadamard", seed: int = 0) -> dict:
    """Fold the norms and the rotations R1 (residual stream) and R2 (values, per head) into
    ``model``'s float weights, in place (see the module's text); returns what was done:
    ``kind``, ``seed``, ``untied_head`` (whether the head had to become a tensor of its own).
    The model computes the same logits up to float rounding."""
    decoder = check(model)
    untie = _unties(decoder)
    spec = decoder.spec
    r1 = orthogonal(spec.dim, kind, seed)
    r2 = orthogonal(spec.head_dim, kind, seed + 1)
    if untie:
        _untie(model, decoder)
    for block in decoder.layers:
        qkv, gate_up = _readers(block)
        _fold_norm(block.attention_norm, qkv)
        _fold_norm(block.ffn_norm, gate_up)
    _fold_norm(decoder.norm, [decoder.output])

    embedding = decoder.tok_embeddings.weight
    embedding.copy_((embedding.double() @ r1).to(embedding.dtype))
    for block in decoder.layers:
        qkv, gate_up = _readers(block)
        for linear in [*qkv, *gate_up]:
            _rotate_input(linear, r1)
        _rotate_output(block.attention.wo, r1)
        _rotate_output(block.feed_forward.w2, r1)
        _rotate_values(block.attention, spec, r2)
    if not _tied(decoder):  # else the head reads the embedding's turned tensor
        _rotate_input(decoder.output, r1)
    return {"kind": kind, "seed": seed, "untied_head": untie}


def _rotate_values(attention: nn.Module, spec, r: torch.Tensor) -> None:
    """R2: each kv head's value rows ``R^T W_v`` (bias ``b R``), every head's output-projection
    columns ``W_o R``."""
    d, kv, heads = spec.head_dim, spec.n_kv_heads, spec.n_heads
    if attention.fused:
        linear, first = attention.wqkv, heads * d + kv * d  # v: the last kv * d rows
    else:
        linear, first = attention.wv, 0
    w = linear.weight
    rows = w[first : first + kv * d].double().reshape(kv, d, -1)
    w[first : first + kv * d] = torch.einsum("ji,hjc->hic", r, rows).reshape(kv * d, -1).to(w.dtype)
    if linear.bias is not None:
        b = linear.bias
        b[first : first + kv * d] = (
            (b[first : first + kv * d].double().reshape(kv, d) @ r).reshape(-1).to(b.dtype)
        )
    wo = attention.wo.weight
    cols = wo.double().reshape(wo.shape[0], heads, d)
    wo.copy_(torch.einsum("ohj,ji->ohi", cols, r).reshape(wo.shape).to(wo.dtype))


def _untie(model: nn.Module, decoder: nn.Module) -> None:
    """Give the head a weight of its own (a copy of the embedding's)."""
    head = nn.Parameter(decoder.output.weight.detach().clone(), requires_grad=False)
    decoder.output.weight = head
    decoder.spec = decoder.spec.replace(tied_embedding=False)
    args = getattr(model, "args", None)  # llama2.c: its header's flag rebuilds the bundle's shape
    if hasattr(args, "tied_embedding"):
        model.args = dataclasses.replace(args, tied_embedding=False)
    config = getattr(model, "config", None)
    if config is not None:
        config.tie_word_embeddings = False
        text = getattr(config, "get_text_config", lambda: None)()
        if text is not None:
            text.tie_word_embeddings = False


__all__ = ["ROTATIONS", "check", "hadamard", "orthogonal", "rotate", "unties_head"]
