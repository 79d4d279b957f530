"""One model quantized once, then written as .pte, .tflite and .gguf and measured in each runtime:
per artifact its bytes, KL / top-1 / perplexity against the float model on the same WikiText-2
windows, decode / prefill tokens/s in that runtime, and the KL difference to the eager model (for
a GGUF file, to the eager model with activations in float when the recipe quantizes them:
llama.cpp quantizes activations itself, in blocks of 32, and the file holds the weights only).

    python benchmarks/families.py [--model qwen2.5-1.5b] [--recipe 8da4w] [--algorithm hqq]
        [--windows 4] [--seq-len 512] [--folder build/families] [--out FILE] [--bundle B]

The quantization is `edgequant quantize --model M --recipe R --algorithm A` (``--calibration``
for the algorithms that need data), run here or, with ``--bundle``, read from the bundle that
command wrote; each program is measured as `edgequant eval --pte/--tflite/
--gguf` measures it (`edgequant.export.load_program`, a GGUF file's speed with llama.cpp computing
the last position's logits only); speed as the main job measures it (its 64-token prompt from the
start of the text, 32 new tokens). Memory: the float model is quantized in place once its logits
and speed are taken, one artifact is written and run at a time, and each runtime model is freed
after its evaluation; the peak RSS is printed after every step. An artifact that fails to export
or run gets its error in its row; the others go on. Run on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import re
import resource
import time
import traceback
from pathlib import Path

import torch

import edgequant
from edgequant import eval as ev
from edgequant import job
from edgequant.export import load_program, to_gguf, to_pte, to_tflite
from edgequant.export.gguf_runtime import GgufModel
from edgequant.models import load
from edgequant.quantize import as_recipe
from edgequant.recipe import Recipe

PREFILL = 64  # the .tflite prefill signature's length (as benchmarks/tflite.py)
FORMATS = ("pte", "gguf", "tflite")  # tflite last: it holds a float copy (the most memory)


START = time.perf_counter()


def memory(step: str, log: list[dict]) -> None:
    """Print and record the peak RSS so far (getrusage) and the current RSS after ``step``."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        now = pages * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError):  # not Linux
        now = float("nan")
    elapsed = time.perf_counter() - START
    print(
        f"[{elapsed:5.0f} s] after {step}: peak RSS {peak:.2f} GiB, now {now:.2f} GiB", flush=True
    )
    log.append(
        {"step": step, "seconds": round(elapsed, 1), "peak_rss_gib": round(peak, 3),
         "rss_gib": round(now, 3)}
    )  # fmt: skip


def quality(model, windows, reference) -> dict:
    """KL / top-1 / perplexity of ``model`` against the float ``reference`` logits."""
    out = ev.compare(reference, ev.float_logits(model, windows), windows)
    out.pop("float_perplexity")
    return out


@contextlib.contextmanager
def weights_only(model):
    """``model`` with its packed modules' activation quantization off while inside: what a GGUF
    file of it computes (llama.cpp quantizes activations itself, in blocks of 32; see
    docs/gguf.md). Yields False when no module quantizes activations."""
    from edgequant import kernels
    from edgequant.layers import QuantizedLinear

    changed = [
        (m, m.scheme)
        for m in model.modules()
        if isinstance(m, QuantizedLinear) and m.scheme.activation != "none"
    ]
    for m, scheme in changed:
        m.scheme = dataclasses.replace(scheme, activation="none")
    # the reference kernels (float activations, fp32 matmul): a layer's fast kernel is chosen
    # once and cached, and the int4 weight-only one computes in bf16
    kernels.use_reference(bool(changed))
    try:
        yield bool(changed)
    finally:
        kernels.use_reference(False)
        for m, scheme in changed:
            m.scheme = scheme


def speed(model, speed_ids: list[int]) -> dict:
    """Decode and prefill tokens/s of ``model`` (as the main job measures them)."""
    s = ev.speed(model, speed_ids, job.SPEED_NEW_TOKENS)
    return {k: s[k] for k in ("decode_tokens_per_s", "prefill_tokens_per_s")}


def export(fmt: str, model, path: Path, tokenizer, info: dict, max_seq_len: int) -> Path:
    """Write ``model`` as ``path`` the way `edgequant export --format fmt` does."""
    if fmt == "pte":
        return to_pte(
            model, path, max_seq_len=max_seq_len, bos_id=getattr(tokenizer, "bos_id", None),
            eos_id=getattr(tokenizer, "eos_id", None), overwrite=True,
        )  # fmt: skip
    if fmt == "tflite":
        return to_tflite(model, path, max_seq_len=max_seq_len, prefill_len=PREFILL, overwrite=True)
    source = info["source"] if str(info["source"]).endswith(".gguf") else None
    return to_gguf(
        model, path, tokenizer=None if source else tokenizer, tokenizer_gguf=source,
        overwrite=True,
    )  # fmt: skip


def run_program(path: Path, windows, reference, speed_ids) -> dict:
    """The file in its runtime, as `edgequant eval --pte/--tflite/--gguf` runs it."""
    program = load_program(path)
    out = quality(program, windows, reference)
    if isinstance(program, GgufModel):  # speed as llama.cpp's tools run: last logits only
        n_ctx = program.args.max_seq_len
        del program
        gc.collect()
        program = GgufModel(path, n_ctx=n_ctx, last_only=True)
    return {**out, **speed(program, speed_ids)}


def table(rows: list[dict]) -> str:
    """The rows as a markdown table (an error's first line in its row)."""
    lines = [
        "| artifact | MB | KL | top-1 % | perplexity | decode tok/s | prefill tok/s | "
        "KL - eager | export s | error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def num(row: dict, key: str, fmt: str, scale: float = 1.0) -> str:
        return format(row[key] / scale, fmt) if row.get(key) is not None else "-"

    for r in rows:
        error = r["error"].splitlines()[0][:120].replace("|", "/") if r.get("error") else ""
        lines.append(
            f"| {r['artifact']} | {num(r, 'bytes', '.1f', 1e6)} | "
            f"{num(r, 'kl_divergence', '.4f')} | {num(r, 'top1_agreement', '.1f')} | "
            f"{num(r, 'perplexity', '.3f')} | {num(r, 'decode_tokens_per_s', '.1f')} | "
            f"{num(r, 'prefill_tokens_per_s', '.1f')} | {num(r, 'kl_minus_eager', '+.4f')} | "
            f"{num(r, 'export_s', '.0f')} | {error} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-1.5b", help="a name or path `load` takes")
    parser.add_argument("--recipe", default="8da4w")
    parser.add_argument("--algorithm", default="hqq", help="for every integer rule ('' keeps)")
    parser.add_argument("--calibration", help="for gptq/awq/smoothquant, e.g. wikitext:128x512")
    parser.add_argument(
        "--bundle",
        help="a bundle `edgequant quantize --model M ... --out B` wrote: measured instead of "
        "quantizing here (--recipe/--algorithm/--calibration are then the bundle's)",
    )
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--folder", default="build/families")
    parser.add_argument("--out", help="default: benchmarks/results/families-<model>.json")
    args = parser.parse_args()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(args.model).name)  # a name or a file's name
    folder = Path(args.folder) / slug
    folder.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or Path(__file__).parent / "results" / f"families-{slug}.json")
    # the programs' KV cache holds a window and the speed run's prompt + new tokens
    max_seq_len = max(args.seq_len, job.SPEED_PROMPT_TOKENS + job.SPEED_NEW_TOKENS)
    recipe = as_recipe(args.recipe)
    if args.algorithm:
        recipe = job.with_algorithm(recipe, args.algorithm)
    mem: list[dict] = []

    started = time.perf_counter()
    model, tokenizer, info = load(args.model)
    print(f"loaded {args.model} ({info['source']}) in {time.perf_counter() - started:.0f} s")
    memory("load", mem)
    ids = ev.tokenize_file(tokenizer, ev.default_text())
    windows = ev.windows(ids, args.seq_len, args.windows)
    speed_ids = ids[: job.SPEED_PROMPT_TOKENS]
    reference = ev.float_logits(model, windows)
    float_row = {
        "artifact": "float",
        "kl_divergence": 0.0,
        "top1_agreement": 100.0,
        "perplexity": ev.perplexity_from_logits(reference, windows),
        **speed(model, speed_ids),
    }
    memory("float logits and speed", mem)

    calibration = None
    if args.bundle:  # quantized by `edgequant quantize`: only the float reference is needed
        recipe = Recipe.from_dict(edgequant.artifact.read_manifest(args.bundle)["recipe"])
        plan = edgequant.plan(model, recipe)
        del model
        gc.collect()
        model = edgequant.load(args.bundle)
        quantize_s = None
    elif args.calibration:
        from edgequant.calibration import parse

        calibration = parse(
            args.calibration, tokenizer, model=model, eval_tokens=args.windows * args.seq_len
        )
    if not args.bundle:
        started = time.perf_counter()
        model, plan = edgequant.quantize(model, recipe, calibration=calibration)  # in place
        quantize_s = time.perf_counter() - started
    gc.collect()  # the float weights go with the modules quantize swapped out
    size = ev.size_report(plan)
    float_row["bytes"] = size["float_bytes"]
    rows = [float_row]
    eager = {"artifact": "eager", "bytes": size["quantized_bytes"], "quantize_s": quantize_s}
    memory(f"quantize {recipe.name}", mem)
    try:
        eager.update({**quality(model, windows, reference), **speed(model, speed_ids)})
    except Exception as e:  # recorded in the row; the programs go on
        traceback.print_exc()
        eager["error"] = f"{type(e).__name__}: {e}"
    rows.append(eager)
    with weights_only(model) as changed:  # the GGUF file's reference
        if changed:
            eager_wo = {"artifact": "eager, weights only", "bytes": size["quantized_bytes"]}
            eager_wo.update(quality(model, windows, reference))
            rows.append(eager_wo)
    memory("eager eval", mem)

    for fmt in FORMATS:
        row: dict = {"artifact": fmt}
        path = folder / f"{slug}-{recipe.name}.{fmt}".replace("+", "-")
        try:
            print(f"exporting {path} ...", flush=True)
            started = time.perf_counter()
            export(fmt, model, path, tokenizer, info, max_seq_len)
            row["export_s"] = time.perf_counter() - started
            row["path"], row["bytes"] = str(path), path.stat().st_size
            gc.collect()
            memory(f"export {fmt}", mem)
            print(f"evaluating {path.name} on {len(windows)} windows ...", flush=True)
            row.update(run_program(path, windows, reference, speed_ids))
        except Exception as e:  # recorded in the row; the others go on
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {e}"
        gc.collect()
        memory(f"{fmt} eval", mem)
        rows.append(row)

    for r in rows:
        # a GGUF file runs the weights with llama.cpp's own activation blocks: its reference is
        # the eager model with activations in float, when the recipe quantizes them
        ref = next(
            (e for e in rows if e["artifact"] == "eager, weights only"), eager
        ) if r["artifact"] == "gguf" else eager  # fmt: skip
        if r["artifact"] in FORMATS and "kl_divergence" in r and "kl_divergence" in ref:
            r["kl_minus_eager"] = r["kl_divergence"] - ref["kl_divergence"]
    print(
        f"\n{args.model} ({info['source']}), {recipe.name}; {args.windows} x {args.seq_len} tokens "
        f"of WikiText-2 test; speed: {len(speed_ids)}-token prompt, {job.SPEED_NEW_TOKENS} new "
        f"tokens, {torch.get_num_threads()} threads\n"
    )
    print(table(rows))
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": args.model, "source": info["source"], "recipe": recipe.to_dict(),
        "calibration": args.calibration, "windows": args.windows, "seq_len": args.seq_len,
        "max_seq_len": max_seq_len, "speed_prompt_tokens": len(speed_ids),
        "speed_new_tokens": job.SPEED_NEW_TOKENS, "threads": torch.get_num_threads(),
        "edgequant_version": edgequant.__version__, "torch_version": torch.__version__,
    }  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "rows": rows, "memory": mem}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
