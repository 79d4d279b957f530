"""DecoderSpec validation and the refusals a user meets: invalid fields, rope types and
architectures no family file covers (each message names the value and what is allowed)."""

from __future__ import annotations

import math
import re

import pytest
import torch
import transformers

from edgequant.models.families import decoder_of, for_gguf_arch
from edgequant.models.spec import DecoderSpec, RopeScaling

SHAPE = dict(vocab_size=16, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4,
             hidden_dim=16, max_seq_len=8)  # fmt: skip


def test_a_valid_spec_has_derived_fields():
    spec = DecoderSpec(**SHAPE, partial_rotary=0.5, attention_scale=0.1)
    assert (spec.rotary_dim, spec.scale) == (2, 0.1)
    local = DecoderSpec(**SHAPE, sliding_window=4, sliding_window_pattern=3)
    assert [local.is_local(i) for i in range(6)] == [True, True, False, True, True, False]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"dim": 0, "n_layers": -1}, "dim must be a positive int, got 0; n_layers must be a "
         "positive int, got -1"),
        ({"n_kv_heads": 3, "n_heads": 4}, "n_heads=4 must be a multiple of n_kv_heads=3"),
        ({"partial_rotary": 0.25}, "head_dim=4 with partial_rotary=0.25 rotates 1 dims; RoPE "
         "needs an even, positive number"),
        ({"activation": "relu"}, "activation 'relu' is not supported; supported: silu, gelu_tanh"),
        ({"sliding_window": 4}, "sliding_window=4 and sliding_window_pattern=None go together"),
        ({"rope_local_theta": 1e4}, "rope_local_theta=10000.0 needs sliding_window and "
         "sliding_window_pattern"),
        ({"final_logit_softcap": -1.0}, "final_logit_softcap must be None or a positive number"),
    ],
)  # fmt: skip
def test_invalid_specs_name_their_fields(changes, message):
    with pytest.raises(ValueError, match="^DecoderSpec: " + re.escape(message)):
        DecoderSpec(**{**SHAPE, **changes})


def test_rope_scaling_is_checked():
    with pytest.raises(ValueError, match=r"^rope type 'yarn' is not supported; supported: "
                       r"default, linear, llama3, longrope$"):  # fmt: skip
        RopeScaling("yarn", factor=4.0)
    with pytest.raises(ValueError, match=r"^llama3 rope scaling needs low_freq_factor, "
                       r"high_freq_factor, original_max_seq_len$"):  # fmt: skip
        RopeScaling("llama3", factor=8.0)


def _tiny(config_cls, model_cls, **overrides):
    config = getattr(transformers, config_cls)(
        hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
        num_hidden_layers=1, vocab_size=64, max_position_embeddings=32, **overrides,
    )  # fmt: skip
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config).eval()


def test_an_unsupported_rope_type_is_named():
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
            "original_max_position_embeddings": 16}  # fmt: skip
    model = _tiny("LlamaConfig", "LlamaForCausalLM", rope_parameters=yarn)
    with pytest.raises(ValueError, match=r"^rope type 'yarn' is not supported; supported: "
                       r"default, linear, llama3, longrope$"):  # fmt: skip
        decoder_of(model)


def test_an_architecture_no_family_covers_is_named():
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    )
    with pytest.raises(ValueError, match=r"^architecture 'gpt2' is not supported; supported: "
                       r"gemma3_text, llama, phi3, qwen2, qwen3$"):  # fmt: skip
        decoder_of(gpt2)
    with pytest.raises(ValueError, match=r"^GGUF architecture 'gpt2' is not supported; "
                       r"supported: gemma3, llama, phi3, qwen2, qwen3$"):  # fmt: skip
        for_gguf_arch("gpt2")


@pytest.mark.parametrize(
    "arch, missing",
    [
        ("gemma3n_text", "Gemma 3n's per-layer embeddings, AltUp and LAuReL blocks"),
        ("phimoe", "a mixture-of-experts MLP (Phi-3.5-MoE)"),
    ],
)
def test_variants_the_decoder_cannot_express_name_what_is_missing(arch, missing):
    from edgequant.models.families import for_model_type

    with pytest.raises(ValueError, match=re.escape(f"has no {missing}; supported: gemma3_text")):
        for_model_type(arch)
    with pytest.raises(ValueError, match=re.escape(f"has no {missing}; supported: gemma3, ")):
        for_gguf_arch(arch)


GEMMA3 = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
              head_dim=16, num_hidden_layers=4, vocab_size=64, sliding_window=4)  # fmt: skip


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"attn_logit_softcapping": 50.0}, "gemma3 with attn_logit_softcapping=50.0 is not "
         "supported by edgequant's decoder"),
        ({"layer_types": ["sliding_attention", "full_attention", "full_attention",
                          "sliding_attention"]},
         "gemma3 layer_types ['sliding_attention', 'full_attention', 'full_attention', "
         "'sliding_attention'] do not repeat one pattern of local layers then a global one"),
        ({"hidden_activation": "relu"}, "gemma3 hidden_activation 'relu' is not supported; "
         "supported: gelu_pytorch_tanh"),
    ],
)  # fmt: skip
def test_gemma3_configs_the_decoder_cannot_run_are_refused(changes, message):
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**GEMMA3, **changes))
    with pytest.raises(ValueError, match=re.escape(message)):
        decoder_of(model)


def test_a_gemma3_pattern_llama_cpp_does_not_run_is_refused_before_writing(tmp_path):
    from edgequant.export import to_gguf

    config = transformers.Gemma3TextConfig(**GEMMA3, sliding_window_pattern=2)
    model = transformers.Gemma3ForCausalLM(config)
    assert decoder_of(model).spec.sliding_window_pattern == 2  # eager, .pte, .tflite run it
    with pytest.raises(ValueError, match=re.escape(
        "GGUF (llama.cpp's gemma3) cannot hold sliding_window_pattern=2 (llama.cpp's gemma3 "
        "makes every 6th layer global)"
    )):  # fmt: skip
        to_gguf(model, tmp_path / "g.gguf", tokenizer_gguf="never-read.gguf")
    assert not list(tmp_path.iterdir())


def test_longrope_is_read_from_a_phi3_config_and_checked():
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 2.0],
            "long_factor": [3.0, 4.0], "original_max_position_embeddings": 16}  # fmt: skip
    config = transformers.Phi3Config(
        hidden_size=32, intermediate_size=64, num_attention_heads=8, num_hidden_layers=1,
        vocab_size=64, pad_token_id=0, max_position_embeddings=64, rope_parameters=rope,
        original_max_position_embeddings=16,
    )  # fmt: skip
    spec = decoder_of(transformers.Phi3ForCausalLM(config)).spec
    scaling = spec.rope_scaling
    assert (scaling.type, scaling.factors(16), scaling.factors(17)) == (
        "longrope", (1.0, 2.0), (3.0, 4.0),
    )  # fmt: skip
    assert scaling.attention_factor == pytest.approx((1 + math.log(4) / math.log(16)) ** 0.5)
    with pytest.raises(ValueError, match=re.escape(
        "DecoderSpec: longrope has 2 factors; head_dim=4 with partial_rotary=0.5 rotates 1 "
        "frequencies"
    )):  # fmt: skip
        spec.replace(partial_rotary=0.5)
    with pytest.raises(ValueError, match="longrope short_factor has 2 values and long_factor 1"):
        RopeScaling("longrope", short_factor=(1.0, 2.0), long_factor=(1.0,),
                    original_max_seq_len=16)  # fmt: skip


def test_a_phi3_window_shorter_than_its_context_makes_every_layer_local():
    config = transformers.Phi3Config(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=64, pad_token_id=0, max_position_embeddings=64, sliding_window=8,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(config).eval()
    decoder = decoder_of(model)
    assert [decoder.spec.is_local(i) for i in range(2)] == [True, True]
    ids = torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(ids).logits, decoder(ids)
        windowless = decoder_of(
            transformers.Phi3ForCausalLM(transformers.Phi3Config(
                **{**config.to_dict(), "sliding_window": None})).eval()
        )  # fmt: skip
        windowless.load_state_dict(decoder.state_dict())
        assert (windowless(ids) - want).abs().max() > 1e-3  # the window matters at 24 tokens
    assert (got - want).abs().max() < 1e-5
