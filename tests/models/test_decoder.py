"""The one decoder's own parts: fused projections, norm offsets, partial rotary, softcaps and
sliding windows computed as their unfused / plain equivalents say."""

from __future__ import annotations

import torch

from edgequant.models.decoder import Decoder, apply_rope, rope_tables
from edgequant.models.spec import DecoderSpec

SHAPE = dict(vocab_size=32, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4,
             hidden_dim=32, max_seq_len=16)  # fmt: skip
IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])


def _random(spec: DecoderSpec) -> Decoder:
    torch.manual_seed(0)
    model = Decoder(spec).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return model


def test_fused_qkv_and_gate_up_equal_separate_projections():
    plain = _random(DecoderSpec(**SHAPE, qkv_bias=True))
    fused = Decoder(DecoderSpec(**SHAPE, qkv_bias=True, fused_qkv=True, fused_gate_up=True))
    state = {}
    for name, t in plain.state_dict().items():
        state[name] = t
    for i in range(2):
        a, f = f"layers.{i}.attention.", f"layers.{i}.feed_forward."
        for kind in ("weight", "bias"):
            state[a + "wqkv." + kind] = torch.cat(
                [state.pop(a + p + "." + kind) for p in ("wq", "wk", "wv")]
            )
        state[f + "w13.weight"] = torch.cat(
            [state.pop(f + "w1.weight"), state.pop(f + "w3.weight")]
        )
    fused.load_state_dict(state)
    with torch.no_grad():
        assert (fused.eval()(IDS) - plain(IDS)).abs().max() < 1e-5


def test_norm_offset_multiplies_by_one_plus_weight():
    plain = _random(DecoderSpec(**SHAPE))
    offset = Decoder(DecoderSpec(**SHAPE, norm_offset=1.0))
    state = {k: (v - 1 if k.endswith("norm.weight") else v) for k, v in plain.state_dict().items()}
    offset.load_state_dict(state)
    with torch.no_grad():
        assert (offset.eval()(IDS) - plain(IDS)).abs().max() < 1e-5


def test_partial_rotary_leaves_the_tail_of_each_head_alone():
    spec = DecoderSpec(
        **{**SHAPE, "head_dim": 8, "n_heads": 2, "n_kv_heads": 1}, partial_rotary=0.5
    )
    cos, sin = rope_tables(spec, 5, start=2)
    x = torch.randn(1, 5, 2, 8)
    y = apply_rope(x, cos, sin)
    assert torch.equal(y[..., 4:], x[..., 4:])
    assert not torch.allclose(y[..., :4], x[..., :4])


def test_softcap_bounds_the_logits():
    model = _random(DecoderSpec(**SHAPE, final_logit_softcap=0.5))
    with torch.no_grad():
        assert model(IDS).abs().max() <= 0.5


def test_sliding_window_layers_see_only_the_window_and_match_with_a_cache():
    spec = DecoderSpec(**SHAPE, sliding_window=3, sliding_window_pattern=2, rope_local_theta=100.0)
    model = _random(spec)
    with torch.no_grad():
        full = model(IDS)
        cache = model.new_cache()
        steps = [model(IDS[:, :4], 0, cache)]
        steps += [model(IDS[:, i : i + 1], i, cache) for i in range(4, IDS.shape[1])]
        assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5
        # a token outside every window of layer 0 changes nothing there, but layer 1 is global
        changed = IDS.clone()
        changed[0, 0] = 7
        assert (model(changed)[0, -1] - full[0, -1]).abs().max() > 1e-4
