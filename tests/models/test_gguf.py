"""The GGUF loader on a small GGUF written here with gguf's own writer (Q8_0 + F32, llama.cpp
names, q/k rows permuted the way llama.cpp's converter does), against its float source."""

from __future__ import annotations

import re

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import quantize as gguf_quantize
from transformers import LlamaConfig, LlamaForCausalLM

from edgequant.models import gguf as eq_gguf
from edgequant.primitives import sqnr

HEADS, KV_HEADS = 4, 2


def _tiny_llama(tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return LlamaForCausalLM(config).eval()


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter: rotate-half rows -> adjacent RoPE pairs (inverse of unpermute)."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_gguf(model: LlamaForCausalLM, path, arch: str = "llama") -> None:
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = tensor.detach().float()
        if name.endswith("q_proj.weight"):
            w = permute_qk(w, HEADS)
        elif name.endswith("k_proj.weight"):
            w = permute_qk(w, KV_HEADS)
        gguf_name = _gguf_name(name)
        data = w.numpy()
        if data.ndim == 2:
            writer.add_tensor(
                gguf_name,
                gguf_quantize(data, gguf.GGMLQuantizationType.Q8_0),
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
        else:
            writer.add_tensor(gguf_name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _gguf_name(hf: str) -> str:
    """Hugging Face Llama parameter name -> llama.cpp tensor name (gguf-py's own table)."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 8)
    return names.get_name(hf, try_suffixes=(".weight", ".bias"))


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_weights_match_the_float_source(tmp_path, tie):
    source = _tiny_llama(tie)
    path = tmp_path / "tiny.gguf"
    write_gguf(source, path)
    config, state = eq_gguf.read_weights(path)
    assert config["num_attention_heads"] == HEADS and config["num_key_value_heads"] == KV_HEADS
    assert config["tie_word_embeddings"] is tie
    model = eq_gguf.build_model(config, state)
    for name, ref in source.state_dict().items():
        got = model.state_dict()[name]
        if ref.dim() == 1:  # F32 norms: exact
            assert torch.equal(got, ref), name
        else:  # Q8_0: one fp16 scale per 32 values, in the rows' original (un-permuted) order
            assert sqnr(ref, got) > 38, name
    # the un-permutation is exact: q rows come back in rotate-half order (not merely similar)
    q_ref = source.model.layers[1].self_attn.q_proj.weight
    q_wrong = permute_qk(q_ref, HEADS)
    assert sqnr(q_ref, model.model.layers[1].self_attn.q_proj.weight) > 38
    assert sqnr(q_ref, q_wrong) < 5
    ids = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert sqnr(source(ids).logits, model(ids).logits) > 30


def test_unsupported_architecture_is_named(tmp_path):
    path = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(str(path), "falcon")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        ValueError,
        match=re.escape(
            "GGUF architecture 'falcon' is not supported; supported: "
            "gemma3, llama, phi3, qwen2, qwen3"
        ),
    ):
        eq_gguf.read_weights(path)


def test_not_a_gguf_file_is_refused(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="is not a readable GGUF file"):
        eq_gguf.read_weights(path)
    with pytest.raises(FileNotFoundError, match="GGUF file .*missing.gguf' does not exist"):
        eq_gguf.read_weights(tmp_path / "missing.gguf")
