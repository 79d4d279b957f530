"""Calibration sources: seeded, reproducible, clear of the evaluation windows; bad input named."""

from __future__ import annotations

import re

import pytest
import torch

from edgequant import calibration
from edgequant.eval import default_text, tokenize_file


def test_wikitext_batches_are_seeded_and_clear_of_the_evaluation_windows(stories260k):
    _, tok = stories260k
    a = calibration.wikitext(tok, n=8, seq_len=64, seed=3)
    b = calibration.wikitext(tok, n=8, seq_len=64, seed=3)
    c = calibration.wikitext(tok, n=8, seq_len=64, seed=4)
    assert len(a) == 8 and a.tokens == 8 * 64
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert a.source == "wikitext-2 test, after token 32768: 8 x 64 tokens, seed 3"
    ids = tokenize_file(tok, default_text())
    text = torch.tensor(ids)
    for batch in a:  # each batch is a slice of the file past the first 64 x 512 tokens
        row = batch[0]
        starts = (text[calibration.EVAL_TOKENS :].unfold(0, 64, 1) == row).all(dim=1)
        assert bool(starts.any())


def test_prompts_and_the_models_own_samples(stories260k):
    model, tok = stories260k
    p = calibration.from_prompts(["Once upon a time", "The dog ran"], tok)
    assert len(p) == 2 and int(p.batches[0][0, 0]) == tok.bos_id
    s1 = calibration.from_model(model, tok, n=2, seq_len=12, seed=1)
    s2 = calibration.from_model(model, tok, n=2, seq_len=12, seed=1)
    assert [tuple(b.shape) for b in s1] == [(1, 12), (1, 12)]
    assert all(torch.equal(x, y) for x, y in zip(s1, s2, strict=True))
    assert s1.source == "float model's own samples: 2 x 12, seed 1"


def test_parse_reads_the_command_line_spec(stories260k, tmp_path):
    model, tok = stories260k
    assert len(calibration.parse("wikitext:4x32", tok)) == 4
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a cat. " * 40)
    got = calibration.parse(f"file:{text}:3x16", tok)
    assert len(got) == 3 and got.source.startswith(str(text))
    assert len(calibration.parse("model:1x5", tok, model=model)) == 1


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("wiki:4x32", ValueError, "calibration 'wiki:4x32' is not one of wikitext[:NxL]"),
        ("file:/no/such.txt:2x8", FileNotFoundError, "calibration file '/no/such.txt' does not"),
        ("model:1x5", ValueError, "calibration 'model' needs the float model"),
    ],
)
def test_bad_specs_are_named(stories260k, spec, error, message):
    _, tok = stories260k
    with pytest.raises(error, match=re.escape(message)):
        calibration.parse(spec, tok)


def test_text_shorter_than_one_batch_is_refused(stories260k):
    _, tok = stories260k
    with pytest.raises(ValueError, match=r"has \d+ tokens, fewer than one batch of 512"):
        calibration.from_text("a short story about a cat.", tok, n=2, seq_len=512)
    with pytest.raises(ValueError, match="calibration n must be a positive integer, got 0"):
        calibration.from_text("text", tok, n=0)


def test_inline_text_is_not_mistaken_for_a_path(stories260k):
    _, tok = stories260k
    text = "the little dog ran to the park " * 40  # 1200 characters, no slash
    assert len(calibration.from_text(text, tok, n=2, seq_len=16)) == 2
