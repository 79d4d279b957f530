"""edgequant.eval: windowing, perplexity, compare, cache, layer SQNR, size and speed, with numbers
checked against direct computations on the real stories260K model."""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import edgequant
import edgequant.eval as ev
from edgequant.layers import QuantizedEmbedding, QuantizedLinear, linear_weight
from edgequant.primitives import sqnr

RECIPE_8DA4W = Path(__file__).resolve().parents[1] / "examples" / "stories260k-8da4w.yaml"

# A TinyStories-style passage (written for this test): 285 tokens, so 2 windows of 128.
STORY = (
    "Once upon a time, there was a little boy named Tim. Tim had a big red ball. He liked to "
    "play with his ball every day. One day, Tim went to the park with his mom. He saw a girl "
    'named Sue. Sue was sad because she had no toys. Tim said, "Do you want to play with my '
    'ball?" Sue smiled and said, "Yes, please!" They played with the ball all day. They threw it '
    "high and ran fast. When the sun went down, Tim and Sue were tired but happy. Tim's mom "
    'said, "It is time to go home." Tim gave Sue a big hug. He said, "We can play again '
    'tomorrow." Sue was happy. She had a new friend. The next day, Tim and Sue met at the park '
    "again. They played with the ball and laughed. They were best friends. "
)
# The first characters of WikiText-2 test: tokenizing all 1.3 MB takes ~3 s in llama2.c's pure
# Python BPE; merges only reach a few characters, so the first 256 tokens of this prefix are
# those of the whole file (checked: the first 500 agree).
WIKI_PREFIX_CHARS = 8000


def _require_data(reason: str) -> None:
    """As conftest.require_data (not importable from here): fail in CI, skip elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"shared data missing in CI: {reason}")
    pytest.skip(f"shared data missing: {reason}")


@pytest.fixture(scope="module")
def wiki_windows(stories260k, tmp_path_factory):
    """2 windows of 128 stories260K tokens from the start of WikiText-2 test, via tokenize_file."""
    try:
        text = ev.default_text().read_text(encoding="utf-8")
    except FileNotFoundError as e:
        _require_data(str(e))
    path = tmp_path_factory.mktemp("wiki") / "prefix.raw"
    path.write_text(text[:WIKI_PREFIX_CHARS], encoding="utf-8")
    return ev.windows(ev.tokenize_file(stories260k[1], path), 128, 2)


@pytest.fixture(scope="module")
def story_windows(stories260k):
    return ev.windows(stories260k[1].encode(STORY, bos=False), 128, 2)


def _direct_perplexity(logits: torch.Tensor, w: torch.Tensor) -> float:
    V = logits.shape[-1]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), w[:, 1:].reshape(-1))
    return math.exp(float(loss))


# --- windows -------------------------------------------------------------------------------


def test_windows_slices_exactly():
    ids = list(range(100, 111))  # 11 tokens
    assert ev.windows(ids, 4, None).tolist() == [[100, 101, 102, 103], [104, 105, 106, 107]]
    assert ev.windows(ids, 4, 1).tolist() == [[100, 101, 102, 103]]
    assert ev.windows(torch.tensor(ids), 5, None).tolist() == [
        list(range(100, 105)),
        list(range(105, 110)),
    ]
    assert ev.windows(ids, 11, None).dtype == torch.long


@settings(max_examples=50, deadline=None)
@given(n_ids=st.integers(2, 300), seq_len=st.integers(2, 64))
def test_windows_are_the_reshaped_prefix(n_ids, seq_len):
    ids = torch.randint(0, 1000, (n_ids,))
    if n_ids < seq_len:
        with pytest.raises(ValueError, match="fewer than one window"):
            ev.windows(ids, seq_len, None)
        return
    n = n_ids // seq_len
    assert torch.equal(ev.windows(ids, seq_len, None), ids[: n * seq_len].view(n, seq_len))


def test_windows_errors():
    with pytest.raises(ValueError, match=r"^text has 300 tokens, fewer than one window of 512$"):
        ev.windows(list(range(300)), 512, None)
    msg = "asked for 4 windows of 3 tokens, but the text has 10 tokens: 3 full windows"
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        ev.windows(list(range(10)), 3, 4)
    with pytest.raises(ValueError, match=r"seq_len must be an int >= 2 .*got 1"):
        ev.windows(list(range(10)), 1, None)
    with pytest.raises(ValueError, match=r"n_windows must be a positive int or None .*got 0"):
        ev.windows(list(range(10)), 3, 0)


def test_tokenize_file(tmp_path):
    class Recorder:
        def encode(self, text, bos=True, eos=False):
            self.call = (text, bos)
            return [7, 8, 9]

    tok, path = Recorder(), tmp_path / "t.txt"
    path.write_text("héllo\n", encoding="utf-8")
    assert ev.tokenize_file(tok, path) == [7, 8, 9]
    assert tok.call == ("héllo\n", False)
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        ev.tokenize_file(tok, missing)


# --- perplexity on stories260K -------------------------------------------------------------


def test_perplexity_equals_direct_cross_entropy(stories260k, wiki_windows):
    model, _ = stories260k
    with torch.no_grad():
        direct = _direct_perplexity(model(wiki_windows), wiki_windows)  # both windows at once
    ppl = ev.perplexity(model, wiki_windows)
    assert ppl == pytest.approx(direct, rel=1e-6)
    from_logits = ev.perplexity_from_logits(ev.float_logits(model, wiki_windows), wiki_windows)
    assert from_logits == pytest.approx(direct, rel=1e-6)
    print(f"stories260K WikiText-2 perplexity, 2 x 128 tokens: {ppl:.2f}")  # measured 91.50
    assert 30 < ppl < 400  # README: about 106 over the whole file


def test_float_perplexity_on_tinystories(stories260k, story_windows):
    ppl = ev.perplexity(stories260k[0], story_windows)
    print(f"stories260K TinyStories perplexity, 2 x 128 tokens: {ppl:.3f}")  # measured 2.486
    assert 1.5 < ppl < 4  # README: about 2.5


def test_perplexity_shape_errors():
    w = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"logits must be \[n, seq_len, vocab\] = \[2, 8, vocab\]"):
        ev.perplexity_from_logits(torch.zeros(2, 7, 5), w)
    with pytest.raises(ValueError, match=r"windows must be a \[n, seq_len >= 2\] tensor"):
        ev.perplexity_from_logits(torch.zeros(8, 5), torch.zeros(8, dtype=torch.long))


# --- compare -------------------------------------------------------------------------------


def test_compare_float_with_itself(stories260k, wiki_windows):
    ref = ev.float_logits(stories260k[0], wiki_windows)
    out = ev.compare(ref, ref.clone(), wiki_windows)
    assert out["kl_divergence"] == 0.0
    assert out["top1_agreement"] == 100.0
    assert out["perplexity"] == out["float_perplexity"]
    assert out["float_perplexity"] == pytest.approx(_direct_perplexity(ref, wiki_windows), rel=1e-6)
    assert out["positions"] == 2 * 127


def test_compare_quantized_matches_direct(stories260k, fresh_stories260k, wiki_windows):
    quantized, _ = edgequant.quantize(fresh_stories260k()[0], "int8-dynamic")
    ref = ev.float_logits(stories260k[0], wiki_windows)
    out_q = ev.float_logits(quantized, wiki_windows)
    out = ev.compare(ref, out_q, wiki_windows)

    p = F.log_softmax(ref[:, :-1].double(), -1)  # [2, 127, V]
    q = F.log_softmax(out_q[:, :-1].double(), -1)
    kl = F.kl_div(q, p, log_target=True, reduction="sum") / (2 * 127)  # KL(p || q)
    agree = (ref[:, :-1].argmax(-1) == out_q[:, :-1].argmax(-1)).sum()
    assert out["kl_divergence"] == pytest.approx(float(kl), rel=1e-6)
    assert out["top1_agreement"] == pytest.approx(100 * int(agree) / (2 * 127), rel=1e-12)
    assert out["perplexity"] == pytest.approx(_direct_perplexity(out_q, wiki_windows), rel=1e-6)
    assert out["float_perplexity"] == pytest.approx(_direct_perplexity(ref, wiki_windows), rel=1e-6)
    assert 0 < out["kl_divergence"] < 0.1  # int8 per-channel: close to float, not equal
    assert out["top1_agreement"] > 80


def test_compare_shape_mismatch():
    w = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"differ in shape: \(1, 4, 5\) vs \(1, 4, 6\)"):
        ev.compare(torch.zeros(1, 4, 5), torch.zeros(1, 4, 6), w)


# --- float_logits cache --------------------------------------------------------------------


def test_float_logits_cache_runs_the_model_once(stories260k, wiki_windows):
    model = stories260k[0]
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    key = "test_eval:stories260k|wiki-prefix|L=128|n=2"
    try:
        first = ev.float_logits(model, wiki_windows, cache_key=key)
        assert len(calls) == 2 and first.shape == (2, 128, 512) and first.dtype == torch.float32
        second = ev.float_logits(model, wiki_windows, cache_key=key)
        assert len(calls) == 2  # no new forward
        assert second is first
        uncached = ev.float_logits(model, wiki_windows)
        assert len(calls) == 4 and torch.equal(uncached, first)
        with pytest.raises(ValueError, match="holds logits for other windows"):
            ev.float_logits(model, wiki_windows[:1], cache_key=key)
    finally:
        handle.remove()
        ev.clear_cache()


def test_cache_key_hashes_the_text(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("one"), b.write_text("two")
    assert ev.cache_key("m", a, 512, 8) == ev.cache_key("m", a, 512, 8)
    assert ev.cache_key("m", a, 512, 8) != ev.cache_key("m", b, 512, 8)
    assert ev.cache_key("m", a, 512, None).endswith("|L=512|n=all")


# --- layer SQNR and size -------------------------------------------------------------------


@pytest.fixture(scope="module")
def stories_8da4w(stories260k):
    """``(quantized copy, plan)`` of stories260K with the example 8da4w recipe."""
    return edgequant.quantize(copy.deepcopy(stories260k[0]), str(RECIPE_8DA4W))


def test_layer_sqnr_stories260k_8da4w(stories260k, stories_8da4w):
    float_model, (quantized, _) = stories260k[0], stories_8da4w
    rows = ev.layer_sqnr(float_model, quantized)
    assert len(rows) == 37  # embedding + 5 x 7 linears + tied output
    for row in rows:
        module = quantized.get_submodule(row["fqn"])
        reference = float_model.get_submodule(row["fqn"]).weight
        assert row["sqnr_db"] == sqnr(reference, module.dequantized_weight())
        assert row["scheme"].startswith("int4 g")
        assert 15 < row["sqnr_db"] < 25  # measured 19.1 .. 22.1
    by_fqn = {row["fqn"]: row for row in rows}
    assert (by_fqn["layers.0.attention.wq"]["role"], by_fqn["layers.0.attention.wq"]["layer"]) == (
        "attention",
        0,
    )
    assert by_fqn["layers.3.feed_forward.w2"]["role"] == "feedforward"
    assert by_fqn["layers.3.feed_forward.w2"]["scheme"].startswith("int4 g86")
    assert by_fqn["layers.3.feed_forward.w2"]["shape"] == [64, 172]
    assert (by_fqn["tok_embeddings"]["role"], by_fqn["output"]["role"]) == ("embedding", "lm_head")
    assert by_fqn["output"]["sqnr_db"] == by_fqn["tok_embeddings"]["sqnr_db"]  # one tied tensor


def test_layer_sqnr_errors():
    quantized, _ = edgequant.quantize(
        nn.Sequential(nn.Linear(32, 8), nn.Linear(8, 8)), "int8-weight-only"
    )
    with pytest.raises(ValueError, match="the float model has no module '1' to compare with"):
        ev.layer_sqnr(nn.Sequential(nn.Linear(32, 8)), quantized)
    with pytest.raises(ValueError, match="0 is quantized in the float model too"):
        ev.layer_sqnr(quantized, quantized)


def test_size_report_stories260k_8da4w(stories_8da4w):
    _, plan = stories_8da4w
    report = ev.size_report(plan)
    # tok_embeddings (tied to output) 512 x 64, then per layer wq, wk, wv, wo, w1, w2, w3
    per_layer = 64 * 64 + 32 * 64 + 32 * 64 + 64 * 64 + 3 * 172 * 64
    assert report["n_weights"] == 512 * 64 + 5 * per_layer == 259_328
    assert report["float_bytes"] == plan.bytes_before == 4 * 259_328
    assert report["quantized_bytes"] == plan.bytes_after
    assert report["bits_per_weight"] == plan.bytes_after * 8 / 259_328
    assert 4.3 < report["bits_per_weight"] < 4.5  # measured 4.433


# --- speed ---------------------------------------------------------------------------------

SPEED_KEYS = {
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "prompt_tokens",
    "new_tokens",
    "kv_cache",
}


def test_speed_hf_llama_uses_the_kv_cache(tiny_hf_llama):
    result = ev.speed(tiny_hf_llama, list(range(1, 17)), new_tokens=8)
    assert set(result) == SPEED_KEYS
    assert result["kv_cache"] is True
    assert (result["prompt_tokens"], result["new_tokens"]) == (16, 8)
    assert result["prefill_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0


def test_layer_sqnr_reads_hf_conv1d_transposed():
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=32,
        n_layer=1,
        n_head=2,
        vocab_size=64,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    float_model = transformers.GPT2LMHeadModel(config).eval()
    quantized, _ = edgequant.quantize(copy.deepcopy(float_model), "int8-weight-only")
    rows = {row["fqn"]: row for row in ev.layer_sqnr(float_model, quantized)}
    fqn = "transformer.h.0.attn.c_attn"  # Conv1D weight [in 32, out 96]
    reference = linear_weight(float_model.get_submodule(fqn))  # [96, 32]
    assert rows[fqn]["shape"] == [96, 32]
    assert rows[fqn]["sqnr_db"] == sqnr(
        reference, quantized.get_submodule(fqn).dequantized_weight()
    )
    assert rows[fqn]["role"] == "attention" and rows[fqn]["sqnr_db"] > 35
    assert all(
        isinstance(quantized.get_submodule(f), (QuantizedLinear, QuantizedEmbedding)) for f in rows
    )


def test_speed_stories260k(stories260k):
    model, tok = stories260k
    result = ev.speed(model, tok.encode("Once upon a time", bos=True), new_tokens=4)
    assert set(result) == SPEED_KEYS
    assert isinstance(result["kv_cache"], bool)
    assert result["kv_cache"] == callable(getattr(model, "new_cache", None))  # llama2.c cache API
    assert result["new_tokens"] == 4 and result["prompt_tokens"] == 5
    assert result["prefill_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0


def test_speed_errors():
    model = nn.Embedding(4, 4)
    with pytest.raises(ValueError, match="at least one prompt token"):
        ev.speed(model, [], new_tokens=4)
    with pytest.raises(ValueError, match="new_tokens must be a positive int, got 0"):
        ev.speed(model, [1], new_tokens=0)


def _greedy(model, prompt, n):
    step, kv_cache = ev._stepper(model, len(prompt) + n)
    out, token = [], step(torch.tensor([prompt]))
    for _ in range(n):
        out.append(int(token))
        token = step(token)
    return out, kv_cache


class _NoCache(nn.Module):
    """Hides any cache API of the wrapped model: ``forward(ids) -> logits`` only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor):
        return self.model(ids)


def test_timed_decode_path_matches_full_recompute(stories260k, tiny_hf_llama):
    """What `speed` times generates the same greedy tokens as recomputing everything."""
    from edgequant.models import llama2c

    model, tok = stories260k
    prompt = tok.encode("Once upon a time", bos=True)
    with torch.inference_mode():
        tokens, _ = _greedy(model, prompt, 12)
        assert tokens == llama2c.generate(model, prompt, 12)[len(prompt) :]
        assert _greedy(_NoCache(model), prompt, 12) == (tokens, False)
        hf_tokens, kv_cache = _greedy(tiny_hf_llama, list(range(1, 17)), 8)
        assert kv_cache is True
        assert _greedy(_NoCache(tiny_hf_llama), list(range(1, 17)), 8) == (hf_tokens, False)


def test_text_files_that_are_folders_or_not_utf8_are_refused_by_name(tmp_path):
    from edgequant.eval import tokenize_file

    class Chars:
        def encode(self, text, bos=False):
            return [ord(c) for c in text]

    (tmp_path / "ok.txt").write_text("héllo")
    assert tokenize_file(Chars(), tmp_path / "ok.txt") == [104, 233, 108, 108, 111]
    with pytest.raises(ValueError, match=re.escape(f"text file {str(tmp_path)!r} is a folder")):
        tokenize_file(Chars(), tmp_path)
    (tmp_path / "latin.txt").write_bytes(b"h\xe9llo")
    with pytest.raises(ValueError, match=r"latin.txt' is not UTF-8 text: byte 1 is 0xe9"):
        tokenize_file(Chars(), tmp_path / "latin.txt")
