"""Gemma 3 (``Gemma3ForCausalLM``, model type ``gemma3_text``: the 270M and 1B models, and the
text part of the larger ones): norms that multiply by ``1 + weight``, four per block (before and
after attention, before and after the MLP), q/k RMSNorm, embeddings scaled by sqrt(hidden), a
GELU-tanh gated MLP, attention scaled by ``query_pre_attn_scalar ** -0.5``, and sliding-window
layers: every ``sliding_window_pattern``-th layer is global (RoPE base 1,000,000, linear scaling
where the config has it), the others see the last ``sliding_window`` tokens (RoPE base 10,000,
unscaled). Tied head.

llama.cpp's ``gemma3`` architecture (NEOX RoPE: rows are not permuted) stores every norm as
``1 + weight`` (its converter adds the 1; `Family.gguf_norm_shift`), fixes the pattern at 6 and
the local RoPE base at 10,000, reads the window from ``gemma3.attention.sliding_window``, and
scales attention by ``head_dim ** -0.5`` (``(hidden / heads) ** -0.5`` for the 62-layer 27B):
a ``query_pre_attn_scalar`` that differs is folded into the q norm's weights.
"""

from __future__ import annotations

from typing import Any

from edgequant.models.families.base import GEMMA_STYLE, Family, gguf_config, hf_spec
from edgequant.models.spec import DecoderSpec

GGUF_PATTERN = 6  # llama.cpp's gemma3: every 6th layer global (set_swa_pattern(6))
GGUF_LOCAL_THETA = 10000.0  # and its local layers' RoPE base (rope_freq_base_train_swa)


def layer_pattern(layer_types: list[str]) -> int:
    """The n of "every n-th layer is global" that ``layer_types`` follows (n > len: none is);
    refused when the layers follow no such pattern."""
    n = len(layer_types)
    full = [i for i, t in enumerate(layer_types) if t == "full_attention"]
    pattern = full[0] + 1 if full else n + 1
    want = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if list(layer_types) != want:
        raise ValueError(
            f"gemma3 layer_types {list(layer_types)} do not repeat one pattern of local layers "
            "then a global one; edgequant's decoder runs 'every n-th layer global' only"
        )
    return pattern


def spec(config: Any) -> DecoderSpec:
    c = config
    unsupported = {
        "attn_logit_softcapping": getattr(c, "attn_logit_softcapping", None),
        "use_bidirectional_attention": getattr(c, "use_bidirectional_attention", False) or None,
        "attention_bias": getattr(c, "attention_bias", False) or None,
    }
    named = [f"{k}={v}" for k, v in unsupported.items() if v is not None]
    if named:
        raise ValueError(f"gemma3 with {', '.join(named)} is not supported by edgequant's decoder")
    if c.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(
            f"gemma3 hidden_activation {c.hidden_activation!r} is not supported; supported: "
            "gelu_pytorch_tanh"
        )
    rope = c.rope_parameters
    local = dict(rope.get("sliding_attention") or {})
    if local.get("rope_type", "default") != "default":
        raise ValueError(
            f"gemma3 local layers with rope type {local['rope_type']!r} are not supported; "
            "supported: default"
        )
    return hf_spec(
        c,
        rope_params=dict(rope.get("full_attention") or {}),
        qk_norm=True,
        norm_offset=1.0,
        embedding_scale=c.hidden_size**0.5,
        sandwich_norms=True,
        activation="gelu_tanh",
        sliding_window=c.sliding_window,
        sliding_window_pattern=layer_pattern(c.layer_types),
        rope_local_theta=float(local.get("rope_theta", GGUF_LOCAL_THETA)),
        attention_scale=float(c.query_pre_attn_scalar) ** -0.5,
        final_logit_softcap=getattr(c, "final_logit_softcapping", None),
    )


def gguf_query_scalar(n_layers: int, dim: int, n_heads: int, head_dim: int) -> int:
    """The ``query_pre_attn_scalar`` llama.cpp's gemma3 implies: ``head_dim``, but
    ``hidden / heads`` for its 27B (62 layers)."""
    return dim // n_heads if n_layers == 62 else head_dim


def gguf_attention_scale(spec: DecoderSpec) -> float:
    """The scale llama.cpp's gemma3 puts on attention logits."""
    return gguf_query_scalar(spec.n_layers, spec.dim, spec.n_heads, spec.head_dim) ** -0.5


def gguf_metadata(writer, spec: DecoderSpec) -> None:
    """Gemma 3's keys, after checking llama.cpp's gemma3 runs ``spec`` (only the check when
    ``writer`` is None)."""
    problems = []
    if spec.sliding_window_pattern != GGUF_PATTERN:
        problems.append(
            f"sliding_window_pattern={spec.sliding_window_pattern} (llama.cpp's gemma3 makes "
            f"every {GGUF_PATTERN}th layer global)"
        )
    if spec.rope_local_theta != GGUF_LOCAL_THETA:
        problems.append(
            f"local rope theta {spec.rope_local_theta} (llama.cpp's gemma3 uses "
            f"{GGUF_LOCAL_THETA:g})"
        )
    if spec.final_logit_softcap is not None:
        problems.append(f"final_logit_softcap={spec.final_logit_softcap} (gemma3 has none)")
    if problems:
        raise ValueError("GGUF (llama.cpp's gemma3) cannot hold " + "; ".join(problems))
    if writer is not None:
        writer.add_sliding_window(spec.sliding_window)


def hf_config(get, tensors: dict) -> dict:
    config = gguf_config(get, tensors, "gemma3_text")
    global_rope = config.pop("rope_parameters")
    head_dim = config["head_dim"]
    config.update(
        architectures=["Gemma3ForCausalLM"],
        hidden_activation="gelu_pytorch_tanh",
        sliding_window=int(get("attention.sliding_window")),
        layer_types=[
            "sliding_attention" if (i + 1) % GGUF_PATTERN else "full_attention"
            for i in range(config["num_hidden_layers"])
        ],
        # the q norm carries any other scale (see gguf_attention_scale)
        query_pre_attn_scalar=gguf_query_scalar(
            config["num_hidden_layers"],
            config["hidden_size"],
            config["num_attention_heads"],
            head_dim,
        ),
        rope_parameters={
            "full_attention": global_rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": GGUF_LOCAL_THETA},
        },
    )
    return config


FAMILY = Family(
    name="gemma3",
    model_types=("gemma3_text",),
    gguf_arch="gemma3",
    permute_qk=False,
    spec=spec,
    hf_config=hf_config,
    names=dict(GEMMA_STYLE),
    gguf_pre="default",
    gguf_metadata=gguf_metadata,
    gguf_attention_scale=gguf_attention_scale,
    gguf_norm_shift=1.0,
)

__all__ = ["FAMILY", "layer_pattern", "spec"]
