"""The one decoder every family and every runtime shares.

``Decoder(spec)`` is embedding -> blocks (norm, attention, norm, MLP) -> norm -> head, with what
differs between families read from a `DecoderSpec` (q/k/v biases, q/k norms, fused projections,
norm offsets, sandwich norms, sliding windows, rope scaling, softcaps). It is written once: the
KV cache and the attention kernel are passed in as an ``attend(layer, q, k, v) -> y`` callable
(``q [B, T, H, D]``, ``k, v [B, T, KV, D]`` after RoPE; ``y [B, T, H, D]``), so eager generation
(`KVCache`, `EagerAttention`), ExecuTorch and LiteRT (`edgequant.export.attention`) run the
same blocks with their own cache.

Module names follow llama2.c / Meta's (``tok_embeddings``, ``layers.N.attention.wq``,
``layers.N.feed_forward.w1`` ...), so a llama2.c checkpoint is a `Decoder`; a Hugging Face model
is adopted into one by its family file, which hands over the model's own (possibly quantized)
modules. RoPE uses the rotate-half convention (pairs ``(i, i + D/2)``), as Hugging Face does.

Example::

    >>> spec = DecoderSpec(vocab_size=16, dim=8, n_layers=1, n_heads=2, n_kv_heads=1,
    ...                    head_dim=4, hidden_dim=16, max_seq_len=8)
    >>> _ = torch.manual_seed(0)
    >>> model = Decoder(spec).eval()
    >>> tokens = torch.tensor([[1, 2, 3]])
    >>> full = model(tokens)                                 # [1, 3, 16], no cache
    >>> cache = model.new_cache()
    >>> first = model(tokens[:, :2], start_pos=0, cache=cache)
    >>> last = model(tokens[:, 2:], start_pos=2, cache=cache)
    >>> torch.allclose(full, torch.cat([first, last], dim=1), atol=1e-6)
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgequant.models.spec import DecoderSpec, RopeScaling

Attend = Callable[[int, Tensor, Tensor, Tensor], Tensor]  # (layer, q, k, v) -> y [B, T, H, D]
Activation = Callable[[Tensor], Tensor]
Rope = tuple[Tensor, Tensor]  # cos, sin [T, 1, rotary_dim]


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` in fp32 (``* (offset + weight)`` for Gemma's offset 1)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim) if offset == 0 else torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset == 0:
            return xf.type_as(x) * self.weight
        return (xf * (self.offset + self.weight.float())).type_as(x)

    def extra_repr(self) -> str:
        offset = f", offset={self.offset}" if self.offset else ""
        return f"{tuple(self.weight.shape)}, eps={self.eps}{offset}"


class ScaledEmbedding(nn.Embedding):
    """An embedding whose rows are multiplied by ``embed_scale`` (Gemma: sqrt(dim)), as
    transformers' ``*ScaledWordEmbedding``: the factor belongs to the module, so a quantized
    embedding (`edgequant.layers.QuantizedEmbedding`) and an adopted Hugging Face one keep it."""

    def __init__(self, num_embeddings: int, embedding_dim: int, embed_scale: float) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.embed_scale = embed_scale

    def forward(self, ids: Tensor) -> Tensor:
        rows = super().forward(ids)
        return rows * torch.tensor(self.embed_scale, dtype=rows.dtype)


# ---- RoPE ------------------------------------------------------------------------------------


def inv_frequencies(
    spec: DecoderSpec, theta: float | None = None, context: int | None = None
) -> Tensor:
    """RoPE's ``rotary_dim / 2`` inverse frequencies (float32), rope scaling applied
    (LongRoPE's factors chosen by ``context``, the tokens the sequence or cache may hold:
    default ``spec.max_seq_len``).

    >>> spec = DecoderSpec(vocab_size=4, dim=8, n_layers=1, n_heads=1, n_kv_heads=1,
    ...                    head_dim=8, hidden_dim=8, max_seq_len=4, rope_theta=10000.0)
    >>> inv_frequencies(spec).tolist()
    [1.0, 0.10000000149011612, 0.009999999776482582, 0.0010000000474974513]
    """
    dim = spec.rotary_dim
    theta = spec.rope_theta if theta is None else theta
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim  # [R/2]
    scaling = spec.rope_scaling
    if scaling is not None and scaling.type == "longrope":  # as transformers writes it
        factors = torch.tensor(scaling.factors(context or spec.max_seq_len), dtype=torch.float32)
        return 1.0 / (factors * theta**shape)
    return _scaled(1.0 / theta**shape, scaling)


def _scaled(inv: Tensor, scaling: RopeScaling | None) -> Tensor:
    if scaling is None:
        return inv
    if scaling.type == "linear":
        return inv / scaling.factor
    # llama3: wavelengths past low_freq_wavelen divided by factor, a smooth ramp down to
    # high_freq_wavelen, shorter ones kept (Llama 3.1's formula)
    factor, old = scaling.factor, scaling.original_max_seq_len
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    ramp = (1 - smooth) * scaled / factor + smooth * scaled
    middle = ~(wavelen < old / high) & ~(wavelen > old / low)
    return torch.where(middle, ramp, scaled)


def rope_tables(
    spec: DecoderSpec,
    length: int,
    *,
    start: int = 0,
    local: bool = False,
    device=None,
    context: int | None = None,
) -> Rope:
    """cos and sin ``[length, 1, rotary_dim]`` (float32) of positions ``start ..
    start + length - 1``, for global layers or (``local``) Gemma 3's local ones. ``context``
    (default ``start + length``) picks LongRoPE's factors."""
    context = context or start + length
    if local and spec.rope_local_theta:  # Gemma 3's local layers: their own base, unscaled
        inv = inv_frequencies(spec.replace(rope_scaling=None), spec.rope_local_theta)
    else:
        inv = inv_frequencies(spec, context=context)
    inv = inv.to(device)
    positions = torch.arange(start, start + length, device=device).float()  # [T]
    angles = torch.outer(positions, inv)  # [T, R/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None, :]  # [T, 1, R]
    cos, sin = angles.cos(), angles.sin()
    scaling = spec.rope_scaling
    own_base = local and spec.rope_local_theta  # Gemma's local layers: no scaling at all
    if not own_base and scaling is not None and scaling.attention_factor != 1.0:  # LongRoPE
        cos, sin = cos * scaling.attention_factor, sin * scaling.attention_factor
    return cos, sin


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, T, H, D]`` by ``cos, sin [T, 1, R]``: pairs are ``(i, i + R/2)`` within
    the first ``R`` dims (all of them unless the family rotates part of each head)."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        x_rot, x_pass = x[..., :rotary], x[..., rotary:]
        return torch.cat([apply_rope(x_rot, cos, sin), x_pass], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)  # [B, T, H, D/2] each
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ---- blocks ----------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
        q_dim, kv_dim = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
        if spec.fused_qkv:
            self.wqkv = nn.Linear(spec.dim, q_dim + 2 * kv_dim, bias=spec.qkv_bias)
        else:
            self.wq = nn.Linear(spec.dim, q_dim, bias=spec.qkv_bias)
            self.wk = nn.Linear(spec.dim, kv_dim, bias=spec.qkv_bias)
            self.wv = nn.Linear(spec.dim, kv_dim, bias=spec.qkv_bias)
        self.wo = nn.Linear(q_dim, spec.dim, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.norm_eps, spec.norm_offset)
            self.k_norm = RMSNorm(spec.head_dim, spec.norm_eps, spec.norm_offset)
        self.fused, self.qk_norm = spec.fused_qkv, spec.qk_norm

    def forward(self, x: Tensor, rope: Rope, attend: Attend, layer: int) -> Tensor:
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        if self.fused:
            q, k, v = self.wqkv(x).split([H * D, KV * D, KV * D], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q, k, v = q.view(B, T, H, D), k.view(B, T, KV, D), v.view(B, T, KV, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = attend(layer, q, k, v)  # [B, T, H, D]
        return self.wo(y.reshape(B, T, H * D))


class FeedForward(nn.Module):
    """``w2(act(w1 x) * w3 x)``: w1 the gate, w3 the up projection, w2 the down one (Phi-3's
    fused ``w13`` holds the gate rows, then the up rows)."""

    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        dim, hidden, bias = spec.dim, spec.hidden_dim, spec.mlp_bias
        if spec.fused_gate_up:
            self.w13 = nn.Linear(dim, 2 * hidden, bias=bias)
        else:
            self.w1 = nn.Linear(dim, hidden, bias=bias)
            self.w3 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, dim, bias=bias)
        self.fused, self.gelu = spec.fused_gate_up, spec.activation == "gelu_tanh"

    def forward(self, x: Tensor, gelu: Activation | None = None) -> Tensor:
        if self.fused:
            gate, up = self.w13(x).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        if self.gelu:
            gate = F.gelu(gate, approximate="tanh") if gelu is None else gelu(gate)
        else:
            gate = F.silu(gate)
        return self.w2(gate * up)


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU's tanh approximation written out: for a runtime whose GELU kernel ignores
    ``approximate="tanh"`` (XNNPACK computes the erf form, up to 5e-4 away)."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


class Block(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        eps, offset = spec.norm_eps, spec.norm_offset
        self.attention_norm = RMSNorm(spec.dim, eps, offset)
        self.attention = Attention(spec)
        self.ffn_norm = RMSNorm(spec.dim, eps, offset)
        self.feed_forward = FeedForward(spec)
        self.sandwich = spec.sandwich_norms
        if spec.sandwich_norms:  # Gemma 3: each branch's output is normed before the residual
            self.post_attention_norm = RMSNorm(spec.dim, eps, offset)
            self.post_ffn_norm = RMSNorm(spec.dim, eps, offset)

    def forward(
        self, x: Tensor, rope: Rope, attend: Attend, layer: int, gelu: Activation | None = None
    ) -> Tensor:
        a = self.attention(self.attention_norm(x), rope, attend, layer)
        if self.sandwich:
            a = self.post_attention_norm(a)
        h = x + a
        f = self.feed_forward(self.ffn_norm(h), gelu)
        if self.sandwich:
            f = self.post_ffn_norm(f)
        return h + f


# ---- eager cache and attention ---------------------------------------------------------------


class KVCache:
    """Static keys and values of every layer, for decoding one token at a time.

    ``k`` and ``v`` are ``[n_layers, batch, n_kv_heads, max_len, head_dim]``, allocated once
    (`Decoder.new_cache`); ``model(tokens, start_pos=pos, cache=cache)`` writes the new tokens'
    keys and values at positions ``pos, ..., pos + T - 1``. Keys are stored after RoPE and before
    the grouped-query repeat. Not an ``nn.Module``: the cache is never saved.
    """

    def __init__(
        self, spec: DecoderSpec, batch: int, max_len: int, dtype: torch.dtype, device
    ) -> None:
        shape = (spec.n_layers, batch, spec.n_kv_heads, max_len, spec.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, KV, S, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, KV, S, D]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        """Views ``([B, KV, S, D], [B, KV, S, D])`` of layer ``i``'s keys and values."""
        return self.k[i], self.v[i]


class EagerAttention:
    """``attend`` for eager PyTorch: causal SDPA over the tokens given, or over a `KVCache`
    after writing the new keys and values at ``start_pos``; sliding-window layers see only the
    last ``spec.sliding_window`` positions."""

    def __init__(
        self, spec: DecoderSpec, T: int, start_pos: int, cache: KVCache | None, device
    ) -> None:
        self.spec, self.cache, self.start_pos = spec, cache, start_pos
        self.n_rep = spec.n_heads // spec.n_kv_heads
        end = start_pos + T
        self.masks: dict[bool, Tensor | None] = {False: None, True: None}
        if cache is not None or spec.sliding_window is not None:
            queries = torch.arange(start_pos, end, device=device)[:, None]  # [T, 1]
            keys = torch.arange(end, device=device)[None, :]  # [1, end]
            causal = keys <= queries  # [T, end]
            self.masks[False] = causal
            if spec.sliding_window is not None:
                self.masks[True] = causal & (queries - keys < spec.sliding_window)

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H or KV, T, D]
        if self.cache is not None:
            k_cache, v_cache = self.cache.layer(layer)  # [B, KV, S, D] each
            end = self.start_pos + q.shape[2]
            k_cache[:, :, self.start_pos : end] = k
            v_cache[:, :, self.start_pos : end] = v
            k, v = k_cache[:, :, :end], v_cache[:, :, :end]  # [B, KV, end, D]
        k = k.repeat_interleave(self.n_rep, dim=1)  # [B, H, end, D]
        v = v.repeat_interleave(self.n_rep, dim=1)  # [B, H, end, D]
        mask = self.masks[self.spec.is_local(layer)]
        scale = self.spec.attention_scale
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return y.transpose(1, 2)  # [B, T, H, D]


# ---- the decoder -----------------------------------------------------------------------------


class Decoder(nn.Module):
    """``forward(tokens [B, T]) -> logits [B, T, vocab]`` (float32).

    Incremental decoding with a static KV cache: ``cache = model.new_cache(batch=1)``, then
    ``model(prompt, start_pos=0, cache=cache)`` (prefill) and ``model(next_token,
    start_pos=len(prompt), cache=cache)`` and so on; each call returns the logits of its new
    tokens only, equal (up to float rounding) to the matching rows of a full recompute. Call it
    under ``torch.inference_mode()`` or ``torch.no_grad()``. Exporters call `run` with their own
    RoPE tables and ``attend``.
    """

    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.spec = spec
        if spec.embedding_scale is None:
            self.tok_embeddings = nn.Embedding(spec.vocab_size, spec.dim)
        else:  # the module scales its rows itself (see ScaledEmbedding)
            self.tok_embeddings = ScaledEmbedding(spec.vocab_size, spec.dim, spec.embedding_scale)
        self.layers = nn.ModuleList(Block(spec) for _ in range(spec.n_layers))
        self.norm = RMSNorm(spec.dim, spec.norm_eps, spec.norm_offset)
        self.output = nn.Linear(spec.dim, spec.vocab_size, bias=False)
        if spec.tied_embedding:
            self.output.weight = self.tok_embeddings.weight

    def run(
        self,
        tokens: Tensor,
        ropes: tuple[Rope, Rope | None],
        attend: Attend,
        gelu: Activation | None = None,
    ) -> Tensor:
        """Logits ``[B, T, vocab]`` of ``tokens [B, T]`` given the RoPE tables of their
        positions (global, and local for sliding-window layers) and an ``attend``: the body
        every runtime shares. ``gelu`` replaces ``F.gelu(approximate="tanh")`` for a runtime
        that needs it written otherwise (`gelu_tanh`)."""
        h = self.tok_embeddings(tokens)  # [B, T, dim], times embedding_scale where set
        for i in range(len(self.layers)):
            h = self.run_layer(i, h, ropes, attend, gelu)
        return self.head(h)

    def run_layer(
        self,
        i: int,
        h: Tensor,
        ropes: tuple[Rope, Rope | None],
        attend: Attend,
        gelu: Activation | None = None,
    ) -> Tensor:
        """Block ``i`` of `run` on the hidden states ``h [B, T, dim]`` (`edgequant.stream` runs
        the blocks one at a time, each when its weights are in memory)."""
        rope = ropes[1] if self.spec.is_local(i) else ropes[0]
        return self.layers[i](h, rope, attend, i, gelu)

    def head(self, h: Tensor) -> Tensor:
        """The logits ``[B, T, vocab]`` of the last block's hidden states: final norm, output
        projection and the softcap where the family has one."""
        logits = self.output(self.norm(h))  # [B, T, vocab]
        cap = self.spec.final_logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def eager_context(
        self, T: int, start_pos: int = 0, cache: KVCache | None = None, device=None
    ) -> tuple[tuple[Rope, Rope | None], Attend]:
        """``(ropes, attend)`` that `forward` gives `run` for ``T`` tokens at ``start_pos``:
        RoPE tables in the model's float dtype and eager attention (over ``cache``, if any)."""
        dtype = self.norm.weight.dtype
        context = T if cache is None else cache.max_len  # LongRoPE's factors go by it
        ropes = tuple(
            None if r is None else (r[0].to(dtype), r[1].to(dtype))
            for r in self.ropes(T, start_pos, device, context)
        )
        return ropes, EagerAttention(self.spec, T, start_pos, cache, device)

    def ropes(
        self, length: int, start: int = 0, device=None, context: int | None = None
    ) -> tuple[Rope, Rope | None]:
        """The RoPE tables `run` takes, for positions ``start .. start + length - 1`` of a
        sequence or cache of ``context`` tokens (default ``start + length``)."""
        spec = self.spec
        glob = rope_tables(spec, length, start=start, device=device, context=context)
        local = None
        if spec.sliding_window_pattern is not None:
            local = rope_tables(spec, length, start=start, local=True, device=device)
        return glob, local

    def new_cache(
        self,
        batch: int = 1,
        max_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """An empty `KVCache` for ``batch`` sequences of up to ``max_len`` tokens (default
        ``spec.max_seq_len``), in the dtype and on the device of the model's final norm."""
        limit = self.spec.max_seq_len
        max_len = limit if max_len is None else max_len
        if not 1 <= max_len <= limit:
            raise ValueError(f"max_len must be in [1, max_seq_len={limit}], got {max_len}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        weight = self.norm.weight  # never quantized: the model's float dtype and device
        return KVCache(self.spec, batch, max_len, dtype or weight.dtype, device or weight.device)

    def forward(self, tokens: Tensor, start_pos: int = 0, cache: KVCache | None = None) -> Tensor:
        """Logits ``[B, T, vocab]`` of ``tokens [B, T]``, the tokens at positions
        ``start_pos .. start_pos + T - 1``; without a ``cache`` they must be the whole sequence
        (``start_pos`` 0)."""
        limit = self.spec.max_seq_len if cache is None else cache.max_len
        if tokens.dim() != 2 or start_pos < 0 or start_pos + tokens.shape[1] > limit:
            raise ValueError(
                f"tokens must be [batch, seq] with start_pos + seq <= {limit} "
                f"({'max_seq_len' if cache is None else 'the cache max_len'}), got shape "
                f"{tuple(tokens.shape)} at start_pos={start_pos}"
            )
        if cache is None and start_pos != 0:
            raise ValueError(f"start_pos={start_pos} needs a cache (model.new_cache())")
        if cache is not None and tokens.shape[0] != cache.batch:
            raise ValueError(f"the cache holds batch {cache.batch}, got batch {tokens.shape[0]}")
        ropes, attend = self.eager_context(tokens.shape[1], start_pos, cache, tokens.device)
        return self.run(tokens, ropes, attend).float()


__all__ = [
    "Attend",
    "Attention",
    "Block",
    "Decoder",
    "EagerAttention",
    "FeedForward",
    "KVCache",
    "RMSNorm",
    "ScaledEmbedding",
    "apply_rope",
    "gelu_tanh",
    "inv_frequencies",
    "rope_tables",
]
