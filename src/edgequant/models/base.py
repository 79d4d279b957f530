"""What the rest of edgequant needs from a loaded model and tokenizer, whatever its family.

- ``logits(model, ids)``: float32 ``[B, T, vocab]`` next-token logits for token ids ``[B, T]``
  (edgequant's `Decoder` returns them directly, and runs Hugging Face models of the families
  it knows; another Hugging Face model returns them in ``.logits``);
- a tokenizer has ``encode(text, bos=...) -> list[int]``, ``decode(ids) -> str``, ``bos_id``,
  ``eos_id`` (``None`` when it has none), ``vocab_size`` and
  ``chat_prompt(user_text) -> str | None`` (the model's chat template applied to one user
  message, ready to generate; ``None`` without a template).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn


class TokenizerLike(Protocol):
    bos_id: int | None
    eos_id: int | None

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def chat_prompt(self, user_text: str) -> str | None: ...


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """float32 ``[B, T, vocab]`` logits of ``model`` on ``ids`` ``[B, T]`` (no cache); a model
    of a known family runs through edgequant's one decoder (holding the model's modules)."""
    from edgequant.models.families import eager_decoder

    decoder = eager_decoder(model) if isinstance(model, nn.Module) else None
    out = (decoder or model)(ids)
    if not isinstance(out, torch.Tensor):
        out = out.logits
    return out.float()
