"""The runtimes' caches and attention kernels around the one `Decoder`.

An exporter never re-writes the decoder: it wraps it in one of these modules, which hold RoPE
tables for ``max_seq_len`` positions, turn the runtime's calling convention into positions, and
pass `Decoder.run` an ``attend(layer, q, k, v)`` built on the runtime's own cache ops.

- `ExecuTorchDecoder`: ``forward(tokens [1, T] int64, input_pos [1] int64) -> logits
  [1, T, vocab]`` with the KV cache in buffers (the calling convention of ExecuTorch's LLM
  runner). With ``custom_sdpa`` (the default) it uses ExecuTorch's ``llama::update_cache`` and
  ``llama::custom_sdpa`` (what its own LLM export uses: grouped-query attention over the cache
  prefix, cache ``[1, S, KV, D]``); without, portable ``index_copy_`` and SDPA over the whole
  cache under a mask (cache ``[1, KV, S, D]``).
- `LiteRTDecoder`: ``forward(tokens [1, T] int32, input_pos [T] int32, k_0, v_0, ...) ->
  (logits, k_0', v_0', ...)``: the cache ``[1, S, KV, D]`` passed in and returned, written with
  LiteRT's ``DYNAMIC_UPDATE_SLICE`` and attended with litert-torch's fused attention composite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgequant.models.decoder import Decoder


def _setup(wrapper: nn.Module, decoder: Decoder, max_seq_len: int) -> None:
    """What every wrapper holds: the decoder (as ``model``), ``max_seq_len`` (checked) and
    its RoPE tables."""
    spec = decoder.spec
    if not 2 <= max_seq_len <= spec.max_seq_len:
        raise ValueError(
            f"max_seq_len must be in [2, {spec.max_seq_len}] for this model, got {max_seq_len}"
        )
    if spec.sliding_window is not None:
        raise NotImplementedError(
            "sliding-window layers (sliding_window, sliding_window_pattern) are not exported yet"
        )
    wrapper.model, wrapper.max_seq_len, wrapper.spec = decoder, max_seq_len, spec
    (cos, sin), _ = decoder.ropes(max_seq_len)
    wrapper.register_buffer("rope_cos", cos.float(), persistent=False)  # [S, 1, R]
    wrapper.register_buffer("rope_sin", sin.float(), persistent=False)  # [S, 1, R]


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
        rope = (self.rope_cos[positions], self.rope_sin[positions])  # [T, 1, R]
        # query i (at position input_pos + i) sees cache slots 0 .. input_pos + i
        slots = torch.arange(self.max_seq_len, dtype=torch.long)
        mask = slots[None, :] <= positions[:, None]  # [T, S]
        n_rep = self.spec.n_heads // self.spec.n_kv_heads

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            k_cache = getattr(self, f"k_cache_{i}").index_copy_(2, positions, k.transpose(1, 2))
            v_cache = getattr(self, f"v_cache_{i}").index_copy_(2, positions, v.transpose(1, 2))
            keys = k_cache.repeat_interleave(n_rep, dim=1)  # [1, H, S, D]
            values = v_cache.repeat_interleave(n_rep, dim=1)  # [1, H, S, D]
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys, values, attn_mask=mask, scale=self.spec.attention_scale
            )  # [1, H, T, D]
            return y.transpose(1, 2)  # [1, T, H, D]

        return self.model.run(tokens, (rope, None), attend)

    def _forward_custom(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        T = tokens.shape[1]
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + T <= self.max_seq_len)
        rope = (self.rope_cos.narrow(0, start, T), self.rope_sin.narrow(0, start, T))  # [T, 1, R]
        scale = self.spec.attention_scale

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            k_cache, v_cache = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
            torch.ops.llama.update_cache(k, k_cache, start)
            torch.ops.llama.update_cache(v, v_cache, start)
            if scale is None:
                return torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, None, 0.0, True)
            return torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, None, 0.0, True, scale)

        return self.model.run(tokens, (rope, None), attend)


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

        rope = (self.rope_cos[input_pos], self.rope_sin[input_pos])  # [T, 1, R]
        # query i (at position input_pos[i]) sees cache slots 0 .. input_pos[i]
        visible = torch.arange(self.max_seq_len)[None, :] <= input_pos[:, None]  # [T, S]
        bias = torch.where(visible, 0.0, float("-inf"))[None, None]  # [1, 1, T, S]
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
            return sdpa(q, k_cache, v_cache, head_dim, mask=bias, scale=scale)  # [1, T, H, D]

        logits = self.model.run(tokens, (rope, None), attend)
        return (logits, *caches)


__all__ = ["ExecuTorchDecoder", "LiteRTDecoder"]
