"""Roles, ties and quantized logits on tiny random Hugging Face models of each family.

Each model is built from a config (never downloaded), seeded, with every dimension a multiple
of 32 so that group-32 schemes fit every module: hidden 64, intermediate 128, 4 heads of 16,
2 kv heads, 2 layers, vocabulary 128.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import transformers  # noqa: E402  (the hf extra; installed by make test)

import edgequant
from edgequant.generative import GenerativeQuantRecipe
from edgequant.generative import quant_recipe_utils as utils
from edgequant.layers import QuantizedEmbedding, QuantizedLinear
from edgequant.primitives import sqnr
from edgequant.recipe import Recipe, Rule
from edgequant.roles import infer_roles
from edgequant.schemes import Scheme

Conv1D = transformers.pytorch_utils.Conv1D

DIMS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_hidden_layers=2,
    vocab_size=128,
    max_position_embeddings=64,
)

# Llama, Qwen2, Gemma 2 and Gemma 3 name their modules alike.
DECODER_ROLES = {
    "model.embed_tokens": ("embedding", None),
    "model.layers.0.self_attn.q_proj": ("attention", 0),
    "model.layers.0.self_attn.k_proj": ("attention", 0),
    "model.layers.0.self_attn.v_proj": ("attention", 0),
    "model.layers.0.self_attn.o_proj": ("attention", 0),
    "model.layers.0.mlp.gate_proj": ("feedforward", 0),
    "model.layers.0.mlp.up_proj": ("feedforward", 0),
    "model.layers.0.mlp.down_proj": ("feedforward", 0),
    "model.layers.1.self_attn.q_proj": ("attention", 1),
    "model.layers.1.self_attn.k_proj": ("attention", 1),
    "model.layers.1.self_attn.v_proj": ("attention", 1),
    "model.layers.1.self_attn.o_proj": ("attention", 1),
    "model.layers.1.mlp.gate_proj": ("feedforward", 1),
    "model.layers.1.mlp.up_proj": ("feedforward", 1),
    "model.layers.1.mlp.down_proj": ("feedforward", 1),
    "lm_head": ("lm_head", None),
}
GPT2_ROLES = {
    "transformer.wte": ("embedding", None),
    "transformer.wpe": ("embedding", None),
    "transformer.h.0.attn.c_attn": ("attention", 0),
    "transformer.h.0.attn.c_proj": ("attention", 0),
    "transformer.h.0.mlp.c_fc": ("feedforward", 0),
    "transformer.h.0.mlp.c_proj": ("feedforward", 0),
    "transformer.h.1.attn.c_attn": ("attention", 1),
    "transformer.h.1.attn.c_proj": ("attention", 1),
    "transformer.h.1.mlp.c_fc": ("feedforward", 1),
    "transformer.h.1.mlp.c_proj": ("feedforward", 1),
    "lm_head": ("lm_head", None),
}


def _decoder(config_cls: str, model_cls: str, **overrides):
    def build() -> nn.Module:
        torch.manual_seed(0)
        config = getattr(transformers, config_cls)(**DIMS, **overrides)
        return getattr(transformers, model_cls)(config).eval()

    return build


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    # bos/eos inside the tiny vocabulary (the default 50256 is not)
    config = transformers.GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        vocab_size=128,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


# family -> (builder, expected {fqn: (role, layer)}, FQN the lm_head is tied to or None)
FAMILIES = {
    "llama-tied": (
        _decoder("LlamaConfig", "LlamaForCausalLM", tie_word_embeddings=True),
        DECODER_ROLES,
        "model.embed_tokens",
    ),
    "llama": (
        _decoder("LlamaConfig", "LlamaForCausalLM", tie_word_embeddings=False),
        DECODER_ROLES,
        None,
    ),
    "qwen2": (_decoder("Qwen2Config", "Qwen2ForCausalLM"), DECODER_ROLES, None),
    "gemma2": (_decoder("Gemma2Config", "Gemma2ForCausalLM"), DECODER_ROLES, "model.embed_tokens"),
    "gemma3": (
        _decoder("Gemma3TextConfig", "Gemma3ForCausalLM"),
        DECODER_ROLES,
        "model.embed_tokens",
    ),
    "gpt2": (_gpt2, GPT2_ROLES, "transformer.wte"),
}

FP16 = Scheme("fp16")
INT8_WEIGHT_ONLY = Scheme("int8")
INT8_DYNAMIC = Scheme("int8", activation="int8_dynamic")
A8W4_G32 = Scheme("int4", "per_group", 32, scale_dtype="fp16", activation="int8_dynamic")


def _ids() -> torch.Tensor:
    return torch.randint(0, DIMS["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_plan_gives_every_quantizable_module_its_role_and_layer(family):
    build, expected, tied = FAMILIES[family]
    model = build()
    plan = edgequant.plan(model, "int8-dynamic")
    quantizable = {
        fqn for fqn, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding, Conv1D))
    }
    assert [lp.fqn for lp in plan] == list(expected)
    assert set(expected) == quantizable
    assert {lp.fqn: (lp.role, lp.layer) for lp in plan} == expected
    assert all(lp.role is not None for lp in plan)
    assert all(lp.scheme == INT8_DYNAMIC for lp in plan)
    # the tie is the config's default for Gemma and GPT-2, not for Qwen2
    assert model.config.tie_word_embeddings is (tied is not None)
    if tied is not None:
        assert model.lm_head.weight is model.get_submodule(tied).weight
    assert plan["lm_head"].tied_to == tied
    assert all(lp.tied_to is None for lp in plan if lp.fqn != "lm_head")


def test_gpt2_conv1d_is_planned_as_out_by_in():
    plan = edgequant.plan(_gpt2(), "int8-dynamic")
    # Conv1D stores [in, out]; the plan (and the packed weight) are [out, in] like nn.Linear
    assert [(lp.kind, lp.shape) for lp in plan if lp.layer == 0] == [
        ("conv1d", (192, 64)),  # c_attn: q, k, v
        ("conv1d", (64, 64)),
        ("conv1d", (256, 64)),  # c_fc
        ("conv1d", (64, 256)),  # mlp.c_proj
    ]


# Logits SQNR (dB) of the quantized model against float on the same 2 x 16 random ids; each
# floor sits a bit under what was measured here (other seeds moved it by up to about 1.5 dB).
FLOORS = {
    ("llama-tied", "fp16"): 67.0,  # measured 69.57
    ("llama-tied", "int8-dynamic"): 37.0,  # 38.06
    ("llama-tied", "8da4w-g32"): 15.0,  # 16.06
    ("llama", "fp16"): 66.0,  # 68.45
    ("llama", "int8-dynamic"): 36.0,  # 37.11
    ("llama", "8da4w-g32"): 14.0,  # 14.81
    ("qwen2", "fp16"): 65.0,  # 67.60
    ("qwen2", "int8-dynamic"): 36.0,  # 37.14
    ("qwen2", "8da4w-g32"): 14.0,  # 14.69
    # Gemma: measured with the embedding's sqrt(hidden) scale put back by hand after quantize
    # (what quantize gives today, without it: fp16 15.0, int8-dynamic 15.0, 8da4w 9.3 / 9.1).
    # Its post-attention / post-feedforward norms lift the random blocks' output to unit scale,
    # so their int4 noise weighs more than in Llama: hence the low 8da4w numbers.
    ("gemma2", "fp16"): 62.0,  # 64.23
    ("gemma2", "int8-dynamic"): 30.5,  # 31.93
    ("gemma2", "8da4w-g32"): 10.0,  # 10.65
    ("gemma3", "fp16"): 62.0,  # 64.08
    ("gemma3", "int8-dynamic"): 30.5,  # 31.77
    ("gemma3", "8da4w-g32"): 9.8,  # 10.32
    ("gpt2", "fp16"): 67.0,  # 69.26
    ("gpt2", "int8-dynamic"): 37.5,  # 38.66
    ("gpt2", "8da4w-g32"): 15.5,  # 16.33
}
RECIPES = {
    "fp16": "fp16",
    "int8-dynamic": "int8-dynamic",
    "8da4w-g32": Recipe((Rule(A8W4_G32, role="default"),)),
}


@pytest.mark.parametrize(
    ("family", "recipe"),
    list(FLOORS),
)
def test_quantized_logits_stay_close_to_float(family, recipe):
    build, _, _ = FAMILIES[family]
    model, ids = build(), _ids()
    quantized, plan = edgequant.quantize(copy.deepcopy(model), RECIPES[recipe])
    packed = [
        m for m in quantized.modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))
    ]
    assert len(packed) == len(plan)
    assert not any(isinstance(m, (nn.Linear, nn.Embedding, Conv1D)) for m in quantized.modules())
    with torch.no_grad():
        reference, logits = model(ids).logits, quantized(ids).logits  # [2, 16, vocab]
    db = sqnr(reference, logits)
    print(f"{family} {recipe}: logits SQNR {db:.2f} dB")
    assert db >= FLOORS[family, recipe]


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_quantized_gemma_embedding_keeps_its_scale(family):
    model, ids = FAMILIES[family][0](), _ids()
    quantized, _ = edgequant.quantize(copy.deepcopy(model), "fp16")
    with torch.no_grad():
        reference = model.model.embed_tokens(ids)  # the lookup times sqrt(64) = 8
        assert sqnr(reference, quantized.model.embed_tokens(ids)) > 60


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generative_recipe_gives_each_module_its_scheme(family):
    build, expected_roles, _ = FAMILIES[family]
    recipe = GenerativeQuantRecipe(
        default=utils.create_layer_quant_fp16(),
        embedding=utils.create_layer_quant_int8_weight_only(),
        attention={1: utils.create_layer_quant_int8_dynamic()},
        feedforward=utils.create_layer_quant_int4_dynamic_block(32),
    )
    by_role = {
        ("embedding", None): INT8_WEIGHT_ONLY,
        ("attention", 0): FP16,  # attention only names layer 1: layer 0 falls to the default
        ("attention", 1): INT8_DYNAMIC,
        ("feedforward", 0): A8W4_G32,
        ("feedforward", 1): A8W4_G32,
        ("lm_head", None): FP16,
    }
    model = build()
    plan = edgequant.plan(model, recipe)
    assert {lp.fqn: lp.scheme for lp in plan} == {
        fqn: by_role[role] for fqn, role in expected_roles.items()
    }
    # GPT-2's tied wte / lm_head get different schemes here, so each keeps its own copy
    assert all(lp.tied_to is None for lp in plan)
    quantized, _ = edgequant.quantize(model, recipe)
    with torch.no_grad():
        assert torch.isfinite(quantized(_ids()).logits).all()


class _Routed(nn.Module):
    """A decoder block with a router next to its feed-forward, as in mixture-of-experts."""

    def __init__(self) -> None:
        super().__init__()
        block = nn.Module()
        block.router = nn.Linear(32, 4)
        block.mlp = nn.Module()
        block.mlp.up = nn.Linear(32, 64)
        self.layers = nn.ModuleList([block])


def test_module_in_a_block_outside_attention_and_feedforward_keeps_its_layer():
    model = _Routed()
    assert infer_roles(model) == {
        "layers.0.router": (None, 0),
        "layers.0.mlp.up": ("feedforward", 0),
    }
    recipe = Recipe((Rule(INT8_DYNAMIC, role="default"), Rule(A8W4_G32, role="feedforward")))
    plan = edgequant.plan(model, recipe)
    assert (plan["layers.0.router"].role, plan["layers.0.router"].layer) == (None, 0)
    assert (plan["layers.0.router"].scheme, plan["layers.0.router"].rule) == (INT8_DYNAMIC, 0)
    assert plan["layers.0.mlp.up"].scheme == A8W4_G32
    only_layer_0 = Recipe((Rule(INT8_DYNAMIC, role="default", layers=(0,)),))
    assert edgequant.plan(model, only_layer_0)["layers.0.router"].scheme == INT8_DYNAMIC
    feedforward_only = Recipe((Rule(A8W4_G32, role="feedforward"),))
    assert edgequant.plan(model, feedforward_only)["layers.0.router"].scheme is None


def test_embedding_subclass_with_its_own_forward_is_refused():
    class Odd(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) + 1.0

    model = nn.Sequential()
    model.add_module("emb", Odd(16, 32))
    with pytest.raises(
        ValueError, match="rules\\[0\\] would quantize emb, a Odd whose forward is not"
    ):
        edgequant.plan(model, "int8-weight-only")
