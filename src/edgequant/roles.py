"""Roles and layer indices of a model's quantizable modules, read from their FQNs.

A role says what a module does in a decoder: ``embedding``, ``attention``, ``feedforward`` or
``lm_head``; the layer index is the decoder block it sits in. Recipes select modules by these.
A model's family file (`edgequant.models.families`: Llama, Qwen2, Qwen3, llama2.c) states them
for the modules it knows; a model can state its own with a method ``edgequant_roles() ->
{fqn: (role, layer)}``; otherwise the names below give them (llama2.c / gpt-fast, Llama, Qwen2,
Gemma, GPT-2, BERT).
"""

from __future__ import annotations

import re

import torch.nn as nn

from edgequant.layers import QuantizedEmbedding, QuantizedLinear, is_conv1d

# Last FQN component -> role, for modules outside the decoder blocks.
_TOP_LEVEL = {
    "tok_embeddings": "embedding",
    "embed_tokens": "embedding",
    "wte": "embedding",
    "wpe": "embedding",
    "word_embeddings": "embedding",
    "output": "lm_head",
    "lm_head": "lm_head",
}
# Any FQN component -> role, inside decoder blocks.
_BLOCK_PARTS = {
    "attention": "attention",
    "self_attn": "attention",
    "attn": "attention",
    "feed_forward": "feedforward",
    "mlp": "feedforward",
    "ffn": "feedforward",
}
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


def is_quantizable(module: nn.Module) -> bool:
    """Modules edgequant can swap: ``nn.Linear``, ``nn.Embedding`` and Hugging Face's ``Conv1D``."""
    return isinstance(module, (nn.Linear, nn.Embedding)) or is_conv1d(module)


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, (QuantizedLinear, QuantizedEmbedding))


def role_of(fqn: str, module: nn.Module) -> tuple[str | None, int | None]:
    """``(role, layer index)`` of one module from its FQN (``None`` where unknown).

    >>> role_of("layers.3.attention.wq", nn.Linear(2, 2))
    ('attention', 3)
    >>> role_of("model.layers.0.mlp.down_proj", nn.Linear(2, 2))
    ('feedforward', 0)
    >>> role_of("output", nn.Linear(2, 2))
    ('lm_head', None)
    """
    return role_of_name(fqn, isinstance(module, (nn.Embedding, QuantizedEmbedding)))


def role_of_name(fqn: str, embedding: bool) -> tuple[str | None, int | None]:
    """`role_of` for a module known only by its FQN and whether it is an embedding lookup (as
    in an exported graph's module stack).

    >>> role_of_name("encoder.layer.1.attention.self.query", embedding=False)
    ('attention', 1)
    """
    m = _LAYER_INDEX.search(fqn)
    layer = int(m.group(1)) if m else None
    parts = fqn.split(".")
    if layer is not None:
        for part in parts:
            if part in _BLOCK_PARTS:
                return _BLOCK_PARTS[part], layer
    if embedding:
        return "embedding", layer
    if layer is not None:  # e.g. layers.0.output is not the lm_head
        return None, layer
    return _TOP_LEVEL.get(parts[-1]), None


def _family_roles(model: nn.Module) -> dict[str, tuple[str, int | None]]:
    """The roles a model's family file gives (`edgequant.models.families`), or none for a model
    no family covers. Imported here, on use: the family files sit above this module."""
    from edgequant.models.families import for_model

    try:
        return for_model(model).roles(model)
    except (ValueError, NotImplementedError, AttributeError):
        return {}


def infer_roles(model: nn.Module) -> dict[str, tuple[str | None, int | None]]:
    """``{fqn: (role, layer)}`` for every quantizable (or already quantized) module."""
    own = getattr(model, "edgequant_roles", None)
    declared = own() if callable(own) else _family_roles(model)
    out = {}
    for fqn, module in model.named_modules():
        if is_quantizable(module) or is_quantized(module):
            out[fqn] = declared.get(fqn) or role_of(fqn, module)
    return out
