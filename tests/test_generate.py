"""`edgequant.generate`: cached decoding equals full recompute; sampling rules; errors."""

from __future__ import annotations

import copy
import logging
import re

import pytest
import torch
from torch import nn

import edgequant
from edgequant.generate import Generation, encode_prompt, generate, sample
from edgequant.models import llama2c

REFERENCE_START = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
    " One day, she saw a big, red ball."
)


class CharTokenizer:
    """The tokenizer protocol over ASCII: id = code point, BOS 1, no EOS unless given."""

    bos_id = 1

    def __init__(self, eos_id: int | None = None, template: str | None = None) -> None:
        self.eos_id, self.template = eos_id, template

    @property
    def vocab_size(self) -> int:
        return 128

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + [ord(c) for c in text] + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids if i not in (self.bos_id, self.eos_id))

    def chat_prompt(self, user_text: str) -> str | None:
        return None if self.template is None else self.template.format(user_text)


class NoCache(nn.Module):
    """A model edgequant knows no cache for: ``forward(ids) -> logits`` only."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.inner(ids)
        return out if isinstance(out, torch.Tensor) else out.logits


def recompute_greedy(model: nn.Module, ids: list[int], n: int) -> list[int]:
    """Argmax over the whole sequence's logits at every step (no cache)."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out = model(torch.tensor([ids]))
            out = out if isinstance(out, torch.Tensor) else out.logits
            ids.append(int(out[0, -1].argmax()))
    return ids


# --- stories260K (llama2.c, static cache) ---------------------------------------------------


@pytest.fixture(scope="module")
def greedy_200(stories260k):
    model, tok = stories260k
    return generate(model, tok, None, max_new_tokens=200)


def test_greedy_from_bos_reproduces_reference_text(stories260k, greedy_200):
    model, _ = stories260k
    out = greedy_200
    assert isinstance(out, Generation)
    assert out.prompt_ids == [1]
    assert len(out.new_ids) == 200
    assert out.text.startswith(REFERENCE_START)
    assert out.new_ids == llama2c.generate(model, [1], max_new_tokens=200)[1:]
    assert not out.stopped_at_eos


def test_timings_and_rates(greedy_200):
    out = greedy_200
    assert out.prefill_seconds > 0 and out.decode_seconds > 0
    assert out.prefill_tokens_per_s == pytest.approx(1 / out.prefill_seconds)
    assert out.decode_tokens_per_s == pytest.approx(199 / out.decode_seconds)
    d = out.to_dict()
    assert d["new_ids"] == out.new_ids and d["decode_tokens_per_s"] == out.decode_tokens_per_s


def test_text_is_the_continuation_of_a_text_prompt(stories260k):
    model, tok = stories260k
    out = generate(model, tok, "Once upon a time", max_new_tokens=10)
    assert out.prompt_ids == tok.encode("Once upon a time")  # no chat template: BOS + text
    assert out.text.startswith(", there was")
    assert tok.decode(out.prompt_ids + out.new_ids) == "Once upon a time" + out.text
    assert out.new_ids == recompute_greedy(model, out.prompt_ids, 10)[len(out.prompt_ids) :]


def test_sampling_is_seeded(stories260k):
    model, tok = stories260k
    a = generate(model, tok, None, 40, temperature=1.0, seed=0)
    b = generate(model, tok, None, 40, temperature=1.0, seed=0)
    c = generate(model, tok, None, 40, temperature=1.0, seed=1)
    assert a.new_ids == b.new_ids and a.text == b.text
    assert a.new_ids != c.new_ids


def test_degenerate_sampling_equals_greedy(stories260k, greedy_200):
    model, tok = stories260k
    greedy = greedy_200.new_ids[:30]
    assert generate(model, tok, None, 30, temperature=1.0, top_k=1, seed=3).new_ids == greedy
    assert generate(model, tok, None, 30, temperature=1e-6, seed=3).new_ids == greedy
    assert generate(model, tok, None, 30, temperature=1e-30, seed=3).new_ids == greedy  # no NaN
    assert generate(model, tok, None, 30, temperature=2.0, top_p=1e-6, seed=3).new_ids == greedy


def test_stops_at_eos_and_keeps_it_out_of_the_text(stories260k, greedy_200):
    model, tok = stories260k
    tok = copy.copy(tok)
    tok.eos_id = greedy_200.new_ids[4]  # pretend the 5th greedy token is EOS
    out = generate(model, tok, None, 50)
    assert out.stopped_at_eos
    assert out.new_ids == greedy_200.new_ids[:5]
    assert out.text == tok.decode([1] + greedy_200.new_ids[:4])
    assert len(generate(model, tok, None, 50, stop_at_eos=False).new_ids) == 50


def test_stops_at_the_context_length(stories260k):
    model, tok = stories260k
    prompt = [tok.bos_id] + [400] * (model.args.max_seq_len - 4)
    out = generate(model, tok, prompt, max_new_tokens=10)
    assert len(out.prompt_ids) + len(out.new_ids) == model.args.max_seq_len
    assert len(out.new_ids) == 3


def test_quantized_model_generates_with_the_cache(fresh_stories260k):
    model, tok = fresh_stories260k()
    edgequant.quantize(model, "int8-dynamic")
    out = generate(model, tok, None, max_new_tokens=20)
    assert out.new_ids == llama2c.generate(model, [tok.bos_id], max_new_tokens=20)[1:]


def test_unknown_model_recomputes_and_warns_once(stories260k, greedy_200, caplog):
    model, tok = stories260k
    wrapped = NoCache(model)
    with caplog.at_level(logging.WARNING, logger="edgequant.generate"):
        first = generate(wrapped, tok, None, 20)
        second = generate(wrapped, tok, None, 20)
    assert first.new_ids == second.new_ids == greedy_200.new_ids[:20]
    warnings = [r for r in caplog.records if "recomputing the whole sequence" in r.message]
    assert len(warnings) <= 1  # once per model class and process (0 if an earlier test warned)


# --- a tiny random Hugging Face Llama (past_key_values) --------------------------------------


def test_hf_greedy_with_cache_equals_recompute(tiny_hf_llama):
    tok = CharTokenizer()
    out = generate(tiny_hf_llama, tok, "hello there", max_new_tokens=30)
    assert out.prompt_ids == tok.encode("hello there")
    assert out.new_ids == recompute_greedy(tiny_hf_llama, out.prompt_ids, 30)[12:]


def test_hf_sampling_with_cache_equals_recompute(tiny_hf_llama):
    # a random model is close to uniform: sampled tokens vary, so every position is checked
    tok = CharTokenizer()
    cached = generate(tiny_hf_llama, tok, "hi", 40, temperature=1.0, seed=7)
    recomputed = generate(NoCache(tiny_hf_llama), tok, "hi", 40, temperature=1.0, seed=7)
    assert len(set(cached.new_ids)) > 10
    assert cached.new_ids == recomputed.new_ids


def test_hf_stops_at_max_position_embeddings(tiny_hf_llama):
    out = generate(tiny_hf_llama, CharTokenizer(), "hello", max_new_tokens=100)
    assert len(out.prompt_ids) + len(out.new_ids) == 64


def test_hf_chat_template_is_encoded_without_extra_bos(tiny_hf_llama):
    tok = CharTokenizer(template="<u>{}</u>")
    out = generate(tiny_hf_llama, tok, "hi", max_new_tokens=2)
    assert out.prompt_ids == [ord(c) for c in "<u>hi</u>"]
    assert generate(tiny_hf_llama, tok, "hi", 2, chat=False).prompt_ids == tok.encode("hi")


# --- prompts, sampling and errors -----------------------------------------------------------


def test_prompt_rules():
    tok = CharTokenizer(template="[{}]")
    assert encode_prompt(tok, None) == encode_prompt(tok, "") == encode_prompt(tok, []) == [1]
    assert encode_prompt(tok, [5, 6]) == [5, 6]
    assert encode_prompt(tok, "ab") == [ord("["), 97, 98, ord("]")]
    assert encode_prompt(tok, "ab", chat=False) == [1, 97, 98]
    assert encode_prompt(tok, "ab", chat=False, bos=False) == [97, 98]
    no_bos = CharTokenizer()
    no_bos.bos_id = None
    assert encode_prompt(no_bos, "ab") == [97, 98]
    with pytest.raises(ValueError, match="an empty prompt needs a tokenizer with a BOS token"):
        encode_prompt(no_bos, None)
    with pytest.raises(ValueError, match="bos=True, but the tokenizer has no BOS token"):
        encode_prompt(no_bos, "ab", bos=True)


def test_sample_filters():
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    gen = torch.Generator().manual_seed(0)
    draws = {sample(logits, 1.0, generator=gen) for _ in range(300)}
    assert draws == {0, 1, 2}
    assert {sample(logits, 1.0, top_k=2, generator=gen) for _ in range(300)} == {0, 1}
    assert {sample(logits, 1.0, top_p=0.75, generator=gen) for _ in range(300)} == {0, 1}
    assert {sample(logits, 1.0, top_p=0.45, generator=gen) for _ in range(100)} == {0}
    assert sample(logits) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be an int >= 1, got 0"),
        (
            {"temperature": -0.5},
            "temperature must be a finite number >= 0 (0 means greedy), got -0.5",
        ),
        ({"top_k": 0}, "top_k must be None or an int >= 1, got 0"),
        ({"top_p": 0.0}, "top_p must be None or a number in (0, 1], got 0.0"),
        ({"top_p": 1.5}, "top_p must be None or a number in (0, 1], got 1.5"),
        ({"prompt": [1, 512]}, "prompt ids must be ints in [0, 512), got [512]"),
        (
            {"prompt": [1] * 512},
            "the prompt has 512 tokens but the model's context is 512 tokens; shorten the "
            "prompt to at most 511 tokens to leave room for one new token",
        ),
    ],
)
def test_argument_errors(stories260k, kwargs, message):
    model, tok = stories260k
    kwargs = {"prompt": None, **kwargs}
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        generate(model, tok, **kwargs)


def test_prompt_type_error(stories260k):
    model, tok = stories260k
    with pytest.raises(TypeError, match="prompt must be a str, a list of ids or None, got int"):
        generate(model, tok, 5)
