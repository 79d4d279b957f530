"""Phi-3 and Phi-4-mini (``Phi3ForCausalLM``): Llama's block with one packed q/k/v projection
(``qkv_proj``: q rows, then k, then v) and one packed gate/up projection (``gate_up_proj``: gate
rows, then up); LongRoPE (per-frequency factors, long ones when the context is longer than
``original_max_position_embeddings``, cos and sin times an attention factor); partial rotary
(Phi-4-mini rotates the first 3/4 of each head); a sliding window over every layer where the
config has one shorter than the trained context (Phi-3-mini-4k: 2047).

The packed projections stay packed everywhere: the decoder's ``wqkv`` and ``w13`` are the
model's own modules, XNNPACK and LiteRT run one linear each, and llama.cpp's ``phi3``
architecture reads ``attn_qkv`` and a packed ``ffn_up``. So a recipe addresses them as
``qkv_proj`` and ``gate_up_proj`` (roles ``attention`` and ``feedforward``): a rule naming
``q_proj`` matches nothing in a Phi model, and q, k and v share one scheme.

llama.cpp's ``phi3`` (NEOX RoPE: rows are not permuted) reads LongRoPE as two tensors,
``rope_factors_long`` / ``rope_factors_short``, the attention factor and the original context
from the metadata, and picks the long factors when its context is longer than the original:
the same rule as edgequant's (`RopeScaling.factors`). It ignores a sliding window (its loader
says "Phi SWA is currently disabled"): a GGUF file of a model with a window is exact only for
sequences within the window, and writing one says so.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from edgequant.models.families.base import (
    PHI3_STYLE,
    SMOOTHING_PACKED,
    Family,
    gguf_config,
    hf_spec,
)
from edgequant.models.spec import DecoderSpec

log = logging.getLogger(__name__)

ROPE_TENSORS = ("rope_factors_long.weight", "rope_factors_short.weight")


def spec(config: Any) -> DecoderSpec:
    c = config
    if c.hidden_act != "silu":
        raise ValueError(f"phi3 hidden_act {c.hidden_act!r} is not supported; supported: silu")
    window = getattr(c, "sliding_window", None)
    sliding: dict[str, Any] = {"sliding_window": None}
    if window is not None and window < c.max_position_embeddings:
        # every layer is local: a "global every n-th layer" past the last one
        sliding = {"sliding_window": window, "sliding_window_pattern": c.num_hidden_layers + 1}
    return hf_spec(c, fused_qkv=True, fused_gate_up=True, **sliding)


def rope_factors(spec: DecoderSpec) -> dict[str, np.ndarray]:
    """LongRoPE's two factor tensors llama.cpp reads, else nothing."""
    scaling = spec.rope_scaling
    if scaling is None or scaling.type != "longrope":
        return {}
    return {
        "rope_factors_long.weight": np.asarray(scaling.long_factor, dtype=np.float32),
        "rope_factors_short.weight": np.asarray(scaling.short_factor, dtype=np.float32),
    }


def gguf_metadata(writer, spec: DecoderSpec) -> None:
    """LongRoPE's attention factor and original context; a window llama.cpp will ignore."""
    scaling = spec.rope_scaling
    if scaling is not None and scaling.type not in ("longrope", "linear"):
        raise ValueError(
            f"GGUF (llama.cpp's phi3) cannot hold {scaling.type} rope scaling; it runs longrope"
        )
    if writer is None:
        return
    if scaling is not None and scaling.type == "longrope":
        writer.add_rope_scaling_attn_factors(scaling.attention_factor)
        writer.add_rope_scaling_orig_ctx_len(scaling.original_max_seq_len)
    if spec.sliding_window is not None:
        log.warning(
            "llama.cpp's phi3 ignores the sliding window (%d tokens): the GGUF file computes "
            "what transformers does only for sequences within it",
            spec.sliding_window,
        )
        writer.add_sliding_window(spec.sliding_window)


def hf_config(get, tensors: dict) -> dict:
    config = gguf_config(get, tensors, "phi3")
    config["architectures"] = ["Phi3ForCausalLM"]
    rope = config["rope_parameters"]
    rotary = get("rope.dimension_count")
    if rotary is not None:
        rope["partial_rotary_factor"] = int(rotary) / config["head_dim"]
    if "rope_factors_long.weight" in tensors:
        original = int(get("rope.scaling.original_context_length"))
        factor = config["max_position_embeddings"] / original
        rope.update(
            rope_type="longrope",
            long_factor=[float(x) for x in tensors["rope_factors_long.weight"].data],
            short_factor=[float(x) for x in tensors["rope_factors_short.weight"].data],
            original_max_position_embeddings=original,
            factor=factor,
        )
        attention = get("rope.scaling.attn_factor")
        if attention is not None:
            rope["attention_factor"] = float(attention)
        config["original_max_position_embeddings"] = original
    window = get("attention.sliding_window")
    config["sliding_window"] = None if window is None else int(window)
    return config


FAMILY = Family(
    name="phi3",
    model_types=("phi3",),
    gguf_arch="phi3",
    permute_qk=False,
    spec=spec,
    hf_config=hf_config,
    names=dict(PHI3_STYLE),
    gguf_tensors=rope_factors,
    gguf_config_tensors=ROPE_TENSORS,
    gguf_pre="default",
    gguf_metadata=gguf_metadata,
    smoothing_groups=SMOOTHING_PACKED,
)

__all__ = ["FAMILY", "rope_factors", "spec"]
