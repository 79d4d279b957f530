"""Calibration data: token batches for the algorithms that look at activations (GPTQ).

Three sources, each seeded and reproducible, each a `Calibration` (an iterable of ``[1, L]``
token tensors that also says where it came from, for the report):

- `from_text(path_or_text, tokenizer, n, seq_len, seed)`: ``n`` windows of ``seq_len`` tokens at
  random offsets (a seeded generator) of a text; `wikitext(tokenizer)` is WikiText-2's test file
  past its first `EVAL_TOKENS` tokens, so calibration never sees the windows edgequant evaluates
  on (the first ``n_windows x seq_len`` tokens: up to 64 windows of 512);
- `from_prompts(prompts, tokenizer)`: one batch per prompt;
- `from_model(model, tokenizer, n, seq_len, seed)`: samples the float model writes itself from
  its BOS token (no data needed).

`parse(spec, tokenizer, model)` reads the command line's ``--calibration``: ``wikitext:128x512``,
``file:PATH:128x512``, ``model:32x128``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgequant._io import read_text_file

EVAL_TOKENS = 64 * 512  # the evaluation windows' span that calibration stays clear of


@dataclass(frozen=True)
class Calibration:
    """Token batches ``[1, L]`` (int64) and a description of their source."""

    batches: tuple[torch.Tensor, ...]
    source: str

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def tokens(self) -> int:
        return sum(int(b.numel()) for b in self.batches)


def _check_counts(n: int, seq_len: int) -> None:
    for name, value in (("n", n), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"calibration {name} must be a positive integer, got {value!r}")


def from_text(
    text: str | Path,
    tokenizer: Any,
    n: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    *,
    skip_tokens: int = 0,
    name: str | None = None,
) -> Calibration:
    """``n`` windows of ``seq_len`` tokens at seeded random offsets of ``text`` (a path or the
    text itself), after its first ``skip_tokens`` tokens."""
    _check_counts(n, seq_len)
    path = Path(text) if isinstance(text, Path) or _is_file(str(text)) else None
    body = read_text_file(path, "calibration text") if path is not None else str(text)
    ids = tokenizer.encode(body, bos=False)[skip_tokens:]
    label = name or (str(path) if path is not None else f"{len(body)} characters of text")
    if len(ids) < seq_len:
        raise ValueError(
            f"calibration text {label!r} has {len(ids)} tokens"
            f"{f' after the first {skip_tokens}' if skip_tokens else ''}, fewer than one batch of "
            f"{seq_len}; give more text or a shorter seq_len"
        )
    ids = torch.tensor(ids, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (n,), generator=g).tolist()
    batches = tuple(ids[s : s + seq_len][None].clone() for s in starts)
    where = f", after token {skip_tokens}" if skip_tokens else ""
    return Calibration(batches, f"{label}{where}: {n} x {seq_len} tokens, seed {seed}")


def _is_file(text: str) -> bool:
    try:
        return len(text) < 4096 and os.path.isfile(text)
    except (OSError, ValueError):  # a name too long, a NUL: text, not a path
        return False


def wikitext(
    tokenizer: Any, n: int = 128, seq_len: int = 512, seed: int = 0, *, skip: int = EVAL_TOKENS
) -> Calibration:
    """WikiText-2 raw test past its first ``skip`` tokens (`EVAL_TOKENS`: disjoint from the
    evaluation windows, which are the file's first ``n_windows x seq_len`` tokens)."""
    from edgequant.eval import default_text

    return from_text(
        default_text(), tokenizer, n, seq_len, seed, skip_tokens=max(skip, EVAL_TOKENS),
        name="wikitext-2 test",
    )  # fmt: skip


def from_prompts(prompts: list[str], tokenizer: Any) -> Calibration:
    """One batch per prompt (BOS first, as the model sees a prompt)."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    batches = tuple(
        torch.tensor([tokenizer.encode(p, bos=True)], dtype=torch.long) for p in prompts
    )
    return Calibration(batches, f"{len(batches)} prompts")


@torch.no_grad()
def from_model(
    model: Any, tokenizer: Any, n: int = 32, seq_len: int = 128, seed: int = 0
) -> Calibration:
    """``n`` samples of ``seq_len`` tokens the float model writes from BOS (temperature 1)."""
    from edgequant.models.base import logits

    _check_counts(n, seq_len)
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.tensor([[tokenizer.bos_id]], dtype=torch.long)
        while ids.shape[1] < seq_len:
            probs = torch.softmax(logits(model, ids)[0, -1].double(), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=g)
            ids = torch.cat([ids, nxt[None]], dim=1)
        batches.append(ids)
    return Calibration(tuple(batches), f"float model's own samples: {n} x {seq_len}, seed {seed}")


_SPEC = re.compile(r"^(?P<kind>wikitext|model|file:(?P<path>.+?))(?::(?P<n>\d+)x(?P<len>\d+))?$")


def parse(
    spec: str, tokenizer: Any, model: Any = None, seed: int = 0, *, eval_tokens: int = 0
) -> Calibration:
    """A `Calibration` from ``wikitext[:NxL]``, ``file:PATH[:NxL]`` or ``model[:NxL]``;
    ``eval_tokens``: how many leading WikiText-2 tokens the evaluation uses (skipped)."""
    m = _SPEC.match(spec.strip())
    if m is None:
        raise ValueError(
            f"calibration {spec!r} is not one of wikitext[:NxL], file:PATH[:NxL], model[:NxL] "
            "(e.g. wikitext:128x512)"
        )
    kind = "file" if m["path"] else m["kind"]
    n, seq_len = (
        (int(m["n"]), int(m["len"])) if m["n"] else ((32, 128) if kind == "model" else (128, 512))
    )
    if kind == "wikitext":
        return wikitext(tokenizer, n, seq_len, seed, skip=eval_tokens)
    if kind == "file":
        if not Path(m["path"]).is_file():
            raise FileNotFoundError(f"calibration file {m['path']!r} does not exist")
        return from_text(Path(m["path"]), tokenizer, n, seq_len, seed)
    if model is None:
        raise ValueError("calibration 'model' needs the float model")
    return from_model(model, tokenizer, n, seq_len, seed)
