"""An export-ready decoder: edgequant's llama2.c-style `Transformer` with a static KV cache held
in buffers and positions given as a tensor, so that ``torch.export`` sees one graph for prefill
(any number of tokens) and decode (one token).

``ExportDecoder(model, max_seq_len).forward(tokens [1, T] int64, input_pos [1] int64)`` returns
the logits ``[1, T, vocab]`` of the new tokens and writes their keys and values into the cache
at ``input_pos .. input_pos + T - 1``: the calling convention of ExecuTorch's LLM runner.

A Hugging Face Llama (e.g. SmolLM2 loaded from GGUF) is first moved onto the same structure with
`from_hf_llama`; its modules (quantized or not) are reused as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgequant.models import llama2c


def from_hf_llama(model: nn.Module) -> llama2c.Transformer:
    """A llama2.c `Transformer` holding the (possibly quantized) modules of an HF Llama."""
    cfg = model.config
    if cfg.model_type != "llama":
        raise NotImplementedError(
            f"export supports llama2.c models and Hugging Face Llama; got {cfg.model_type!r}"
        )
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        raise NotImplementedError(f"head_dim {head_dim} x heads != hidden {cfg.hidden_size}")
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise NotImplementedError(f"rope_type {rope.get('rope_type')!r} is not supported")
    args = llama2c.ModelArgs(
        dim=cfg.hidden_size,
        hidden_dim=cfg.intermediate_size,
        n_layers=cfg.num_hidden_layers,
        n_heads=cfg.num_attention_heads,
        n_kv_heads=cfg.num_key_value_heads,
        vocab_size=cfg.vocab_size,
        max_seq_len=cfg.max_position_embeddings,
        norm_eps=cfg.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))),
        tied_embedding=bool(cfg.tie_word_embeddings),
    )
    with torch.device("meta"):
        native = llama2c.Transformer(args)
    hf = model.model
    native.tok_embeddings = hf.embed_tokens
    native.output = model.lm_head
    native.norm.weight = hf.norm.weight
    for block, layer in zip(native.layers, hf.layers, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        block.attention.wq, block.attention.wk = attn.q_proj, attn.k_proj
        block.attention.wv, block.attention.wo = attn.v_proj, attn.o_proj
        block.feed_forward.w1, block.feed_forward.w2 = mlp.gate_proj, mlp.down_proj
        block.feed_forward.w3 = mlp.up_proj
        block.attention_norm.weight = layer.input_layernorm.weight
        block.ffn_norm.weight = layer.post_attention_layernorm.weight
    for name, tensor in list(native.named_parameters()) + list(native.named_buffers()):
        if tensor.is_meta:
            raise AssertionError(f"{name} was not carried over from the HF model")
    return native.eval()


def setup_decoder(decoder: nn.Module, model: llama2c.Transformer, max_seq_len: int):
    """What every export decoder holds: ``model``, ``max_seq_len`` (checked), the head counts
    and RoPE tables for ``max_seq_len`` positions; returns the model's args."""
    args = model.args
    if not 2 <= max_seq_len <= args.max_seq_len:
        raise ValueError(
            f"max_seq_len must be in [2, {args.max_seq_len}] for this model, got {max_seq_len}"
        )
    decoder.model, decoder.max_seq_len = model, max_seq_len
    decoder.n_heads, decoder.n_kv_heads = args.n_heads, args.n_kv_heads
    decoder.head_dim = args.head_dim
    cos, sin = llama2c.rope_cos_sin(max_seq_len, args.head_dim, args.rope_theta)
    decoder.register_buffer("rope_cos", cos.float(), persistent=False)  # [S, D]
    decoder.register_buffer("rope_sin", sin.float(), persistent=False)  # [S, D]
    return args


class ExportDecoder(nn.Module):
    """``forward(tokens [1, T], input_pos [1]) -> logits [1, T, vocab]`` with a static cache."""

    def __init__(
        self, model: llama2c.Transformer, max_seq_len: int, custom_sdpa: bool = True
    ) -> None:
        super().__init__()
        # custom_sdpa: ExecuTorch's llama::update_cache / llama::custom_sdpa kernels (what its own
        # LLM export uses: grouped-query attention over the cache prefix, no copies); otherwise
        # plain index_copy_ + SDPA over the whole cache with a mask (portable, slower).
        self.custom_sdpa = custom_sdpa
        if custom_sdpa:
            import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (llama:: ops)
        args = setup_decoder(self, model, max_seq_len)
        shape = (1, args.n_kv_heads, max_seq_len, args.head_dim)  # [1, KV, S, D] per layer
        if custom_sdpa:
            shape = (1, max_seq_len, args.n_kv_heads, args.head_dim)  # [1, S, KV, D]
        for i in range(args.n_layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)

    def forward(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        T = tokens.shape[1]
        if self.custom_sdpa:
            return self._forward_custom(tokens, input_pos)
        positions = input_pos + torch.arange(T, dtype=torch.long)  # [T]
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [T, D]
        # query i (at position input_pos + i) sees cache slots 0 .. input_pos + i
        slots = torch.arange(self.max_seq_len, dtype=torch.long)
        mask = slots[None, :] <= positions[:, None]  # [T, S]
        h = self.model.tok_embeddings(tokens)  # [1, T, dim]
        for i, block in enumerate(self.model.layers):
            h = h + self._attention(block, i, block.attention_norm(h), cos, sin, positions, mask)
            h = h + block.feed_forward(block.ffn_norm(h))
        return self.model.output(self.model.norm(h))  # [1, T, vocab]

    def _forward_custom(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        T = tokens.shape[1]
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + T <= self.max_seq_len)
        cos = self.rope_cos.narrow(0, start, T)  # [T, D]
        sin = self.rope_sin.narrow(0, start, T)  # [T, D]
        h = self.model.tok_embeddings(tokens)  # [1, T, dim]
        for i, block in enumerate(self.model.layers):
            x = block.attention_norm(h)
            attn = block.attention
            q = attn.wq(x).view(1, T, self.n_heads, self.head_dim)  # [1, T, H, D]
            k = attn.wk(x).view(1, T, self.n_kv_heads, self.head_dim)  # [1, T, KV, D]
            v = attn.wv(x).view(1, T, self.n_kv_heads, self.head_dim)  # [1, T, KV, D]
            q = llama2c.apply_rope(q.transpose(1, 2), cos, sin).transpose(1, 2)
            k = llama2c.apply_rope(k.transpose(1, 2), cos, sin).transpose(1, 2)
            k_cache, v_cache = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
            torch.ops.llama.update_cache(k, k_cache, start)
            torch.ops.llama.update_cache(v, v_cache, start)
            y = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, None, 0.0, True)
            h = h + attn.wo(y.reshape(1, T, self.n_heads * self.head_dim))  # [1, T, dim]
            h = h + block.feed_forward(block.ffn_norm(h))
        return self.model.output(self.model.norm(h))  # [1, T, vocab]

    def _attention(self, block, i: int, x: Tensor, cos, sin, positions, mask) -> Tensor:
        attn = block.attention
        B, T, _ = x.shape
        q = attn.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [1, H, T, D]
        k = attn.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [1, KV, T, D]
        v = attn.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [1, KV, T, D]
        q, k = llama2c.apply_rope(q, cos, sin), llama2c.apply_rope(k, cos, sin)
        k_cache = getattr(self, f"k_cache_{i}").index_copy_(2, positions, k)  # [1, KV, S, D]
        v_cache = getattr(self, f"v_cache_{i}").index_copy_(2, positions, v)  # [1, KV, S, D]
        n_rep = self.n_heads // self.n_kv_heads
        keys = k_cache.repeat_interleave(n_rep, dim=1)  # [1, H, S, D]
        values = v_cache.repeat_interleave(n_rep, dim=1)  # [1, H, S, D]
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [1, H, T, D]
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # [1, T, H * D]
        return attn.wo(y)
