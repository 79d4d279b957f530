"""The runtimes' caches and attention kernels around the one `Decoder`.

An exporter never re-writes the decoder: it wraps it in one of these modules, which hold RoPE
tables for ``max_seq_len`` positions, turn the runtime's calling convention into positions, and
pass `Decoder.run` an ``attend(layer, q, k, v)`` built on the runtime's own cache ops.

- `ExecuTorchDecoder`: ``forward(tokens [1, T] int64, input_pos [1] int64) -> logits
  [1, T, vocab]`` with the KV cache in buffers (the calling convention of ExecuTorch's LLM
  runner). With ``custom_sdpa`` (the default) it uses ExecuTorch's ``llama::update_cache`` and
  ``llama::custom_sdpa`` (what its own LLM export uses: grouped-query attention over the cache
  prefix, cache ``[1, S, KV, D]``; sliding-window layers pass the kernel an explicit mask over
  the whole cache); without, portable ``index_copy_`` and SDPA over the whole cache under a
  mask (cache ``[1, KV, S, D]``).
- `LiteRTDecoder`: ``forward(tokens [1, T] int32, input_pos [T] int32, k_0, v_0, ...) ->
  (logits, k_0', v_0', ...)``: the cache ``[1, S, KV, D]`` passed in and returned, written with
  LiteRT's ``DYNAMIC_UPDATE_SLICE`` and attended with litert-torch's fused attention composite.

Sliding-window layers (Gemma 3's local ones) keep a full-length cache and mask what lies
beyond the window: exact at every position, though a local layer reads the whole cache (a
ring cache of the window's length would read less).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgequant.models.decoder import Decoder, gelu_tanh


def _setup(wrapper: nn.Module, decoder: Decoder, max_seq_len: int) -> None:
    """What every wrapper holds: the decoder (as ``model``), ``max_seq_len`` (checked) and
    its RoPE tables (global, and local for sliding-window layers)."""
    spec = decoder.spec
    if not 2 <= max_seq_len <= spec.max_seq_len:
        raise ValueError(
            f"max_seq_len must be in [2, {spec.max_seq_len}] for this model, got {max_seq_len}"
        )
    wrapper.model, wrapper.max_seq_len, wrapper.spec = decoder, max_seq_len, spec
    (cos, sin), local = decoder.ropes(max_seq_len)
    wrapper.register_buffer("rope_cos", cos.float(), persistent=False)  # [S, 1, R]
    wrapper.register_buffer("rope_sin", sin.float(), persistent=False)  # [S, 1, R]
    wrapper.local = local is not None
    if local is not None:
        wrapper.register_buffer("rope_cos_local", local[0].float(), persistent=False)
        wrapper.register_buffer("rope_sin_local", local[1].float(), persistent=False)


def _ropes(wrapper: nn.Module, rows) -> tuple:
    """The global and local RoPE tables ``[T, 1, R]`` at ``rows`` (a function of a table)."""
    glob = (rows(wrapper.rope_cos), rows(wrapper.rope_sin))
    if not wrapper.local:
        return glob, None
    return glob, (rows(wrapper.rope_cos_local), rows(wrapper.rope_sin_local))


def _visible(spec, positions: Tensor, slots: Tensor) -> tuple[Tensor, Tensor | None]:
    """Which cache slots each query sees ``[T, S]``: causal, and for sliding-window layers
    also within the last ``spec.sliding_window`` positions (None without such layers)."""
    causal = slots[None, :] <= positions[:, None]  # [T, S]
    if spec.sliding_window is None:
        return causal, None
    return causal, causal & (positions[:, None] - slots[None, :] < spec.sliding_window)


class ExecuTorchDecoder(nn.Module):
    """``forward(tokens [1, T], input_pos [1]) -> logits [1, T, vocab]`` with a static cache."""

    def __init__(self, decoder: Decoder, max_seq_len: int, custom_sdpa: bool = True) -> None:
        super().__init__()
        _setup(self, decoder, max_seq_len)
        self.custom_sdpa = custom_sdpa
        if custom_sdpa:
            import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (llama:: ops)
        spec = decoder.spec
        shape = (1, max_seq_len, spec.n_kv_heads, spec.head_dim)  # [1, S, KV, D]
        if not custom_sdpa:
            shape = (1, spec.n_kv_heads, max_seq_len, spec.head_dim)  # [1, KV, S, D]
        for i in range(spec.n_layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)

    def forward(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        if self.custom_sdpa:
            return self._forward_custom(tokens, input_pos)
        T = tokens.shape[1]
        positions = input_pos + torch.arange(T, dtype=torch.long)  # [T]
        ropes = _ropes(self, lambda table: table[positions])  # [T, 1, R]
        # query i (at position input_pos + i) sees cache slots 0 .. input_pos + i (the last
        # sliding_window of them in local layers)
        slots = torch.arange(self.max_seq_len, dtype=torch.long)
        masks = _visible(self.spec, positions, slots)  # [T, S] each
        n_rep = self.spec.n_heads // self.spec.n_kv_heads

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            k_cache = getattr(self, f"k_cache_{i}").index_copy_(2, positions, k.transpose(1, 2))
            v_cache = getattr(self, f"v_cache_{i}").index_copy_(2, positions, v.transpose(1, 2))
            keys = k_cache.repeat_interleave(n_rep, dim=1)  # [1, H, S, D]
            values = v_cache.repeat_interleave(n_rep, dim=1)  # [1, H, S, D]
            mask = masks[self.spec.is_local(i)]
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys, values, attn_mask=mask, scale=self.spec.attention_scale
            )  # [1, H, T, D]
            return y.transpose(1, 2)  # [1, T, H, D]

        return self.model.run(tokens, ropes, attend, gelu_tanh)  # XNNPACK's GELU is erf's

    def _forward_custom(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        T = tokens.shape[1]
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + T <= self.max_seq_len)
        ropes = _ropes(self, lambda table: table.narrow(0, start, T))  # [T, 1, R]
        spec, scale = self.spec, self.spec.attention_scale
        local_bias = None
        if spec.sliding_window is not None:  # local layers: an explicit mask over the cache
            positions = start + torch.arange(T, dtype=torch.long)  # [T]
            _, local = _visible(spec, positions, torch.arange(self.max_seq_len))
            local_bias = torch.where(local, 0.0, float("-inf"))  # [T, S]

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            k_cache, v_cache = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
            torch.ops.llama.update_cache(k, k_cache, start)
            torch.ops.llama.update_cache(v, v_cache, start)
            sdpa = torch.ops.llama.custom_sdpa
            if spec.is_local(i):  # with a mask the kernel reads every slot; start is unused
                return sdpa(q, k_cache, v_cache, 0, local_bias, 0.0, False, scale)
            if scale is None:
                return sdpa(q, k_cache, v_cache, start, None, 0.0, True)
            return sdpa(q, k_cache, v_cache, start, None, 0.0, True, scale)

        return self.model.run(tokens, ropes, attend, gelu_tanh)  # XNNPACK's GELU is erf's


class LiteRTDecoder(nn.Module):
    """The decoder with its KV cache passed in and returned (see the module doc)."""

    def __init__(self, decoder: Decoder, max_seq_len: int) -> None:
        super().__init__()
        _setup(self, decoder, max_seq_len)

    def cache_shape(self) -> tuple[int, int, int, int]:
        return (1, self.max_seq_len, self.spec.n_kv_heads, self.spec.head_dim)

    def forward(self, tokens: Tensor, input_pos: Tensor, *kv: Tensor):
        from litert_torch.generative.custom_ops.dynamic_update_slice import dynamic_update_slice
        from litert_torch.generative.layers.scaled_dot_product_attention import (
            scaled_dot_product_attention_with_hlfb as sdpa,
        )

        ropes = _ropes(self, lambda table: table[input_pos])  # [T, 1, R]
        # query i (at position input_pos[i]) sees cache slots 0 .. input_pos[i] (the last
        # sliding_window of them in local layers)
        masks = _visible(self.spec, input_pos, torch.arange(self.max_seq_len))  # [T, S] each
        biases = [
            None if m is None else torch.where(m, 0.0, float("-inf"))[None, None]  # [1, 1, T, S]
            for m in masks
        ]
        zero = torch.zeros([], dtype=torch.int32)
        slot = [zero, input_pos.int()[0].reshape([]), zero, zero]  # positions are consecutive
        caches: list[Tensor] = []
        head_dim, scale = self.spec.head_dim, self.spec.attention_scale

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            # LiteRT's DYNAMIC_UPDATE_SLICE (an index_copy becomes a slow STABLEHLO_SCATTER)
            k_cache = dynamic_update_slice(kv[2 * i], k, slot)  # [1, S, KV, D]
            v_cache = dynamic_update_slice(kv[2 * i + 1], v, slot)
            caches.extend([k_cache, v_cache])
            # litert-torch's attention composite: LiteRT runs it as one fused op (a plain
            # F.scaled_dot_product_attention decomposes into ops 15x slower at decode)
            bias = biases[self.spec.is_local(i)]
            return sdpa(q, k_cache, v_cache, head_dim, mask=bias, scale=scale)  # [1, T, H, D]

        logits = self.model.run(tokens, ropes, attend)
        return (logits, *caches)


__all__ = ["ExecuTorchDecoder", "LiteRTDecoder"]
