"""Llama (Hugging Face ``LlamaForCausalLM``: Llama 2, Llama 3.x with ``llama3`` rope scaling,
SmolLM, TinyLlama) and llama2.c's checkpoints (already a `Decoder`).

llama.cpp's ``llama`` architecture rotates adjacent pairs, so q/k rows are permuted on the way
to GGUF; Llama 3's rope scaling travels as a ``rope_freqs`` tensor of per-frequency divisors.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgequant.models.decoder import inv_frequencies
from edgequant.models.families.base import Family, gguf_config, hf_spec
from edgequant.models.spec import DecoderSpec


def spec(config: Any) -> DecoderSpec:
    bias = bool(getattr(config, "attention_bias", False))
    return hf_spec(
        config, qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(config, "mlp_bias", False))
    )


def rope_freqs(spec: DecoderSpec) -> dict[str, np.ndarray]:
    """``{"rope_freqs.weight": divisors}`` for ``llama3`` rope scaling (llama.cpp divides each
    frequency by its entry), else nothing."""
    if spec.rope_scaling is None or spec.rope_scaling.type != "llama3":
        return {}
    plain = inv_frequencies(spec.replace(rope_scaling=None))
    return {"rope_freqs.weight": (plain / inv_frequencies(spec)).numpy().astype(np.float32)}


def llama3_from_freqs(divisors: np.ndarray, theta: float, rotary_dim: int) -> dict:
    """The ``llama3`` rope parameters that give ``divisors`` (a GGUF's ``rope_freqs``): the
    largest divisor is ``factor``; frequencies between 1 and ``factor`` lie on the smooth ramp,
    whose two ends fix ``original_max_position_embeddings`` and the high-frequency factor (the
    low one taken as 1). Checked: the parameters must give ``divisors`` back."""
    f = np.asarray(divisors, dtype=np.float64)
    inv = 1.0 / theta ** (np.arange(0, rotary_dim, 2) / rotary_dim)
    wavelen = 2 * math.pi / inv
    factor = float(f.max())
    middle = (f > 1 + 1e-6) & (f < factor * (1 - 1e-6))
    if factor <= 1 + 1e-6:
        raise ValueError("rope_freqs holds no scaling (every divisor is 1)")
    if middle.sum() >= 2:  # smooth = a / wavelen + b, from 1 / f = (1 - smooth) / factor + smooth
        smooth = (1 / f[middle] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(1 / wavelen[middle], smooth, 1)
        high = 1 - 1 / b  # with low_freq_factor 1: b = -1 / (high - 1), a = old / (high - 1)
        old = a * (high - 1)
    else:  # no ramp: any boundary between the kept and the divided wavelengths
        kept = wavelen[f <= 1 + 1e-6]
        divided = wavelen[f >= factor * (1 - 1e-6)]
        lo, hi = (kept.max() if kept.size else 0.0), divided.min()
        old = lo + 2 * (hi - lo) / 3  # low_freq_wavelen = old (low factor 1)
        high = old / (lo + (hi - lo) / 3)
    params = {  # the fit lands within float rounding of the integers configs hold
        "rope_type": "llama3", "rope_theta": theta, "factor": _tidy(factor),
        "low_freq_factor": 1.0, "high_freq_factor": _tidy(high),
        "original_max_position_embeddings": int(round(old)),
    }  # fmt: skip
    scaled = _llama3_divisors(inv, params)
    if not np.allclose(scaled, f, rtol=1e-4, atol=1e-5):
        raise ValueError("rope_freqs is not a llama3 rope scaling edgequant can recover")
    return params


def _tidy(x: float) -> float:
    return float(round(x)) if abs(x - round(x)) < 1e-4 * max(1.0, abs(x)) else float(x)


def _llama3_divisors(inv: np.ndarray, p: dict) -> np.ndarray:
    factor, old = p["factor"], p["original_max_position_embeddings"]
    low, high = p["low_freq_factor"], p["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - low) / (high - low)
    ramp = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, ramp))


def hf_config(get, tensors: dict) -> dict:
    config = gguf_config(get, tensors, "llama")
    config["architectures"] = ["LlamaForCausalLM"]
    config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    if "rope_freqs.weight" in tensors:
        divisors = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float32)
        theta = config["rope_parameters"]["rope_theta"]
        config["rope_parameters"] = llama3_from_freqs(divisors, theta, config["head_dim"])
    return config


FAMILY = Family(
    name="llama",
    model_types=("llama",),
    gguf_arch="llama",
    permute_qk=True,
    spec=spec,
    hf_config=hf_config,
    gguf_tensors=rope_freqs,
    gguf_config_tensors=("rope_freqs.weight",),
    gguf_pre="llama-bpe",  # Llama 3's; SmolLM's is "smollm" (to_gguf(tokenizer_pre=...))
)

__all__ = ["FAMILY", "llama3_from_freqs", "rope_freqs", "spec"]
