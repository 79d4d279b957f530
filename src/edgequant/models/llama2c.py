"""Llama as trained by Karpathy's llama2.c, in one readable file.

Holds the model (``ModelArgs``, ``Transformer``, with an optional static ``KVCache``), a reader
for llama2.c's legacy version-0 ``.bin`` checkpoints (``load_checkpoint``), its ``tok*.bin``
tokenizer (``Tokenizer``), ``load`` for both, and greedy decoding without a cache (``generate``,
the reference; `edgequant.generate` is the cached, sampling one). q/k rows use the Hugging Face
"rotate half" RoPE order.

Example (the tinyllamas model from the shared data folder)::

    >>> from edgequant.data import stories260k_dir
    >>> model, tok = load(stories260k_dir())
    >>> tok.decode(generate(model, [tok.bos_id], max_new_tokens=30))[:26]
    'Once upon a time, there wa'
"""

from __future__ import annotations

import heapq
import logging
import math
import re
import struct
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelArgs:
    """Shape of a llama2.c model: the seven ``.bin`` header ints plus constants llama2.c fixes.

    >>> ModelArgs(64, 172, 5, 8, 4, 512, 512).head_dim
    8
    """

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    max_seq_len: int
    norm_eps: float = 1e-5  # hard-coded in llama2.c's rmsnorm()
    rope_theta: float = 10000.0  # hard-coded in llama2.c's RoPE
    tied_embedding: bool = True  # the .bin header says so with a positive vocab_size

    def __post_init__(self) -> None:
        for f in fields(self)[:7]:
            value = getattr(self, f.name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelArgs.{f.name} must be a positive int, got {value!r}")
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads or self.head_dim % 2:
            raise ValueError(
                f"need dim % n_heads == 0, n_heads % n_kv_heads == 0 and an even head_dim; got "
                f"dim={self.dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        """Plain dict of all fields (JSON-friendly); ``from_dict`` inverts it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        """Build from a dict such as ``to_dict()`` returns; unknown keys raise ``ValueError``."""
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"unknown ModelArgs key(s) {unknown}; allowed keys: {allowed}")
        missing = [f.name for f in fields(cls)[:7] if f.name not in d]
        if missing:
            raise ValueError(f"ModelArgs dict lacks required key(s) {missing}")
        return cls(**d)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_cos_sin(
    seq_len: int,
    head_dim: int,
    theta: float,
    device: torch.device | None = None,
    start: int = 0,
) -> tuple[Tensor, Tensor]:
    """cos and sin tables ``[seq_len, head_dim]`` for rotate-half RoPE (float32), for the
    positions ``start, ..., start + seq_len - 1``."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    positions = torch.arange(start, start + seq_len, device=device).float()  # [T]
    angles = torch.outer(positions, inv_freq)  # [T, D/2]
    angles = torch.cat([angles, angles], dim=-1)  # [T, D]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, H, T, D]``: pairs are (i, i + D/2), the Hugging Face convention."""
    x1, x2 = x.chunk(2, dim=-1)  # [B, H, T, D/2] each
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Static keys and values of every layer, for decoding one token at a time.

    ``k`` and ``v`` are ``[n_layers, batch, n_kv_heads, max_len, head_dim]``, allocated once
    (`Transformer.new_cache`); ``model(tokens, start_pos=pos, cache=cache)`` writes the new
    tokens' keys and values at positions ``pos, ..., pos + T - 1``. Keys are stored after RoPE
    and before the grouped-query repeat. Not an ``nn.Module``: the cache is never saved.
    """

    def __init__(
        self, args: ModelArgs, batch: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (args.n_layers, batch, args.n_kv_heads, max_len, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, KV, S, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, KV, S, D]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        """Views ``([B, KV, S, D], [B, KV, S, D])`` of layer ``i``'s keys and values."""
        return self.k[i], self.v[i]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        kv_cache: tuple[Tensor, Tensor] | None = None,
        start_pos: int = 0,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Without ``kv_cache``: causal attention within ``x``. With it (this layer's
        ``[B, KV, S, D]`` keys and values): store the new keys and values at ``start_pos`` and
        attend over positions ``0 .. start_pos + T - 1`` under ``mask`` ``[T, start_pos + T]``."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, T, D]
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k_cache, v_cache = kv_cache  # [B, KV, S, D] each
            end = start_pos + T
            k_cache[:, :, start_pos:end] = k
            v_cache[:, :, start_pos:end] = v
            k, v = k_cache[:, :, :end], v_cache[:, :, :end]  # [B, KV, end, D]
        n_rep = self.n_heads // self.n_kv_heads  # grouped-query attention: share each kv head
        k = k.repeat_interleave(n_rep, dim=1)  # [B, H, T or end, D]
        v = v.repeat_interleave(n_rep, dim=1)  # [B, H, T or end, D]
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, D]
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, T, D]
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # [B, T, H * D]
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        kv_cache: tuple[Tensor, Tensor] | None = None,
        start_pos: int = 0,
        mask: Tensor | None = None,
    ) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, kv_cache, start_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Decoder-only Llama: ``forward(tokens [B, T]) -> logits [B, T, vocab]``.

    Incremental decoding with a static KV cache: ``cache = model.new_cache(batch=1)``, then
    ``model(prompt, start_pos=0, cache=cache)`` (prefill) and ``model(next_token,
    start_pos=len(prompt), cache=cache)`` and so on; each call returns the logits of its new
    tokens only, equal (up to float rounding) to the matching rows of a full recompute. Call it
    under ``torch.inference_mode()`` or ``torch.no_grad()``.
    """

    edgequant_family = "llama2c"

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tied_embedding:
            self.output.weight = self.tok_embeddings.weight

    def edgequant_config(self) -> dict:
        """The ``ModelArgs`` as a dict; ``build(model.edgequant_config())`` rebuilds the shape."""
        return self.args.to_dict()

    def new_cache(
        self,
        batch: int = 1,
        max_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """An empty `KVCache` for ``batch`` sequences of up to ``max_len`` tokens (default
        ``args.max_seq_len``), in the dtype and on the device of the model's norm weights."""
        max_len = self.args.max_seq_len if max_len is None else max_len
        if not 1 <= max_len <= self.args.max_seq_len:
            raise ValueError(
                f"max_len must be in [1, max_seq_len={self.args.max_seq_len}], got {max_len}"
            )
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        weight = self.norm.weight  # never quantized: the model's float dtype and device
        return KVCache(self.args, batch, max_len, dtype or weight.dtype, device or weight.device)

    def forward(self, tokens: Tensor, start_pos: int = 0, cache: KVCache | None = None) -> Tensor:
        """Logits ``[B, T, vocab]`` of ``tokens [B, T]``, the tokens at positions
        ``start_pos .. start_pos + T - 1``; without a ``cache`` they must be the whole sequence
        (``start_pos`` 0)."""
        limit = self.args.max_seq_len if cache is None else cache.max_len
        if tokens.dim() != 2 or start_pos < 0 or start_pos + tokens.shape[1] > limit:
            raise ValueError(
                f"tokens must be [batch, seq] with start_pos + seq <= {limit} "
                f"({'max_seq_len' if cache is None else 'the cache max_len'}), got shape "
                f"{tuple(tokens.shape)} at start_pos={start_pos}"
            )
        if cache is None and start_pos != 0:
            raise ValueError(f"start_pos={start_pos} needs a cache (model.new_cache())")
        if cache is not None and tokens.shape[0] != cache.batch:
            raise ValueError(f"the cache holds batch {cache.batch}, got batch {tokens.shape[0]}")
        T = tokens.shape[1]
        h = self.tok_embeddings(tokens)  # [B, T, dim]
        cos, sin = rope_cos_sin(T, self.args.head_dim, self.args.rope_theta, h.device, start_pos)
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)  # [T, D]
        mask = None
        if cache is not None:  # query i (position start_pos + i) sees keys 0 .. start_pos + i
            mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=h.device)
            mask = mask.tril(diagonal=start_pos)  # [T, start_pos + T]
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else cache.layer(i)
            h = layer(h, cos, sin, kv, start_pos, mask)
        return self.output(self.norm(h)).float()  # [B, T, vocab]


def build(config: dict) -> Transformer:
    """A model of the shape ``config`` describes, with placeholder weights (load them next).

    >>> build({"dim": 8, "hidden_dim": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1,
    ...        "vocab_size": 10, "max_seq_len": 4}).output.weight.shape
    torch.Size([10, 8])
    """
    return Transformer(ModelArgs.from_dict(config))


def _meta_to_rotate_half(w: Tensor, n_heads: int) -> Tensor:
    """Reorder q/k rows from Meta's interleaved pairs to rotate-half pairs (i, i + D/2)."""
    dim_out, dim_in = w.shape
    w = w.view(n_heads, dim_out // n_heads // 2, 2, dim_in)  # [H, D/2, 2, in]
    return w.transpose(1, 2).reshape(dim_out, dim_in)  # [H * D, in], evens then odds per head


def load_checkpoint(path: str | Path) -> Transformer:
    """Read a llama2.c legacy version-0 ``.bin`` into a float32 ``Transformer`` in eval mode.

    >>> from edgequant.data import stories260k_dir
    >>> load_checkpoint(stories260k_dir() / "stories260K.bin").args.n_kv_heads
    4
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c checkpoint not found: {path}")
    actual = path.stat().st_size
    if actual < 28:
        raise ValueError(f"{path}: expected at least 28 bytes (the header), got {actual} bytes")
    header = np.fromfile(path, "<i4", 7).tolist()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = header
    try:
        args = ModelArgs(*header[:5], abs(vocab), seq_len, tied_embedding=vocab > 0)
    except ValueError as e:
        raise ValueError(f"{path}: not a llama2.c version-0 checkpoint header: {e}") from None
    L, kv_dim, each = n_layers, n_kv * args.head_dim, "layers.{}."  # [L, ...] arrays, per layer
    shapes = [  # file order
        ("tok_embeddings.weight", (args.vocab_size, dim)),
        (each + "attention_norm.weight", (L, dim)),
        (each + "attention.wq.weight", (L, dim, dim)),
        (each + "attention.wk.weight", (L, kv_dim, dim)),
        (each + "attention.wv.weight", (L, kv_dim, dim)),
        (each + "attention.wo.weight", (L, dim, dim)),
        (each + "ffn_norm.weight", (L, dim)),
        (each + "feed_forward.w1.weight", (L, hidden, dim)),
        (each + "feed_forward.w2.weight", (L, dim, hidden)),
        (each + "feed_forward.w3.weight", (L, hidden, dim)),
        ("norm.weight", (dim,)),
        ("rope tables", (2, seq_len, args.head_dim // 2)),  # unused: RoPE is computed
    ]
    if not args.tied_embedding:
        shapes.append(("output.weight", (args.vocab_size, dim)))  # after the RoPE tables
    expected = 28 + 4 * sum(math.prod(shape) for _, shape in shapes)
    if actual != expected:
        raise ValueError(
            f"{path}: expected {expected} bytes for a llama2.c version-0 checkpoint with "
            f"{args}, got {actual} bytes (truncated, or not a legacy llama2.c .bin)"
        )
    flat = torch.from_numpy(np.fromfile(path, "<f4", offset=28))
    state, offset = {}, 0
    for name, shape in shapes:
        tensor = flat[offset : offset + math.prod(shape)].view(shape)
        offset += math.prod(shape)
        if name.startswith(each):
            state.update({name.format(i): tensor[i] for i in range(L)})
        else:
            state[name] = tensor
    state.pop("rope tables")
    state.setdefault("output.weight", state["tok_embeddings.weight"])  # tied
    for i in range(L):  # Meta's interleaved q/k rows -> rotate-half rows
        for key, heads in (("wq", n_heads), ("wk", n_kv)):
            key = f"layers.{i}.attention.{key}.weight"
            state[key] = _meta_to_rotate_half(state[key], heads)
    model = Transformer(args)
    model.load_state_dict(state, strict=True)
    logger.info("loaded llama2.c checkpoint %s: %s", path, args)
    return model.float().eval()


class Tokenizer:
    """llama2.c's ``tok*.bin`` BPE tokenizer (sentencepiece-compatible ids, byte fallback).

    >>> from edgequant.data import stories260k_dir
    >>> tok = Tokenizer(stories260k_dir() / "tok512.bin")
    >>> tok.decode(tok.encode("Hi, Lily!"))
    'Hi, Lily!'
    """

    bos_id = 1
    eos_id = 2
    _BYTE_PIECE = re.compile(rb"<0x([0-9A-F]{2})>")

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"llama2.c tokenizer not found: {path}")
        raw = path.read_bytes()
        self.file_name, self._raw = path.name, raw  # for save(): the file as read
        self.pieces: list[bytes] = []
        self.scores: list[float] = []
        offset = 4  # skips max_token_length, which only sizes a C buffer
        while offset < len(raw):
            if offset + 8 > len(raw):
                raise ValueError(f"{path}: truncated token record at byte {offset} of {len(raw)}")
            score, n = struct.unpack_from("<fi", raw, offset)
            if n < 0 or offset + 8 + n > len(raw):
                raise ValueError(f"{path}: token of {n} bytes at byte {offset} overruns the file")
            self.pieces.append(raw[offset + 8 : offset + 8 + n])
            self.scores.append(score)
            offset += 8 + n
        self._ids = {piece: i for i, piece in reversed(list(enumerate(self.pieces)))}

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def save(self, folder: str | Path) -> list[str]:
        """Write the ``tok*.bin`` file as read into ``folder``; returns its name (what
        `edgequant.artifact` stores in a bundle)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / self.file_name).write_bytes(self._raw)
        return [self.file_name]

    def chat_prompt(self, user_text: str) -> None:
        """Always ``None``: llama2.c models have no chat template (prompts are raw text)."""
        return None

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """llama2.c ``encode``: dummy-prefix space, characters (or bytes), then best-score merges.

        Merges are applied as llama2.c does (highest score first, leftmost on ties), with a heap.
        """
        ids = [self._ids[b" "]] if text else []
        for char in text:
            encoded = char.encode("utf-8")
            if encoded in self._ids:
                ids.append(self._ids[encoded])
            else:  # byte fallback: <0x00> is id 3
                ids.extend(b + 3 for b in encoded)
        nxt, prv = list(range(1, len(ids) + 1)), list(range(-1, len(ids) - 1))
        heap: list[tuple[float, int, int, int, int]] = []

        def push(i: int) -> None:
            if i < 0 or nxt[i] >= len(ids):
                return
            j = nxt[i]
            merged = self._ids.get(self.pieces[ids[i]] + self.pieces[ids[j]])
            if merged is not None:
                heapq.heappush(heap, (-self.scores[merged], i, j, ids[i], ids[j]))

        for i in range(len(ids) - 1):
            push(i)
        while heap:
            _, i, j, id_i, id_j = heapq.heappop(heap)
            if nxt[i] != j or ids[i] != id_i or ids[j] != id_j:
                continue  # stale: a neighbour merged since this pair was pushed
            ids[i] = self._ids[self.pieces[id_i] + self.pieces[id_j]]
            ids[j] = -1
            nxt[i] = nxt[j]
            if nxt[i] < len(ids):
                prv[nxt[i]] = i
            push(prv[i])
            push(i)
        out = [t for t in ids if t >= 0]
        return [self.bos_id] * bos + out + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        """Concatenate pieces; ``<0xXX>`` become bytes, BOS/EOS vanish, and the dummy-prefix
        space after BOS (or at the start) is stripped, as llama2.c and sentencepiece do."""
        out, prev = [], self.bos_id
        for t in ids:
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"token id {t} out of range [0, {self.vocab_size})")
            if t not in (self.bos_id, self.eos_id):
                piece = self.pieces[t]
                if prev == self.bos_id and piece.startswith(b" "):
                    piece = piece[1:]
                if m := self._BYTE_PIECE.fullmatch(piece):
                    piece = bytes([int(m.group(1), 16)])
                out.append(piece)
            prev = t
        return b"".join(out).decode("utf-8", errors="replace")


def load(
    model_dir_or_bin: str | Path, tokenizer_path: str | Path | None = None
) -> tuple[Transformer, Tokenizer]:
    """Load ``(Transformer, Tokenizer)`` from a checkpoint or a folder holding one.

    A folder must hold exactly one ``*.bin`` not named ``tok*.bin``; the tokenizer defaults to
    ``tok{vocab_size}.bin`` beside the checkpoint (``tok512.bin`` for stories260K).
    """
    path = Path(model_dir_or_bin)
    if path.is_dir():
        bins = sorted(p for p in path.glob("*.bin") if not p.name.startswith("tok"))
        if len(bins) != 1:
            raise ValueError(f"expected exactly one model *.bin in {path}, found {bins}")
        path = bins[0]
    model = load_checkpoint(path)
    tokenizer = Tokenizer(tokenizer_path or path.parent / f"tok{model.args.vocab_size}.bin")
    if tokenizer.vocab_size != model.args.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens, model expects {model.args.vocab_size}"
        )
    return model, tokenizer


@torch.no_grad()
def generate(model: Transformer, tokens: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding, recomputing the whole sequence each step; returns prompt + new tokens.

    Stops after ``max_new_tokens`` or when the sequence reaches ``model.args.max_seq_len``.
    """
    if not tokens:
        raise ValueError("generate needs at least one prompt token (e.g. the BOS id 1)")
    out = list(tokens)
    device = next(model.parameters()).device
    while len(out) < min(len(tokens) + max_new_tokens, model.args.max_seq_len):
        logits = model(torch.tensor([out], device=device))  # [1, T, vocab]
        out.append(int(logits[0, -1].argmax()))
    return out
