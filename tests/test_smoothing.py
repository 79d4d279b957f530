"""AWQ and SmoothQuant fold their scales without changing the float model: random scales folded
into every group, and the searched scales of the real path, leave the logits equal within 1e-5
relative, on stories260K (llama2.c names, grouped-query attention) and a tiny Hugging Face
Llama, on a tiny Gemma 3 (norms of 1 + w) and a tiny Phi-3 (packed projections); unknown layouts
are refused."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import edgequant
from edgequant import calibration, layerwise, smoothing
from edgequant.job import with_algorithm
from edgequant.recipe import Recipe


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def _relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _fold_random(model, layers) -> int:
    g = torch.Generator().manual_seed(3)
    folded = 0
    for layer in layers:
        for group in smoothing.groups(layer):
            cols = layer.get_submodule(group.consumers[0]).weight.shape[1]
            s = torch.rand(cols, generator=g) * 4 + 0.25
            if group.tie is not None:
                n_rep, head_dim = group.tie
                s = s.view(-1, n_rep, head_dim)[:, :1].expand(-1, n_rep, -1).reshape(-1)
            smoothing.fold(layer, group, s)
            folded += 1
    return folded


def test_random_scales_fold_without_changing_stories260k(fresh_stories260k, story_ids):
    model, _ = fresh_stories260k()
    ref = _logits(model, story_ids)
    groups = smoothing.groups(model.layers[0])
    assert [g.producer for g in groups] == [
        "attention_norm", "attention.wv", "ffn_norm", "feed_forward.w3",
    ]  # fmt: skip
    assert groups[1].tie == (2, 8)  # 8 heads share 4 value heads, 8 channels each
    assert _fold_random(model, model.layers) == 4 * len(model.layers)
    assert _relative(_logits(model, story_ids), ref) < 1e-5


def test_random_scales_fold_without_changing_a_hugging_face_llama(tiny_hf_llama):
    model = copy.deepcopy(tiny_hf_llama)
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(1))
    ref = _logits(model, ids)
    assert smoothing.groups(model.model.layers[0])[1].tie == (2, 16)
    assert _fold_random(model, model.model.layers) == 8
    assert _relative(_logits(model, ids), ref) < 1e-5


@pytest.mark.parametrize("algorithm", ["awq", "smoothquant"])
def test_searched_scales_fold_without_changing_the_float_model(
    algorithm, fresh_stories260k, story_ids
):
    model, tok = fresh_stories260k()
    ref = _logits(model, story_ids)
    recipe = with_algorithm(Recipe.load("examples/stories260k-8da4w.yaml"), algorithm)
    plan = edgequant.plan(model, recipe)
    schemes = {lp.fqn: lp.scheme for lp in plan if lp.scheme is not None and lp.kind == "linear"}
    before = model.layers[0].attention_norm.weight.clone()
    scales = layerwise.smooth(model, schemes, calibration.wikitext(tok, 8, 128))
    assert len(scales) == 7 * len(model.layers)  # every decoder linear sits in a group
    assert not torch.equal(model.layers[0].attention_norm.weight, before)
    assert _relative(_logits(model, story_ids), ref) < 1e-5


def test_unknown_layouts_are_refused():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(16, 64)
            self.layers = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(64, 64))])

        def forward(self, ids):
            return self.layers[0](self.embed(ids))

    recipe = with_algorithm(edgequant.recipes.get("8da4w"), "awq")
    with pytest.raises(
        ValueError,
        match=r"awq needs to know which op produces each linear's "
        r"input to fold its scales into; layers.0 \(Sequential\) is none of the "
        r"known layouts: llama2c \(edgequant's decoder\), Hugging Face llama / qwen2 / qwen3, "
        r"Hugging Face gemma3, Hugging Face phi3",
    ):
        edgequant.quantize(Toy(), recipe, calibration=[torch.zeros(1, 4, dtype=torch.long)])


def _tiny_gemma3():
    cfg = transformers.Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_hidden_layers=2, vocab_size=128, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((0.2 if name.endswith("norm.weight") else 0.1) * torch.randn_like(p))
    return model


def test_random_scales_fold_into_gemma_norms_without_changing_gemma3():
    """Gemma's norms multiply by 1 + w: the fold keeps (1 + w) / s. Its layer also has a
    post_attention_layernorm (after attention, not before the MLP as in Llama's naming): the
    groups are Gemma's, the MLP's producer is pre_feedforward_layernorm."""
    model = _tiny_gemma3()
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(1))
    ref = _logits(model, ids)
    groups = smoothing.groups(model.model.layers[0])
    assert [g.producer for g in groups] == [
        "input_layernorm", "self_attn.v_proj", "pre_feedforward_layernorm", "mlp.up_proj",
    ]  # fmt: skip
    before = model.model.layers[0].input_layernorm.weight.clone()
    assert _fold_random(model, model.model.layers) == 8
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, before)
    assert _relative(_logits(model, ids), ref) < 1e-5


def _tiny_phi3():
    cfg = transformers.Phi3Config(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=0,
        max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1 + 0.2 * torch.randn_like(p)) if name.endswith("norm.weight") else
                    0.1 * torch.randn_like(p))  # fmt: skip
    return model


def test_random_scales_fold_into_phi3_packed_projections_without_changing_it():
    """Phi-3's v rows are the last rows of qkv_proj, its up rows the last half of gate_up_proj:
    the fold scales only those (and the grouped-query tie counts the v rows alone)."""
    model = _tiny_phi3()
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(1))
    ref = _logits(model, ids)
    groups = smoothing.groups(model.model.layers[0])
    assert [(g.producer, g.rows, g.tie) for g in groups] == [
        ("input_layernorm", None, None),
        ("self_attn.qkv_proj", (96, 128), (2, 16)),  # q 64 rows, k 32, v 32; 2 heads per kv
        ("post_attention_layernorm", None, None),
        ("mlp.gate_up_proj", (128, 256), None),  # gate 128 rows, up 128
    ]
    layer = model.model.layers[0]
    qk_rows = layer.self_attn.qkv_proj.weight[:96].clone()
    smoothing.fold(layer, groups[1], torch.full((64,), 2.0))  # v through attention alone
    assert torch.equal(layer.self_attn.qkv_proj.weight[:96], qk_rows)
    assert _fold_random(model, model.model.layers) == 8
    assert _relative(_logits(model, ids), ref) < 1e-5


@pytest.mark.parametrize("family", ["llama", "gemma3", "phi3"])
def test_awq_and_smoothquant_through_quantize(family, tiny_hf_llama):
    """Every scale lands in the model, the quantized layers hold the recipe's algorithm, and
    the result is closer to float than min-max on the same calibration-free text (a tiny
    Llama, and a tiny Gemma 3: norms of 1 + w, sliding-window layers)."""
    model = {"llama": lambda: tiny_hf_llama, "gemma3": _tiny_gemma3, "phi3": _tiny_phi3}[family]()
    if family != "llama":  # three outlier channels, what AWQ is for (on plain random weights
        # it lost to min-max on Gemma 3 here: 0.281 against 0.265)
        with torch.no_grad():
            for layer in model.model.layers:
                for norm in (
                    layer.input_layernorm,
                    getattr(layer, "pre_feedforward_layernorm", layer.post_attention_layernorm),
                ):
                    norm.weight[[3, 17, 40]] = 7.0 if family == "gemma3" else 8.0  # x8
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(1))
    ref = _logits(model, ids)
    cal = [
        torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(i)) for i in range(8)
    ]
    err = {}
    for algorithm in ("minmax", "awq", "smoothquant"):
        recipe = with_algorithm(edgequant.recipes.get("8da4w"), algorithm)
        q, _ = edgequant.quantize(copy.deepcopy(model), recipe, calibration=cal)
        assert q.model.layers[1].mlp.down_proj.scheme.algorithm == algorithm
        if family == "phi3":
            assert q.model.layers[1].self_attn.qkv_proj.scheme.algorithm == algorithm
        err[algorithm] = _relative(_logits(q, ids), ref)
    assert err["awq"] < err["minmax"], err
