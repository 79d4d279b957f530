"""The decoder families edgequant runs, one file each; this registry finds a model's.

Adding a family is a file here (its `Family`: spec, names, GGUF architecture) and one entry in
``FAMILIES`` (and one line in the generic test runner, tests/models/test_decoder_families.py).

>>> for_model_type("qwen2").gguf_arch
'qwen2'
>>> for_model_type("mamba")
Traceback (most recent call last):
...
ValueError: architecture 'mamba' is not supported; supported: gemma3_text, llama, phi3, qwen2, qwen3
"""

from __future__ import annotations

import logging

from torch import nn

from edgequant.models.decoder import Decoder
from edgequant.models.families import gemma3, llama, phi3, qwen2, qwen3
from edgequant.models.families.base import Family

log = logging.getLogger(__name__)

FAMILIES: dict[str, Family] = {
    f.name: f for f in (llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY, gemma3.FAMILY, phi3.FAMILY)
}
_DECODER_FAMILIES = {"llama2c": "llama"}  # edgequant's own Decoder subclasses


# variants of supported families the decoder cannot express: what is missing
NOT_EXPRESSIBLE = {
    "gemma3n": "Gemma 3n's per-layer embeddings, AltUp and LAuReL blocks",
    "gemma3n_text": "Gemma 3n's per-layer embeddings, AltUp and LAuReL blocks",
    "phimoe": "a mixture-of-experts MLP (Phi-3.5-MoE)",
    "gemma3": "the multimodal Gemma3ForConditionalGeneration (its text model, model_type "
    "gemma3_text, is supported)",
    "gemma2": "Gemma 2's attention logit softcapping and its 1:1 local/global pattern",
}


def supported() -> str:
    return ", ".join(sorted({t for f in FAMILIES.values() for t in f.model_types}))


def for_model_type(model_type: str) -> Family:
    """The family of a Hugging Face ``config.model_type``."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    missing = NOT_EXPRESSIBLE.get(model_type)
    if missing is not None:
        raise ValueError(
            f"architecture {model_type!r} is not supported: edgequant's decoder has no "
            f"{missing}; supported: {supported()}"
        )
    raise ValueError(f"architecture {model_type!r} is not supported; supported: {supported()}")


def for_gguf_arch(arch: str) -> Family:
    """The family of a GGUF file's ``general.architecture``."""
    for family in FAMILIES.values():
        if family.gguf_arch == arch:
            return family
    archs = ", ".join(sorted(f.gguf_arch for f in FAMILIES.values()))
    missing = NOT_EXPRESSIBLE.get(arch)
    if missing is not None:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported: edgequant's decoder has no "
            f"{missing}; supported: {archs}"
        )
    raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {archs}")


def for_model(model: nn.Module) -> Family:
    """The family of a loaded model: a `Decoder` (llama2.c's is Llama) or a Hugging Face model."""
    if isinstance(model, Decoder):
        own = getattr(model, "family", None) or getattr(model, "edgequant_family", None)
        return FAMILIES[_DECODER_FAMILIES.get(own, own or "llama")]
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise ValueError(
            f"{type(model).__name__} is neither an edgequant Decoder nor a Hugging Face model "
            f"with a config.model_type; supported architectures: {supported()}"
        )
    return for_model_type(model_type)


def module_name(model: nn.Module, decoder_name: str) -> str | None:
    """The model's own name of one of the decoder's modules (``norm``, ``output``,
    ``tok_embeddings``; None: the model has none); a model no family covers is refused."""
    return decoder_name if isinstance(model, Decoder) else for_model(model).hf_name(decoder_name)


def decoder_of(model: nn.Module) -> Decoder:
    """``model`` as the one `Decoder` (itself, or a Hugging Face model adopted by its family:
    the decoder holds the model's own modules)."""
    if isinstance(model, Decoder):
        return model
    return for_model(model).adopt(model)


def eager_decoder(model: nn.Module) -> Decoder | None:
    """`decoder_of` for eager evaluation and generation: None (the model's own forward runs)
    for a model no family covers, or one whose config its family cannot run yet (logged)."""
    if isinstance(model, Decoder):
        return model
    try:
        family = for_model(model)
    except ValueError:
        return None
    try:
        return family.adopt(model)
    except (NotImplementedError, ValueError) as e:
        if type(model).__name__ not in _warned:
            _warned.add(type(model).__name__)
            log.warning(
                "%s runs its own forward, not edgequant's decoder: %s", type(model).__name__, e
            )
        return None


_warned: set[str] = set()


__all__ = [
    "FAMILIES",
    "NOT_EXPRESSIBLE",
    "Family",
    "decoder_of",
    "eager_decoder",
    "for_gguf_arch",
    "for_model",
    "for_model_type",
]
