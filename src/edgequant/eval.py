"""Evaluation harness: perplexity, KL and top-1 against the float model, weight SQNR, size, speed.

Windowing convention (fixed, so numbers are comparable across models and runs): the whole text
is tokenized once with the model's own tokenizer (``encode(text, bos=False)``: no BOS is added,
at the start or per window); window ``i`` is tokens ``[i*L, (i+1)*L)`` (non-overlapping); a
trailing partial window is dropped; ``n_windows=None`` takes every full window. Each window is
run on its own (batch 1, no state carried across windows) and the loss covers every position
after the first of each window: predictions ``logits[:, :-1]`` against targets
``windows[:, 1:]``, i.e. ``n * (L - 1)`` predicted tokens. KL divergence and top-1 agreement use
exactly those positions.

Typical use, comparing several recipes in one process with one float pass::

    ids = tokenize_file(tokenizer, default_text())
    w = windows(ids, seq_len=512, n_windows=8)
    ref = float_logits(model, w, cache_key=cache_key("smollm2", default_text(), 512, 8))
    for recipe in recipes:
        quantized, plan = edgequant.quantize(copy.deepcopy(model), recipe)
        print(compare(ref, float_logits(quantized, w), w), size_report(plan))
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgequant._progress import progress_bar
from edgequant.layers import linear_weight
from edgequant.models.base import logits as model_logits
from edgequant.quantize import Plan
from edgequant.roles import infer_roles, is_quantized

log = logging.getLogger(__name__)

# Float logits by cache key: {key: (windows they were computed on, logits [n, L, V])}.
_FLOAT_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
# Predicted positions per block in `compare`: bounds float64 temporaries to a few of
# [block, vocab] (128 x 49152 x 8 B = 50 MB) whatever the window length; fewer positions for a
# vocabulary over 65,536 tokens (Qwen2.5's 151,936: 55), so a block stays within _BLOCK_VALUES.
_BLOCK = 128
_BLOCK_VALUES = 128 * 65536


def _device(model: nn.Module) -> torch.device:
    """Where the model's tensors live; CPU for models that hold none (e.g. a .pte runner)."""
    if isinstance(model, nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return torch.device("cpu")


# --- text -> windows -----------------------------------------------------------------------


def default_text() -> Path:
    """The WikiText-2 raw test split from the shared data folder (`edgequant.data`)."""
    from edgequant.data import wikitext2_test

    return wikitext2_test()


def tokenize_file(tokenizer: Any, path: str | Path) -> list[int]:
    """Token ids of a whole UTF-8 text file: ``tokenizer.encode(text, bos=False)``."""
    from edgequant._io import read_text_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text file not found: {path}")
    ids = tokenizer.encode(read_text_file(path, "text file"), bos=False)
    log.info("tokenized %s: %d tokens", path, len(ids))
    return ids


def cache_key(model_id: str, text: str | Path, seq_len: int, n_windows: int | None) -> str:
    """A `float_logits` cache key: model identity, the text file's sha256, ``seq_len``, ``n``.

    ``model_id`` must tell models apart (e.g. a checkpoint path or its hash).
    """
    digest = hashlib.sha256(Path(text).read_bytes()).hexdigest()
    return f"{model_id}|{digest}|L={seq_len}|n={'all' if n_windows is None else n_windows}"


def windows(ids: list[int] | torch.Tensor, seq_len: int, n_windows: int | None) -> torch.Tensor:
    """The first ``n_windows`` non-overlapping windows ``[n, seq_len]`` (int64) of ``ids``.

    Window ``i`` is ``ids[i*seq_len : (i+1)*seq_len]``; a trailing partial window is dropped;
    ``n_windows=None`` takes them all.

    >>> windows(list(range(10)), 3, None)
    tensor([[0, 1, 2],
            [3, 4, 5],
            [6, 7, 8]])
    >>> windows(list(range(10)), 3, 4)
    Traceback (most recent call last):
    ...
    ValueError: asked for 4 windows of 3 tokens, but the text has 10 tokens: 3 full windows
    """
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(
            f"seq_len must be an int >= 2 (a window predicts from its 2nd token), got {seq_len!r}"
        )
    available = ids.numel() // seq_len
    if available == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    if n_windows is None:
        n_windows = available
    elif isinstance(n_windows, bool) or not isinstance(n_windows, int) or n_windows < 1:
        raise ValueError(f"n_windows must be a positive int or None (all), got {n_windows!r}")
    elif n_windows > available:
        raise ValueError(
            f"asked for {n_windows} windows of {seq_len} tokens, but the text has {ids.numel()} "
            f"tokens: {available} full windows"
        )
    return ids[: n_windows * seq_len].view(n_windows, seq_len).clone()  # [n, L]


def _check_windows(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[1] < 2:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"windows must be a [n, seq_len >= 2] tensor (see `windows`), got {shape}")


def _check_logits(name: str, lg: torch.Tensor, w: torch.Tensor) -> None:
    if lg.dim() != 3 or lg.shape[:2] != w.shape:
        raise ValueError(
            f"{name} must be [n, seq_len, vocab] = [{w.shape[0]}, {w.shape[1]}, vocab] to match "
            f"the windows, got {tuple(lg.shape)}"
        )


# --- logits and perplexity -----------------------------------------------------------------


def _iter_logits(model: nn.Module, w: torch.Tensor, desc: str) -> Iterator[torch.Tensor]:
    """float32 logits ``[L, V]`` of each window, one forward (batch 1) per window."""
    _check_windows(w)
    device = _device(model)
    with torch.no_grad():
        for i in progress_bar(range(w.shape[0]), w.shape[0], desc, "window"):
            yield model_logits(model, w[i : i + 1].to(device))[0].cpu()  # [L, V]


def float_logits(
    model: nn.Module, windows: torch.Tensor, cache_key: str | None = None
) -> torch.Tensor:
    """float32 logits ``[n, L, vocab]`` of ``model`` on each window (batch 1, no grad).

    With a ``cache_key`` (see `cache_key`), the result is kept in this process and a later call
    with the same key returns the same tensor without running the model, so comparing many
    recipes costs one float pass. Do not modify the returned tensor in place. The cache lives
    until `clear_cache`; a key reused for different windows raises ValueError.
    """
    _check_windows(windows)
    if cache_key is not None and cache_key in _FLOAT_CACHE:
        cached_windows, cached = _FLOAT_CACHE[cache_key]
        if not torch.equal(cached_windows, windows.cpu()):
            raise ValueError(
                f"cache key {cache_key!r} holds logits for other windows "
                f"({tuple(cached_windows.shape)}); build the key from the text, seq_len and n"
            )
        log.info("float logits for %r from the in-process cache", cache_key)
        return cached
    out = None
    for i, lg in enumerate(_iter_logits(model, windows, "logits")):
        if out is None:  # allocate once: no stacking copy of a possibly large tensor
            out = torch.empty((windows.shape[0], *lg.shape), dtype=torch.float32)
        out[i] = lg
    if cache_key is not None:
        _FLOAT_CACHE[cache_key] = (windows.cpu().clone(), out)
    return out


def clear_cache() -> None:
    """Forget every logits tensor `float_logits` cached."""
    _FLOAT_CACHE.clear()


def _nll_sum(lg: torch.Tensor, w: torch.Tensor) -> float:
    """Summed NLL (float64) of one window: predictions ``lg[:-1]`` [L-1, V], targets ``w[1:]``."""
    return float(F.cross_entropy(lg[:-1].double(), w[1:].to(lg.device), reduction="sum"))


def perplexity_from_logits(logits: torch.Tensor, windows: torch.Tensor) -> float:
    """``exp(mean NLL)`` over every position after the first of each window.

    >>> w = torch.tensor([[0, 1, 2, 3]])
    >>> round(perplexity_from_logits(torch.zeros(1, 4, 10), w), 6)  # uniform over 10 tokens
    10.0
    """
    _check_windows(windows)
    _check_logits("logits", logits, windows)
    total = sum(_nll_sum(logits[i], windows[i]) for i in range(windows.shape[0]))
    return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))


def perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    """Perplexity of ``model`` on ``windows`` (one window in memory at a time)."""
    total = sum(
        _nll_sum(lg, windows[i]) for i, lg in enumerate(_iter_logits(model, windows, "perplexity"))
    )
    return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))


def compare(
    float_logits: torch.Tensor, quant_logits: torch.Tensor, windows: torch.Tensor
) -> dict[str, float]:
    """Quality of ``quant_logits`` against ``float_logits`` ``[n, L, vocab]`` on ``windows``.

    All metrics use the same ``n * (L - 1)`` positions: ``logits[:, :-1]`` each predict the next
    token ``windows[:, 1:]`` (the last position of a window predicts nothing it holds). Returns
    ``perplexity`` (of the quantized logits), ``float_perplexity``, ``kl_divergence`` (mean
    KL(float || quantized) in nats/token, log_softmax in float64), ``top1_agreement`` (% of
    positions whose argmax agrees) and ``positions``.

    >>> w = torch.tensor([[0, 1, 2]])
    >>> ref = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]]])
    >>> out = compare(ref, ref.clone(), w)
    >>> out["kl_divergence"], out["top1_agreement"], out["perplexity"] == out["float_perplexity"]
    (0.0, 100.0, True)
    """
    _check_windows(windows)
    _check_logits("float_logits", float_logits, windows)
    _check_logits("quant_logits", quant_logits, windows)
    if quant_logits.shape != float_logits.shape:
        raise ValueError(
            f"float and quantized logits differ in shape: {tuple(float_logits.shape)} vs "
            f"{tuple(quant_logits.shape)}"
        )
    n = windows.shape[0]
    totals = Comparison()
    for i in progress_bar(range(n), n, "compare", "window"):
        totals.add(float_logits[i], quant_logits[i], windows[i])
    return totals.result()


class Comparison:
    """`compare`'s sums, one window at a time: ``add(float [L, V], quantized [L, V], window
    [L])`` for each window, then ``result()``; only one window's logits need to be in memory
    (the streaming path reads the float ones back from disk)."""

    def __init__(self) -> None:
        self.kl = self.nll_q = self.nll_f = 0.0
        self.agree = self.positions = 0

    def add(self, float_logits: torch.Tensor, quant_logits: torch.Tensor, window) -> None:
        L = window.shape[0]
        block = max(1, min(_BLOCK, _BLOCK_VALUES // float_logits.shape[-1]))
        for start in range(0, L - 1, block):
            stop = min(start + block, L - 1)
            f, q = float_logits[start:stop], quant_logits[start:stop]  # [b, V]
            target = window[start + 1 : stop + 1, None].to(f.device)  # [b, 1]
            log_p, log_q = F.log_softmax(f.double(), -1), F.log_softmax(q.double(), -1)
            self.kl += float((log_p.exp() * (log_p - log_q)).sum())
            self.agree += int((f.argmax(-1) == q.argmax(-1)).sum())
            self.nll_f -= float(log_p.gather(-1, target).sum())
            self.nll_q -= float(log_q.gather(-1, target).sum())
        self.positions += L - 1

    def result(self) -> dict[str, float]:
        positions = self.positions
        return {
            "perplexity": math.exp(self.nll_q / positions),
            "float_perplexity": math.exp(self.nll_f / positions),
            "kl_divergence": max(self.kl / positions, 0.0),
            "top1_agreement": 100.0 * self.agree / positions,
            "positions": positions,
        }


# --- weights and size ----------------------------------------------------------------------


def layer_sqnr(float_model: nn.Module, quantized_model: nn.Module) -> list[dict[str, Any]]:
    """Weight SQNR (dB) of every packed module of ``quantized_model`` against ``float_model``.

    Each `QuantizedLinear` / `QuantizedEmbedding` is matched by FQN to the float model's module
    (``nn.Linear``, ``nn.Embedding`` or Hugging Face's ``Conv1D``); only those weights are read.
    Entries, in module order: ``fqn``, ``role``, ``layer``, ``scheme`` (its description),
    ``shape`` ``[rows, cols]`` and ``sqnr_db``. Tied modules each get an entry.
    """
    roles = infer_roles(quantized_model)
    out = []
    for fqn, module in quantized_model.named_modules():
        if not is_quantized(module):
            continue
        try:
            ref_module = float_model.get_submodule(fqn)
        except AttributeError:
            raise ValueError(f"the float model has no module {fqn!r} to compare with") from None
        if is_quantized(ref_module):
            raise ValueError(f"{fqn} is quantized in the float model too; pass the float model")
        if isinstance(ref_module, nn.Embedding):
            ref = ref_module.weight
        else:
            ref = linear_weight(ref_module)  # TypeError naming the type if neither
        if tuple(ref.shape) != (module.rows, module.cols):
            raise ValueError(
                f"{fqn}: float weight {tuple(ref.shape)} vs quantized {(module.rows, module.cols)}"
            )
        role, layer = roles[fqn]
        out.append(
            {
                "fqn": fqn,
                "role": role,
                "layer": layer,
                "scheme": module.scheme.describe(),
                "shape": [module.rows, module.cols],
                "sqnr_db": weight_sqnr(ref, module),
            }
        )
    return out


def weight_sqnr(reference: torch.Tensor, module: nn.Module) -> float:
    """`edgequant.primitives.sqnr` of a packed module's weight against ``reference``, a block
    of rows at a time (float64 sums of a 150 M-value embedding would otherwise take GBs)."""
    from edgequant.primitives import rows_per_block

    rows, cols = reference.shape
    step = rows_per_block(cols)
    signal = noise = 0.0
    for start in range(0, rows, step):
        ref = reference[start : start + step].detach().double()
        approx = module.dequantized_rows(start, start + step).double()
        signal += float(ref.pow(2).sum())
        noise += float((ref - approx).pow(2).sum())
    if noise == 0:
        return float("inf")
    return 10 * math.log10(signal / noise) if signal > 0 else float("-inf")


def size_report(plan: Plan) -> dict[str, float]:
    """Bytes before and after, weight count and bits per stored weight of a quantization plan.

    ``n_weights`` counts a tensor shared by tied modules once (``plan.n_weights``);
    ``bits_per_weight`` = ``quantized_bytes * 8 / n_weights`` (scales and zero points included).

    >>> import edgequant
    >>> _, plan = edgequant.quantize(nn.Sequential(nn.Linear(64, 64)), "8da4w")
    >>> size_report(plan)["bits_per_weight"]  # 4 bits + one fp16 scale per 32 weights
    4.5
    """
    n_weights = plan.n_weights
    return {
        "float_bytes": plan.bytes_before,
        "quantized_bytes": plan.bytes_after,
        "n_weights": n_weights,
        "bits_per_weight": plan.bytes_after * 8 / n_weights if n_weights else float("nan"),
    }


# --- speed ---------------------------------------------------------------------------------


Step = Callable[[torch.Tensor], torch.Tensor]  # next ids [1, T] -> greedy next token [1, 1]


def _stepper(model: nn.Module, max_len: int) -> tuple[Step, bool]:
    """``(step, kv_cache)``: ``step`` feeds ids after all earlier ones, with the model's own
    cache if it has one: edgequant's decoder (llama2.c models, and Hugging Face models of a
    known family, run through it) or a runtime's ``new_cache()``; another Hugging Face model's
    ``past_key_values``."""
    from edgequant.models.families import eager_decoder

    model = (eager_decoder(model) if isinstance(model, nn.Module) else None) or model
    if callable(getattr(model, "new_cache", None)):  # a static cache
        cache, pos = model.new_cache(batch=1, max_len=max_len), 0

        def step(ids: torch.Tensor) -> torch.Tensor:
            nonlocal pos
            out = model(ids, start_pos=pos, cache=cache)  # [1, T, vocab]
            pos += ids.shape[1]
            return out[:, -1].argmax(-1, keepdim=True)  # [1, 1]

        return step, True
    params = inspect.signature(model.forward).parameters
    if hasattr(model, "config") and "past_key_values" in params and "use_cache" in params:
        past = None
        extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

        def step(ids: torch.Tensor) -> torch.Tensor:
            nonlocal past
            out = model(input_ids=ids, past_key_values=past, use_cache=True, **extra)
            past = out.past_key_values
            return out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]

        return step, True
    seq = None

    def step(ids: torch.Tensor) -> torch.Tensor:
        nonlocal seq
        seq = ids if seq is None else torch.cat([seq, ids], dim=1)  # [1, T so far]: recompute
        return model_logits(model, seq)[:, -1].argmax(-1, keepdim=True)  # [1, 1]

    return step, False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speed(
    model: nn.Module, prompt_ids: list[int], new_tokens: int, warmup: int = 1
) -> dict[str, Any]:
    """Prefill and greedy-decode throughput (tokens/s) of ``model``, batch 1.

    Prefill is one forward over the prompt; decode is ``new_tokens`` one-token forwards, each
    feeding the previous greedy token. The model's own KV cache is used when it has one: a
    llama2.c-style ``new_cache()`` with ``forward(ids, start_pos=, cache=)``, or a Hugging Face
    model's ``past_key_values`` (it has ``.config`` and takes ``use_cache``). Other models
    recompute the whole sequence for every new token (``"kv_cache": False``). ``warmup``
    untimed rounds (a prefill and one decode step) run first. Returns ``prefill_tokens_per_s``,
    ``decode_tokens_per_s``, ``prompt_tokens``, ``new_tokens`` and ``kv_cache``.
    """
    if not prompt_ids:
        raise ValueError("speed needs at least one prompt token")
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"new_tokens must be a positive int, got {new_tokens!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    device = _device(model)
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)  # [1, T]
    max_len = prompt.shape[1] + new_tokens
    with torch.inference_mode():
        for _ in range(warmup):
            step, _ = _stepper(model, max_len)
            step(step(prompt))
        step, kv_cache = _stepper(model, max_len)
        _sync(device)
        t0 = time.perf_counter()
        token = step(prompt)
        _sync(device)
        t1 = time.perf_counter()
        for _ in progress_bar(range(new_tokens), new_tokens, "decode", "tok"):
            token = step(token)
        _sync(device)
        t2 = time.perf_counter()
    return {
        "prefill_tokens_per_s": prompt.shape[1] / max(t1 - t0, 1e-9),
        "decode_tokens_per_s": new_tokens / max(t2 - t1, 1e-9),
        "prompt_tokens": prompt.shape[1],
        "new_tokens": new_tokens,
        "kv_cache": kv_cache,
    }
