"""Numbers from the real llama2.c stories260K model (see /work/shared/data/README.md)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgequant import data
from edgequant.models import llama2c

REFERENCE_START = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
    " One day, she saw a big, red ball."
)
PASSAGE = (
    "Once upon a time, there was a little boy named Tim. He had a big dog named Max. "
    "They liked to play in the garden every day."
)
CHECKPOINT_BYTES = 1_056_540  # stories260K.bin, from the data README


def perplexity(model: llama2c.Transformer, ids: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids]))  # [1, T, vocab]
    return float(torch.exp(F.cross_entropy(logits[0, :-1], torch.tensor(ids[1:]))))


def test_greedy_decoding_matches_reference_text(stories260k):
    model, tok = stories260k
    ids = llama2c.generate(model, [tok.bos_id], max_new_tokens=200)
    assert len(ids) == 201
    assert tok.decode(ids).startswith(REFERENCE_START)


def test_perplexity_on_tinystories_passage(stories260k):
    model, tok = stories260k
    assert perplexity(model, tok.encode(PASSAGE)) < 4.0  # README: about 2.5 on TinyStories


def test_embedding_is_tied(stories260k):
    model, _ = stories260k
    assert model.args.tied_embedding
    assert model.output.weight is model.tok_embeddings.weight


def test_model_is_float32_eval(stories260k):
    model, _ = stories260k
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.edgequant_family == "llama2c"


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        'Lily said, "Can I play?" and ran; Tom: no...',
        "naïve café, 你好 😀",  # byte fallback for the CJK and emoji
        "two  spaces\ttab\nnewline",
        "",
    ],
)
def test_tokenizer_round_trip(stories260k, text):
    _, tok = stories260k
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id
    assert tok.decode(ids) == text


def test_tokenizer_byte_fallback_ids(stories260k):
    _, tok = stories260k
    # "你" is not in the 512-token vocabulary: its UTF-8 bytes e4 bd a0 become ids byte + 3
    assert tok.encode("你", bos=False) == [
        tok.encode(" ", bos=False)[0],
        0xE4 + 3,
        0xBD + 3,
        0xA0 + 3,
    ]
    assert tok.encode("a", bos=False, eos=True)[-1] == tok.eos_id
    assert tok.vocab_size == 512


def test_tokenizer_matches_sentencepiece(stories260k):
    import sentencepiece as spm

    _, tok = stories260k
    sp = spm.SentencePieceProcessor(model_file=str(data.stories260k_dir() / "tok512.model"))
    # sentencepiece also collapses runs of spaces; llama2.c (and this encoder) keeps them
    for text in [REFERENCE_START, PASSAGE, "Tom's cat, 42 naïve 你好!\nBye."]:
        assert tok.encode(text) == sp.encode(text, add_bos=True)


def test_truncated_checkpoint_states_expected_and_actual_bytes(stories260k, tmp_path):
    real = data.stories260k_dir() / "stories260K.bin"
    short = tmp_path / "short.bin"
    short.write_bytes(real.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"expected {CHECKPOINT_BYTES} bytes.*got 1000 bytes"):
        llama2c.load_checkpoint(short)
    long = tmp_path / "long.bin"
    long.write_bytes(real.read_bytes() + b"\0" * 4)
    with pytest.raises(ValueError, match=f"expected {CHECKPOINT_BYTES} bytes.*got 1056544 bytes"):
        llama2c.load_checkpoint(long)


def test_missing_checkpoint_names_path(tmp_path):
    missing = tmp_path / "nope.bin"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        llama2c.load_checkpoint(missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        llama2c.Tokenizer(missing)


def test_untied_checkpoint_gives_same_logits(stories260k, tmp_path):
    model, tok = stories260k
    raw = bytearray((data.stories260k_dir() / "stories260K.bin").read_bytes())
    raw[20:24] = np.int32(-512).tobytes()  # negative vocab_size: a classifier follows at the end
    embedding = model.tok_embeddings.weight.detach().numpy().astype("<f4").tobytes()
    path = tmp_path / "untied.bin"
    path.write_bytes(bytes(raw) + embedding)
    untied = llama2c.load_checkpoint(path)
    assert not untied.args.tied_embedding
    assert untied.output.weight is not untied.tok_embeddings.weight
    ids = torch.tensor([tok.encode(PASSAGE)])
    with torch.no_grad():
        torch.testing.assert_close(untied(ids), model(ids), rtol=0, atol=0)


def test_build_from_config_then_load_state_dict_gives_identical_logits(stories260k):
    model, tok = stories260k
    rebuilt = llama2c.build(model.edgequant_config())
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    assert rebuilt.output.weight is rebuilt.tok_embeddings.weight
    ids = torch.tensor([tok.encode(PASSAGE)])
    with torch.no_grad():
        assert torch.equal(rebuilt(ids), model(ids))


def test_model_args_from_dict_rejects_unknown_key():
    config = llama2c.ModelArgs(64, 172, 5, 8, 4, 512, 512).to_dict()
    assert llama2c.ModelArgs.from_dict(config).to_dict() == config
    with pytest.raises(ValueError, match=r"unknown ModelArgs key\(s\) \['n_embd'\].*allowed"):
        llama2c.ModelArgs.from_dict({**config, "n_embd": 64})
    with pytest.raises(ValueError, match="n_kv_heads"):
        llama2c.ModelArgs(64, 172, 5, 8, 3, 512, 512)


def test_data_dir_env_var_pointing_nowhere(monkeypatch, tmp_path):
    nowhere = tmp_path / "no-such-folder"
    monkeypatch.setenv("EDGEQUANT_DATA_DIR", str(nowhere))
    with pytest.raises(FileNotFoundError, match=re.escape(str(nowhere))):
        data.data_dir()


def test_kv_cache_decoding_equals_full_recompute(stories260k):
    model, tok = stories260k
    prompt = tok.encode(PASSAGE)
    seq = llama2c.generate(model, prompt, max_new_tokens=40)  # prompt + 40 greedy tokens
    with torch.no_grad():
        full = model(torch.tensor([seq]))  # [1, P + 40, vocab]
        cache = model.new_cache(batch=1)
        steps = [model(torch.tensor([prompt]), start_pos=0, cache=cache)]  # prefill
        for pos in range(len(prompt), len(seq)):  # then one token at a time
            steps.append(model(torch.tensor([seq[pos : pos + 1]]), start_pos=pos, cache=cache))
    cached = torch.cat(steps, dim=1)
    assert [s.shape[1] for s in steps] == [len(prompt)] + [1] * 40
    assert (cached - full).abs().max() < 1e-4


def test_kv_cache_batch_and_chunks(stories260k):
    model, tok = stories260k
    ids = torch.tensor([tok.encode(PASSAGE)[:24], tok.encode(REFERENCE_START)[:24]])  # [2, 24]
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch=2, max_len=24)
        chunks = [model(ids[:, a:b], start_pos=a, cache=cache) for a, b in [(0, 10), (10, 24)]]
    assert (torch.cat(chunks, dim=1) - full).abs().max() < 1e-4


def test_kv_cache_errors(stories260k):
    model, _ = stories260k
    cache = model.new_cache(batch=1, max_len=8)
    assert cache.k.shape == (5, 1, 4, 8, 8) and cache.max_len == 8
    with pytest.raises(ValueError, match=r"start_pos \+ seq <= 8 \(the cache max_len\)"):
        model(torch.ones(1, 4, dtype=torch.long), start_pos=6, cache=cache)
    with pytest.raises(ValueError, match="the cache holds batch 1, got batch 2"):
        model(torch.ones(2, 1, dtype=torch.long), start_pos=0, cache=cache)
    with pytest.raises(ValueError, match=r"start_pos=3 needs a cache \(model.new_cache\(\)\)"):
        model(torch.ones(1, 1, dtype=torch.long), start_pos=3)
    with pytest.raises(ValueError, match=r"max_len must be in \[1, max_seq_len=512\], got 513"):
        model.new_cache(max_len=513)


def test_tokenizer_has_no_chat_template(stories260k):
    _, tok = stories260k
    assert tok.chat_prompt("Tell me a story.") is None


def test_tokenizer_save_writes_the_file_as_read(stories260k, tmp_path):
    _, tok = stories260k
    assert tok.save(tmp_path / "tok") == ["tok512.bin"]
    saved = (tmp_path / "tok" / "tok512.bin").read_bytes()
    assert saved == (data.stories260k_dir() / "tok512.bin").read_bytes()
    assert llama2c.Tokenizer(tmp_path / "tok" / "tok512.bin").encode(PASSAGE) == tok.encode(PASSAGE)
