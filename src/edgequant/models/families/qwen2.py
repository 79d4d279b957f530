"""Qwen2 and Qwen2.5 (``Qwen2ForCausalLM``): Llama's block with biases on the q/k/v
projections; llama.cpp's ``qwen2`` architecture (NEOX RoPE: rows are not permuted)."""

from __future__ import annotations

from typing import Any

from edgequant.models.families.base import Family, gguf_config, hf_spec
from edgequant.models.spec import DecoderSpec


def spec(config: Any) -> DecoderSpec:
    return hf_spec(config, qkv_bias=True)


def hf_config(get, tensors: dict) -> dict:
    return {**gguf_config(get, tensors, "qwen2"), "architectures": ["Qwen2ForCausalLM"]}


FAMILY = Family(
    name="qwen2", model_types=("qwen2",), gguf_arch="qwen2", permute_qk=False, spec=spec,
    hf_config=hf_config, gguf_pre="qwen2",
)  # fmt: skip

__all__ = ["FAMILY", "spec"]
