"""SmolLM2-135M as ExecuTorch programs: per scheme, .pte bytes, quality against float on the
same windows (KL, top-1, perplexity of the program itself), and decode / prefill tokens/s in
ExecuTorch's own TextLLMRunner, interleaved round by round; plus the bandwidth roofline
(weight bytes read per decoded token against this machine's measured read bandwidth).

    python benchmarks/pte.py [--folder DIR] [--windows 8] [--rounds 3] [--out FILE]

Programs already in --folder (smol_<scheme>.pte) are reused; missing ones are exported
(several minutes each). Run on a quiet machine: anything else on the 2 cores halves the speed.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

import edgequant
from edgequant import eval as ev
from edgequant.export import to_pte
from edgequant.export.pte_runtime import PteModel
from edgequant.models import load
from edgequant.recipe import Recipe, Rule

SCHEMES = ("fp32", "int8-dynamic", "8da4w")  # embedding float: quantized lookups not exported
PROMPT_TOKENS, NEW_TOKENS = 64, 128


def recipe_for(name: str) -> Recipe | None:
    if name == "fp32":
        return None
    base = edgequant.recipes.get(name)
    return Recipe(base.rules + (Rule(None, role="embedding"),), name=name)


def read_bandwidth_gb_s(threads: int) -> float:
    """Read bandwidth from summing a 512 MiB tensor (best of 5)."""
    torch.set_num_threads(threads)
    x = torch.ones(128 * 2**20, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    torch.set_num_threads(2)
    return x.numel() * 4 / best / 1e9


def runner_speed(path: Path, tokenizer_path: Path, prompt: str) -> dict:
    import executorch.extension.llm.custom_ops  # noqa: F401
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    runner = TextLLMRunner(str(path), str(tokenizer_path))
    stats = []
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, temperature=0.0, echo=False)
    runner.generate(prompt, config, stats_callback=stats.append)
    s = json.loads(stats[-1].to_json_string())
    return {
        "decode_tokens_per_s": s["decode_token_per_sec"],
        "prefill_tokens_per_s": s["prefill_token_per_sec"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="build/pte")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "pte.json"))
    args = parser.parse_args()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)

    model, tokenizer, _ = load("default")
    tokenizer_dir = folder / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        tokenizer.save(tokenizer_dir)
    paths, weight_bytes = {}, {}
    for name in SCHEMES:
        path = folder / f"smol_{name}.pte"
        recipe = recipe_for(name)
        if recipe is None:
            quantized, plan = model, edgequant.plan(model, Recipe(()))
        else:
            quantized, plan = edgequant.quantize(copy.deepcopy(model), recipe)
        # bytes read per decoded token: every weight but the embedding table (one row is read)
        weight_bytes[name] = sum(lp.bytes_after for lp in plan if lp.role != "embedding")
        if not path.is_file():
            print(f"exporting {path} ...", flush=True)
            to_pte(
                quantized, path, max_seq_len=512, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id
            )
        paths[name] = path

    windows = ev.windows(ev.tokenize_file(tokenizer, ev.default_text()), 512, args.windows)
    reference = ev.float_logits(model, windows)
    rows = {}
    for name, path in paths.items():
        program = PteModel(path)
        logits = torch.stack([program(w[None])[0] for w in windows])
        rows[name] = {
            "scheme": name,
            "pte_bytes": path.stat().st_size,
            "weight_bytes": weight_bytes[name],
            **ev.compare(reference, logits, windows),
        }
        del program
    prompt = tokenizer.decode(ev.tokenize_file(tokenizer, ev.default_text())[:PROMPT_TOKENS])
    samples = {name: [] for name in paths}
    for _ in range(args.rounds):  # interleaved: drift moves every scheme alike
        for name, path in paths.items():
            samples[name].append(runner_speed(path, tokenizer_dir / "tokenizer.json", prompt))
    bandwidth = {t: read_bandwidth_gb_s(t) for t in (1, 2)}
    for name, row in rows.items():
        row["decode_tokens_per_s"] = statistics.median(
            s["decode_tokens_per_s"] for s in samples[name]
        )
        row["prefill_tokens_per_s"] = statistics.median(
            s["prefill_tokens_per_s"] for s in samples[name]
        )
        roofline = bandwidth[2] * 1e9 / row["weight_bytes"]
        row["roofline_tokens_per_s"] = roofline
        row["fraction_of_roofline"] = row["decode_tokens_per_s"] / roofline
    base = rows["fp32"]["decode_tokens_per_s"]
    print(f"read bandwidth: {bandwidth[1]:.1f} GB/s (1 thread), {bandwidth[2]:.1f} GB/s (2)")
    print(
        "| scheme | .pte MB | perplexity | KL | top-1 % | decode tok/s | x fp32 | prefill tok/s "
        "| roofline tok/s | of roofline |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows.values():
        print(
            f"| {r['scheme']} | {r['pte_bytes'] / 1e6:.1f} | {r['perplexity']:.3f} | "
            f"{r['kl_divergence']:.4f} | {r['top1_agreement']:.1f} | "
            f"{r['decode_tokens_per_s']:.1f} | {r['decode_tokens_per_s'] / base:.2f} | "
            f"{r['prefill_tokens_per_s']:.1f} | {r['roofline_tokens_per_s']:.1f} | "
            f"{r['fraction_of_roofline']:.2f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"bandwidth_gb_s": bandwidth, "rows": list(rows.values()), "samples": samples}, indent=2
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
