"""llama.cpp's K-quants as edgequant weights: llama.cpp's quantizer (with and without an
importance), packed modules, a bundle round trip, the GGUF file holding the very bytes and
llama.cpp running them as the eager model computes, calibrated (``imatrix``) rounding, refusals."""

from __future__ import annotations

import copy

import gguf
import pytest
import torch
from torch import nn

import edgequant
from edgequant import eval as ev
from edgequant import kernels, kquants
from edgequant.layers import QuantizedEmbedding, QuantizedLinear
from edgequant.primitives import sqnr
from edgequant.recipe import Recipe, Rule
from edgequant.schemes import Scheme


def _weighted_error(w, d, x):
    return float(((x @ (w - d).T) ** 2).sum() / ((x @ w.T) ** 2).sum())


def test_quantize_gives_llama_cpps_block_bytes_and_more_bits_round_finer():
    torch.manual_seed(0)
    w = torch.randn(64, 1536)
    floors = {"q2_k": 10.0, "q3_k": 16.0, "q4_k": 22.5, "q5_k": 28.5, "q6_k": 34.5}  # measured
    # 10.5, 16.5, 22.9, 28.9, 35.0 dB
    for kind, floor in floors.items():
        blocks = kquants.quantize(w, kind)
        assert blocks.dtype == torch.uint8
        assert blocks.shape == (64, 1536 // 256 * kquants.BLOCK_BYTES[kind])
        values = kquants.dequantize(blocks, kind)
        assert sqnr(w, values) > floor, kind
        # the gguf package's dequantizer reads them as that GGUF type
        ref = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[kind.upper()])
        assert torch.equal(torch.from_numpy(ref.copy()), values)
    assert Scheme("q4_k").bits_per_weight(64, 1536) == 4.5
    assert Scheme("q6_k").bits_per_weight(64, 1536) == 6.5625


def test_an_importance_lowers_the_error_it_weighs():
    """Columns whose inputs are large count more: llama.cpp's quantizer with their mean squares
    leaves a smaller output error on those inputs (measured: q2_k 0.087 -> 0.071, q3_k 0.0224
    -> 0.0207, q4_k 0.00504 -> 0.00493)."""
    torch.manual_seed(0)
    w = torch.randn(64, 1536)
    x = torch.randn(512, 1536) * torch.linspace(0.1, 3, 1536)
    importance = (x * x).mean(0)
    for kind in ("q2_k", "q3_k", "q4_k"):
        plain = kquants.dequantize(kquants.quantize(w, kind), kind)
        weighed = kquants.dequantize(kquants.quantize(w, kind, importance), kind)
        assert _weighted_error(w, weighed, x) < _weighted_error(w, plain, x), kind


def test_bad_shapes_are_refused_by_name():
    with pytest.raises(ValueError) as e:
        kquants.quantize(torch.randn(4, 576), "q4_k")
    assert str(e.value) == (
        "q4_k stores rows in blocks of 256 values; its 576 input features are not a multiple of 256"
    )
    with pytest.raises(ValueError, match=r"importance has shape \(3,\); expected \(256,\)"):
        kquants.quantize(torch.randn(4, 256), "q4_k", torch.ones(3))
    with pytest.raises(ValueError, match="'q4_0' is not a K-quant"):
        kquants.ggml_type("q4_0")
    with pytest.raises(ValueError, match="model.layers.0.q: q6_k stores rows in blocks of 256"):
        QuantizedLinear.from_float(nn.Linear(576, 8), Scheme("q6_k"), name="model.layers.0.q")


def test_schemes_are_validated():
    assert Scheme("q4_k").describe() == "q4_k"
    assert Scheme("q4_k", algorithm="imatrix").describe() == "q4_k, imatrix"
    assert Scheme("q5_k").rounded_by("gptq", damp=0.1) == Scheme("q5_k", algorithm="imatrix")
    with pytest.raises(ValueError, match="activation 'int8_dynamic' does not apply"):
        Scheme("q4_k", activation="int8_dynamic")
    with pytest.raises(ValueError, match="algorithm 'minmax' .* or 'imatrix' .*, not 'gptq'"):
        Scheme("q4_k", algorithm="gptq")
    with pytest.raises(ValueError, match="'imatrix' is llama.cpp's quantizer for K-quant"):
        Scheme("int4", "per_group", 32, algorithm="imatrix")
    with pytest.raises(ValueError, match="group_size 32 does not apply to a q4_k weight"):
        Scheme("q4_k", group_size=32)


def test_packed_modules_compute_with_the_blocks_values():
    torch.manual_seed(0)
    lin = nn.Linear(512, 32)
    q = QuantizedLinear.from_float(lin, Scheme("q5_k"))
    assert q.weight_bytes() == 32 * 2 * 176 and set(q.packed_buffers()) == {"blocks"}
    x = torch.randn(3, 512)
    want = x @ kquants.dequantize(q.blocks, "q5_k").T + lin.bias
    assert torch.allclose(q(x), want, atol=1e-5)
    kernels.use_reference(True)
    try:
        assert torch.allclose(q(x), want, atol=1e-5)
    finally:
        kernels.use_reference(False)
    emb = QuantizedEmbedding.from_float(nn.Embedding(10, 256), Scheme("q6_k"))
    ids = torch.tensor([[3, 1, 3]])
    rows = kquants.dequantize(emb.blocks, "q6_k")[ids[0]]
    assert torch.equal(emb(ids)[0], rows)
    assert torch.equal(emb.dequantized_rows(1, 4), kquants.dequantize(emb.blocks[1:4], "q6_k"))


def test_pte_and_tflite_refuse_them_with_the_reason():
    from edgequant.export.litert import litert_problem
    from edgequant.export.pte import xnnpack_problem

    q = QuantizedLinear.from_float(nn.Linear(256, 16), Scheme("q4_k"))
    for problem in (xnnpack_problem(q), litert_problem(q)):
        assert problem[0] == "q4_k is llama.cpp's K-quant block format: only a GGUF runs it"


@pytest.fixture(scope="module")
def tiny_256(stories260k):
    """A random untied Llama whose rows are multiples of 256 (hidden 256, feed-forward 512),
    with stories260K's 512-token vocabulary and tokenizer."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval(), stories260k[1]


RECIPE = Recipe(
    (
        Rule(Scheme("q4_k", algorithm="imatrix"), role="default"),
        Rule(Scheme("q6_k", algorithm="imatrix"), role="attention"),
        Rule(Scheme("q5_k"), role="embedding"),
    )
)


@pytest.fixture(scope="module")
def quantized(tiny_256):
    model, _ = tiny_256
    batches = [torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(i))
               for i in range(4)]  # fmt: skip
    q, _ = edgequant.quantize(copy.deepcopy(model), RECIPE, calibration=batches)
    return q, batches


def test_imatrix_rounds_with_the_mean_square_of_each_columns_inputs(tiny_256, quantized):
    """Layer 0's projections see the float model's (normed) embeddings: their blocks are
    llama.cpp's rounding with those inputs' per-column mean squares; the head's with the last
    layer's outputs through the final norm (the quantized layers' outputs)."""
    model, _ = tiny_256
    q, batches = quantized
    seen: dict[str, list] = {"q": [], "down": [], "head": []}
    hooks = [
        model.model.layers[0].self_attn.q_proj.register_forward_hook(
            lambda m, a, o: seen["q"].append(a[0].reshape(-1, 256))
        ),
        model.model.layers[0].mlp.down_proj.register_forward_hook(
            lambda m, a, o: seen["down"].append(a[0].reshape(-1, 512))
        ),
    ]
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for h in hooks:
        h.remove()
    x = torch.cat(seen["q"]).float()
    want = kquants.quantize(model.model.layers[0].self_attn.q_proj.weight, "q6_k", (x * x).mean(0))
    got = q.model.layers[0].self_attn.q_proj.blocks
    assert (got == want).float().mean() > 0.999  # summation order of the mean squares
    assert q.model.layers[0].self_attn.q_proj.scheme == Scheme("q6_k", algorithm="imatrix")
    plain = kquants.quantize(model.model.layers[0].self_attn.q_proj.weight, "q6_k")
    assert not torch.equal(got, plain)  # the importance changed the rounding
    assert q.lm_head.scheme == Scheme("q4_k", algorithm="imatrix")
    assert q.model.embed_tokens.scheme == Scheme("q5_k")


def test_bundle_and_gguf_keep_the_bytes_and_llama_cpp_runs_them(tiny_256, quantized, tmp_path):
    from edgequant.export import to_gguf
    from edgequant.export.gguf import permute_qk, read_layers
    from edgequant.export.gguf_runtime import GgufModel

    model, tok = tiny_256
    q, _ = quantized
    edgequant.save(q, tmp_path / "bundle")
    loaded = edgequant.load(tmp_path / "bundle")
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, q(ids).logits)
    path = to_gguf(loaded, tmp_path / "k.gguf", tokenizer=tok)
    layers = read_layers(path)
    kinds = {name: kind for name, (kind, _) in layers.items()}
    assert kinds["token_embd.weight"] == "Q5_K" and kinds["output.weight"] == "Q4_K"
    assert kinds["blk.0.attn_q.weight"] == "Q6_K" and kinds["blk.1.ffn_down.weight"] == "Q4_K"
    block = loaded.model.layers[1]
    for name, module, heads in (
        ("blk.1.attn_q.weight", block.self_attn.q_proj, 4),
        ("blk.1.attn_k.weight", block.self_attn.k_proj, 2),
        ("blk.1.attn_v.weight", block.self_attn.v_proj, None),
        ("blk.1.ffn_down.weight", block.mlp.down_proj, None),
        ("output.weight", loaded.lm_head, None),
    ):
        want = permute_qk(module.blocks, heads) if heads else module.blocks
        assert torch.equal(torch.from_numpy(layers[name][1].copy()), want), name
    # llama.cpp rounds the activations to 8-bit blocks itself; measured: 36 dB between its
    # logits and the eager model's (Q8_0 weights: 39 dB, Q4_0: 39 dB on the same model)
    got = GgufModel(path, n_ctx=32)(ids)
    with torch.no_grad():
        eager = loaded(ids).logits
    assert sqnr(eager, got) > 32.0
    assert ev.compare(eager, got, ids)["kl_divergence"] < 0.002
