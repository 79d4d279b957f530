"""What every family file provides (`Family`), and the pieces most families share: reading a
`DecoderSpec` from a Hugging Face config (`hf_spec`), the Llama-style module names Llama, Qwen2
and Qwen3 use (`LLAMA_STYLE`), adoption of a Hugging Face model's own modules into a `Decoder`
(`adopt`), and the GGUF metadata every llama.cpp architecture reads (`gguf_config`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgequant.layers import embed_scale_of
from edgequant.models.decoder import Decoder, RMSNorm
from edgequant.models.spec import ROPE_TYPES, DecoderSpec, RopeScaling
from edgequant.roles import is_quantizable, is_quantized

# Decoder module names -> a Llama-style Hugging Face model's (Llama, Qwen2, Qwen3, Mistral,
# SmolLM); "{}" is the layer index.
LLAMA_STYLE = {
    "tok_embeddings": "model.embed_tokens",
    "norm": "model.norm",
    "output": "lm_head",
    "layers.{}.attention_norm": "model.layers.{}.input_layernorm",
    "layers.{}.attention.wq": "model.layers.{}.self_attn.q_proj",
    "layers.{}.attention.wk": "model.layers.{}.self_attn.k_proj",
    "layers.{}.attention.wv": "model.layers.{}.self_attn.v_proj",
    "layers.{}.attention.wo": "model.layers.{}.self_attn.o_proj",
    "layers.{}.attention.q_norm": "model.layers.{}.self_attn.q_norm",
    "layers.{}.attention.k_norm": "model.layers.{}.self_attn.k_norm",
    "layers.{}.ffn_norm": "model.layers.{}.post_attention_layernorm",
    "layers.{}.feed_forward.w1": "model.layers.{}.mlp.gate_proj",
    "layers.{}.feed_forward.w2": "model.layers.{}.mlp.down_proj",
    "layers.{}.feed_forward.w3": "model.layers.{}.mlp.up_proj",
}

# Gemma 3: a norm before and after each branch; q/k norms as Qwen3's
GEMMA_STYLE = {
    **LLAMA_STYLE,
    "layers.{}.post_attention_norm": "model.layers.{}.post_attention_layernorm",
    "layers.{}.ffn_norm": "model.layers.{}.pre_feedforward_layernorm",
    "layers.{}.post_ffn_norm": "model.layers.{}.post_feedforward_layernorm",
}

# Phi-3 / Phi-4-mini: one qkv projection, one gate_up projection (the decoder's wqkv, w13)
PHI3_STYLE = {
    "tok_embeddings": "model.embed_tokens",
    "norm": "model.norm",
    "output": "lm_head",
    "layers.{}.attention_norm": "model.layers.{}.input_layernorm",
    "layers.{}.attention.wqkv": "model.layers.{}.self_attn.qkv_proj",
    "layers.{}.attention.wo": "model.layers.{}.self_attn.o_proj",
    "layers.{}.ffn_norm": "model.layers.{}.post_attention_layernorm",
    "layers.{}.feed_forward.w13": "model.layers.{}.mlp.gate_up_proj",
    "layers.{}.feed_forward.w2": "model.layers.{}.mlp.down_proj",
}

# Where AWQ / SmoothQuant scales fold, in decoder names inside one block: (producer,
# consumers, through attention, the producer's rows that feed the consumers: None for all,
# "last" for the rows past the consumer's input width, as the v rows of a packed qkv and the
# up rows of a packed gate_up). Valid wherever the block has these modules (q/k norms and
# biases sit after the projections and do not change the fold).
SMOOTHING = (
    ("attention_norm", ("attention.wq", "attention.wk", "attention.wv"), False, None),
    ("attention.wv", ("attention.wo",), True, None),
    ("ffn_norm", ("feed_forward.w1", "feed_forward.w3"), False, None),
    ("feed_forward.w3", ("feed_forward.w2",), False, None),
)
# Phi-3's packed projections: v is the last kv_dim rows of qkv, up the last half of gate_up
SMOOTHING_PACKED = (
    ("attention_norm", ("attention.wqkv",), False, None),
    ("attention.wqkv", ("attention.wo",), True, "last"),
    ("ffn_norm", ("feed_forward.w13",), False, None),
    ("feed_forward.w13", ("feed_forward.w2",), False, "last"),
)


@dataclass(frozen=True)
class Family:
    """Everything edgequant knows about one decoder family.

    ``spec(hf_config)`` reads the `DecoderSpec`; ``names`` maps decoder module names to the
    Hugging Face model's; ``gguf_arch`` is llama.cpp's ``general.architecture``;
    ``permute_qk`` says whether llama.cpp's RoPE wants q/k rows in adjacent-pair order (its
    ``llama`` rope type) rather than rotate-half (``neox``); ``hf_config(get, tensors)`` builds
    a Hugging Face config dict from GGUF metadata (``get(key)`` reads ``<arch>.<key>``);
    ``gguf_tensors(spec)`` gives extra tensors llama.cpp reads (Llama 3's ``rope_freqs``);
    ``gguf_metadata(writer, spec)`` refuses what llama.cpp's architecture cannot run and adds
    its own keys (Gemma 3's sliding window; with ``writer`` None it only checks);
    ``gguf_attention_scale(spec)`` is the scale llama.cpp puts on attention logits (a different
    one in the spec is folded into the q norm, or refused); ``gguf_norm_shift`` is added to
    every norm weight on the way to GGUF (Gemma's ``1 + w``) and taken off on the way back."""

    name: str
    model_types: tuple[str, ...]
    gguf_arch: str
    permute_qk: bool
    spec: Callable[[Any], DecoderSpec]
    hf_config: Callable[[Callable[[str], Any], set[str]], dict]
    names: dict[str, str] = field(default_factory=lambda: dict(LLAMA_STYLE))
    gguf_tensors: Callable[[DecoderSpec], dict] = lambda spec: {}
    gguf_config_tensors: tuple[str, ...] = ()  # GGUF tensors hf_config reads, not weights
    gguf_pre: str = "default"  # llama.cpp's pre-tokenizer for a byte-level BPE tokenizer
    gguf_metadata: Callable[[Any, DecoderSpec], None] = lambda writer, spec: None
    gguf_attention_scale: Callable[[DecoderSpec], float] = lambda spec: spec.head_dim**-0.5
    gguf_norm_shift: float = 0.0
    smoothing_groups: tuple = SMOOTHING  # in decoder names (SMOOTHING_PACKED for Phi-3)

    def hf_name(self, decoder_name: str) -> str | None:
        """The Hugging Face module name of a decoder module name (None: it has none)."""
        parts = decoder_name.split(".")
        if parts[0] == "layers" and len(parts) > 2:
            key = ".".join(["layers", "{}", *parts[2:]])
            hf = self.names.get(key)
            return None if hf is None else hf.format(parts[1])
        return self.names.get(decoder_name)

    def roles(self, model: nn.Module) -> dict[str, tuple[str, int | None]]:
        """``{fqn: (role, layer)}`` of ``model``'s linears and embeddings, from what each is in
        the decoder (`edgequant.roles` reads these before guessing from names)."""
        own = isinstance(model, Decoder)  # llama2.c: the decoder's own names
        n_layers = model.spec.n_layers if own else self.spec(model.config).n_layers
        out: dict[str, tuple[str, int | None]] = {}
        for key, hf in self.names.items():
            role = _ROLES.get(key.split(".")[2] if key.startswith("layers.") else key)
            name = key if own else hf
            if role is None:
                continue
            if "{}" in key:
                out.update({name.format(i): (role, i) for i in range(n_layers)})
            else:
                out[name] = (role, None)
        modules = dict(model.named_modules())
        return {
            fqn: r
            for fqn, r in out.items()
            if fqn in modules and (is_quantizable(modules[fqn]) or is_quantized(modules[fqn]))
        }

    def smoothing(self) -> list[tuple[str, tuple[str, ...], bool, str | None]]:
        """`smoothing_groups` in the Hugging Face model's names, relative to one of its
        blocks."""

        def inside(name: str) -> str:
            return self.names[f"layers.{{}}.{name}"].split("{}.", 1)[1]

        return [
            (inside(p), tuple(inside(c) for c in cs), t, rows)
            for p, cs, t, rows in self.smoothing_groups
        ]

    def adopt(self, model: nn.Module, parts: tuple[str, ...] | None = None) -> Decoder:
        """A `Decoder` holding ``model``'s own modules (quantized or not): its linears and
        embeddings as they are, its norms' weights shared (so folding scales into a norm, or
        quantizing a linear, acts on both). With ``parts`` (decoder module names such as
        ``"layers.3"``, ``"norm"``) only those are taken (the model's others may be on the meta
        device: `edgequant.stream` runs one layer at a time)."""
        spec = self.spec(model.config)
        with torch.device("meta"):
            decoder = Decoder(spec)
        modules = dict(model.named_modules())

        def wanted(name: str) -> bool:
            return parts is None or any(name == p or name.startswith(p + ".") for p in parts)

        for name, module in list(decoder.named_modules()):
            if not _is_leaf(module) or not wanted(name):
                continue
            hf_name = self.hf_name(name)
            source = modules.get(hf_name) if hf_name else None
            if source is None:
                raise ValueError(
                    f"{type(model).__name__} has no module {hf_name!r} for the decoder's "
                    f"{name!r} ({self.name} family)"
                )
            if isinstance(module, RMSNorm):
                module.weight = source.weight
                continue
            if name == "tok_embeddings" and not _same_scale(embed_scale_of(source), spec):
                raise ValueError(
                    f"{type(model).__name__}'s embedding scales its rows by "
                    f"{embed_scale_of(source)}; the {self.name} family expects "
                    f"{spec.embedding_scale}"
                )
            parent, _, child = name.rpartition(".")
            setattr(decoder.get_submodule(parent) if parent else decoder, child, source)
        left = [n for n, t in [*decoder.named_parameters(), *decoder.named_buffers()]
                if t.is_meta and wanted(n)]  # fmt: skip
        if left:
            raise AssertionError(f"not carried over from the Hugging Face model: {left}")
        decoder.family = self.name
        return decoder.eval()


# decoder module (or a block's part) -> role; norms have none (they are never quantized)
_ROLES = {
    "tok_embeddings": "embedding",
    "output": "lm_head",
    "attention": "attention",
    "feed_forward": "feedforward",
}


def _same_scale(scale: float | None, spec: DecoderSpec) -> bool:
    want = spec.embedding_scale
    if scale is None or want is None:
        return scale is want
    return math.isclose(scale, want, rel_tol=1e-6)  # transformers holds it in float32


def _is_leaf(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding, RMSNorm))


def rope_scaling(
    config: Any, params: dict | None = None
) -> tuple[float, RopeScaling | None, float]:
    """``(rope_theta, scaling, partial_rotary_factor)`` from a Hugging Face config (or from
    ``params``, one entry of a config's per-layer-type ``rope_parameters``)."""
    if params is None:
        params = dict(getattr(config, "rope_parameters", None) or {})
        legacy = getattr(config, "rope_scaling", None)
        if isinstance(legacy, dict) and not params:
            params = dict(legacy)
    theta = params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    partial = params.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", 1.0)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return float(theta), None, float(partial)
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    original = params.get("original_max_position_embeddings") or getattr(
        config, "original_max_position_embeddings", None
    )
    if kind == "longrope":
        return float(theta), _longrope(config, params, original), float(partial)
    scaling = RopeScaling(
        kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=params.get("low_freq_factor"),
        high_freq_factor=params.get("high_freq_factor"),
        original_max_seq_len=None if original is None else int(original),
    )
    return float(theta), scaling, float(partial)


def _longrope(config: Any, params: dict, original: int | None) -> RopeScaling:
    """Phi-3's LongRoPE, with transformers' defaults: ``factor`` the trained context over the
    original one, ``attention_factor`` sqrt(1 + ln(factor) / ln(original)) when it is > 1."""
    if original is None:
        raise ValueError("longrope rope scaling needs original_max_position_embeddings")
    factor = params.get("factor") or config.max_position_embeddings / original
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeScaling(
        "longrope",
        factor=float(factor),
        original_max_seq_len=int(original),
        short_factor=tuple(float(f) for f in params["short_factor"]),
        long_factor=tuple(float(f) for f in params["long_factor"]),
        attention_factor=float(attention),
    )


def hf_spec(config: Any, rope_params: dict | None = None, **family_fields) -> DecoderSpec:
    """The fields every Llama-like Hugging Face config holds, plus ``family_fields``; RoPE from
    ``rope_params`` where the family passes them (else the config's ``rope_parameters``).
    Sliding-window layers are refused unless the family reads them (``sliding_window`` among
    ``family_fields``)."""
    c = config
    sliding = getattr(c, "use_sliding_window", False) or any(
        t != "full_attention" for t in (getattr(c, "layer_types", None) or [])
    )
    if sliding and "sliding_window" not in family_fields:
        raise NotImplementedError(
            f"{c.model_type} with sliding-window layers (use_sliding_window / layer_types) is "
            "not supported yet"
        )
    theta, scaling, partial = rope_scaling(c, rope_params)
    heads = c.num_attention_heads
    return DecoderSpec(
        vocab_size=c.vocab_size,
        dim=c.hidden_size,
        n_layers=c.num_hidden_layers,
        n_heads=heads,
        n_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
        hidden_dim=c.intermediate_size,
        max_seq_len=c.max_position_embeddings,
        norm_eps=float(c.rms_norm_eps),
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary=partial,
        tied_embedding=bool(getattr(c, "tie_word_embeddings", False)),
        **family_fields,
    )


def gguf_config(get: Callable[[str], Any], tensors: set[str], model_type: str) -> dict:
    """A Hugging Face config dict from the metadata every llama.cpp architecture here writes
    (``get(key)`` reads ``<arch>.<key>``, None when absent); the caller adds its own fields."""

    def need(key: str) -> Any:
        value = get(key)
        if value is None:
            raise ValueError(f"GGUF metadata lacks <arch>.{key}; cannot build the model")
        return value

    rope = {"rope_type": "default", "rope_theta": float(get("rope.freq_base") or 10000.0)}
    if get("rope.scaling.type") == "linear":
        rope.update(rope_type="linear", factor=float(get("rope.scaling.factor")))
    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // heads
    return {
        "model_type": model_type,
        "vocab_size": int(need("vocab_size")),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv") or heads),
        "head_dim": int(head_dim),
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_parameters": rope,
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": "float32",
    }


__all__ = [
    "GEMMA_STYLE",
    "LLAMA_STYLE",
    "PHI3_STYLE",
    "SMOOTHING",
    "SMOOTHING_PACKED",
    "Family",
    "gguf_config",
    "hf_spec",
    "rope_scaling",
]
