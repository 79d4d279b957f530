"""GGUF export on stories260K: the F32 file's greedy tokens in llama.cpp are the llama2.c
reference; Q4_0 / Q5_0 / Q8_0 / F16 tensors read back bit-exact with the gguf reader; llama.cpp's
logits for a quantized file match the eager model with the same weights; bad input is named."""

from __future__ import annotations

import copy
import logging
import struct

import gguf
import numpy as np
import pytest
import torch

import edgequant
from edgequant import eval as ev
from edgequant.export import gguf as gg
from edgequant.export import load_program
from edgequant.export.gguf_blocks import exact_type, nearest_scheme
from edgequant.export.gguf_runtime import GgufModel, check_file
from edgequant.export.llama_quantize import importance_matrix, llama_quantize, write_imatrix
from edgequant.models import llama2c
from edgequant.models.gguf import unpermute_qk
from edgequant.primitives import sqnr
from edgequant.recipe import Recipe
from edgequant.schemes import Scheme

EXACT = "examples/stories260k-gguf.yaml"  # Q8_0 embedding/wq/wk, Q5_0 wv/wo, Q4_0 w1/w3, F16 w2
Q4_0 = Scheme("int4", "per_group", 32, scale_dtype="fp16")


@pytest.fixture(scope="module")
def files(stories260k, tmp_path_factory):
    model, tok = stories260k
    folder = tmp_path_factory.mktemp("gguf")
    quantized, _ = edgequant.quantize(copy.deepcopy(model), Recipe.load(EXACT))
    return {
        "fp32": gg.to_gguf(model, folder / "fp32.gguf", tokenizer=tok),
        "exact": gg.to_gguf(quantized, folder / "exact.gguf", tokenizer=tok),
        "quantized": quantized,
        "folder": folder,
    }


def test_f32_file_generates_the_llama2c_reference_in_llama_cpp(stories260k, files):
    model, tok = stories260k
    reference = llama2c.generate(model, [tok.bos_id], 40)
    program = GgufModel(files["fp32"])
    tokens = [tok.bos_id]
    cache = program.new_cache()
    logits = program(torch.tensor([tokens]), 0, cache)
    for _ in range(40):
        tokens.append(int(logits[0, -1].argmax()))
        logits = program(torch.tensor([tokens[-1:]]), len(tokens) - 1, cache)
    assert tokens == reference
    assert tok.decode(tokens[1:]).startswith("Once upon a time, there was a little girl named Lily")


def test_every_tensor_reads_back_bit_exact(files):
    q = files["quantized"]
    layers = gg.read_layers(files["exact"])
    kinds = {name: kind for name, (kind, _) in layers.items()}
    assert kinds["token_embd.weight"] == "Q8_0" and "output.weight" not in kinds  # tied
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["blk.0.ffn_gate.weight"] == "Q4_0"
    assert kinds["blk.0.attn_v.weight"] == "Q5_0" and kinds["blk.3.attn_output.weight"] == "Q5_0"
    assert kinds["blk.0.ffn_down.weight"] == "F16" and kinds["blk.0.attn_norm.weight"] == "F32"
    cases = {
        "token_embd.weight": (q.tok_embeddings, None),
        "blk.2.attn_q.weight": (q.layers[2].attention.wq, 8),
        "blk.2.attn_k.weight": (q.layers[2].attention.wk, 4),
        "blk.1.attn_v.weight": (q.layers[1].attention.wv, None),
        "blk.3.attn_output.weight": (q.layers[3].attention.wo, None),
        "blk.2.ffn_gate.weight": (q.layers[2].feed_forward.w1, None),
        "blk.4.ffn_up.weight": (q.layers[4].feed_forward.w3, None),
    }
    for name, (module, heads) in cases.items():
        kind, raw = layers[name]
        ints, scales = module.int_weight(), module.scale
        if heads:  # the file holds llama.cpp's RoPE row order
            ints, scales = gg.permute_qk(ints, heads), gg.permute_qk(scales, heads)
        got_ints, got_scales = _decode_blocks(raw, kind)
        assert torch.equal(got_ints, ints), name
        assert torch.equal(got_scales.view(torch.int16), scales.view(torch.int16)), name
        # and gguf's own dequantizer gives our dequantized weights exactly
        values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind])
        want = module.dequantized_weight()
        want = gg.permute_qk(want, heads) if heads else want
        assert torch.equal(torch.from_numpy(values.copy()).reshape(want.shape), want), name
    kind, raw = layers["blk.1.ffn_down.weight"]
    w2 = q.layers[1].feed_forward.w2
    assert torch.equal(torch.from_numpy(raw.copy()), w2.dequantized_weight(torch.float16))


def _decode_blocks(raw: np.ndarray, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Integers and fp16 scales of Q4_0 / Q5_0 / Q8_0 rows, decoded by hand from llama.cpp's
    layout (ggml-common.h: ``block_q4_0``, ``block_q5_0``, ``block_q8_0``)."""
    rows = raw.shape[0]
    size = {"Q4_0": 18, "Q5_0": 22, "Q8_0": 34}[kind]
    blocks = raw.reshape(rows, -1, size)
    d = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0])
    body = blocks[..., 2:]
    if kind == "Q4_0":
        low, high = body & 0x0F, body >> 4
        q = np.concatenate([low, high], axis=-1).astype(np.int16) - 8
    elif kind == "Q5_0":  # 32-bit mask of fifth bits (bit j: element j), then Q4_0's nibbles
        mask = body[..., :4].copy().view("<u4")  # [rows, blocks, 1]
        fifth = (mask >> np.arange(32, dtype=np.uint32)) & 1
        nibbles = np.concatenate([body[..., 4:] & 0x0F, body[..., 4:] >> 4], axis=-1)
        q = (nibbles | (fifth << 4)).astype(np.int16) - 16
    else:
        q = body.view(np.int8).astype(np.int16)
    return torch.from_numpy(q.reshape(rows, -1).astype(np.int8)), d


def test_llama_cpp_logits_match_the_eager_model(stories260k, files):
    """llama.cpp quantizes activations to 8 bits in blocks of 32 inside its CPU kernels; the
    eager model keeps them float. Measured on 4 windows of 256 tokens: 45.3 dB between the two
    (max 0.39 on logits up to about 20), KL between them 0.0008; both 0.124 against float."""
    model, tok = stories260k
    w = ev.windows(ev.tokenize_file(tok, ev.default_text()), 256, 4)
    program = load_program(files["exact"])
    with torch.no_grad():
        eager = torch.stack([files["quantized"](x[None])[0] for x in w])
        float_logits = torch.stack([model(x[None])[0] for x in w])
    got = torch.stack([program(x[None])[0] for x in w])
    assert sqnr(eager, got) > 40.0
    assert ev.compare(eager, got, w)["kl_divergence"] < 0.002
    kl_eager = ev.compare(float_logits, eager, w)["kl_divergence"]
    kl_file = ev.compare(float_logits, got, w)["kl_divergence"]
    assert abs(kl_file - kl_eager) < 0.05 * kl_eager, (kl_eager, kl_file)


def test_incremental_decoding_equals_one_pass(files, story_ids):
    program = GgufModel(files["exact"], n_ctx=256)
    ids = story_ids[:, :40]
    whole = program(ids)
    cache = program.new_cache()
    parts = torch.cat([program(ids[:, :25], 0, cache), program(ids[:, 25:], 25, cache)], dim=1)
    assert torch.equal(parts, whole)
    with pytest.raises(ValueError, match="start_pos \\+ seq must be <= max_seq_len=256"):
        program(story_ids, 200, cache)


def test_permute_qk_undoes_the_loaders_unpermute():
    w = torch.randn(48, 5)
    assert torch.equal(unpermute_qk(gg.permute_qk(w, 3), 3), w)
    assert torch.equal(gg.permute_qk(unpermute_qk(w, 3), 3), w)


def test_scheme_mapping():
    assert exact_type(Q4_0) == "Q4_0"
    assert exact_type(Scheme("int8", "per_group", 32, scale_dtype="fp16")) == "Q8_0"
    assert exact_type(Scheme("int5", "per_group", 32, scale_dtype="fp16")) == "Q5_0"
    assert exact_type(Scheme("int4", "per_group", 32, scale_dtype="fp16",
                             activation="int8_dynamic")) == "Q4_0"  # fmt: skip
    assert exact_type(Scheme("fp16")) == "F16" and exact_type(None) == "F32"
    for inexact in (
        Scheme("int8"),
        Scheme("int4", "per_group", 64, scale_dtype="fp16"),
        Scheme("int4", "per_group", 32),
        Scheme("int4", "per_group", 32, symmetric=False, scale_dtype="fp16"),
    ):
        assert exact_type(inexact) is None, inexact
    assert nearest_scheme(Scheme("int8")).describe() == "int8 g32 sym fp16-scales"
    assert nearest_scheme(Scheme("int5")).describe() == "int5 g32 sym fp16-scales"


def test_a_scheme_without_an_exact_type_is_refused_with_the_nearest(stories260k, tmp_path):
    model, tok = stories260k
    q, _ = edgequant.quantize(copy.deepcopy(model), "int8-weight-only")
    out = tmp_path / "x.gguf"
    with pytest.raises(
        ValueError,
        match=r"GGUF has no exact type for 36 layer\(s\): tok_embeddings \(int8 per-channel sym; "
        r"nearest exact: int8 g32 sym fp16-scales = Q8_0\); layers.0.attention.wq .* and 30 "
        r"more. Exact: int4 g32 sym fp16-scales \(Q4_0\)",
    ):
        gg.to_gguf(q, out, tokenizer=tok)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_allow_requant_reports_each_layers_added_error(stories260k, tmp_path, caplog):
    model, tok = stories260k
    q, _ = edgequant.quantize(copy.deepcopy(model), "int8-weight-only")
    with caplog.at_level(logging.WARNING):
        path = gg.to_gguf(q, tmp_path / "r.gguf", tokenizer=tok, allow_requant=True)
    lines = [r.getMessage() for r in caplog.records if "re-quantized" in r.getMessage()]
    assert len(lines) == 36 and lines[0].startswith("tok_embeddings re-quantized to Q8_0: ")
    assert any(m.startswith("layers.0.feed_forward.w2 re-quantized to F16: ") for m in lines)
    db = [float(m.split(": ")[1].split(" dB")[0]) for m in lines]
    assert min(db) > 35, lines
    kinds = {name: kind for name, (kind, _) in gg.read_layers(path).items()}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["blk.0.ffn_down.weight"] == "F16"


def test_an_architecture_without_a_mapping_is_named(tmp_path):
    import transformers

    cfg = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=128, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg)
    with pytest.raises(ValueError, match=r"^architecture 'gpt2' is not supported; supported: "
                       r"gemma3_text, llama, phi3, qwen2, qwen3$"):  # fmt: skip
        gg.to_gguf(model, tmp_path / "g.gguf", tokenizer_gguf="x.gguf")


def test_existing_output_is_kept_without_overwrite(stories260k, files):
    model, tok = stories260k
    before = files["fp32"].read_bytes()
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        gg.to_gguf(model, files["fp32"], tokenizer=tok)
    assert files["fp32"].read_bytes() == before


def test_truncated_file_is_a_clear_error(files, tmp_path):
    data = files["exact"].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.gguf' is not a readable GGUF file \(truncated or "):
        GgufModel(cut)
    cut.write_bytes(data[:100])
    with pytest.raises(ValueError, match="is not a readable GGUF file"):
        check_file(cut)
    cut.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\x00" * 8)
    with pytest.raises(ValueError, match="is not a readable GGUF file"):
        check_file(cut)


def test_llama_cpps_own_quantizer_with_tensor_types_and_an_importance_matrix(
    stories260k, files, tmp_path
):
    from edgequant import calibration

    model, tok = stories260k
    sums, tokens = importance_matrix(model, calibration.wikitext(tok, 8, 128))  # seeded
    assert tokens == 8 * 128
    assert sums["blk.0.attn_q.weight"].shape == (64,) and sums["blk.4.ffn_down.weight"].shape == (
        172,
    )
    assert "token_embd.weight" not in sums  # a lookup table has no input activations
    # layer 0's q/k/v read the attention norm of the embeddings: the same sums by hand
    total = torch.zeros(64, dtype=torch.float64)
    with torch.no_grad():
        for ids in calibration.wikitext(tok, 8, 128):
            x = model.layers[0].attention_norm(model.tok_embeddings(ids)).double()
            total += (x * x).sum((0, 1))
    assert np.allclose(sums["blk.0.attn_k.weight"], total.numpy(), rtol=1e-4)

    types = {"attn_v": "Q8_0"}
    plain = llama_quantize(files["fp32"], tmp_path / "q.gguf", "Q4_0", tensor_types=types)
    weighted = llama_quantize(
        files["fp32"], tmp_path / "qi.gguf", "Q4_0", tensor_types=types, imatrix=(sums, tokens)
    )
    a, b = gg.read_layers(plain), gg.read_layers(weighted)
    assert a["blk.0.attn_v.weight"][0] == "Q8_0" and a["blk.0.attn_q.weight"][0] == "Q4_0"
    assert not np.array_equal(a["blk.0.attn_q.weight"][1], b["blk.0.attn_q.weight"][1])
    w = ev.windows(ev.tokenize_file(tok, ev.default_text()), 128, 2)
    ref = torch.stack([model(x[None])[0] for x in w]).detach()
    for path in (plain, weighted):
        got = torch.stack([GgufModel(path)(x[None])[0] for x in w])
        assert ev.compare(ref, got, w)["kl_divergence"] < 0.5, path

    with pytest.raises(ValueError, match="llama.cpp has no file type 'Q4_9'; known: "):
        llama_quantize(files["fp32"], tmp_path / "x.gguf", "Q4_9")
    with pytest.raises(ValueError, match="tensor type 'Q9' \\(for 'attn_v'\\) is not a GGML type"):
        llama_quantize(files["fp32"], tmp_path / "x.gguf", "Q4_0", tensor_types={"attn_v": "Q9"})

    path = write_imatrix(tmp_path / "m.imatrix.gguf", sums, tokens, dataset="w", chunk_size=128)
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.type"].contents() == "imatrix"
    assert reader.fields["imatrix.chunk_count"].contents() == 8
    back = {t.name: np.array(t.data) for t in reader.tensors}
    assert np.array_equal(
        back["blk.0.attn_q.weight.in_sum2"].reshape(-1), sums["blk.0.attn_q.weight"]
    )
    assert float(back["blk.0.attn_q.weight.counts"].reshape(-1)[0]) == tokens
