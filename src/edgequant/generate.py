"""Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p), timed.

``generate(model, tokenizer, prompt, max_new_tokens)`` returns a `Generation` holding the prompt
and new token ids, the new text and prefill / decode speeds. It works with

- edgequant's `Decoder` (llama2.c models, and Hugging Face models of the families in
  `edgequant.models.families`, run through it), or any model with ``new_cache()`` and
  ``forward(tokens, start_pos=..., cache=...)`` (the runtimes' runners): a static KV cache;
- another Hugging Face causal LM (it has ``.config`` and ``forward(..., past_key_values=...,
  use_cache=...)``): prefill once with ``use_cache=True``, then one token at a time;
- any other model returning logits (see `edgequant.models.base.logits`): the whole sequence is
  recomputed for every new token (slow; a warning says so once per model class).

Generation never runs past the model's context (llama2.c ``args.max_seq_len``, Hugging Face
``config.max_position_embeddings``): prompt plus new tokens stop there.

Example (the tinyllamas model from the shared data folder)::

    >>> from edgequant.data import stories260k_dir
    >>> from edgequant.models import llama2c
    >>> model, tok = llama2c.load(stories260k_dir())
    >>> out = generate(model, tok, None, max_new_tokens=12)
    >>> out.text
    'Once upon a time, there was a little girl'
    >>> len(out.prompt_ids), len(out.new_ids), out.stopped_at_eos
    (1, 12, False)
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from edgequant.models.base import TokenizerLike
from edgequant.models.base import logits as full_logits

logger = logging.getLogger(__name__)

Step = Callable[[Tensor], Tensor]  # next input ids [1, T] -> logits of the last position [vocab]
_warned_no_cache: set[str] = set()  # model classes already warned about full recompute


@dataclass
class Generation:
    """What `generate` produced and how fast.

    ``new_ids`` includes the EOS token when generation stopped at it; ``text`` is the decoded
    continuation (new tokens only, EOS not shown). Prefill covers the prompt forward pass and
    the choice of the first new token; decode covers the remaining new tokens.
    """

    prompt_ids: list[int]
    new_ids: list[int]
    text: str
    prefill_seconds: float
    decode_seconds: float
    stopped_at_eos: bool

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens per second of prefill (0.0 if it took no measurable time)."""
        return _rate(len(self.prompt_ids), self.prefill_seconds)

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens after the first, per second of decode (0.0 if there were none)."""
        return _rate(len(self.new_ids) - 1, self.decode_seconds)

    def to_dict(self) -> dict:
        """All fields plus both rates, JSON-friendly."""
        return {
            **asdict(self),
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
        }


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if tokens > 0 and seconds > 0 else 0.0


def check_sampling(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    """Raise ``ValueError`` naming the first bad argument and what is allowed."""
    if not (_is_int(max_new_tokens) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and 0 <= temperature < math.inf):
        raise ValueError(
            f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}"
        )
    if top_k is not None and not (_is_int(top_k) and top_k >= 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sample(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """The next token id from ``logits [vocab]``: argmax if ``temperature`` is 0, otherwise a
    draw from ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens
    and to the smallest set whose probability reaches ``top_p`` (nucleus).

    >>> sample(torch.tensor([0.0, 2.0, 1.0]))
    1
    >>> sample(torch.tensor([0.0, 2.0, 1.0]), temperature=1.0, top_k=1)
    1
    """
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float()
    # subtract the max first: a tiny temperature then gives -inf, never inf - inf = NaN
    scaled = (logits - logits.max()) / temperature  # [vocab]
    if top_k is not None and top_k < scaled.numel():
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    if top_p is not None and top_p < 1:
        probs, order = torch.sort(scaled.softmax(-1), descending=True)  # [vocab]
        before = probs.cumsum(-1) - probs  # probability mass of the more likely tokens
        drop = torch.zeros_like(scaled, dtype=torch.bool)
        drop[order] = before >= top_p  # the most likely token is always kept
        scaled = scaled.masked_fill(drop, -math.inf)
    return int(torch.multinomial(scaled.softmax(-1), 1, generator=generator))


def context_length(model: nn.Module) -> int | None:
    """The most tokens ``model`` can attend to (prompt plus new ones), ``None`` if unknown."""
    for holder in (getattr(model, "spec", None), getattr(model, "args", None)):
        if isinstance(getattr(holder, "max_seq_len", None), int):
            return holder.max_seq_len
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) else None


def _is_hf_causal_lm(model: nn.Module) -> bool:
    if not hasattr(model, "config"):
        return False
    params = inspect.signature(model.forward).parameters
    return "past_key_values" in params and "use_cache" in params


def _stepper(model: nn.Module, max_len: int) -> Step:
    """A function feeding the next ids ``[1, T]`` to ``model`` (after all earlier ones) and
    returning the float32 logits ``[vocab]`` of the last one, with the best cache available."""
    from edgequant.models.families import eager_decoder

    model = (eager_decoder(model) if isinstance(model, nn.Module) else None) or model
    if callable(getattr(model, "new_cache", None)):  # edgequant's decoder: static cache
        cache, pos = model.new_cache(batch=1, max_len=max_len), 0

        def step(ids: Tensor) -> Tensor:
            nonlocal pos
            out = model(ids, start_pos=pos, cache=cache)  # [1, T, vocab]
            pos += ids.shape[1]
            return out[0, -1].float()

        return step
    if _is_hf_causal_lm(model):  # Hugging Face: past_key_values
        past = None
        keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
        extra = {"logits_to_keep": 1} if keep_last else {}

        def step(ids: Tensor) -> Tensor:
            nonlocal past
            out = model(input_ids=ids, past_key_values=past, use_cache=True, **extra)
            past = out.past_key_values
            return out.logits[0, -1].float()  # [vocab]

        return step
    name = type(model).__name__
    if name not in _warned_no_cache:
        _warned_no_cache.add(name)
        logger.warning(
            "%s has no KV cache edgequant knows (llama2.c new_cache() or Hugging Face "
            "past_key_values): recomputing the whole sequence for every new token",
            name,
        )
    seq: Tensor | None = None

    def step(ids: Tensor) -> Tensor:
        nonlocal seq
        seq = ids if seq is None else torch.cat([seq, ids], dim=1)  # [1, T so far]
        return full_logits(model, seq)[0, -1]

    return step


def encode_prompt(
    tokenizer: TokenizerLike,
    prompt: str | list[int] | None,
    *,
    chat: bool = True,
    bos: bool | None = None,
) -> list[int]:
    """Prompt ids as `generate` feeds them (see there for the rules)."""
    if prompt is None or (isinstance(prompt, (str, list)) and len(prompt) == 0):
        if tokenizer.bos_id is None:
            raise ValueError("an empty prompt needs a tokenizer with a BOS token; give a prompt")
        return [tokenizer.bos_id]
    if isinstance(prompt, list):
        bad = [t for t in prompt if not (_is_int(t) and 0 <= t < tokenizer.vocab_size)]
        if bad:
            raise ValueError(
                f"prompt ids must be ints in [0, {tokenizer.vocab_size}), got {bad[:5]!r}"
            )
        return list(prompt)
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, a list of ids or None, got {type(prompt).__name__}")
    templated = tokenizer.chat_prompt(prompt) if chat else None
    if templated is not None:
        return tokenizer.encode(templated, bos=False)  # the template holds any BOS it wants
    if bos and tokenizer.bos_id is None:
        raise ValueError("bos=True, but the tokenizer has no BOS token; pass bos=None or False")
    return tokenizer.encode(prompt, bos=tokenizer.bos_id is not None and bos is not False)


def generate(
    model: nn.Module,
    tokenizer: TokenizerLike,
    prompt: str | list[int] | None,
    max_new_tokens: int = 128,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    chat: bool = True,
    stop_at_eos: bool = True,
    bos: bool | None = None,
    progress: bool = False,
) -> Generation:
    """Continue ``prompt`` by up to ``max_new_tokens`` tokens with a KV cache.

    The prompt:

    - ``None``, ``""`` or ``[]``: BOS only (llama2.c's reference decoding);
    - a list of ids: fed as is;
    - a string with ``chat`` True and a tokenizer whose ``chat_prompt(text)`` returns a string:
      that string, encoded without an extra BOS (the template holds any BOS it wants);
    - otherwise the string itself, with a BOS first unless ``bos`` is False or the tokenizer
      has none.

    ``temperature`` 0 is greedy (argmax; ``top_k``, ``top_p`` and ``seed`` unused); above 0
    tokens are drawn with a ``torch.Generator`` seeded by ``seed``, so the same arguments give
    the same tokens. Generation stops after ``max_new_tokens``, at the EOS token (if
    ``stop_at_eos``; it is kept in ``new_ids``), or when prompt plus new tokens fill the
    model's context. ``progress`` shows a tqdm bar. The model is not switched to eval mode.

    >>> from edgequant.data import stories260k_dir
    >>> from edgequant.models import llama2c
    >>> model, tok = llama2c.load(stories260k_dir())
    >>> out = generate(model, tok, "Once upon a time", 8, temperature=0.8, top_p=0.9, seed=1)
    >>> out.prompt_ids == tok.encode("Once upon a time")  # no chat template: BOS + text
    True
    >>> out.new_ids == generate(model, tok, "Once upon a time", 8, temperature=0.8, top_p=0.9,
    ...                         seed=1).new_ids  # same seed, same tokens
    True
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    prompt_ids = encode_prompt(tokenizer, prompt, chat=chat, bos=bos)
    limit = context_length(model)
    if limit is not None and len(prompt_ids) >= limit:
        raise ValueError(
            f"the prompt has {len(prompt_ids)} tokens but the model's context is {limit} tokens; "
            f"shorten the prompt to at most {limit - 1} tokens to leave room for one new token"
        )
    budget = max_new_tokens if limit is None else min(max_new_tokens, limit - len(prompt_ids))
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = first.device if first is not None else torch.device("cpu")
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None

    def pick(logits: Tensor) -> int:
        return sample(logits, temperature, top_k, top_p, generator)

    bar = tqdm(total=budget, unit="tok", disable=not progress, desc="generate")
    with torch.inference_mode():
        step = _stepper(model, max_len=len(prompt_ids) + budget)
        start = time.perf_counter()
        new_ids = [pick(step(torch.tensor([prompt_ids], device=device)))]  # prefill: [1, P]
        prefill_end = time.perf_counter()
        bar.update(1)
        while len(new_ids) < budget and not (stop_at_eos and new_ids[-1] == tokenizer.eos_id):
            new_ids.append(pick(step(torch.tensor([new_ids[-1:]], device=device))))  # [1, 1]
            bar.update(1)
        end = time.perf_counter()
    bar.close()
    stopped_at_eos = stop_at_eos and new_ids[-1] == tokenizer.eos_id
    if len(new_ids) < max_new_tokens and not stopped_at_eos:
        logger.info("stopped at the model's context of %d tokens", limit)
    return Generation(
        prompt_ids=prompt_ids,
        new_ids=new_ids,
        text=_continuation(tokenizer, prompt_ids, new_ids[:-1] if stopped_at_eos else new_ids),
        prefill_seconds=prefill_end - start,
        decode_seconds=end - prefill_end,
        stopped_at_eos=stopped_at_eos,
    )


def _continuation(tokenizer: TokenizerLike, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text ``new_ids`` add after the prompt: decoding them alone would lose a leading
    space (sentencepiece strips it at the start) or split a multi-byte character."""
    before = tokenizer.decode(prompt_ids)
    full = tokenizer.decode(prompt_ids + new_ids)
    return full[len(before) :] if full.startswith(before) else tokenizer.decode(new_ids)
