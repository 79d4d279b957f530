"""SmolLM2-135M as ExecuTorch programs: per variant, .pte bytes, quality against float on the
same windows (KL, top-1, perplexity of the program itself), and decode / prefill tokens/s both in
ExecuTorch's own TextLLMRunner and in edgequant's loop over ``executorch.runtime``, interleaved
round by round; the bandwidth roofline (weight bytes read per decoded token against this
machine's measured read bandwidth); and ExecuTorch's own 8da4w route (torchao ``quantize_`` with
``Int8DynamicActivationIntxWeightConfig(int4, PerGroup(32))``, min-max and HQQ scales) through
the same lowering, for comparison.

    python benchmarks/pte.py [--folder DIR] [--windows 8] [--rounds 5] [--out FILE]

Programs already in --folder are reused when their sidecar ``.json`` names the same variant;
missing ones are exported (a few minutes each). Run on a quiet machine: anything else on the
2 cores halves the speed.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import edgequant
from edgequant import eval as ev
from edgequant.export import to_pte
from edgequant.export.pte_runtime import PteModel
from edgequant.models import load
from edgequant.models.families import decoder_of
from edgequant.recipe import Recipe, Rule

PROMPT_TOKENS, NEW_TOKENS, MAX_SEQ_LEN = 64, 128, 512
# name -> (how it is built, edgequant recipe whose plan gives the bytes read per token)
VARIANTS = {
    "fp32": ("float", None),
    "fp16": ("edgequant fp16", "fp16"),
    "int8-dynamic": ("edgequant int8-dynamic (int8 embedding)", "int8-dynamic"),
    "8da4w": ("edgequant 8da4w g32 fp16 scales (int4 g32 embedding)", "8da4w"),
    "8da4w-emb-fp32": ("edgequant 8da4w g32 fp16 scales, embedding fp32", "8da4w-emb-fp32"),
    "et-8da4w": ("torchao quantize_ int4 PerGroup(32) affine, embedding fp32", "8da4w-emb-fp32"),
    "et-8da4w-hqq": ("torchao quantize_ int4 PerGroup(32) hqq_scale_only", "8da4w-emb-fp32"),
}


def recipe_for(name: str) -> Recipe:
    if name == "8da4w-emb-fp32":
        base = edgequant.recipes.get("8da4w")
        return Recipe(base.rules + (Rule(None, role="embedding"),), name=name)
    return edgequant.recipes.get(name)


def executorch_route(model: nn.Module, algorithm: str) -> nn.Module:
    """ExecuTorch's own 8da4w source transformation (as its LLM export applies it)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    native = decoder_of(copy.deepcopy(model))
    config = Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4,
        weight_granularity=PerGroup(32),
        intx_choose_qparams_algorithm=algorithm,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(native, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    return native


def build(name: str, model: nn.Module) -> nn.Module:
    if name == "fp32":
        return model
    if name == "et-8da4w":
        return executorch_route(model, "affine")
    if name == "et-8da4w-hqq":
        return executorch_route(model, "hqq_scale_only")
    quantized, _ = edgequant.quantize(copy.deepcopy(model), recipe_for(name))
    return quantized


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
    """Decode and prefill tokens/s in ExecuTorch's C++ TextLLMRunner."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (llama:: kernels)
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    runner = TextLLMRunner(str(path), str(tokenizer_path))
    stats = []
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, temperature=0.0, echo=False)
    runner.generate(prompt, config, stats_callback=stats.append)
    s = json.loads(stats[-1].to_json_string())
    return {
        "decode": s["decode_token_per_sec"],
        "prefill": s["prefill_token_per_sec"],
        "generated": stats[-1].num_generated_tokens,  # it stops early at an end-of-text token
    }


def loop_speed(path: Path, prompt_ids: list[int]) -> dict:
    """Decode and prefill tokens/s in edgequant's loop over ``executorch.runtime``."""
    s = ev.speed(PteModel(path), prompt_ids, NEW_TOKENS)
    return {"decode": s["decode_tokens_per_s"], "prefill": s["prefill_tokens_per_s"]}


def export_all(model, tokenizer, folder: Path) -> dict[str, Path]:
    paths = {}
    for name, (how, _) in VARIANTS.items():
        path = folder / f"smol_{name}.pte"
        sidecar = path.with_suffix(".json")
        made = {"variant": name, "how": how, "max_seq_len": MAX_SEQ_LEN}
        if not (path.is_file() and sidecar.is_file() and json.loads(sidecar.read_text()) == made):
            print(f"exporting {path} ({how}) ...", flush=True)
            start = time.perf_counter()
            to_pte(
                build(name, model),
                path,
                max_seq_len=MAX_SEQ_LEN,
                bos_id=tokenizer.bos_id,
                eos_id=tokenizer.eos_id,
                overwrite=True,
            )
            sidecar.write_text(json.dumps(made) + "\n")
            print(f"  {time.perf_counter() - start:.0f} s", flush=True)
        paths[name] = path
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="build/pte")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "pte.json"))
    args = parser.parse_args()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)

    model, tokenizer, _ = load("default")
    tokenizer_dir = folder / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        tokenizer.save(tokenizer_dir)
    paths = export_all(model, tokenizer, folder)
    # bytes read per decoded token: every weight but the embedding table (one row is read),
    # as XNNPACK holds them (int4 + 2-byte scales, int8 + per-row scales, fp16, fp32)
    weight_bytes = {}
    for name, (_, recipe) in VARIANTS.items():
        plan = edgequant.plan(model, Recipe(()) if recipe is None else recipe_for(recipe))
        weight_bytes[name] = sum(lp.bytes_after for lp in plan if lp.role != "embedding")

    text_ids = ev.tokenize_file(tokenizer, ev.default_text())
    windows = ev.windows(text_ids, 512, args.windows)
    reference = ev.float_logits(model, windows)
    rows = {}
    for name, path in paths.items():
        print(f"evaluating {path.name} on {len(windows)} windows ...", flush=True)
        program = PteModel(path)
        logits = torch.stack([program(w[None])[0] for w in windows])
        rows[name] = {
            "variant": name,
            "how": VARIANTS[name][0],
            "pte_bytes": path.stat().st_size,
            "weight_bytes_per_token": weight_bytes[name],
            **ev.compare(reference, logits, windows),
        }
        del program, logits
    del reference, model

    # A counting prompt: every variant keeps counting for all NEW_TOKENS (on the WikiText
    # prompt the 8da4w programs stopped at an end-of-text token after about 30), so each decode
    # rate covers the same context. TextLLMRunner stops at end-of-text and cannot be told not to.
    counting = ", ".join(str(i) for i in range(1, 200))
    prompt_ids = tokenizer.encode(counting, bos=False)[:PROMPT_TOKENS]
    prompt = tokenizer.decode(prompt_ids)
    samples = {name: {"runner": [], "loop": []} for name in paths}
    for r in range(args.rounds):  # interleaved: drift moves every variant alike
        print(f"speed round {r + 1}/{args.rounds} ...", flush=True)
        for name, path in paths.items():
            samples[name]["runner"].append(
                runner_speed(path, tokenizer_dir / "tokenizer.json", prompt)
            )
            samples[name]["loop"].append(loop_speed(path, prompt_ids))
    bandwidth = {t: read_bandwidth_gb_s(t) for t in (1, 2)}
    for name, row in rows.items():
        row["runner_generated_tokens"] = min(s["generated"] for s in samples[name]["runner"])
        for where in ("runner", "loop"):
            for what in ("decode", "prefill"):
                row[f"{where}_{what}_tokens_per_s"] = statistics.median(
                    s[what] for s in samples[name][where]
                )
        row["roofline_tokens_per_s"] = bandwidth[2] * 1e9 / row["weight_bytes_per_token"]
        row["fraction_of_roofline"] = (
            row["runner_decode_tokens_per_s"] / row["roofline_tokens_per_s"]
        )

    base = rows["fp32"]["runner_decode_tokens_per_s"]
    print(f"\nread bandwidth: {bandwidth[1]:.1f} GB/s (1 thread), {bandwidth[2]:.1f} GB/s (2)")
    print(
        f"SmolLM2-135M, {args.windows} x 512 tokens; speed: {PROMPT_TOKENS}-token prompt, "
        f"{NEW_TOKENS} new tokens, median of {args.rounds} interleaved rounds\n"
    )
    print(
        "| variant | .pte MB | perplexity | KL | top-1 % | runner decode tok/s | x fp32 | "
        "runner new tokens | runner prefill tok/s | loop decode tok/s | loop prefill tok/s | "
        "roofline tok/s | of roofline |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows.values():
        print(
            f"| {r['variant']} | {r['pte_bytes'] / 1e6:.1f} | {r['perplexity']:.3f} | "
            f"{r['kl_divergence']:.4f} | {r['top1_agreement']:.1f} | "
            f"{r['runner_decode_tokens_per_s']:.1f} | "
            f"{r['runner_decode_tokens_per_s'] / base:.2f} | {r['runner_generated_tokens']} | "
            f"{r['runner_prefill_tokens_per_s']:.1f} | {r['loop_decode_tokens_per_s']:.1f} | "
            f"{r['loop_prefill_tokens_per_s']:.1f} | {r['roofline_tokens_per_s']:.1f} | "
            f"{r['fraction_of_roofline']:.2f} |"
        )
    ours, theirs = rows["8da4w-emb-fp32"], rows["et-8da4w"]
    print(
        f"\nedgequant 8da4w vs ExecuTorch's route (both embedding fp32): size "
        f"{ours['pte_bytes'] / theirs['pte_bytes']:.3f}x, KL {ours['kl_divergence']:.4f} vs "
        f"{theirs['kl_divergence']:.4f}, runner decode "
        f"{ours['runner_decode_tokens_per_s'] / theirs['runner_decode_tokens_per_s']:.3f}x"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "bandwidth_gb_s": bandwidth,
                "prompt_tokens": PROMPT_TOKENS,
                "new_tokens": NEW_TOKENS,
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
