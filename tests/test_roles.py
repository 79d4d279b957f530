"""Roles and layer indices read from module names of the common families."""

from __future__ import annotations

import pytest
import torch.nn as nn

from edgequant.roles import infer_roles, role_of

LIN, EMB = nn.Linear(2, 2), nn.Embedding(4, 2)


@pytest.mark.parametrize(
    ("fqn", "module", "expected"),
    [
        # llama2.c / gpt-fast
        ("tok_embeddings", EMB, ("embedding", None)),
        ("layers.3.attention.wq", LIN, ("attention", 3)),
        ("layers.12.feed_forward.w2", LIN, ("feedforward", 12)),
        ("output", LIN, ("lm_head", None)),
        # Hugging Face Llama / Qwen2 / Gemma
        ("model.embed_tokens", EMB, ("embedding", None)),
        ("model.layers.0.self_attn.o_proj", LIN, ("attention", 0)),
        ("model.layers.29.mlp.gate_proj", LIN, ("feedforward", 29)),
        ("lm_head", LIN, ("lm_head", None)),
        # GPT-2
        ("transformer.wte", EMB, ("embedding", None)),
        ("transformer.wpe", EMB, ("embedding", None)),
        ("transformer.h.5.attn.c_attn", LIN, ("attention", 5)),
        ("transformer.h.5.mlp.c_proj", LIN, ("feedforward", 5)),
        # inside a block but neither attention nor feed-forward: no role, still a layer index
        ("layers.0.output", LIN, (None, 0)),
        ("encoder.proj", LIN, (None, None)),
    ],
)
def test_role_of(fqn, module, expected):
    assert role_of(fqn, module) == expected


def test_a_model_can_declare_its_own_roles():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def edgequant_roles(self):
            return {"head": ("lm_head", None)}

    assert infer_roles(Tiny()) == {"proj": (None, None), "head": ("lm_head", None)}
