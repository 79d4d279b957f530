"""Every preset on one model, twice: as the preset says (embedding and lm_head included) and on
the decoder linears only (embedding and lm_head kept float, the scope of torchao's reference
numbers). Quality against float on the same windows; one float pass for all.

    python benchmarks/presets.py [--model default] [--windows 8] [--seq-len 512] [--out FILE]

Prints a Markdown table and writes JSON (default benchmarks/results/presets.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import edgequant
from edgequant import eval as ev
from edgequant.models import load
from edgequant.models.base import logits
from edgequant.recipe import Recipe, Rule


def decoder_linears_only(recipe: Recipe) -> Recipe:
    keep_float = (Rule(None, role="embedding"), Rule(None, role="lm_head"))
    return Recipe(recipe.rules + keep_float, name=f"{recipe.name} (decoder linears)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "presets.json"))
    args = parser.parse_args()

    model, tokenizer, info = load(args.model)
    windows = ev.windows(ev.tokenize_file(tokenizer, ev.default_text()), args.seq_len, args.windows)
    reference = ev.float_logits(model, windows)
    rows = [
        {
            "recipe": "float",
            "scope": "-",
            "perplexity": ev.perplexity_from_logits(reference, windows),
        }
    ]
    for name in edgequant.recipes.names("source"):
        preset = edgequant.recipes.get(name)
        for scope, recipe in (
            ("decoder linears", decoder_linears_only(preset)),
            ("whole model", preset),
        ):
            started = time.perf_counter()
            quantized, plan = edgequant.quantize(copy.deepcopy(model), recipe)
            with torch.inference_mode():
                out = torch.stack([logits(quantized, w[None])[0] for w in windows])
            row = {
                "recipe": name,
                "scope": scope,
                **ev.compare(reference, out, windows),
                **ev.size_report(plan),
                "seconds": time.perf_counter() - started,
            }
            rows.append(row)
            print(
                f"{name:18s} {scope:16s} ppl {row['perplexity']:8.3f}  "
                f"KL {row['kl_divergence']:.5f}  top-1 {row['top1_agreement']:5.1f}%  "
                f"{row['bits_per_weight']:.2f} bits/weight",
                flush=True,
            )
            del quantized
    print(f"\n{args.model}: {args.windows} windows x {args.seq_len} tokens of WikiText-2 test\n")
    print("| recipe | scope | perplexity | KL nats/token | top-1 % | bits/weight |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        kl = r.get("kl_divergence")
        print(
            f"| {r['recipe']} | {r['scope']} | {r['perplexity']:.3f} | "
            f"{'-' if kl is None else f'{kl:.5f}'} | {r.get('top1_agreement', 100.0):.1f} | "
            f"{r.get('bits_per_weight', 32.0):.2f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": args.model,
        "source": info["source"],
        "windows": args.windows,
        "seq_len": args.seq_len,
        "torch": torch.__version__,
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
