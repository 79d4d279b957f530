"""Qwen3 (``Qwen3ForCausalLM``, dense): RMSNorm over each head of q and k before RoPE, and a
``head_dim`` that need not be hidden / heads; llama.cpp's ``qwen3`` architecture (NEOX RoPE)."""

from __future__ import annotations

from typing import Any

from edgequant.models.families.base import Family, gguf_config, hf_spec
from edgequant.models.spec import DecoderSpec


def spec(config: Any) -> DecoderSpec:
    bias = bool(getattr(config, "attention_bias", False))
    return hf_spec(config, qkv_bias=bias, o_bias=bias, qk_norm=True)


def hf_config(get, tensors: dict) -> dict:
    config = gguf_config(get, tensors, "qwen3")
    config["architectures"] = ["Qwen3ForCausalLM"]
    config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    return config


FAMILY = Family(
    name="qwen3", model_types=("qwen3",), gguf_arch="qwen3", permute_qk=False, spec=spec,
    hf_config=hf_config, gguf_pre="qwen2",
)  # fmt: skip

__all__ = ["FAMILY", "spec"]
