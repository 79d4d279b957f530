"""The main job's deployed files: the quantized model written for each runtime (``.pte`` for
ExecuTorch, ``.tflite`` for LiteRT, ``.gguf`` for llama.cpp), each evaluated in its runtime on
the eager model's windows and timed in its runtime, interleaved.

    names = parse("all")                            # ['pte', 'tflite', 'gguf']
    rows = write_all(model, tokenizer, names, out, n_weights=..., max_seq_len=512).wait()
    measure(rows, tokenizer, float_pass=..., speed_ids=..., new_tokens=32)

A target that cannot hold the recipe as stored is skipped with the reason (`check`), unless
``allow_fallback`` keeps such layers in float (``.pte``, ``.tflite``) or re-quantizes them to
the nearest exact GGUF type.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from edgequant import eval as ev
from edgequant._progress import progress_bar

log = logging.getLogger(__name__)

# name -> (runtime, file name written in the bundle folder)
TARGETS: dict[str, tuple[str, str]] = {
    "pte": ("ExecuTorch (XNNPACK)", "model.pte"),
    "tflite": ("LiteRT (XNNPACK)", "model.tflite"),
    "gguf": ("llama.cpp", "model.gguf"),
}
# How a target's runtime rounds activations where that differs from the scheme
# (`edgequant.kernels.computing_as`): llama.cpp meets a Q4_0 / Q5_0 / Q8_0 weight with Q8_0
# activation blocks of 32, finer than the per-token int8 of an ``int8_dynamic`` scheme.
ARITHMETIC: dict[str, str] = {"gguf": "ggml"}
SPEED_ROUNDS = 3  # interleaved rounds per file; the median is reported
ANSWER_PROMPT = "What is the capital of France?"
ANSWER_TOKENS = 32


def parse(text: str | Sequence[str] | None) -> list[str]:
    """Target names from ``"pte,tflite,gguf"``, ``"all"`` or a list, in the order given,
    without repeats.

    >>> parse("gguf,pte"), parse("all")
    (['gguf', 'pte'], ['pte', 'tflite', 'gguf'])
    >>> parse("onnx")
    Traceback (most recent call last):
    ...
    ValueError: unknown target 'onnx'; targets: pte, tflite, gguf (or all)
    """
    names = parse_names(text, list(TARGETS), "target")
    if text is not None and not names:
        raise ValueError(f"no target named; targets: {', '.join(TARGETS)} (or all)")
    return names


def parse_names(text: str | Sequence[str] | None, known: Sequence[str], what: str) -> list[str]:
    """Names among ``known`` from a comma-separated string or a list (``all``: every one), in
    the order given, without repeats; an unknown one is refused naming ``what`` and the known."""
    if text is None:
        return []
    items = text.split(",") if isinstance(text, str) else list(text)
    names: list[str] = []
    for item in (i.strip() for i in items if i.strip()):
        if item == "all":
            names += [n for n in known if n not in names]
        elif item not in known:
            raise ValueError(f"unknown {what} {item!r}; {what}s: {', '.join(known)} (or all)")
        elif item not in names:
            names.append(item)
    return names


def check(model: nn.Module, target: str) -> str | None:
    """Why ``target`` cannot hold the packed ``model`` as stored (None: it can): the first
    module its runtime cannot run exactly, and how many there are."""
    from edgequant.export.common import unsupported

    if target == "pte":
        from edgequant.export.pte import xnnpack_problem as problem_of
    elif target == "tflite":
        from edgequant.export.litert import litert_problem as problem_of
    else:
        from edgequant.export.gguf_blocks import gguf_problem as problem_of
    problems = unsupported(model, problem_of)
    if not problems:
        return None
    first = problems[0]
    more = f" (and {len(problems) - 1} more module(s))" if len(problems) > 1 else ""
    return (
        f"{TARGETS[target][0]} cannot run {first.fqn} ({first.scheme.describe()}) as stored"
        f"{more}: {first.reason}; nearest exact: {first.nearest}"
    )


def write(
    model: nn.Module,
    tokenizer,
    target: str,
    path: Path,
    *,
    source: str | None = None,
    max_seq_len: int | None = None,
    allow_fallback: bool = False,
) -> Path:
    """Write the packed ``model`` as ``target`` to ``path`` (replacing a file the job wrote
    before). ``source`` is the model's GGUF file, whose tokenizer a ``.gguf`` copies."""
    from edgequant.export import to_gguf, to_pte, to_tflite

    if target == "pte":
        bos, eos = getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)
        return to_pte(
            model, path, max_seq_len=max_seq_len, bos_id=bos, eos_id=eos,
            allow_fallback=allow_fallback, overwrite=True,
        )  # fmt: skip
    if target == "tflite":
        return to_tflite(
            model, path, max_seq_len=max_seq_len, allow_fallback=allow_fallback, overwrite=True
        )
    from_source = source is not None and str(source).endswith(".gguf") and Path(source).is_file()
    return to_gguf(
        model, path, tokenizer=None if from_source else tokenizer,
        tokenizer_gguf=source if from_source else None, allow_requant=allow_fallback,
        overwrite=True,
    )  # fmt: skip


def for_speed(program):
    """The program as its runtime's own tools run it: llama.cpp computing the last position's
    logits only (the evaluation needs them all)."""
    from edgequant.export.gguf_runtime import GgufModel

    if isinstance(program, GgufModel):
        return GgufModel(program.path, n_ctx=program.args.max_seq_len, last_only=True)
    return program


def speeds(
    paths: dict[str, str | Path], prompt_ids: list[int], new_tokens: int, rounds: int = SPEED_ROUNDS
) -> dict[str, dict[str, float]]:
    """Prefill and decode tokens/s of each written file: ``rounds`` rounds, every file once per
    round in turn (so drift in the machine's speed touches all alike), the median of each.
    Every file prefills the same prompt and decodes exactly ``new_tokens`` tokens.

    Each run is a fresh process that loads the file alone, as on a device: in one process,
    llama.cpp decoded SmolLM2 at a third of its speed after ExecuTorch had prefilled 512
    tokens, for as long as the process lived."""
    runs: dict[str, list[dict]] = {name: [] for name in paths}
    steps = [(r, name) for r in range(rounds) for name in paths]
    for _, name in progress_bar(steps, len(steps), "speed", "run"):
        runs[name].append(speed_in_child(paths[name], prompt_ids, new_tokens))
    return {
        name: {
            "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in rs),
            "prefill_tokens_per_s": statistics.median(r["prefill_tokens_per_s"] for r in rs),
            "speed_rounds": rounds,
        }
        for name, rs in runs.items()
    }


_CHILD = """
import json, sys
from edgequant import eval as ev
from edgequant.export import load_program
from edgequant.targets import for_speed
job = json.load(sys.stdin)
program = for_speed(load_program(job["path"]))
result = ev.speed(program, job["prompt"], job["new_tokens"])
print("EDGEQUANT-SPEED " + json.dumps(result))
"""


def speed_in_child(path: str | Path, prompt_ids: list[int], new_tokens: int) -> dict[str, Any]:
    """`edgequant.eval.speed` of the file at ``path`` in a fresh Python process, with this
    process's thread count."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    job = {"path": str(path), "prompt": list(prompt_ids), "new_tokens": new_tokens}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD], input=json.dumps(job), capture_output=True, text=True,
        env=env, timeout=1800,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("EDGEQUANT-SPEED ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"timing {str(path)!r} in a child process failed (exit {done.returncode}): "
            f"{done.stderr.strip()[-1500:]}"
        )
    return json.loads(lines[-1].removeprefix("EDGEQUANT-SPEED "))


def answer(model, tokenizer, prompt: str = ANSWER_PROMPT) -> str:
    """The greedy answer of ``model`` (eager or a program) to one chat prompt."""
    from edgequant.generate import generate

    return generate(model, tokenizer, prompt, max_new_tokens=ANSWER_TOKENS).text


def file_row(runtime: str, path: Path, n_weights: int, **extra: Any) -> dict[str, Any]:
    """The size facts of a written file: ``runtime``, ``path``, ``bytes``, ``bits_per_weight``
    (the whole file's bytes per weight of the plan)."""
    size = Path(path).stat().st_size
    return {
        "runtime": runtime,
        "path": str(path),
        "bytes": size,
        "bits_per_weight": size * 8 / n_weights if n_weights else None,
        **extra,
    }


def measure(
    rows: dict[str, dict[str, Any]],
    tokenizer,
    *,
    float_pass: dict[str, Any] | None,
    speed_ids: list[int],
    new_tokens: int,
    rounds: int = SPEED_ROUNDS,
    writes: Writes | None = None,
    while_waiting: Callable[[], None] | None = None,
) -> None:
    """Evaluate each written file of ``rows`` (those with a ``path``) in its runtime on the
    float pass's windows, ask it `ANSWER_PROMPT`, then time them all interleaved; the results
    go into the rows. With ``writes``, a file still being written by a child process is
    evaluated once it is there; ``while_waiting`` runs first. Nothing else runs while files are
    timed."""
    from edgequant.export import load_program

    def evaluate(row: dict[str, Any]) -> None:
        log.info("evaluating %s in %s", row["path"], row["runtime"])
        program = load_program(row["path"])
        if float_pass is not None:
            windows = float_pass["windows"]
            with torch.inference_mode():
                logits = torch.stack([program(w[None])[0] for w in windows])
            measured = ev.compare(float_pass["logits"], logits, windows)
            row.update(
                perplexity=measured["perplexity"],
                kl_divergence=measured["kl_divergence"],
                top1_agreement=measured["top1_agreement"],
            )
            del logits
        row["answer"] = answer(program, tokenizer)

    for row in rows.values():
        if "path" in row:
            evaluate(row)
    if while_waiting is not None:
        while_waiting()
    if writes is not None and writes.pending:
        pending = list(writes.pending)
        writes.wait()
        for name in pending:
            rows[name] = writes.rows[name]
            if "path" in rows[name]:
                evaluate(rows[name])
    paths = {name: row["path"] for name, row in rows.items() if "path" in row}
    if paths:
        for name, speed in speeds(paths, speed_ids, new_tokens, rounds).items():
            rows[name].update(speed)


def eager_twins(
    model: nn.Module, rows: dict[str, dict[str, Any]], float_pass: dict[str, Any], eager_kl: float
) -> None:
    """Give each evaluated row ``eager_kl_divergence``: the eager model's KL computing as that
    runtime computes (``eager_arithmetic``: ``scheme``, or an `ARITHMETIC` name, one pass per
    name). A file keeps the bundle's values when its KL is this one's, to within 0.01. A file
    written with ``--allow-fallback`` holds other values than the bundle: it has no twin."""
    from edgequant import kernels
    from edgequant.models.base import logits

    twins: dict[str, float] = {"scheme": eager_kl}
    for name, row in rows.items():
        if row.get("kl_divergence") is None or row.get("fallback") or "eager_arithmetic" in row:
            continue
        arithmetic = ARITHMETIC.get(name, "scheme")
        if arithmetic not in twins:
            log.info("evaluating the eager model computing as %s (%s's twin)", arithmetic, name)
            windows = float_pass["windows"]
            with kernels.computing_as(arithmetic), torch.inference_mode():
                twin = torch.stack([logits(model, w[None])[0] for w in windows])
            twins[arithmetic] = ev.compare(float_pass["logits"], twin, windows)["kl_divergence"]
            del twin
        row["eager_arithmetic"] = arithmetic
        row["eager_kl_divergence"] = twins[arithmetic]


# A writer's peak memory per weight of the model (measured: lowering SmolLM2-135M's 8da4w bundle
# to a .pte peaks at 4.2 GB); two writers run at once only when both fit in the free memory.
WRITER_BYTES_PER_WEIGHT = 32

_WRITE_CHILD = """
import json, sys
from pathlib import Path
from edgequant.artifact import load, load_tokenizer
from edgequant.targets import write
job = json.load(sys.stdin)
try:
    write(load(job["bundle"]), load_tokenizer(job["bundle"]), job["target"], Path(job["path"]),
          source=job["source"], max_seq_len=job["max_seq_len"],
          allow_fallback=job["allow_fallback"])
except (ValueError, NotImplementedError) as e:
    print("EDGEQUANT-SKIP " + json.dumps(str(e)))
"""


def _free_bytes() -> int:
    """Memory the OS can give now (``MemAvailable``; 0 where /proc/meminfo is missing)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _start_child_writer(bundle: Path, name: str, path: Path, **job: Any):
    """Write target ``name`` of the saved ``bundle`` in a child process; returns the process.
    Its output goes to temporary files, not pipes: a pipe nobody reads while the job works
    would stop the child once it filled."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITE_CHILD], stdin=subprocess.PIPE, stdout=out, stderr=err,
        text=True, env=env,
    )  # fmt: skip
    child.stdin.write(json.dumps({"bundle": str(bundle), "target": name, "path": str(path), **job}))
    child.stdin.close()
    child.output = (out, err)
    return child


def _finish_child_writer(child, name: str) -> str | None:
    """Wait for a child writer: None when it wrote its file, the reason when the target
    cannot be written; any other failure raises."""
    import json

    child.wait()
    texts = []
    for f in child.output:
        f.seek(0)
        texts.append(f.read())
        f.close()
    out, err = texts
    skip = [line for line in out.splitlines() if line.startswith("EDGEQUANT-SKIP ")]
    if child.returncode == 0 and skip:
        return json.loads(skip[-1].removeprefix("EDGEQUANT-SKIP "))
    if child.returncode != 0:
        raise RuntimeError(
            f"writing target {name} in a child process failed (exit {child.returncode}): "
            f"{err.strip()[-1500:]}"
        )
    return None


class Writes:
    """Targets being written: ``rows`` (``{name: row}``) holds every target
    written here or skipped; one written by a child process is in ``pending`` until `wait`."""

    def __init__(self, rows: dict[str, dict[str, Any]], out: Path, n_weights: int) -> None:
        self.rows, self.out, self.n_weights = rows, Path(out), n_weights
        self.pending: dict[str, Any] = {}  # name -> child process

    def finish(self, name: str, reason: str | None) -> None:
        """Record target ``name``'s outcome: written (``reason`` None) or skipped."""
        runtime = TARGETS[name][0]
        if reason is not None:
            log.warning("target %s skipped: %s", name, reason)
            self.rows[name] = {"runtime": runtime, "skipped": reason}
        else:
            path = self.out / TARGETS[name][1]
            fallback = self.rows[name].get("fallback")
            self.rows[name] = file_row(runtime, path, self.n_weights, fallback=fallback)

    def wait(self) -> dict[str, dict[str, Any]]:
        """Wait for the child writers; the complete rows."""
        try:
            for name, child in list(self.pending.items()):
                if child.poll() is None:
                    log.info("waiting for the child process writing %s", TARGETS[name][1])
                self.finish(name, _finish_child_writer(child, name))
                del self.pending[name]
        finally:
            self.kill()
        return self.rows

    def kill(self) -> None:
        """Stop child writers still running (after an error)."""
        for child in self.pending.values():
            if child.poll() is None:
                child.kill()
                child.wait()


def write_all(
    model: nn.Module,
    tokenizer,
    names: Sequence[str],
    out: Path,
    *,
    n_weights: int,
    max_seq_len: int,
    source: str | None = None,
    allow_fallback: bool = False,
    bundle: Path | None = None,
) -> Writes:
    """Write each target into ``out``; ``writes.wait()`` gives ``{name: row}`` with each file's
    size facts, or ``{"runtime", "skipped": reason}`` for a target that cannot hold the recipe.

    With ``bundle`` (``model`` saved there) and two cores and the memory for two writers, the
    ``.pte`` (the slowest: ExecuTorch lowers each delegated partition apart) is written from the
    bundle by a child process, which may still run when this returns."""
    import os

    rows: dict[str, dict[str, Any]] = {}
    todo: list[str] = []
    for name in names:
        reason = check(model, name)
        if reason and not allow_fallback:
            log.warning("target %s skipped: %s (--allow-fallback writes it anyway)", name, reason)
            rows[name] = {"runtime": TARGETS[name][0], "skipped": reason}
        else:
            todo.append(name)
            rows[name] = {"runtime": TARGETS[name][0], "fallback": reason}
    writes = Writes(rows, out, n_weights)
    parallel = (
        bundle is not None and "pte" in todo and len(todo) > 1 and (os.cpu_count() or 1) > 1
        and _free_bytes() > 2 * WRITER_BYTES_PER_WEIGHT * n_weights
    )  # fmt: skip
    if parallel:
        log.info("writing %s in a child process, alongside the others", Path(out) / "model.pte")
        writes.pending["pte"] = _start_child_writer(
            bundle, "pte", Path(out) / TARGETS["pte"][1], source=source,
            max_seq_len=max_seq_len, allow_fallback=allow_fallback,
        )  # fmt: skip
        todo.remove("pte")
    try:
        for name in progress_bar(todo, len(todo), "write", "file"):
            path = Path(out) / TARGETS[name][1]
            log.info("writing %s", path)
            try:
                write(
                    model, tokenizer, name, path, source=source, max_seq_len=max_seq_len,
                    allow_fallback=allow_fallback,
                )  # fmt: skip
                writes.finish(name, None)
            except (ValueError, NotImplementedError) as e:  # e.g. an architecture GGUF can't hold
                writes.finish(name, str(e))
    except BaseException:
        writes.kill()
        raise
    return writes
