"""One runner for every decoder family: a tiny random transformers model of each family must
give transformers' logits through edgequant's decoder (eager, float) and through every file
written from it (.pte, .tflite, .gguf); quantized files must equal the eager quantized model.

Adding a family = its file in edgequant/models/families/ and one entry in ``CASES``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from edgequant.models.families import decoder_of, for_model

DIMS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_hidden_layers=2,
    vocab_size=288,  # a byte-level tokenizer needs 256 ids for bytes; 32 | 288
    max_position_embeddings=64,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 8.0,
    "original_max_position_embeddings": 32,  # two of the 8 frequencies on the smooth ramp
}
PHI_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 0}  # Phi3Config's are 32000
# case -> (family, config class, model class, config overrides)
CASES = {
    "llama": ("llama", "LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama3-rope-untied": (
        "llama",
        "LlamaConfig",
        "LlamaForCausalLM",
        {"tie_word_embeddings": False, "rope_parameters": LLAMA3_ROPE},
    ),
    "qwen2": ("qwen2", "Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": (
        "qwen3",
        "Qwen3Config",
        "Qwen3ForCausalLM",
        {"tie_word_embeddings": True, "head_dim": 32},  # head_dim != hidden / heads
    ),
    # 6 layers: llama.cpp's gemma3 makes every 6th global; a window of 8 inside the 24-token
    # prompt (and the 32-token programs), so what lies beyond it must be masked everywhere; a
    # query_pre_attn_scalar that is not head_dim (GGUF folds it into the q norm)
    "gemma3": (
        "gemma3",
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "tie_word_embeddings": True,
            "num_hidden_layers": 6,
            "sliding_window": 8,
            "query_pre_attn_scalar": 24,
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        },
    ),
    # LongRoPE past its original context (16 < the 24-token prompt and the 32-token programs):
    # the long factors; an untied head, a window longer than the trained context (none)
    "phi3-mini": (
        "phi3",
        "Phi3Config",
        "Phi3ForCausalLM",
        {
            **PHI_IDS,
            "tie_word_embeddings": False,
            "original_max_position_embeddings": 16,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5],
                "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 12.0, 16.0],
                "original_max_position_embeddings": 16,
            },  # fmt: skip
            "sliding_window": 64,
        },
    ),
    # Phi-4-mini: 3/4 of each head rotated, tied head; LongRoPE within its original context
    # (300: more than the 256 llama.cpp rounds its smallest context up to): the short factors
    "phi4-mini": (
        "phi3",
        "Phi3Config",
        "Phi3ForCausalLM",
        {
            **PHI_IDS,
            "tie_word_embeddings": True,
            "max_position_embeddings": 512,
            "original_max_position_embeddings": 300,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.75,
                "short_factor": [1.0, 1.2, 1.5, 2.0, 2.6, 3.2],
                "long_factor": [1.0, 2.0, 4.0, 8.0, 12.0, 16.0],
                "original_max_position_embeddings": 300,
            },  # fmt: skip
        },
    ),
}


def build(case: str) -> torch.nn.Module:
    """The family's tiny model, seeded, with weights large enough that logits differ."""
    _, config_cls, model_cls, overrides = CASES[case]
    config = getattr(transformers, config_cls)(**{**DIMS, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    offset = for_model(model).spec(config).norm_offset  # Gemma's norms multiply by 1 + w
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 - offset + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=list(CASES))
def family_model(request):
    return request.param, build(request.param)


IDS = torch.randint(0, DIMS["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(1))


def reference(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def test_decoder_gives_transformers_logits(family_model):
    case, model = family_model
    want = reference(model)
    with torch.no_grad():
        got = decoder_of(model)(IDS)
    assert got.shape == want.shape
    assert (got - want).abs().max() < 1e-5, case


def test_the_sliding_window_is_exercised():
    """The test prompt is longer than Gemma's window: one token more in the window changes
    transformers' logits far beyond any tolerance used here."""
    from edgequant.primitives import sqnr

    overrides = CASES["gemma3"][3]
    want = reference(build("gemma3"))
    CASES["gemma3-window-9"] = (*CASES["gemma3"][:3], {**overrides, "sliding_window": 9})
    try:
        other = reference(build("gemma3-window-9"))
    finally:
        del CASES["gemma3-window-9"]
    assert IDS.shape[1] > overrides["sliding_window"]
    assert sqnr(want, other) < 20


def test_prefill_then_one_token_equals_one_pass(family_model):
    _, model = family_model
    decoder = decoder_of(model)
    with torch.no_grad():
        full = decoder(IDS)
        cache = decoder.new_cache(max_len=32)
        first = decoder(IDS[:, :-1], start_pos=0, cache=cache)
        last = decoder(IDS[:, -1:], start_pos=IDS.shape[1] - 1, cache=cache)
    assert (torch.cat([first, last], dim=1) - full).abs().max() < 1e-5


def test_decoder_shares_the_models_modules(family_model):
    case, model = family_model
    model = copy.deepcopy(model)
    decoder = decoder_of(model)
    first = model.model.layers[0]
    if decoder.spec.fused_qkv:  # Phi: the packed projections stay packed
        assert decoder.layers[0].attention.wqkv is first.self_attn.qkv_proj
        assert decoder.layers[0].feed_forward.w13 is first.mlp.gate_up_proj
    else:
        assert decoder.layers[0].attention.wq is first.self_attn.q_proj
    assert decoder.layers[0].attention_norm.weight is first.input_layernorm.weight
    assert decoder.output is model.lm_head
    assert for_model(model).name == CASES[case][0]


# ---- every written file, from a bundle --------------------------------------------------------

# bundle -> the formats that hold its values exactly. "mixed": int8-dynamic attention, 8da4w
# (bf16 scales, as XNNPACK and LiteRT hold int4 scales) everywhere else; "q4_0": 8da4w with
# fp16 scales, which GGUF's Q4_0 holds bit for bit.
RECIPES = {"mixed": ("pte", "tflite"), "q4_0": ("gguf",)}
# the cases whose quantized bundles are written (the others differ from one of these only in
# what the float files check: rope scaling, q/k norms, partial rotary), to keep the suite short
QUANTIZED = ["llama", "qwen2", "gemma3", "phi3-mini"]


def tiny_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer of at most ``vocab_size`` tokens, trained here."""
    from tokenizers import Tokenizer, decoders, models, trainers
    from tokenizers import pre_tokenizers as pre
    from transformers import PreTrainedTokenizerFast

    from edgequant.models.tokenizer import HFTokenizer

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tk.train_from_iterator(["once upon a time there was a tiny model"] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")
    assert len(fast) <= vocab_size
    return HFTokenizer(fast)


def _recipe(bundle: str):
    import edgequant
    from edgequant.recipe import Recipe, Rule

    if bundle == "q4_0":
        return edgequant.recipes.get("8da4w", scale_dtype="fp16")
    int8 = edgequant.recipes.get("int8-dynamic").rules[0].scheme
    return Recipe((*edgequant.recipes.get("8da4w", scale_dtype="bf16").rules,
                   Rule(int8, role="attention")))  # fmt: skip


@pytest.fixture(scope="module")
def written(family_model, tmp_path_factory):
    """``{(bundle, format): (eager model, program)}``: each family's float bundle and its
    quantized bundles, saved, loaded back and written to every format that holds them."""
    import edgequant
    from edgequant.export import load_program, to_gguf, to_pte, to_tflite
    from edgequant.export.gguf_runtime import GgufModel

    case, model = family_model
    folder = tmp_path_factory.mktemp(case)
    tokenizer = tiny_tokenizer(DIMS["vocab_size"])
    out = {}
    for bundle in ("float", *RECIPES) if case in QUANTIZED else ("float",):
        source = copy.deepcopy(model)
        if bundle != "float":
            source, _ = edgequant.quantize(source, _recipe(bundle))
        edgequant.save(source, folder / bundle, tokenizer=tokenizer)
        loaded = edgequant.load(folder / bundle)
        tok = edgequant.artifact.load_tokenizer(folder / bundle)
        for fmt in ("pte", "tflite", "gguf") if bundle == "float" else RECIPES[bundle]:
            path = folder / f"{bundle}.{fmt}"
            if fmt == "pte":
                to_pte(loaded, path, max_seq_len=32)
            elif fmt == "tflite":
                to_tflite(loaded, path, max_seq_len=32, prefill_len=8)
            else:
                to_gguf(loaded, path, tokenizer=tok)
            # every file runs with a 32-token context (LongRoPE picks its factors by it)
            program = GgufModel(path, n_ctx=32) if fmt == "gguf" else load_program(path)
            out[bundle, fmt] = (loaded, program)
    return out


def _logits(model, ids=IDS):
    from edgequant.models.base import logits

    with torch.no_grad():
        return logits(model, ids)


@pytest.mark.parametrize("fmt", ["pte", "tflite", "gguf"])
def test_float_files_give_transformers_logits(family_model, written, fmt):
    case, model = family_model
    _, program = written["float", fmt]
    from edgequant.primitives import sqnr

    got, want = program(IDS), reference(model)
    if fmt == "gguf":  # llama.cpp keeps its KV cache in fp16 (measured 0.002 off, 69 dB;
        # Gemma 3: 63.7 dB, where a window one token off gives under 20 dB)
        assert sqnr(want, got) > 55.0, case
    else:
        assert (got - want).abs().max() < 1e-4, case


@pytest.mark.parametrize("fmt", ["pte", "tflite", "gguf"])
def test_files_prefill_then_decode_equals_one_pass(family_model, written, fmt):
    """A 13-token prefill, then 11 tokens one at a time through each runtime's own cache: the
    same logits as one pass (for Gemma 3, decoding crosses its 8-token window)."""
    _, program = written["float", fmt]
    full = program(IDS)
    cache = program.new_cache()
    rows = [program(IDS[:, :13], start_pos=0, cache=cache)]
    for pos in range(13, IDS.shape[1]):
        rows.append(program(IDS[:, pos : pos + 1], start_pos=pos, cache=cache))
    assert (torch.cat(rows, dim=1) - full).abs().max() < (2e-3 if fmt == "gguf" else 1e-4)


@pytest.mark.parametrize("family_model", QUANTIZED, indirect=True, scope="module")
@pytest.mark.parametrize("bundle, fmt", [(b, f) for b, formats in RECIPES.items() for f in formats])
def test_quantized_files_equal_the_eager_quantized_model(family_model, written, bundle, fmt,
                                                         equal_but_rounding_ties):  # fmt: skip
    from edgequant import eval as ev
    from edgequant import kernels

    eager_model, program = written[bundle, fmt]
    got = program(IDS)
    if fmt == "gguf":  # llama.cpp quantizes activations to 8 bits in blocks of 32 itself:
        # KL 0.0002-0.0005 measured; top-1 87-100% (flips only where the eager top two logits
        # are within 0.02 of each other: 2 of 23 positions for Gemma 3)
        compared = ev.compare(_logits(eager_model), got, IDS)
        assert compared["kl_divergence"] < 0.002 and compared["top1_agreement"] > 85, compared
    else:  # both runtimes quantize activations per token, as the scheme says; a rounding tie
        # in a key or value reaches every later position (seen in both runtimes on Gemma 3)
        reference = kernels.reference_logits(decoder_of(eager_model), IDS)
        equal_but_rounding_ties(got, reference, through_attention=True)


def test_gguf_loads_in_llama_cpp_as_the_familys_architecture(family_model, written):
    import gguf

    case, _ = family_model
    _, program = written["float", "gguf"]
    reader = gguf.GGUFReader(str(program.path))
    arch = reader.fields["general.architecture"].contents()
    assert arch == for_model(family_model[1]).gguf_arch
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) is (not family_model[1].config.tie_word_embeddings)
    assert ("blk.0.attn_q.bias" in names) is (case == "qwen2")
    assert ("blk.0.attn_q_norm.weight" in names) is (case in ("qwen3", "gemma3"))
    assert ("rope_freqs.weight" in names) is (case == "llama3-rope-untied")
    assert ("blk.0.post_ffw_norm.weight" in names) is (case == "gemma3")
    assert ("blk.0.attn_qkv.weight" in names) is case.startswith("phi")
    assert ("rope_factors_long.weight" in names) is case.startswith("phi")
    if case == "gemma3":  # llama.cpp reads the window; its pattern (6) and local base are fixed
        assert reader.fields["gemma3.attention.sliding_window"].contents() == 8


def test_gguf_files_load_back_as_their_float_source(family_model, tmp_path):
    """Q8_0 linears and embedding, F32 norms and biases: edgequant's loader (its own
    dequantization, the family file, gguf-py's names) gives back the values written."""
    import edgequant
    from edgequant.export import to_gguf
    from edgequant.models import gguf as gguf_loader
    from edgequant.recipe import Recipe, Rule
    from edgequant.schemes import Scheme

    case, model = family_model
    q8_0 = Scheme("int8", "per_group", 32, scale_dtype="fp16")
    quantized, _ = edgequant.quantize(copy.deepcopy(model), Recipe((Rule(q8_0, role="default"),)))
    path = to_gguf(quantized, tmp_path / "q8_0.gguf", tokenizer=tiny_tokenizer(DIMS["vocab_size"]))
    config, state = gguf_loader.read_weights(path)
    loaded = gguf_loader.build_model(config, state)
    assert type(loaded) is type(model)
    assert for_model(loaded).name == CASES[case][0]
    for name, module in quantized.named_modules():
        if hasattr(module, "dequantized_weight"):
            want = module.dequantized_weight()
            if name == "lm_head" and model.config.tie_word_embeddings:
                continue
            assert torch.equal(loaded.get_submodule(name).weight, want), (case, name)
    shift = for_model(model).gguf_norm_shift  # Gemma's norms go to GGUF as 1 + w and back
    for name, tensor in model.named_parameters():  # norms and biases stay float
        if name.endswith("bias") or "norm" in name:
            got = loaded.get_parameter(name)
            if case == "gemma3" and "q_norm" in name:
                continue  # it carries query_pre_attn_scalar's scale (the logits are compared)
            if shift and "norm" in name:
                assert (got - tensor).abs().max() <= 2**-22, (case, name)  # (w + 1) - 1
            else:
                assert torch.equal(got, tensor), (case, name)
    assert (_logits(loaded) - _logits(quantized)).abs().max() < 1e-4


def test_family_roles_cover_every_linear_and_embedding(family_model):
    from edgequant.roles import infer_roles, role_of

    case, model = family_model
    declared = for_model(model).roles(model)
    roles = infer_roles(model)
    assert {fqn for fqn, (role, _) in roles.items() if role} == set(declared), case
    for fqn, (role, layer) in declared.items():  # the names agree with the family file
        assert role_of(fqn, model.get_submodule(fqn)) == (role, layer), fqn


def test_a_hugging_face_folder_of_the_family_loads(family_model, tmp_path):
    from edgequant.models import load

    case, model = family_model
    model.save_pretrained(tmp_path, safe_serialization=True)
    tiny_tokenizer(DIMS["vocab_size"]).tok.save_pretrained(tmp_path)
    loaded, tokenizer, info = load(tmp_path)
    assert info["config"]["model_type"] == model.config.model_type
    assert (_logits(loaded) - reference(model)).abs().max() < 1e-5, case
    assert tokenizer.decode(tokenizer.encode("once upon a time", bos=False)) == "once upon a time"
