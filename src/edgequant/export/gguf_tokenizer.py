"""A Hugging Face tokenizer written into a GGUF file as the ``tokenizer.*`` keys llama.cpp reads.

`add_hf_tokenizer` takes a transformers fast tokenizer (or edgequant's `HFTokenizer` around one)
and adds to a ``gguf.GGUFWriter`` its tokens, token types, merges, special token ids, whether
BOS/EOS are added, and its chat template. The ``tokenizer.json`` model decides which of
llama.cpp's tokenizers it becomes (`gguf_tokenizer_model`):

=================================================  ===========  ===============================
tokenizer.json                                     llama.cpp    families
=================================================  ===========  ===============================
BPE with a ``ByteLevel`` pre-tokenizer (GPT-2)     ``gpt2``     Qwen2/2.5/3, SmolLM, Llama 3
BPE with ``byte_fallback``, "\u2581" for spaces    ``llama``    Llama 2, TinyLlama
=================================================  ===========  ===============================

Anything else (Unigram, WordPiece, a BPE with neither) is refused.

``gpt2``: llama.cpp cuts the text into words with a regex it picks by name from
``tokenizer.ggml.pre``, then applies the merges by rank. Only the model family knows the name
(``"qwen2"``, ``"smollm"``, ``"llama-bpe"``, ...), so the caller passes it; llama.cpp refuses a
name it does not know when it loads the file.

``llama``: llama.cpp's SentencePiece tokenizer merges by token score, not by merge rank: it
repeatedly joins the adjacent pair whose concatenation is the best-scored token. Each token's
score here is minus the rank of the first merge that makes it, which reproduces Hugging Face's
order when the merges list every split of every token, as tokenizers converted from
SentencePiece (Llama 2's) do; a warning says when they do not.

The other sources `edgequant.export.gguf.to_gguf` takes: `copy_tokenizer` (every ``tokenizer.*``
key of a GGUF file, as it is) and `add_llama2c_tokenizer` (llama2.c's ``tok*.bin``).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import gguf

log = logging.getLogger(__name__)

# What `gguf_tokenizer_model` accepts, for error messages.
SUPPORTED = (
    "BPE with a ByteLevel pre-tokenizer (llama.cpp 'gpt2': Qwen2/2.5/3, SmolLM, Llama 3)",
    "BPE with byte_fallback and '\u2581' for spaces (llama.cpp 'llama': Llama 2)",
)

_SPACE = "\u2581"  # SentencePiece's visible space
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def add_hf_tokenizer(
    writer: gguf.GGUFWriter,
    tokenizer: Any,
    *,
    pre: str | None = None,
    vocab_size: int | None = None,
) -> None:
    """Add every ``tokenizer.*`` key llama.cpp needs for ``tokenizer`` to ``writer``.

    ``tokenizer`` is an `edgequant.models.tokenizer.HFTokenizer` or a transformers fast
    tokenizer. ``pre`` is llama.cpp's pre-tokenizer name for a byte-level (``gpt2``) tokenizer,
    e.g. ``"qwen2"`` (Qwen2/2.5/3), ``"smollm"``, ``"llama-bpe"`` (Llama 3), ``"gpt-2"``; when
    it is not given, ``"default"`` is written (with a warning: llama.cpp's default regex splits
    words unlike most tokenizers). A SentencePiece-style (``llama``) tokenizer has no
    pre-tokenizer in llama.cpp, and ``pre`` is ignored for it. ``vocab_size`` pads the token
    list with unused ``[PAD<id>]`` tokens to the model's embedding rows, which llama.cpp
    requires to match (Qwen2.5's embedding has more rows than its tokenizer has tokens).

    Token types: ``CONTROL`` for special added tokens, ``USER_DEFINED`` for the other added
    tokens (llama.cpp always matches those whole), ``BYTE`` for ``<0xXX>`` in a ``llama``
    vocabulary, ``UNKNOWN`` for the unknown token, ``NORMAL`` for the rest. A special id (BOS,
    EOS, unknown, padding) is written when the tokenizer has it; ``add_bos`` / ``add_eos`` say
    what the tokenizer adds around a text (its post-processor).

    Example (``writer`` is a ``gguf.GGUFWriter``, ``tok`` an `HFTokenizer` of Qwen2.5)::

        add_hf_tokenizer(writer, tok, pre="qwen2", vocab_size=151936)

    Raises ``TypeError`` for an object that is not such a tokenizer, ``ValueError`` for a
    tokenizer llama.cpp cannot run (see `SUPPORTED`) or a ``vocab_size`` below its token count.
    """
    import gguf

    fast = _fast(tokenizer)
    spec = json.loads(fast.backend_tokenizer.to_str())
    kind = _kind(spec)
    tokens, types = _vocabulary(fast, kind, vocab_size)
    merges = _merges(spec)

    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        if pre is None:
            log.warning(
                "no pre= given for a byte-level tokenizer: writing llama.cpp's 'default' "
                "pre-tokenizer, which splits words unlike most models; pass the family's name "
                "(e.g. 'qwen2', 'smollm', 'llama-bpe')"
            )
            pre = "default"
        writer.add_tokenizer_pre(pre)
        if _byte_level_adds_prefix_space(spec):
            log.warning(
                "the tokenizer's ByteLevel pre-tokenizer adds a space before the text; "
                "llama.cpp's 'gpt2' tokenizer does not, so the first word may tokenize differently"
            )
    else:
        if pre is not None:
            log.info(
                "pre=%r ignored: llama.cpp's SentencePiece tokenizer has no pre-tokenizer", pre
            )
        writer.add_token_scores(_scores(tokens, types, merges))
        writer.add_add_space_prefix(_adds_space_prefix(spec))
        if any(p.get("type") == "Metaspace" for p in _component_types(spec.get("pre_tokenizer"))):
            log.warning(
                "the tokenizer's Metaspace pre-tokenizer adds no '\u2581' before a text that "
                "starts with a space (nor, with prepend_scheme='first', after a special token); "
                "llama.cpp's SentencePiece tokenizer does, so such texts tokenize differently"
            )
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([_merge_string(left, right) for left, right in merges])

    for name in ("bos", "eos", "unk", "pad"):
        token_id = getattr(fast, f"{name}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(int(token_id))
    add_bos, add_eos = _added_around_text(fast)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)

    template = getattr(fast, "chat_template", None)
    if isinstance(template, dict):  # named templates; gguf writes "default" as the main one
        template = [{"name": name, "template": text} for name, text in template.items()]
    if template:
        writer.add_chat_template(template)
    log.debug(
        "tokenizer: %s, %d tokens (%d control), %d merges",
        kind,
        len(tokens),
        sum(t == gguf.TokenType.CONTROL for t in types),
        len(merges),
    )


def gguf_tokenizer_model(tokenizer: Any) -> str:
    """llama.cpp's ``tokenizer.ggml.model`` for ``tokenizer``: ``"gpt2"`` (byte-level BPE) or
    ``"llama"`` (SentencePiece-style BPE); ``ValueError`` for any other tokenizer.

    Example: a Qwen2.5 or Llama 3 tokenizer gives ``"gpt2"``, a Llama 2 one ``"llama"``."""
    return _kind(json.loads(_fast(tokenizer).backend_tokenizer.to_str()))


# ---- reading the tokenizer ---------------------------------------------------------------------


def _fast(tokenizer: Any) -> Any:
    """The transformers fast tokenizer in ``tokenizer`` (an `HFTokenizer` holds it as ``.tok``)."""
    fast = getattr(tokenizer, "tok", tokenizer)
    if getattr(fast, "backend_tokenizer", None) is None:
        raise TypeError(
            "expected edgequant's HFTokenizer or a transformers fast tokenizer (one with a "
            f"backend_tokenizer), got {type(tokenizer).__name__}"
        )
    return fast


def _component_types(component: dict | None) -> list[dict]:
    """``component`` (a normalizer, pre-tokenizer, ... of tokenizer.json) and the members of any
    ``Sequence`` inside it, flattened."""
    if not component:
        return []
    members = component.get("pretokenizers") or component.get("normalizers")
    if component.get("type") == "Sequence" and members is not None:
        return [part for member in members for part in _component_types(member)]
    return [component]


def _kind(spec: dict) -> str:
    model = spec.get("model") or {}
    model_type = model.get("type")
    supported = "; ".join(SUPPORTED)
    if model_type != "BPE":
        raise ValueError(
            f"cannot write a {model_type} tokenizer to GGUF: llama.cpp's tokenizers are "
            f"supported for {supported}"
        )
    pre = [part.get("type") for part in _component_types(spec.get("pre_tokenizer"))]
    if "ByteLevel" in pre:
        return "gpt2"
    if model.get("byte_fallback") or "Metaspace" in pre or _adds_space_prefix(spec):
        return "llama"
    raise ValueError(
        "cannot write this BPE tokenizer to GGUF: it has neither a ByteLevel pre-tokenizer nor "
        f"byte_fallback / a Metaspace '{_SPACE}'; llama.cpp's tokenizers are supported for "
        f"{supported}"
    )


def _vocabulary(fast: Any, kind: str, vocab_size: int | None) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types by id, padded to ``vocab_size``."""
    import gguf

    backend = fast.backend_tokenizer
    ids = backend.get_vocab(with_added_tokens=True)
    added = backend.get_added_tokens_decoder()  # id -> AddedToken
    count = max(ids.values()) + 1
    if vocab_size is not None:
        if vocab_size < count:
            raise ValueError(
                f"vocab_size={vocab_size} is smaller than the tokenizer, whose ids go up to "
                f"{count - 1}; pass the model's embedding rows (at least {count})"
            )
        count = vocab_size
    text = {i: token for token, i in ids.items()}
    unk = getattr(fast, "unk_token_id", None)
    tokens: list[str] = []
    types: list[int] = []
    for i in range(count):
        token = text.get(i)
        if token is None:  # a hole in the tokenizer's ids, or padding up to vocab_size
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(token)
        if i == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif kind == "llama" and _BYTE_TOKEN.fullmatch(token):
            types.append(gguf.TokenType.BYTE)
        elif i in added:
            special = added[i].special
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    twice = sorted(token for token, n in Counter(tokens).items() if n > 1)
    if twice:
        raise ValueError(
            f"llama.cpp needs every token string once; these appear twice: {twice[:5]}"
        )
    return tokens, [int(t) for t in types]


def _merges(spec: dict) -> list[tuple[str, str]]:
    """The BPE merges of tokenizer.json, best first, as ``(left, right)``."""
    pairs = []
    for merge in spec["model"].get("merges") or []:
        if isinstance(merge, str):  # the format before tokenizers 0.20: "left right"
            left, _, right = merge.partition(" ")
        else:
            left, right = merge
        pairs.append((left, right))
    return pairs


def _merge_string(left: str, right: str) -> str:
    """llama.cpp's ``"left right"``: it splits at the first space after the first character."""
    if " " in left[1:] or " " in right:
        raise ValueError(
            f"the merge {left!r} + {right!r} has a space inside a token, which llama.cpp's "
            "'left right' merge strings cannot hold"
        )
    return f"{left} {right}"


def _scores(tokens: list[str], types: list[int], merges: list[tuple[str, str]]) -> list[float]:
    """llama.cpp's SentencePiece scores: ``-(rank + 1)`` of the first merge that makes a token,
    0 for tokens no merge makes (characters, bytes, special tokens)."""
    index = {token: i for i, token in enumerate(tokens)}
    scores = [0.0] * len(tokens)
    made: set[int] = set()
    for rank, (left, right) in enumerate(merges):
        i = index.get(left + right)
        if i is not None and i not in made:
            scores[i] = -float(rank + 1)
            made.add(i)
    _warn_unlisted_splits(tokens, types, index, set(merges))
    return scores


def _warn_unlisted_splits(
    tokens: list[str], types: list[int], index: dict[str, int], listed: set[tuple[str, str]]
) -> None:
    """llama.cpp's SentencePiece tokenizer joins any two adjacent tokens that make a token;
    Hugging Face only joins the pairs its merges list. Warn when the two can differ."""
    import gguf

    unlisted = [
        (token, token[:cut], token[cut:])
        for token, kind in zip(tokens, types, strict=True)
        if kind == gguf.TokenType.NORMAL
        for cut in range(1, len(token))
        if token[:cut] in index
        and token[cut:] in index
        and (token[:cut], token[cut:]) not in listed
    ]
    if unlisted:
        token, left, right = unlisted[0]
        log.warning(
            "%d ways to make a token from two tokens are not in the merges (e.g. %r = %r + %r); "
            "llama.cpp's SentencePiece tokenizer joins any such pair, so it may split some words "
            "unlike the Hugging Face tokenizer",
            len(unlisted),
            token,
            left,
            right,
        )


def _adds_space_prefix(spec: dict) -> bool:
    """Whether a SentencePiece-style tokenizer puts "\u2581" before the text: a ``Prepend``
    normalizer (Llama 2's tokenizer.json) or a ``Metaspace`` pre-tokenizer that prepends."""
    for part in _component_types(spec.get("normalizer")):
        if part.get("type") == "Prepend" and part.get("prepend") == _SPACE:
            return True
    for part in _component_types(spec.get("pre_tokenizer")):
        if part.get("type") == "Metaspace":
            scheme = part.get("prepend_scheme")
            return scheme in ("always", "first") if scheme else bool(part.get("add_prefix_space"))
    return False


def _byte_level_adds_prefix_space(spec: dict) -> bool:
    return any(
        part.get("type") == "ByteLevel" and part.get("add_prefix_space")
        for part in _component_types(spec.get("pre_tokenizer"))
    )


def _added_around_text(fast: Any) -> tuple[bool, bool]:
    """``(add_bos, add_eos)``: whether the tokenizer puts BOS before / EOS after a text when it
    adds special tokens (as its post-processor says; transformers' ``add_bos_token`` sets it)."""
    plain = fast("a", add_special_tokens=False)["input_ids"]
    full = fast("a", add_special_tokens=True)["input_ids"]
    bos, eos = fast.bos_token_id, fast.eos_token_id
    add_bos = bos is not None and full[:1] == [bos] and plain[:1] != [bos]
    add_eos = eos is not None and full[-1:] == [eos] and plain[-1:] != [eos]
    if len(full) - len(plain) != add_bos + add_eos:
        log.warning(
            "the tokenizer adds %s around a text; llama.cpp can only add BOS and EOS (writing "
            "add_bos=%s, add_eos=%s)",
            fast.convert_ids_to_tokens(full),
            add_bos,
            add_eos,
        )
    return add_bos, add_eos


# ---- other sources: a GGUF file, a llama2.c tokenizer ----------------------------------------


def copy_tokenizer(writer, source: str | Path) -> None:
    """Every ``tokenizer.*`` key of the GGUF file ``source``, as it is there."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    copied = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), vtype)
        copied += 1
    if copied == 0:
        raise ValueError(f"{str(source)!r} holds no tokenizer (no tokenizer.* metadata)")


def add_llama2c_tokenizer(writer, tokenizer) -> None:
    """llama2.c's sentencepiece-style vocabulary as llama.cpp's ``llama`` (SPM) tokenizer."""
    import gguf

    tokens, types = [], []
    for i, piece in enumerate(tokenizer.pieces):
        if i == 0:
            tokens.append("<unk>")
            types.append(gguf.TokenType.UNKNOWN)
        elif i in (tokenizer.bos_id, tokenizer.eos_id):
            tokens.append("<s>" if i == tokenizer.bos_id else "</s>")
            types.append(gguf.TokenType.CONTROL)
        elif tokenizer._BYTE_PIECE.fullmatch(piece):
            tokens.append(piece.decode())
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(piece.decode("utf-8", errors="replace").replace(" ", "\u2581"))
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([float(s) for s in tokenizer.scores])
    writer.add_token_types(types)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
