"""GGUF tokenizer export: tiny tokenizers trained here (byte-level BPE for each llama.cpp
pre-tokenizer the families use, and a Llama 2 style SentencePiece BPE with byte fallback), written
with `add_hf_tokenizer` into a vocabulary-only GGUF file, give exactly the Hugging Face ids in
llama.cpp and detokenize back; special ids, BOS/EOS flags, token types and the chat template
arrive; tokenizers llama.cpp cannot run are refused by name."""

from __future__ import annotations

from itertools import pairwise
from types import SimpleNamespace

import gguf
import llama_cpp
import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, trainers
from tokenizers import pre_tokenizers as pre
from transformers import PreTrainedTokenizerFast

from edgequant.export.gguf_tokenizer import add_hf_tokenizer, gguf_tokenizer_model
from edgequant.models.tokenizer import HFTokenizer

SENTENCES = [
    "Hello world, this is a tiny tokenizer test.",
    "The quick brown fox jumps over the lazy dog!",
    "It's a small world; they'll see we've got 12345 apples and 2024 pears.",
    "héllo wörld, héllo again and again.",
    "line one\nline two\n\n\tindented line\n",
    "    four spaces, then text   and more spaces  ",
    "Zebra quiz: vexing jinx, perky cows? (maybe) [yes] {no} #1 $2 %3 & more",
]
TEXTS = [
    "Hello world",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n\tindented",
    "digits 0 12 345 6789 2024 3.14",
    "héllo wörld 日本",
    "It's they'll we've, Zebra!",
    "tendented héllorld, dorld ovees onees",  # unseen words, split into pieces
]

# The regexes of Qwen2's and Llama 3's tokenizer.json (llama.cpp's "qwen2" and "llama-bpe").
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
)
LLAMA2_TEMPLATE = (
    "{% for m in messages %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]{% endfor %}"
)


def _split(regex: str):
    return pre.Sequence(
        [
            pre.Split(Regex(regex), behavior="isolated"),
            pre.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# A byte-level tokenizer per llama.cpp pre-tokenizer name, shaped like the family's tokenizer.json.
BYTE_LEVEL = {
    "qwen2": dict(  # Qwen2/2.5/3: no BOS, <think> is an added token that is not special
        pre_tokenizer=lambda: _split(QWEN2_SPLIT),
        special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        user_defined=["<think>", "</think>"],
        roles=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
        template=CHATML,
    ),
    "llama-bpe": dict(  # Llama 3: BOS added, ignore_merges
        pre_tokenizer=lambda: _split(LLAMA3_SPLIT),
        special=[
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
        user_defined=[],
        roles=dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", add_bos_token=True),
        template=LLAMA3_TEMPLATE,
        ignore_merges=True,
    ),
    "smollm": dict(  # SmolLM/SmolLM2: digits split one by one, then GPT-2's regex
        pre_tokenizer=lambda: pre.Sequence(
            [
                pre.Digits(individual_digits=True),
                pre.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        ),
        special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        user_defined=[],
        roles=dict(bos_token="<|im_start|>", eos_token="<|im_end|>"),
        template=CHATML,
    ),
    "gpt-2": dict(
        pre_tokenizer=lambda: pre.ByteLevel(add_prefix_space=False, use_regex=True),
        special=["<|endoftext|>"],
        user_defined=[],
        roles=dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>"),
        template=None,
    ),
}


def byte_level_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `SENTENCES` with the family's pre-tokenizer and tokens."""
    family = BYTE_LEVEL[name]
    tk = Tokenizer(models.BPE(ignore_merges=family.get("ignore_merges", False)))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = family["pre_tokenizer"]()
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=family["special"],
        initial_alphabet=pre.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(SENTENCES, trainer)
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in family["user_defined"]])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, chat_template=family["template"], **family["roles"]
    )


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """Llama 2's tokenizer.json shape: <unk> <s> </s>, the 256 byte tokens, then BPE pieces with
    "▁" for spaces, merges listing every split of every piece (as transformers converts a
    SentencePiece model), a Prepend/Replace normalizer, byte fallback, BOS added."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre.Metaspace()  # pieces never cross a space, as in SentencePiece
    trained.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    learned = sorted(trained.get_vocab(), key=trained.get_vocab().get)
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *learned]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = [
        (piece[:cut], piece[cut:])
        for piece in learned
        for cut in range(1, len(piece))
        if piece[:cut] in vocab and piece[cut:] in vocab
    ]
    tk = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tk.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    tk.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tk.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")]
    )
    tk.add_tokens([AddedToken("<tool>", special=False, normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=True,
        chat_template=LLAMA2_TEMPLATE,
    )


def write_vocab_only(path, tokenizer, **kwargs) -> str:
    """A GGUF file holding only the tokenizer: llama.cpp opens it ``vocab_only`` with no
    architecture hyperparameters and no tensors, only ``general.architecture``."""
    writer = gguf.GGUFWriter(str(path), "llama")
    add_hf_tokenizer(writer, tokenizer, **kwargs)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def load_vocab(path: str):
    return llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)


def texts_with_tokens(fast) -> list[str]:
    """`TEXTS`, the training sentences, and texts with every added token inside them."""
    added = sorted(fast.get_added_vocab(), key=fast.get_added_vocab().get)
    mixed = [f"{token}hello world\n{token} x{token}" for token in added]
    return [
        *TEXTS,
        *SENTENCES,
        *mixed,
        "".join(f"{token} text {i}\n" for i, token in enumerate(added)),
    ]


@pytest.fixture(scope="module", params=[*sorted(BYTE_LEVEL), "sentencepiece"])
def written(request, tmp_path_factory):
    """Each tokenizer written to a vocabulary-only GGUF file: ``name``, ``fast`` (transformers),
    ``path``, ``llm`` (llama.cpp) and ``fields`` (the file's metadata)."""
    name = request.param
    if name == "sentencepiece":
        fast, pre_name = sentencepiece_tokenizer(), None
    else:
        fast, pre_name = byte_level_tokenizer(name), name
    path = tmp_path_factory.mktemp("gguf") / "vocab.gguf"
    write_vocab_only(path, HFTokenizer(fast), pre=pre_name)
    return SimpleNamespace(
        name=name,
        fast=fast,
        path=path,
        llm=load_vocab(str(path)),
        fields=gguf.GGUFReader(path).fields,
    )


def _types(fields) -> dict[str, int]:
    tokens = fields["tokenizer.ggml.tokens"].contents()
    return dict(zip(tokens, fields["tokenizer.ggml.token_type"].contents(), strict=True))


# ---- ids ----------------------------------------------------------------------------------------


def test_llama_cpp_gives_the_hf_ids(written):
    fast, llm = written.fast, written.llm
    for text in texts_with_tokens(fast):
        ids = fast(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text


def test_llama_cpp_detokenizes_the_ids_to_the_text(written):
    fast, llm = written.fast, written.llm
    if written.name == "sentencepiece":  # SentencePiece puts a space before the text
        prefix, texts = b" ", TEXTS
        assert "<0xE6>" in fast.convert_ids_to_tokens(fast("日本")["input_ids"])  # byte fallback
    else:
        prefix, texts = b"", texts_with_tokens(fast)
    for text in texts:
        ids = fast(text, add_special_tokens=False)["input_ids"]
        assert llm.detokenize(ids, special=True) == prefix + text.encode(), text


def test_bos_and_eos_are_added_as_the_hf_tokenizer_adds_them(written):
    for text in TEXTS:
        ids = written.fast(text)["input_ids"]
        assert written.llm.tokenize(text.encode(), add_bos=True) == ids, text


@pytest.mark.parametrize("written", sorted(BYTE_LEVEL), indirect=True)
def test_byte_level_file_reads_back_as_the_same_tokenizer(written):
    """edgequant reads a GGUF tokenizer with transformers (`HFTokenizer.from_gguf`). (Not for
    the SentencePiece one: transformers rebuilds it with a Metaspace pre-tokenizer, which differs
    from Llama 2's tokenizer.json on text starting with spaces and after special tokens.)"""
    back = HFTokenizer.from_gguf(written.path).tok
    for text in texts_with_tokens(written.fast):
        assert back(text)["input_ids"] == written.fast(text)["input_ids"], text
    assert (back.bos_token_id, back.eos_token_id) == (
        written.fast.bos_token_id,
        written.fast.eos_token_id,
    )
    assert back.chat_template == written.fast.chat_template


# ---- metadata -----------------------------------------------------------------------------------


def test_special_ids_and_chat_template_arrive(written):
    fast, llm, meta = written.fast, written.llm, written.llm.metadata
    if fast.bos_token_id is None:  # Qwen2 has no BOS: no key (llama.cpp then reports id 11)
        assert "tokenizer.ggml.bos_token_id" not in meta
    else:
        assert llm.token_bos() == fast.bos_token_id
    assert llm.token_eos() == fast.eos_token_id
    assert llm.n_vocab() == len(fast)
    assert meta.get("tokenizer.chat_template") == fast.chat_template
    if fast.pad_token_id is not None:
        assert int(meta["tokenizer.ggml.padding_token_id"]) == fast.pad_token_id


@pytest.mark.parametrize("written", sorted(BYTE_LEVEL), indirect=True)
def test_byte_level_token_types_and_pre_tokenizer_name(written):
    fields, types = written.fields, _types(written.fields)
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == written.name
    assert "tokenizer.ggml.scores" not in fields
    assert types["\u0120"] == gguf.TokenType.NORMAL  # "Ġ", the byte-level space
    for token in BYTE_LEVEL[written.name]["special"]:
        assert types[token] == gguf.TokenType.CONTROL, token
    for token in BYTE_LEVEL[written.name]["user_defined"]:
        assert types[token] == gguf.TokenType.USER_DEFINED, token


@pytest.mark.parametrize("written", ["sentencepiece"], indirect=True)
def test_sentencepiece_token_types_and_scores(written):
    fields, types = written.fields, _types(written.fields)
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert "tokenizer.ggml.pre" not in fields
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is True
    assert [types[t] for t in ("<unk>", "<s>", "</s>", "<tool>", "<0x00>", "<0xFF>")] == [
        gguf.TokenType.UNKNOWN,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
        gguf.TokenType.USER_DEFINED,
        gguf.TokenType.BYTE,
        gguf.TokenType.BYTE,
    ]
    # llama.cpp joins the pair making the best-scored token first: as SentencePiece, every
    # piece longer than a character scores below the pieces learned before it
    tokens = fields["tokenizer.ggml.tokens"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    pieces = [i for i, t in enumerate(tokens) if types[t] == gguf.TokenType.NORMAL and len(t) > 1]
    assert [i for i, score in enumerate(scores) if score != 0.0] == pieces
    assert scores[pieces[0]] == -1.0
    assert all(scores[a] > scores[b] for a, b in pairwise(pieces))


def test_vocab_size_pads_with_unused_tokens(tmp_path):
    fast = byte_level_tokenizer("qwen2")
    path = write_vocab_only(tmp_path / "padded.gguf", fast, pre="qwen2", vocab_size=len(fast) + 3)
    fields = gguf.GGUFReader(path).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    n = len(fast)
    assert tokens[n:] == [f"[PAD{n}]", f"[PAD{n + 1}]", f"[PAD{n + 2}]"]
    assert fields["tokenizer.ggml.token_type"].contents()[n:] == [gguf.TokenType.UNUSED] * 3
    llm = load_vocab(path)
    assert llm.n_vocab() == n + 3
    assert llm.tokenize(b"Hello world", add_bos=False) == fast("Hello world")["input_ids"]


def test_pre_tokenizer_defaults_to_default_with_a_warning(tmp_path, caplog):
    path = write_vocab_only(tmp_path / "default.gguf", byte_level_tokenizer("gpt-2"))
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "default"
    assert "no pre= given for a byte-level tokenizer" in caplog.text


# ---- refusals -----------------------------------------------------------------------------------

SUPPORTED_TEXT = (
    "BPE with a ByteLevel pre-tokenizer (llama.cpp 'gpt2': Qwen2/2.5/3, SmolLM, Llama 3); "
    "BPE with byte_fallback and '\u2581' for spaces (llama.cpp 'llama': Llama 2)"
)


@pytest.mark.parametrize(
    "model",
    [
        models.Unigram([("<unk>", 0.0), ("a", -1.0)], unk_id=0),
        models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"),
    ],
    ids=["Unigram", "WordPiece"],
)
def test_unsupported_tokenizer_type_is_refused(tmp_path, model):
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(model))
    kind = type(model).__name__
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    with pytest.raises(ValueError) as e:
        add_hf_tokenizer(writer, HFTokenizer(fast))
    assert str(e.value) == (
        f"cannot write a {kind} tokenizer to GGUF: llama.cpp's tokenizers are supported for "
        + SUPPORTED_TEXT
    )


def test_bpe_without_byte_level_or_byte_fallback_is_refused():
    tk = Tokenizer(models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")]))
    tk.pre_tokenizer = pre.Whitespace()
    with pytest.raises(ValueError) as e:
        gguf_tokenizer_model(PreTrainedTokenizerFast(tokenizer_object=tk))
    assert str(e.value) == (
        "cannot write this BPE tokenizer to GGUF: it has neither a ByteLevel pre-tokenizer nor "
        "byte_fallback / a Metaspace '\u2581'; llama.cpp's tokenizers are supported for "
        + SUPPORTED_TEXT
    )


def test_other_objects_and_short_vocab_size_are_refused(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    with pytest.raises(TypeError) as e:
        add_hf_tokenizer(writer, object())
    assert str(e.value) == (
        "expected edgequant's HFTokenizer or a transformers fast tokenizer (one with a "
        "backend_tokenizer), got object"
    )
    fast = byte_level_tokenizer("gpt-2")
    with pytest.raises(ValueError) as e:
        add_hf_tokenizer(writer, fast, pre="gpt-2", vocab_size=10)
    n = len(fast)
    assert str(e.value) == (
        f"vocab_size=10 is smaller than the tokenizer, whose ids go up to {n - 1}; pass the "
        f"model's embedding rows (at least {n})"
    )
