"""The main job: load a model, quantize it with a recipe, save the bundle, measure float vs
quantized, and write ``report.json``, ``report.md`` and ``report.png`` beside the bundle.

``run(...)`` does one recipe; ``compare(...)`` does every preset on one float pass (the float
logits are computed once and reused) and writes ``compare.json`` / ``compare.md`` /
``compare.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

import edgequant
from edgequant import eval as ev
from edgequant import kernels
from edgequant._modules import shallow_copy
from edgequant.models.base import logits
from edgequant.quantize import as_recipe, check_finite
from edgequant.recipe import check_rotation

log = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 512
SPEED_PROMPT_TOKENS = 64
SPEED_NEW_TOKENS = 32
# `run` streams (one decoder layer at a time) a model whose float32 weights exceed this
STREAM_ABOVE = 2 * 10**9


SPEED_TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park. One day, she saw a big, red ball. She wanted to play with it, but it was too high. "
) * 8


def _text_ids(tokenizer, text: str | Path | None) -> tuple[list[int], str]:
    path = Path(text) if text else ev.default_text()
    return ev.tokenize_file(tokenizer, path), str(path)


def _speed_ids(tokenizer, text: str | Path | None) -> list[int]:
    """A prompt for the speed measurement: the start of the evaluation text (or a built-in
    text without one), ``SPEED_PROMPT_TOKENS`` long."""
    from edgequant._io import read_text_file

    chars = SPEED_PROMPT_TOKENS * 32  # enough characters for the tokens
    if text:  # the user's file: a folder or non-UTF-8 bytes are refused naming it
        start = read_text_file(Path(text), "text file")[:chars]
    else:
        try:
            with open(ev.default_text(), encoding="utf-8") as f:
                start = f.read(chars)
        except FileNotFoundError:
            start = SPEED_TEXT
    return tokenizer.encode(start, bos=False)[:SPEED_PROMPT_TOKENS]


def _float_pass(model, tokenizer, info, windows_n, seq_len, text) -> dict[str, Any]:
    """Windows, float logits (cached in-process) and the float model's speed."""
    ids, text_path = _text_ids(tokenizer, text)
    windows = ev.windows(ids, seq_len, windows_n)
    digest = hashlib.sha256(json.dumps(ids[: windows.numel()]).encode()).hexdigest()[:16]
    key = f"{info.get('sha256') or info['source']}:{digest}:{seq_len}:{windows.shape[0]}"
    return {
        "windows": windows,
        "text": text_path,
        "logits": ev.float_logits(model, windows, cache_key=key),
    }


def _float_side(
    float_model, tokenizer, info, eval_windows, seq_len, text, context=None, speed=True
):
    """``(speed prompt ids, float pass or None, float speed)``: everything measured on float.
    ``context`` caps the speed run's prompt + new tokens (a program's max_seq_len)."""
    speed_ids = _speed_ids(tokenizer, text)
    float_pass = (
        _float_pass(float_model, tokenizer, info, eval_windows, seq_len, text)
        if eval_windows
        else None
    )
    return speed_ids, float_pass, _speed(float_model, speed_ids, context, speed)


# what `_speed` reports when told not to time
NOT_TIMED = {"decode_tokens_per_s": None, "prefill_tokens_per_s": None, "prompt_tokens": None,
             "new_tokens": None}  # fmt: skip


def _speed(model, ids: list[int], context: int | None = None, speed=True) -> dict[str, Any]:
    """Prefill of ``SPEED_PROMPT_TOKENS`` and ``SPEED_NEW_TOKENS`` decoded, both shrunk in
    proportion when ``context`` cannot hold them (`NOT_TIMED` without ``speed``)."""
    if not speed:
        return dict(NOT_TIMED)
    prompt, new = SPEED_PROMPT_TOKENS, SPEED_NEW_TOKENS
    if context is not None and prompt + new > context:
        new = max(1, context * new // (prompt + new))
        prompt = context - new
    return ev.speed(model, ids[:prompt], new)


def measure(
    float_model,
    quant_model,
    plan,
    float_pass: dict[str, Any] | None,
    speed_ids: list[int],
    speed: bool = True,
) -> dict[str, Any]:
    """Quality, size and (unless not ``speed``) speed of one quantized model against its float
    model."""
    out: dict[str, Any] = dict(ev.size_report(plan))
    out["bytes_by_role"] = plan.to_dict()["by_role"]
    if float_pass is not None:
        windows = float_pass["windows"]
        with torch.inference_mode():
            quant_logits = torch.stack([logits(quant_model, w[None])[0] for w in windows])
        out.update(ev.compare(float_pass["logits"], quant_logits, windows))
        out["eval_windows"], out["seq_len"] = int(windows.shape[0]), int(windows.shape[1])
        out["text"] = float_pass["text"]
    timed = _speed(quant_model, speed_ids, speed=speed)
    out["decode_tokens_per_s"] = timed["decode_tokens_per_s"]
    out["prefill_tokens_per_s"] = timed["prefill_tokens_per_s"]
    out["layers"] = ev.layer_sqnr(float_model, quant_model)
    return out


def run(
    model_name: str,
    recipe: Any,
    out: str | Path,
    *,
    eval_windows: int = 8,
    seq_len: int = DEFAULT_SEQ_LEN,
    text: str | Path | None = None,
    overwrite: bool = False,
    compare_presets: bool = False,
    algorithm: str | None = None,
    calibration: str | None = None,
    targets: str | list[str] | None = None,
    allow_fallback: bool = False,
    speed_rounds: int = 3,
    compare_anchors: str | list[str] | None = None,
    stream: bool | None = None,
    resume: bool = False,
    speed: bool = True,
    budget: str | None = None,
    rotate: str | None = None,
) -> dict[str, Any]:
    """Quantize ``model_name`` with ``recipe``, save to ``out``, evaluate, write the reports.

    ``rotate`` (``hadamard`` or ``random``; `edgequant.rotation`) sets the recipe's ``rotate``:
    the norms and rotations are folded into the float weights before anything is rounded (with
    ``budget``, the sensitivity is measured on the rotated model). It needs the float model
    whole (no streaming).

    ``budget`` (``4.5bpw``, ``92.5MB``; `edgequant.mixed`) chooses the recipe instead (pass
    ``recipe=None``): a scheme per module among those every one of ``targets`` runs exactly,
    the least summed KL whose stored weight bytes fit; the choice is the report's
    ``allocation`` and the bundle's recipe.

    ``speed=False`` does not time the float and quantized models (their speed keys are
    ``null``): timing needs the packed model whole with the CPU kernels' copy of its weights
    (twice its packed size; a 7B model's is 4.8 GB).

    ``stream`` (default: when the float32 weights exceed `STREAM_ABOVE` bytes) reads, quantizes
    and evaluates the model one decoder layer at a time (`edgequant.stream`), so only one
    layer's float weights, the packed model and the windows' hidden states are in memory; the
    numbers are the in-memory path's, but the float model's speed is not measured and
    ``compare_presets`` / ``compare_anchors`` (which need the whole float model) are refused.
    ``resume`` continues a stopped streaming run of the same bundle from its last finished
    layer.

    ``algorithm`` replaces every rule's algorithm (`edgequant.algorithms`); ``calibration`` is a
    source spec for `edgequant.calibration.parse` (``wikitext:128x512``, ``file:PATH:NxL``,
    ``model:NxL``). ``targets`` (``"pte,tflite,gguf"``, ``"all"``; `edgequant.targets`) also
    writes the model for each runtime into ``out``, evaluates each file in its runtime on the
    same windows and times them interleaved (``speed_rounds`` rounds, medians); a target that
    cannot hold the recipe is skipped with the reason unless ``allow_fallback``.
    ``compare_anchors`` (``"all"`` or names of `edgequant.anchors.ANCHORS`) adds each runtime's
    own 4-bit route on the same float weights, measured the same way."""
    from edgequant import anchors as an
    from edgequant import targets as tg

    target_names = tg.parse(targets)  # an unknown name: before any work
    anchor_names = an.parse(compare_anchors)
    if anchor_names and not target_names:
        raise ValueError("--compare-anchors compares with the deployed files: pass --targets too")
    if isinstance(speed_rounds, bool) or not isinstance(speed_rounds, int) or speed_rounds < 1:
        raise ValueError(f"speed_rounds must be a positive int, got {speed_rounds!r}")
    from edgequant._io import writer_lock
    from edgequant.artifact import check_writable

    out = Path(out)
    check_writable(out, overwrite)  # before any work; again under the lock
    if text is not None:  # a folder, a missing file or non-UTF-8 bytes: before any work
        from edgequant._io import read_text_file

        read_text_file(Path(text), "text file")
    if budget is not None:
        _check_budget(budget, recipe, target_names)
    elif recipe is None:
        raise ValueError("give a recipe (a preset name, a file or a Recipe) or a budget")
    check_rotation(rotate)
    rotating = rotate or (None if recipe is None else as_recipe(recipe).rotate)
    source = None  # the model read a tensor at a time, opened once (a GGUF file is hashed)
    if stream is None:  # what needs the float model whole keeps it whole
        whole = compare_presets or anchor_names or (calibration or "").strip().startswith("model")
        whole = whole or budget is not None or rotating is not None
        source = None if whole else _lazy_source(model_name)
        stream = source is not None and 4 * source.n_weights() > STREAM_ABOVE
    if stream and (compare_presets or anchor_names or budget is not None or rotating):
        what = ("--compare" if compare_presets else "--budget" if budget
                else "--rotate" if rotating else "--compare-anchors")  # fmt: skip
        raise ValueError(
            f"{what} needs the whole float model in memory; it cannot run with streaming "
            "(pass --no-stream where the model fits)"
        )
    if resume and not stream:
        raise ValueError("--resume continues a streaming run: pass --stream too")
    if not speed and (target_names or compare_presets):
        what = "--targets" if target_names else "--compare"
        raise ValueError(f"{what} times every model it measures: drop --no-speed")
    with writer_lock(out):  # one run per bundle: its reports describe its own bundle
        if stream:
            return _run_streaming(
                model_name, source, recipe, out, eval_windows=eval_windows, seq_len=seq_len,
                text=text, overwrite=overwrite, algorithm=algorithm, calibration=calibration,
                targets=target_names, allow_fallback=allow_fallback, speed_rounds=speed_rounds,
                resume=resume, speed=speed,
            )  # fmt: skip
        return _run(
            model_name, recipe, out, eval_windows=eval_windows, seq_len=seq_len, text=text,
            overwrite=overwrite, compare_presets=compare_presets, algorithm=algorithm,
            calibration=calibration, targets=target_names, allow_fallback=allow_fallback,
            speed_rounds=speed_rounds, anchors=anchor_names, speed=speed, budget=budget,
            rotate=rotate,
        )  # fmt: skip


def _run(
    model_name, recipe, out: Path, *, eval_windows, seq_len, text, overwrite, compare_presets,
    algorithm, calibration, targets, allow_fallback, speed_rounds, anchors, speed, budget=None,
    rotate=None,
) -> dict[str, Any]:  # fmt: skip
    from edgequant.artifact import check_writable
    from edgequant.models import load
    from edgequant.report import write_compare, write_report

    check_writable(out, overwrite)
    if budget is None:
        recipe = _job_recipe(recipe, algorithm, calibration, rotate)  # before any work
    else:  # the recipe is chosen later: the algorithm and its data checked now on a stand-in
        _job_recipe("8da4w", algorithm, calibration)
    lap = _Laps()
    seconds = lap.seconds

    float_model, tokenizer, info = load(model_name)
    check_finite(float_model)  # before the float pass: a NaN would end in a misleading report
    calibration_data = None
    if calibration is not None:
        from edgequant.calibration import parse

        calibration_data = parse(
            calibration, tokenizer, model=float_model, eval_tokens=eval_windows * seq_len
        )
    lap("load")
    allocation = None
    if budget is not None:
        from edgequant import mixed

        measured_on = float_model
        if rotate is not None:  # the sensitivity of the model that will be rounded
            from edgequant.rotation import rotate as rotated

            measured_on = copy.deepcopy(float_model)
            rotated(measured_on, rotate)
        recipe, allocation = mixed.budget_recipe(
            measured_on, budget, targets, mixed.sensitivity_windows(tokenizer),
            algorithm=algorithm, calibration=calibration_data,
        )  # fmt: skip
        del measured_on
        recipe = dataclasses.replace(recipe, rotate=rotate)
        lap("allocate")
    speed_ids, float_pass, float_speed = _float_side(
        float_model, tokenizer, info, eval_windows, seq_len, text, speed=speed
    )
    lap("float_pass")
    started = time.perf_counter()
    model, plan = edgequant.quantize(
        copy.deepcopy(float_model), recipe, calibration=calibration_data
    )
    quantize_seconds = time.perf_counter() - started
    lap("quantize")
    edgequant.save(model, out, tokenizer=tokenizer, overwrite=overwrite)
    lap("save")
    report = {
        **_what_ran(model_name, info, recipe, calibration_data, out),
        "quantize_seconds": quantize_seconds,
        **measure(float_model, model, plan, float_pass, speed_ids, speed),
        "float_decode_tokens_per_s": float_speed["decode_tokens_per_s"],
        "float_prefill_tokens_per_s": float_speed["prefill_tokens_per_s"],
        "speed_prompt_tokens": float_speed["prompt_tokens"],
        "speed_new_tokens": float_speed["new_tokens"],
        "bundle_reloads_identically": _reloads_identically(out, model, float_model, speed_ids),
        "kernels": kernels.counts(model),
        "torch_threads": torch.get_num_threads(),
        "edgequant_version": edgequant.__version__,
        "torch_version": torch.__version__,
    }
    if float_pass is None:
        report.update(eval_windows=0, seq_len=seq_len)
    if allocation is not None:
        report["allocation"] = allocation
    report["recipe_resolved"] = [lp.to_dict() for lp in plan]
    lap("measure")
    if targets:
        report.update(_deploy(model, plan, tokenizer, info, targets, out, float_pass, speed_ids,
                              allow_fallback=allow_fallback, rounds=speed_rounds,
                              float_model=float_model, anchors=anchors, lap=lap,
                              eager_kl=report.get("kl_divergence")))  # fmt: skip
    report["seconds"] = seconds
    write_report(report, out)
    if compare_presets:
        rows = compare(float_model, tokenizer, info, float_pass, speed_ids, float_speed)
        write_compare(rows, out, model_name, highlight=recipe.name)
    return report


def _what_ran(model_name, info, recipe, calibration_data, out: Path) -> dict[str, Any]:
    """The report's first keys: model, its file and family, recipe, calibration, bundle."""
    return {
        "model": str(Path(model_name).resolve()) if Path(model_name).exists() else model_name,
        "model_source": info["source"],
        "model_family": info["family"],
        "recipe": recipe.to_dict(),
        "calibration": None if calibration_data is None else calibration_data.source,
        "bundle": str(out),
    }


class _Laps:
    """``lap(name)``: the wall time since the previous lap, kept as ``seconds[name]``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._clock = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._clock, 2)
        self._clock = now


def _job_recipe(recipe, algorithm: str | None, calibration: str | None, rotate=None):
    """The recipe a job runs (``algorithm`` on every integer rule, ``rotate`` when given),
    checked for calibration."""
    recipe = as_recipe(recipe)
    if algorithm is not None:
        recipe = with_algorithm(recipe, algorithm)
    if rotate is not None:
        recipe = dataclasses.replace(recipe, rotate=rotate)
    _check_calibration(recipe, calibration)
    return recipe


def _lazy_source(model_name):
    """The model as a `edgequant.models.lazy.Source` (headers only), or None for what cannot be
    read a tensor at a time (the in-memory path's loader then says why)."""
    from edgequant.models.lazy import open_source

    try:
        return open_source(model_name)
    except (ValueError, OSError, KeyError):
        return None


def _run_streaming(
    model_name, source, recipe, out: Path, *, eval_windows, seq_len, text, overwrite, algorithm,
    calibration, targets, allow_fallback, speed_rounds, resume, speed,
) -> dict[str, Any]:  # fmt: skip
    """`_run` one decoder layer at a time (`edgequant.stream`), from ``source`` (opened here
    when None)."""
    from edgequant import stream
    from edgequant.artifact import check_writable
    from edgequant.models.lazy import open_source
    from edgequant.report import write_report

    check_writable(out, overwrite)
    recipe = _job_recipe(recipe, algorithm, calibration)  # before any work
    lap = _Laps()
    seconds = lap.seconds

    source = source or open_source(model_name)
    tokenizer, info = source.tokenizer(), source.info
    calibration_data = None
    if calibration is not None:
        from edgequant.calibration import parse

        if calibration.strip().startswith("model"):
            raise ValueError(
                f"calibration {calibration!r} samples the float model, which streaming never "
                "holds whole; use wikitext[:NxL] or file:PATH[:NxL]"
            )
        calibration_data = parse(calibration, tokenizer, eval_tokens=eval_windows * seq_len)
    windows, text_path = None, None
    if eval_windows:
        ids, text_path = _text_ids(tokenizer, text)
        windows = ev.windows(ids, seq_len, eval_windows)
    lap("load")
    started = time.perf_counter()
    streamed = stream.quantize(
        source, recipe, out, tokenizer=tokenizer, calibration=calibration_data, windows=windows,
        resume=resume, overwrite=overwrite,
    )  # fmt: skip
    quantize_seconds = time.perf_counter() - started
    lap("quantize")
    plan = streamed.plan
    measured: dict[str, Any] = dict(ev.size_report(plan))
    measured["bytes_by_role"] = plan.to_dict()["by_role"]
    if windows is not None:
        measured.update(streamed.metrics, eval_windows=int(windows.shape[0]),
                        seq_len=int(windows.shape[1]), text=text_path)  # fmt: skip
    else:
        measured.update(eval_windows=0, seq_len=seq_len)
    model, reloads = None, None  # nothing runs on the bundle: not loaded, not checked
    if windows is not None or speed or targets:  # the packed model: its speed, targets' files
        from edgequant._memory import give_back

        give_back()  # what the pass freed, before the bundle is read back
        model = edgequant.load(out)
        reloads = True  # without windows every number below is the reloaded bundle's
    if windows is not None:  # the bundle gives the logits the pass computed, bit for bit
        with torch.inference_mode():
            reloads = stream.window_digest(model, windows[:1]) == streamed.first_window
    speed_ids = _speed_ids(tokenizer, text)
    timed = _speed(model, speed_ids, speed=speed)
    report = {
        **_what_ran(model_name, info, recipe, calibration_data, out),
        "streamed": True,
        "quantize_seconds": quantize_seconds,
        **measured,
        "decode_tokens_per_s": timed["decode_tokens_per_s"],
        "prefill_tokens_per_s": timed["prefill_tokens_per_s"],
        "layers": streamed.layers,
        "float_decode_tokens_per_s": None,  # the float model is never whole in memory
        "float_prefill_tokens_per_s": None,
        "speed_prompt_tokens": timed["prompt_tokens"],
        "speed_new_tokens": timed["new_tokens"],
        "bundle_reloads_identically": reloads,
        "kernels": streamed.kernels,
        "torch_threads": torch.get_num_threads(),
        "edgequant_version": edgequant.__version__,
        "torch_version": torch.__version__,
        "recipe_resolved": [lp.to_dict() for lp in plan],
    }
    float_pass = None
    if windows is not None:
        import numpy as np

        logits_on_disk = np.load(streamed.float_logits, mmap_mode="c")  # paged in per window
        float_pass = {"windows": windows, "text": text_path,
                      "logits": torch.from_numpy(logits_on_disk)}  # fmt: skip
    lap("measure")
    if targets:
        report.update(_deploy(model, plan, tokenizer, info, targets, out, float_pass, speed_ids,
                              allow_fallback=allow_fallback, rounds=speed_rounds, lap=lap,
                              eager_kl=report.get("kl_divergence")))  # fmt: skip
    streamed.finish()
    report["seconds"] = seconds
    write_report(report, out)
    return report


def _deploy(
    model, plan, tokenizer, info, names, out, float_pass, speed_ids, *, allow_fallback, rounds,
    float_model=None, anchors=(), lap=lambda name: None, eager_kl=None,
) -> dict[str, Any]:  # fmt: skip
    """The report's ``targets`` (each runtime's file, measured there), ``predicted`` decode
    speeds and the greedy ``answers`` of the eager model and of each file."""
    from edgequant import speed, targets
    from edgequant.models.families import decoder_of

    spec = decoder_of(model).spec
    position = SPEED_PROMPT_TOKENS + SPEED_NEW_TOKENS // 2
    need = max(seq_len_of(float_pass), SPEED_PROMPT_TOKENS + SPEED_NEW_TOKENS, 512)
    max_seq_len = min(need, spec.max_seq_len)
    table, source = speed.efficiency()
    predicted = speed.predict(plan, spec, names, position=position, max_seq_len=max_seq_len,
                              table=table)  # fmt: skip
    for name, p in predicted.items():
        log.info("%s: predicted decode %.1f tok/s", name, p["predicted_decode_tokens_per_s"])
    writes = targets.write_all(
        model, tokenizer, names, out, n_weights=plan.n_weights, max_seq_len=max_seq_len,
        source=info["source"], allow_fallback=allow_fallback, bundle=out,
    )  # fmt: skip
    rows = writes.rows  # a .pte may still be lowered by a child process: measure waits for it
    lap("write_targets")

    def twins() -> None:
        if float_pass is not None:
            targets.eager_twins(model, rows, float_pass, eager_kl)

    try:
        anchor_rows = {}
        if anchors:
            from edgequant import anchors as anchor_routes

            anchor_rows = anchor_routes.write_all(
                float_model, tokenizer, anchors, out, n_weights=plan.n_weights,
                max_seq_len=max_seq_len, source=info["source"],
            )  # fmt: skip
            lap("write_anchors")
        both = {**rows, **{f"anchor:{n}": r for n, r in anchor_rows.items()}}
        targets.measure(
            both, tokenizer, float_pass=float_pass, speed_ids=speed_ids,
            new_tokens=SPEED_NEW_TOKENS, rounds=rounds, writes=writes, while_waiting=twins,
        )  # fmt: skip
    finally:
        writes.kill()
    twins()  # the rows written by a child process
    for name, row in rows.items():
        if "skipped" not in row:
            row["predicted_decode_tokens_per_s"] = predicted[name]["predicted_decode_tokens_per_s"]
    with torch.inference_mode():
        eager_answer = targets.answer(model, tokenizer)
    lap("measure_targets")
    out_fields = {
        "targets": rows,
        "speed_model": {"efficiency_from": source, "predicted": predicted},
        "answers": {
            "prompt": targets.ANSWER_PROMPT,
            "eager": eager_answer,
            **{n: r["answer"] for n, r in both.items() if "answer" in r},
        },
    }
    if anchors:
        out_fields["anchors"] = anchor_rows
    return out_fields


def seq_len_of(float_pass: dict[str, Any] | None) -> int:
    """The evaluation windows' length (0 without evaluation)."""
    return 0 if float_pass is None else int(float_pass["windows"].shape[1])


def _check_budget(budget: str, recipe, targets: list[str]) -> None:
    from edgequant import mixed

    mixed.parse_budget(budget)  # a bad budget: before any work
    if recipe is not None:
        raise ValueError("--budget chooses the recipe: drop --recipe (or --budget)")
    if not targets:
        raise ValueError(
            "--budget chooses among the schemes a runtime runs exactly: pass --targets "
            "(pte, tflite, gguf; with several, only schemes all of them run)"
        )


def _check_calibration(recipe, calibration: str | None) -> None:
    from edgequant.schemes import NEEDS_CALIBRATION

    needs = sorted(
        {r.scheme.algorithm for r in recipe.rules if r.scheme is not None} & set(NEEDS_CALIBRATION)
    )
    if needs and calibration is None:
        raise ValueError(
            f"the recipe's {', '.join(needs)} needs calibration data: pass --calibration "
            "wikitext:128x512 (WikiText-2 past the evaluation windows), file:PATH:NxL or "
            "model:NxL (the float model's own samples)"
        )


def with_algorithm(recipe, algorithm: str, **params):
    """``recipe`` with ``algorithm`` (and its ``params``) on every integer rule (float rules stay
    as they are; the rotation too). ``algorithm`` may carry parameters after ``@``
    (`edgequant.schemes.parse_algorithm`: ``gptq@gptaq=0.25@sequential``); ``params`` win."""
    from edgequant.schemes import ALGORITHMS, parse_algorithm

    name, written = parse_algorithm(algorithm)
    if name not in ALGORITHMS:
        raise ValueError(f"algorithm {name!r} does not exist; choose from {list(ALGORITHMS)}")
    params = {**written, **params}
    changed = recipe.map_schemes(lambda scheme: scheme.rounded_by(name, **params))
    return dataclasses.replace(changed, name=f"{recipe.name or 'recipe'}+{algorithm}")


def _reloads_identically(out: Path, model, float_model, ids: list[int]) -> bool:
    """Load the bundle just written and check it gives the quantized model's logits exactly."""
    reloaded = edgequant.load(out, model=shallow_copy(float_model))  # no copy of the weights
    x = torch.tensor([ids])
    with torch.inference_mode():
        return bool(torch.equal(logits(reloaded, x), logits(model, x)))


def _float_row(float_speed: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The table row of the float model: its speed plus whatever else the caller measured."""
    return {
        "recipe": "float",
        **fields,
        "decode_tokens_per_s": float_speed["decode_tokens_per_s"],
        "prefill_tokens_per_s": float_speed["prefill_tokens_per_s"],
    }


def compare(float_model, tokenizer, info, float_pass, speed_ids, float_speed) -> list[dict]:
    """Every preset on the same float pass; one row each (float first)."""
    float_row = _float_row(float_speed, bits_per_weight=32.0)
    if float_pass is not None:
        float_row["perplexity"] = ev.perplexity_from_logits(
            float_pass["logits"], float_pass["windows"]
        )
        float_row.update(kl_divergence=0.0, top1_agreement=100.0)
    rows = [float_row]
    for name in edgequant.recipes.names("source"):
        try:
            edgequant.plan(float_model, name)
        except ValueError as e:  # e.g. a group size this model's layers cannot hold
            log.warning("compare: preset %s skipped: %s", name, e)
            rows.append({"recipe": name, "skipped": str(e)})
            continue
        log.info("compare: %s", name)
        model, plan = edgequant.quantize(copy.deepcopy(float_model), name)
        measured = measure(float_model, model, plan, float_pass, speed_ids)
        measured.pop("layers")
        measured.pop("bytes_by_role")
        float_row["quantized_bytes"] = measured["float_bytes"]
        rows.append({"recipe": name, **measured})
        del model
    return rows


def evaluate_bundle(
    bundle: str | Path,
    *,
    reference: str | None = None,
    eval_windows: int = 8,
    seq_len: int = DEFAULT_SEQ_LEN,
    text: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Rows (float, bundle) measuring a saved bundle against its float model.

    ``reference`` names the float model (as `edgequant.models.load` takes it); by default the
    one recorded in the bundle's ``report.json`` by the main job.
    """
    from edgequant.artifact import load_tokenizer, read_manifest
    from edgequant.models import load

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    if reference is None:
        report_path = bundle / "report.json"
        if not report_path.is_file():
            raise ValueError(
                f"{str(bundle)!r} has no report.json naming its float model; pass --model"
            )
        from edgequant._io import load_json

        report = load_json(report_path.read_text(), str(report_path))
        reference = report.get("model") if isinstance(report, dict) else None
        if not isinstance(reference, str):
            raise ValueError(f"{str(report_path)!r} names no float model; pass --model")
    if manifest.get("recipe") is None:  # before loading anything
        raise ValueError(f"{str(bundle)!r} records no recipe; cannot size it against float")
    float_model, float_tokenizer, info = load(reference)
    model = edgequant.load(bundle, model=shallow_copy(float_model))
    tokenizer = load_tokenizer(bundle) or float_tokenizer
    plan = edgequant.plan(float_model, model.edgequant_recipe)
    speed_ids, float_pass, float_speed = _float_side(
        float_model, tokenizer, info, eval_windows, seq_len, text
    )
    measured = measure(float_model, model, plan, float_pass, speed_ids)
    float_row = _float_row(
        float_speed, bits_per_weight=32.0, quantized_bytes=measured["float_bytes"]
    )
    if float_pass is not None:
        float_row["perplexity"] = measured["float_perplexity"]
    name = (manifest["recipe"] or {}).get("name") or str(bundle)
    return [float_row, {**measured, "recipe": name}]


def evaluate_program(
    path: str | Path,
    *,
    reference: str,
    eval_windows: int = 8,
    seq_len: int = DEFAULT_SEQ_LEN,
    text: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Rows (float, program) measuring a written program (``.pte``, ``.tflite``, ``.gguf``)
    against the float model ``reference``, on the same windows and with the same tokenizer."""
    from edgequant.export import load_program
    from edgequant.models import load

    program = load_program(path)
    if seq_len > program.args.max_seq_len:
        raise ValueError(
            f"--seq-len {seq_len} is longer than the program's max_seq_len "
            f"{program.args.max_seq_len}; pass --seq-len {program.args.max_seq_len} or less"
        )
    float_model, tokenizer, info = load(reference)
    context = program.args.max_seq_len
    speed_ids, float_pass, float_speed = _float_side(
        float_model, tokenizer, info, eval_windows, seq_len, text, context
    )
    from edgequant.targets import for_speed

    program_speed = _speed(for_speed(program), speed_ids, context)
    rows = [
        _float_row(float_speed),
        {
            "recipe": Path(path).name,
            "quantized_bytes": Path(path).stat().st_size,
            "decode_tokens_per_s": program_speed["decode_tokens_per_s"],
            "prefill_tokens_per_s": program_speed["prefill_tokens_per_s"],
        },
    ]
    if float_pass is not None:
        windows = float_pass["windows"]
        program_logits = torch.stack([program(w[None])[0] for w in windows])
        measured = ev.compare(float_pass["logits"], program_logits, windows)
        rows[0]["perplexity"] = measured["float_perplexity"]
        rows[1].update(measured)
    return rows
