"""Predicted against measured decode speed: SmolLM2 in three presets, each written for every
runtime and timed there (interleaved rounds, each run a fresh process), beside the prediction
`edgequant.speed.predict` makes from the plan alone, with this machine's calibration if
`edgequant calibrate-speed` was run (else the shipped defaults).

    python benchmarks/speed.py [--model default] [--presets fp16,int8-dynamic,8da4w] [--rounds 3]

Prints a Markdown table and writes JSON (default benchmarks/results/speed.json). Run on a quiet
machine. A target that cannot hold a preset exactly is written with --allow-fallback's rule
(GGUF: int8 per-channel becomes Q8_0).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import edgequant
from edgequant import speed, targets
from edgequant.job import SPEED_NEW_TOKENS, SPEED_PROMPT_TOKENS, _speed_ids
from edgequant.models import load
from edgequant.models.families import decoder_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--presets", default="fp16,int8-dynamic,8da4w")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "speed.json"))
    args = parser.parse_args()

    model, tokenizer, info = load(args.model)
    spec = decoder_of(model).spec
    table, source = speed.efficiency()
    ids = _speed_ids(tokenizer, None)
    position = SPEED_PROMPT_TOKENS + SPEED_NEW_TOKENS // 2
    rows, paths = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            quantized, plan = edgequant.quantize(copy.deepcopy(model), preset)
            predicted = speed.predict(plan, spec, position=position, max_seq_len=512, table=table)
            folder = Path(tmp) / preset
            edgequant.save(quantized, folder, tokenizer=tokenizer)  # the .pte child reads it
            written = targets.write_all(
                quantized, tokenizer, list(targets.TARGETS), folder, n_weights=plan.n_weights,
                max_seq_len=512, source=info["source"], allow_fallback=True, bundle=folder,
            ).wait()  # fmt: skip
            for name, row in written.items():
                key = f"{preset}/{name}"
                paths[key] = row["path"]
                rows.append(
                    {
                        "preset": preset,
                        "runtime": name,
                        "bytes": row["bytes"],
                        "fallback": row["fallback"],
                        **predicted[name],
                    }
                )
                print(f"{key}: predicted {predicted[name]['predicted_decode_tokens_per_s']:.1f}")
            del quantized
        measured = targets.speeds(paths, ids, SPEED_NEW_TOKENS, args.rounds)
    for row in rows:
        m = measured[f"{row['preset']}/{row['runtime']}"]
        row.update(m)
        row["ratio"] = row["predicted_decode_tokens_per_s"] / row["decode_tokens_per_s"]
    print(f"\n{args.model}; kernel efficiencies: {source}; {args.rounds} rounds\n")
    print("| preset | runtime | MiB | MiB read per token | GB/s | predicted decode | measured "
          "decode | predicted / measured |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['preset']} | {r['runtime']} | {r['bytes'] / 2**20:.1f} | "
            f"{r['token_bytes'] / 2**20:.1f} | {r['bandwidth_gb_s']:.1f} | "
            f"{r['predicted_decode_tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | "
            f"{r['ratio']:.2f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"efficiency_from": source, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
