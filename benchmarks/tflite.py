"""SmolLM2-135M as LiteRT programs: per variant, .tflite bytes, quality against float on the same
windows (KL, top-1, perplexity of the file itself, in LiteRT) beside the eager quantized model's,
and decode / prefill tokens/s in LiteRT, interleaved round by round; beside edgequant's files,
litert-torch's own route for the same model (its re-authored SmolLM2 example, converted by its
own converter with its own recipes), run and measured the same way.

    python benchmarks/tflite.py [--folder DIR] [--windows 8] [--rounds 5] [--out FILE]

Every file has a KV cache of 512 (the evaluation windows are 512 tokens) and a 64-token prefill
signature with logits; speed: a 64-token prompt, then 128 decode steps, 2 threads, edgequant's
runner (`TfliteModel`: LiteRT's CompiledModel, KV cache kept in LiteRT's buffers). Files already
in --folder are reused when their sidecar ``.json`` names the same variant; missing ones are
converted (one to two minutes each). Run on a quiet machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

import edgequant
from edgequant import anchors
from edgequant import eval as ev
from edgequant.export import litert
from edgequant.export.litert_runtime import TfliteModel
from edgequant.generative import quant_recipes
from edgequant.job import as_recipe, with_algorithm
from edgequant.models import load
from edgequant.models.base import logits as eager_logits

PROMPT_TOKENS, NEW_TOKENS, MAX_SEQ_LEN, PREFILL = 64, 128, 512, 64
THREADS = 2
# name -> (how it is built, AI Edge recipe for edgequant or litert-torch's quantize flag)
VARIANTS = {
    "fp32": ("edgequant, float", None),
    "fp16": ("edgequant full_fp16_recipe()", quant_recipes.full_fp16_recipe),
    "int8-weight-only": (
        "edgequant full_int8_weight_only_recipe()",
        quant_recipes.full_int8_weight_only_recipe,
    ),
    "int8-dynamic": (
        "edgequant full_int8_dynamic_recipe()",
        quant_recipes.full_int8_dynamic_recipe,
    ),
    "int4-block32": (
        "edgequant full_int4_dynamic_block_recipe(32)",
        quant_recipes.full_int4_dynamic_block_recipe,
    ),
    "int4-block32-mse": (
        "edgequant full_int4_dynamic_block_recipe(32), algorithm mse",
        lambda: with_algorithm(as_recipe(quant_recipes.full_int4_dynamic_block_recipe()), "mse"),
    ),
    "litert-torch-fp32": ("litert-torch SmolLM2 example, quantize=none", "none"),
    "litert-torch-int8-dynamic": ("litert-torch, quantize=dynamic_int8", "dynamic_int8"),
    "litert-torch-int4-block32": (
        "litert-torch, quantize=dynamic_int4_block32",
        "dynamic_int4_block32",
    ),
}


def recipe_of(name: str):
    source = VARIANTS[name][1]
    return None if source is None else source()


def litert_torch_route(model, quantize: str, folder: Path) -> Path:
    """Convert SmolLM2 with litert-torch's own example and converter (``quantize`` flag)."""
    return anchors.litert_torch_route(
        model, folder / f"litert_torch_{quantize}.tflite", quantize=quantize,
        max_seq_len=MAX_SEQ_LEN, prefill=PREFILL,
    )  # fmt: skip


def convert_all(model, folder: Path) -> dict[str, Path]:
    paths = {}
    for name, (how, source) in VARIANTS.items():
        path = folder / f"smol_{name}.tflite"
        sidecar = path.with_suffix(".json")
        made = {"variant": name, "how": how, "max_seq_len": MAX_SEQ_LEN, "prefill": PREFILL}
        recorded = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        recorded.pop("convert_s", None)
        if not (path.is_file() and recorded == made):
            print(f"converting {path} ({how}) ...", flush=True)
            start = time.perf_counter()
            if name.startswith("litert-torch"):
                litert_torch_route(model, source, folder).replace(path)
            else:
                recipe = recipe_of(name)
                quantized = (
                    model if recipe is None else edgequant.quantize(copy.deepcopy(model), recipe)[0]
                )
                litert.to_tflite(
                    quantized, path, max_seq_len=MAX_SEQ_LEN, prefill_len=PREFILL, overwrite=True
                )
            made["convert_s"] = round(time.perf_counter() - start, 1)
            sidecar.write_text(json.dumps(made) + "\n")
            print(f"  {made['convert_s']:.0f} s", flush=True)
        paths[name] = path
    return paths


def schemes_in(path: Path) -> str:
    """What the file's FULLY_CONNECTED and EMBEDDING_LOOKUP ops compute with (read back)."""
    ops = [op for op in litert.weight_ops(path.read_bytes()) if op.subgraph == 0]
    counts = Counter(f"{op.op.split('_')[0].lower()} {op.scheme}" for op in ops)
    return ", ".join(f"{n} x {s}" for s, n in sorted(counts.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="build/tflite")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "tflite.json"))
    args = parser.parse_args()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")

    model, tokenizer, _ = load("default")
    paths = convert_all(model, folder)
    text_ids = ev.tokenize_file(tokenizer, ev.default_text())
    windows = ev.windows(text_ids, 512, args.windows)
    reference = ev.float_logits(model, windows)
    rows = {}
    for name, path in paths.items():
        print(f"evaluating {path.name} on {len(windows)} windows ...", flush=True)
        program = TfliteModel(path, num_threads=THREADS)
        logits = torch.stack([program(w[None])[0] for w in windows])
        rows[name] = {
            "variant": name,
            "how": VARIANTS[name][0],
            "tflite_bytes": path.stat().st_size,
            "convert_s": json.loads(path.with_suffix(".json").read_text()).get("convert_s"),
            "schemes": schemes_in(path),
            **ev.compare(reference, logits, windows),
        }
        recipe = None if name.startswith("litert-torch") else recipe_of(name)
        if recipe is not None:
            quantized, _ = edgequant.quantize(copy.deepcopy(model), recipe)
            with torch.no_grad():
                eager = torch.stack([eager_logits(quantized, w[None])[0] for w in windows])
            rows[name]["eager"] = ev.compare(reference, eager, windows)
            del quantized, eager
        del program, logits
    del reference

    counting = ", ".join(str(i) for i in range(1, 200))  # every variant decodes all 128 tokens
    prompt_ids = tokenizer.encode(counting, bos=False)[:PROMPT_TOKENS]
    programs = {name: TfliteModel(path, num_threads=THREADS) for name, path in paths.items()}
    samples = {name: [] for name in paths}
    for r in range(args.rounds):  # interleaved: drift moves every variant alike
        print(f"speed round {r + 1}/{args.rounds} ...", flush=True)
        for name, program in programs.items():
            s = ev.speed(program, prompt_ids, NEW_TOKENS)
            samples[name].append(
                {"decode": s["decode_tokens_per_s"], "prefill": s["prefill_tokens_per_s"]}
            )
    for name, row in rows.items():
        for what in ("decode", "prefill"):
            row[f"{what}_tokens_per_s"] = statistics.median(s[what] for s in samples[name])

    print(
        f"\nSmolLM2-135M, {args.windows} x 512 tokens of WikiText-2; speed: {PROMPT_TOKENS}-token "
        f"prompt, {NEW_TOKENS} decode steps, KV cache {MAX_SEQ_LEN}, {THREADS} threads, median "
        f"of {args.rounds} interleaved rounds\n"
    )
    print(
        "| variant | .tflite MB | perplexity | KL | top-1 % | eager KL | decode tok/s | x fp32 | "
        "prefill tok/s | x fp32 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows.values():
        base = rows["litert-torch-fp32" if r["variant"].startswith("litert-torch") else "fp32"]
        eager = f"{r['eager']['kl_divergence']:.4f}" if "eager" in r else "-"
        print(
            f"| {r['variant']} | {r['tflite_bytes'] / 1e6:.1f} | {r['perplexity']:.3f} | "
            f"{r['kl_divergence']:.4f} | {r['top1_agreement']:.1f} | {eager} | "
            f"{r['decode_tokens_per_s']:.1f} | "
            f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f} | "
            f"{r['prefill_tokens_per_s']:.1f} | "
            f"{r['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:.2f} |"
        )
    print("\nwhat each file computes with (prefill signature, read back from the file):")
    for r in rows.values():
        print(f"- {r['variant']}: {r['schemes']}")
    for ours, theirs in (
        ("int8-dynamic", "litert-torch-int8-dynamic"),
        ("int4-block32", "litert-torch-int4-block32"),
        ("int4-block32-mse", "litert-torch-int4-block32"),
    ):
        a, b = rows[ours], rows[theirs]
        print(
            f"\n{ours} vs litert-torch's route: size {a['tflite_bytes'] / b['tflite_bytes']:.3f}x, "
            f"KL {a['kl_divergence']:.4f} vs {b['kl_divergence']:.4f}, decode "
            f"{a['decode_tokens_per_s'] / b['decode_tokens_per_s']:.3f}x"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "prompt_tokens": PROMPT_TOKENS,
                "new_tokens": NEW_TOKENS,
                "max_seq_len": MAX_SEQ_LEN,
                "threads": THREADS,
                "rows": list(rows.values()),
                "samples": samples,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
