"""Llama as trained by Karpathy's llama2.c: the model (`Transformer`, the one `Decoder` with the
shape a ``.bin`` header gives), ``load`` for a checkpoint and its ``tok*.bin`` tokenizer, and
greedy decoding without a cache (``generate``, the reference; `edgequant.generate` is the cached,
sampling one). The ``.bin`` reader is `edgequant.models.llama2c_bin`, the tokenizer
`edgequant.models.llama2c_tokenizer`. q/k rows use the Hugging Face "rotate half" RoPE order.

Example (the tinyllamas model from the shared data folder)::

    >>> from edgequant.data import stories260k_dir
    >>> model, tok = load(stories260k_dir())
    >>> tok.decode(generate(model, [tok.bos_id], max_new_tokens=30))[:26]
    'Once upon a time, there wa'
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from edgequant.models.decoder import Decoder
from edgequant.models.llama2c_bin import ModelArgs, read_checkpoint
from edgequant.models.llama2c_tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class Transformer(Decoder):
    """A `Decoder` built from llama2.c's `ModelArgs` (kept as ``args``); see `Decoder` for
    ``forward``, ``new_cache`` and incremental decoding."""

    edgequant_family = "llama2c"

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args.spec())
        self.args = args

    def edgequant_config(self) -> dict:
        """The ``ModelArgs`` as a dict; ``build(model.edgequant_config())`` rebuilds the shape."""
        return self.args.to_dict()


def build(config: dict, meta: bool = False) -> Transformer:
    """A model of the shape ``config`` describes, with placeholder weights (load them next;
    with ``meta`` they take no memory and are assigned next).

    >>> build({"dim": 8, "hidden_dim": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1,
    ...        "vocab_size": 10, "max_seq_len": 4}).output.weight.shape
    torch.Size([10, 8])
    """
    args = ModelArgs.from_dict(config)
    if meta:
        with torch.device("meta"):
            return Transformer(args).eval()
    return Transformer(args)


def load_checkpoint(path: str | Path) -> Transformer:
    """Read a llama2.c legacy version-0 ``.bin`` into a float32 ``Transformer`` in eval mode.

    >>> from edgequant.data import stories260k_dir
    >>> load_checkpoint(stories260k_dir() / "stories260K.bin").args.n_kv_heads
    4
    """
    args, state = read_checkpoint(path)
    model = Transformer(args)
    model.load_state_dict(state, strict=True)
    logger.info("loaded llama2.c checkpoint %s: %s", path, args)
    return model.float().eval()


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
