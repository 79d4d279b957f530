"""`DecoderSpec`: the ways the decoder families edgequant runs differ, as one frozen dataclass.

Llama, Qwen2/2.5, Qwen3, Gemma 3, Phi-3 / Phi-4-mini and llama2.c's checkpoints are one
decoder (`edgequant.models.decoder`): embedding -> blocks (norm, attention, norm, MLP) -> norm ->
head. What differs between them is the short list of facts below; each family file
(`edgequant.models.families`) reads them from its model's config. A spec validates itself: a
combination the decoder cannot run is refused with the fields named.

>>> spec = DecoderSpec(vocab_size=10, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4,
...                    hidden_dim=16, max_seq_len=32)
>>> spec.rotary_dim, spec.scale
(4, 0.5)
>>> DecoderSpec(vocab_size=10, dim=8, n_layers=1, n_heads=3, n_kv_heads=2, head_dim=4,
...             hidden_dim=16, max_seq_len=32)
Traceback (most recent call last):
...
ValueError: DecoderSpec: n_heads=3 must be a multiple of n_kv_heads=2
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

ROPE_TYPES = ("default", "linear", "llama3", "longrope")  # what the decoder computes
ACTIVATIONS = ("silu", "gelu_tanh")


@dataclass(frozen=True)
class RopeScaling:
    """How positions are stretched past the trained context.

    - ``linear``: positions divided by ``factor``;
    - ``llama3`` (Llama 3.1 / 3.2): low frequencies divided by ``factor``, high ones kept, a
      smooth ramp between, set by ``low_freq_factor``, ``high_freq_factor`` and
      ``original_max_seq_len``;
    - ``longrope`` (Phi-3, Phi-4-mini): each frequency divided by its own factor, from
      ``long_factor`` when the context is longer than ``original_max_seq_len``, else from
      ``short_factor``; cos and sin multiplied by ``attention_factor``.
    """

    type: str
    factor: float = 1.0
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_seq_len: int | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attention_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.type not in ROPE_TYPES or self.type == "default":
            raise ValueError(
                f"rope type {self.type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
            )
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise ValueError(f"RopeScaling.factor must be a positive number, got {self.factor!r}")
        if self.type == "llama3":
            self._need("low_freq_factor", "high_freq_factor", "original_max_seq_len")
            if not self.high_freq_factor > self.low_freq_factor > 0:
                raise ValueError(
                    "llama3 rope scaling needs high_freq_factor > low_freq_factor > 0, got "
                    f"{self.high_freq_factor} and {self.low_freq_factor}"
                )
        if self.type == "longrope":
            self._need("short_factor", "long_factor", "original_max_seq_len")
            if len(self.short_factor) != len(self.long_factor):
                raise ValueError(
                    f"longrope short_factor has {len(self.short_factor)} values and long_factor "
                    f"{len(self.long_factor)}; one per rotated frequency each"
                )
            factors = (*self.short_factor, *self.long_factor, self.attention_factor)
            if not all(math.isfinite(f) and f > 0 for f in factors):
                raise ValueError("longrope factors and attention_factor must be positive numbers")

    def _need(self, *names: str) -> None:
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            raise ValueError(f"{self.type} rope scaling needs {', '.join(missing)}")

    def factors(self, context: int) -> tuple[float, ...]:
        """LongRoPE's per-frequency divisors for a context of ``context`` tokens."""
        long = context > self.original_max_seq_len
        return self.long_factor if long else self.short_factor


@dataclass(frozen=True)
class DecoderSpec:
    """Shape and per-family facts of one decoder. Defaults are Llama's."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int  # Qwen3 and Gemma 3 do not have dim == n_heads * head_dim
    hidden_dim: int  # the MLP's inner width
    max_seq_len: int  # the trained context: caches and exported programs stay within it
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    partial_rotary: float = 1.0  # Phi-4-mini rotates the first 3/4 of each head
    qkv_bias: bool = False  # Qwen2/2.5
    o_bias: bool = False  # Llama's attention_bias puts one on the output projection too
    mlp_bias: bool = False
    fused_qkv: bool = False  # Phi-3: one qkv projection
    fused_gate_up: bool = False  # Phi-3: one gate_up projection
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head of q and k before RoPE
    norm_offset: float = 0.0  # Gemma: norms multiply by (1 + weight)
    embedding_scale: float | None = None  # Gemma: embeddings times sqrt(dim)
    sandwich_norms: bool = False  # Gemma 3: norms after attention and after the MLP as well
    activation: str = "silu"  # gate activation: silu (Llama, Qwen, Phi) or gelu_tanh (Gemma)
    sliding_window: int | None = None  # tokens a local layer sees
    sliding_window_pattern: int | None = None  # every n-th layer is global, the others local
    rope_local_theta: float | None = None  # Gemma 3: local layers' RoPE base
    attention_scale: float | None = None  # None: head_dim ** -0.5
    final_logit_softcap: float | None = None  # logits = cap * tanh(logits / cap)
    tied_embedding: bool = True

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "hidden_dim", "max_seq_len"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive int, got {value!r}")
        if problems:
            raise ValueError("DecoderSpec: " + "; ".join(problems))
        if self.n_heads % self.n_kv_heads:
            problems.append(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if not 0 < self.partial_rotary <= 1:
            problems.append(f"partial_rotary must be in (0, 1], got {self.partial_rotary}")
        elif self.rotary_dim % 2 or self.rotary_dim == 0:
            problems.append(
                f"head_dim={self.head_dim} with partial_rotary={self.partial_rotary} rotates "
                f"{self.rotary_dim} dims; RoPE needs an even, positive number"
            )
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                problems.append(f"{name} must be a positive number, got {value!r}")
        if self.activation not in ACTIVATIONS:
            problems.append(
                f"activation {self.activation!r} is not supported; supported: "
                f"{', '.join(ACTIVATIONS)}"
            )
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            problems.append(f"rope_scaling must be a RopeScaling, got {self.rope_scaling!r}")
        elif (
            self.rope_scaling is not None
            and self.rope_scaling.type == "longrope"
            and len(self.rope_scaling.short_factor) != self.rotary_dim // 2
            and self.rotary_dim % 2 == 0
        ):
            problems.append(
                f"longrope has {len(self.rope_scaling.short_factor)} factors; head_dim="
                f"{self.head_dim} with partial_rotary={self.partial_rotary} rotates "
                f"{self.rotary_dim // 2} frequencies"
            )
        if (self.sliding_window is None) != (self.sliding_window_pattern is None):
            problems.append(
                f"sliding_window={self.sliding_window} and sliding_window_pattern="
                f"{self.sliding_window_pattern} go together (local layers need both)"
            )
        for name in ("sliding_window", "sliding_window_pattern"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value > 0):
                problems.append(f"{name} must be a positive int, got {value!r}")
        if self.rope_local_theta is not None and self.sliding_window_pattern is None:
            problems.append(
                f"rope_local_theta={self.rope_local_theta} needs sliding_window and "
                "sliding_window_pattern (local layers)"
            )
        for name in ("attention_scale", "final_logit_softcap", "embedding_scale"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                problems.append(f"{name} must be None or a positive number, got {value!r}")
        if problems:
            raise ValueError("DecoderSpec: " + "; ".join(problems))

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head RoPE rotates."""
        return int(self.head_dim * self.partial_rotary)

    @property
    def scale(self) -> float:
        """The attention logits' scale."""
        return self.head_dim**-0.5 if self.attention_scale is None else self.attention_scale

    def is_local(self, layer: int) -> bool:
        """Whether ``layer`` attends to a sliding window (Gemma 3: all but every n-th layer)."""
        pattern = self.sliding_window_pattern
        return pattern is not None and (layer + 1) % pattern != 0

    def replace(self, **changes) -> DecoderSpec:
        """A copy with ``changes`` (validated again)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return DecoderSpec(**{**values, **changes})


__all__ = ["ACTIVATIONS", "ROPE_TYPES", "DecoderSpec", "RopeScaling"]
