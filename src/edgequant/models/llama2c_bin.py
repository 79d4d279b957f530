"""llama2.c's legacy version-0 ``.bin`` checkpoints: the header (`ModelArgs`) and the weights
(`read_checkpoint`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from edgequant.models.spec import DecoderSpec


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

    def spec(self) -> DecoderSpec:
        """The decoder this header describes (llama2.c's Llama: no biases, default RoPE)."""
        return DecoderSpec(
            vocab_size=self.vocab_size, dim=self.dim, n_layers=self.n_layers,
            n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim,
            hidden_dim=self.hidden_dim, max_seq_len=self.max_seq_len, norm_eps=self.norm_eps,
            rope_theta=self.rope_theta, tied_embedding=self.tied_embedding,
        )  # fmt: skip

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


def _meta_to_rotate_half(w: Tensor, n_heads: int) -> Tensor:
    """Reorder q/k rows from Meta's interleaved pairs to rotate-half pairs (i, i + D/2)."""
    dim_out, dim_in = w.shape
    w = w.view(n_heads, dim_out // n_heads // 2, 2, dim_in)  # [H, D/2, 2, in]
    return w.transpose(1, 2).reshape(dim_out, dim_in)  # [H * D, in], evens then odds per head


def checkpoint_layout(path: str | Path) -> tuple[ModelArgs, dict[str, tuple[int, tuple, Any]]]:
    """``(ModelArgs, {name: (offset, shape, reorder)})`` of a llama2.c legacy version-0 ``.bin``:
    where each tensor starts (in float32 values after the 28-byte header), its shape, and the
    function that reorders its rows (q/k: Meta's interleaved pairs to rotate-half), or None.
    The tied ``output.weight`` is the embedding's entry. Checks the file's size."""
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
    heads = {"wq": n_heads, "wk": n_kv}
    layout: dict[str, tuple[int, tuple, Any]] = {}
    offset = 0
    for name, shape in shapes:
        if name.startswith(each):
            one = shape[1:]
            head = heads.get(name.split(".")[-2]) if ".attention." in name else None
            reorder = None if head is None else partial(_meta_to_rotate_half, n_heads=head)
            for i in range(L):
                layout[name.format(i)] = (offset + i * math.prod(one), one, reorder)
        elif name != "rope tables":
            layout[name] = (offset, shape, None)
        offset += math.prod(shape)
    layout.setdefault("output.weight", layout["tok_embeddings.weight"])  # tied
    return args, layout


def read_checkpoint(path: str | Path) -> tuple[ModelArgs, dict[str, Tensor]]:
    """``(ModelArgs, state dict)`` of a llama2.c legacy version-0 ``.bin`` (float32, q/k rows in
    rotate-half order, ``output.weight`` the embedding when tied).

    >>> from edgequant.data import stories260k_dir
    >>> read_checkpoint(stories260k_dir() / "stories260K.bin")[0].n_kv_heads
    4
    """
    args, layout = checkpoint_layout(path)
    flat = torch.from_numpy(np.fromfile(path, "<f4", offset=28))
    state: dict[str, Tensor] = {}
    by_offset: dict[int, Tensor] = {}
    for name, (offset, shape, reorder) in layout.items():
        if offset in by_offset and reorder is None:  # the tied output: the embedding itself
            state[name] = by_offset[offset]
            continue
        tensor = flat[offset : offset + math.prod(shape)].view(shape)
        state[name] = reorder(tensor) if reorder else tensor
        by_offset[offset] = state[name]
    return args, state
