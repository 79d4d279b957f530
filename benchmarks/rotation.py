"""Rotations folded into the weights (`edgequant.rotation`) with each algorithm, on SmolLM2-135M's
decoder linears as 8da4w g32 (embedding and head float): KL, perplexity and top-1 against the
float model for every variant in the eager model, then the variants named by --deploy written
as each runtime's file and measured in that runtime on the same windows, in one run.

    python benchmarks/rotation.py [--model default] [--windows 8] [--first-window 0]
        [--variants gptq,awq+gptq,hadamard+gptq,hadamard+awq+gptq,random+gptq]
        [--calibration wikitext:128x512] [--deploy best] [--targets pte,tflite,gguf]
        [--folder build/rotation] [--out FILE]

A variant is ``[hadamard+|random+]ALGORITHM`` where ALGORITHM is any of `edgequant.algorithms`'
or ``awq+gptq`` (AWQ's scales, then GPTQ on the scaled inputs), optionally with the
algorithm's parameters after ``@`` (``hadamard+gptq@act_order``, ``gptq@damp=0.05``; a name
alone means true). ``--first-window 8`` measures windows 8, 9, ... instead of the evaluation
windows 0..N-1 (a development set for choosing defaults). ``--deploy best`` deploys the
variant with the lowest eager KL and the best one without rotation; ``--deploy none`` none.
The calibration batches come from WikiText-2's test split past token 32,768, disjoint from
the evaluation windows. Prints a Markdown table and writes JSON (default
benchmarks/results/rotation.json).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

import edgequant
from edgequant import calibration as cal
from edgequant import eval as ev
from edgequant.export import load_program
from edgequant.job import with_algorithm
from edgequant.models import load
from edgequant.recipe import ROTATIONS, Recipe, Rule
from edgequant.schemes import NEEDS_CALIBRATION, parse_algorithm
from edgequant.targets import write

MAX_SEQ_LEN = 512


def decoder_linears() -> Recipe:
    """8da4w g32 on the decoder layers' linears; the embedding and head float."""
    preset = edgequant.recipes.get("8da4w")
    keep = (Rule(None, role="embedding"), Rule(None, role="lm_head"))
    return Recipe(preset.rules + keep, name="decoder-linears-8da4w")


def variant_recipe(variant: str) -> Recipe:
    """``[rotation+]algorithm[@param[=value]...]`` as a recipe."""
    named, params = parse_algorithm(variant)
    rotate, _, algorithm = named.partition("+")
    if rotate not in ROTATIONS:
        rotate, algorithm = None, named
    base = decoder_linears()
    if algorithm == "awq+gptq":
        recipe = base.map_schemes(lambda s: s.rounded_by("awq", gptq=True, **params))
    else:
        recipe = with_algorithm(base, algorithm, **params)
    return dataclasses.replace(recipe, rotate=rotate, name=variant)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--first-window", type=int, default=0)
    parser.add_argument(
        "--variants", default="gptq,awq+gptq,hadamard+gptq,hadamard+awq+gptq,random+gptq"
    )
    parser.add_argument("--calibration", default="wikitext:128x512")
    parser.add_argument("--deploy", default="best", help="best, none, or variants")
    parser.add_argument("--targets", default="pte,tflite,gguf")
    parser.add_argument("--folder", default="build/rotation")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "rotation.json"))
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    recipes = {v: variant_recipe(v) for v in variants}  # a bad name: before any work
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)

    model, tokenizer, info = load(args.model)
    ids = ev.tokenize_file(tokenizer, ev.default_text())[args.first_window * 512 :]
    windows = ev.windows(ids, 512, args.windows)
    reference = ev.float_logits(model, windows)
    needs = any(rule.scheme is not None and rule.scheme.algorithm in NEEDS_CALIBRATION
                for r in recipes.values() for rule in r.rules)  # fmt: skip
    data = cal.parse(args.calibration, tokenizer, model=model) if needs else None
    meta = {"model": args.model, "windows": args.windows, "first_window": args.first_window,
            "calibration": args.calibration}  # fmt: skip
    rows: list[dict] = []  # the JSON rewritten after every row: a late failure loses none
    quantized: dict[str, torch.nn.Module] = {}  # only the variants that may be deployed
    wanted = None if args.deploy == "best" else set(_deployed(args.deploy, []))
    for variant, recipe in recipes.items():
        print(f"{variant}: quantizing ...", flush=True)
        started = time.perf_counter()
        q, _ = edgequant.quantize(copy.deepcopy(model), recipe, calibration=data)
        seconds = time.perf_counter() - started
        got = ev.float_logits(q, windows)  # float32 logits of each window, eager
        row = {"variant": variant, "where": "eager", "quantize_seconds": round(seconds, 1),
               **ev.compare(reference, got, windows)}  # fmt: skip
        rows.append(row)
        _save(Path(args.out), meta, rows)
        print(f"  eager KL {row['kl_divergence']:.4f} ({seconds:.0f} s)", flush=True)
        if wanted is None or variant in wanted:
            quantized[variant] = q
        del q, got

    deploy = _deployed(args.deploy, rows)
    for variant in deploy:
        for target in [t for t in args.targets.split(",") if t]:
            path = folder / f"{variant.replace('+', '-')}.{target}"
            print(f"{variant}: writing {target} ...", flush=True)
            write(quantized[variant], tokenizer, target, path, source=info["source"],
                  max_seq_len=MAX_SEQ_LEN)  # fmt: skip
            program = load_program(path)
            with torch.inference_mode():
                got = torch.stack([program(w[None])[0] for w in windows])
            row = {"variant": variant, "where": target, "file_bytes": path.stat().st_size,
                   **ev.compare(reference, got, windows)}  # fmt: skip
            rows.append(row)
            _save(Path(args.out), meta, rows)
            print(f"  {target} KL {row['kl_divergence']:.4f}", flush=True)
            del program, got

    print(f"\n{args.model}, decoder linears 8da4w g32 (embedding and head float), "
          f"{args.windows} x 512 tokens of WikiText-2 test, "
          f"calibration {args.calibration}\n")  # fmt: skip
    print("| variant | where | KL | top-1 % | perplexity | quantize s |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        secs = r.get("quantize_seconds", "-")
        print(f"| {r['variant']} | {r['where']} | {r['kl_divergence']:.4f} | "
              f"{r['top1_agreement']:.1f} | {r['perplexity']:.2f} | {secs} |")  # fmt: skip
    print(f"wrote {args.out}")


def _save(out: Path, meta: dict, rows: list[dict]) -> None:
    """The JSON file (a temporary file, then renamed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    tmp.replace(out)


def _deployed(deploy: str, rows: list[dict]) -> list[str]:
    """The variants to write as files: ``best`` (the lowest eager KL, and the lowest without a
    rotation), ``none``, or a comma-separated list."""
    if deploy == "none":
        return []
    if deploy != "best":
        return [v for v in deploy.split(",") if v]
    eager = sorted(rows, key=lambda r: r["kl_divergence"])
    best = [eager[0]["variant"]]
    plain = [r["variant"] for r in eager if r["variant"].partition("+")[0] not in ROTATIONS]
    return best + [v for v in plain[:1] if v not in best]


if __name__ == "__main__":
    main()
