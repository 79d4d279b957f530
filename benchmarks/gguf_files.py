"""SmolLM2-135M as GGUF files in llama.cpp: edgequant's int4 group-32 weights written as Q4_0
(min-max, and a better algorithm) against llama.cpp's own quantizer (Q4_0 and IQ4_NL, each
without and with an importance matrix from the same calibration data) run on edgequant's F32
file; for each file its bytes, KL / top-1 / perplexity measured in llama.cpp on the same
windows, and decode / prefill tokens/s in llama.cpp, interleaved round by round.

    python benchmarks/gguf_files.py [--folder build/gguf] [--windows 8] [--rounds 5]
        [--algorithm awq] [--calibration wikitext:128x512] [--out FILE]

Scope as llama.cpp's own Q4_0: every decoder linear in Q4_0; the token embedding (which the
tied output layer shares) in the type llama.cpp's quantizer gives it (read from its file), so
the files have the same layout and bytes. Speed: a 64-token prompt, then 128 decode steps,
2 threads, llama.cpp computing the last position's logits only (as its own tools do), median of
--rounds interleaved rounds. Files already in --folder are reused when their sidecar ``.json``
names the same variant. Run on a quiet machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

# this file is named like the `gguf` package: keep its folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import torch  # noqa: E402

import edgequant  # noqa: E402
from edgequant import calibration as cal  # noqa: E402
from edgequant import eval as ev  # noqa: E402
from edgequant.export.gguf import read_layers, to_gguf  # noqa: E402
from edgequant.export.gguf_runtime import GgufModel  # noqa: E402
from edgequant.export.llama_quantize import importance_matrix, llama_quantize  # noqa: E402
from edgequant.models import default_model_path, load  # noqa: E402
from edgequant.models.base import logits as eager_logits  # noqa: E402
from edgequant.recipe import Recipe, Rule  # noqa: E402
from edgequant.schemes import Scheme  # noqa: E402

PROMPT_TOKENS, NEW_TOKENS, THREADS = 64, 128, 2
Q4 = Scheme("int4", "per_group", 32, scale_dtype="fp16")
EMBEDDING = {"Q8_0": Scheme("int8", "per_group", 32, scale_dtype="fp16"), "Q4_0": Q4}
# llama.cpp's own quantizer: variant -> (file type, with an importance matrix)
LLAMA_VARIANTS = {
    "llama.cpp-Q4_0": ("Q4_0", False),
    "llama.cpp-Q4_0-imatrix": ("Q4_0", True),
    "llama.cpp-IQ4_NL": ("IQ4_NL", False),
    "llama.cpp-IQ4_NL-imatrix": ("IQ4_NL", True),
}


def ours(algorithm: str, embedding: str, overrides: dict) -> Recipe:
    scheme = Scheme(
        "int4", "per_group", 32, scale_dtype="fp16", algorithm=algorithm,
        algorithm_params=overrides,
    )  # fmt: skip
    return Recipe(
        (
            Rule(scheme, role="default"),
            Rule(EMBEDDING[embedding], role="embedding"),
            Rule(EMBEDDING[embedding], role="lm_head"),
        ),
        name=f"int4-g32-{algorithm}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="build/gguf")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--algorithm", default="awq")
    parser.add_argument("--calibration", default="wikitext:128x512")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gguf.json"))
    args = parser.parse_args()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)

    model, tokenizer, _ = load("default")
    source = default_model_path()
    files: dict[str, dict] = {}

    def done(name: str, how: str) -> Path | None:
        path, sidecar = folder / f"{name}.gguf", folder / f"{name}.json"
        if path.is_file() and sidecar.is_file() and json.loads(sidecar.read_text())["how"] == how:
            files[name] = {"path": path, **json.loads(sidecar.read_text())}
            return path
        return None

    def record(name: str, how: str, seconds: float, **extra) -> None:
        meta = {"how": how, "seconds": seconds, **extra}
        (folder / f"{name}.json").write_text(json.dumps(meta) + "\n")
        files[name] = {"path": folder / f"{name}.gguf", **meta}

    f32_how = "edgequant to_gguf, float model"
    if not done("f32", f32_how):
        t = time.perf_counter()
        to_gguf(model, folder / "f32.gguf", tokenizer_gguf=source, overwrite=True)
        record("f32", f32_how, time.perf_counter() - t)
    data = cal.parse(args.calibration, tokenizer, model=model)
    imatrix = None
    for name, (file_type, weighted) in LLAMA_VARIANTS.items():
        how = f"llama_model_quantize {file_type} on f32.gguf" + (
            f", importance matrix from {data.source}" if weighted else ""
        )
        if done(name, how):
            continue
        if weighted and imatrix is None:
            imatrix = importance_matrix(model, data)
        t = time.perf_counter()
        llama_quantize(
            files["f32"]["path"], folder / f"{name}.gguf", file_type,
            imatrix=imatrix if weighted else None, threads=THREADS, overwrite=True,
        )  # fmt: skip
        record(name, how, time.perf_counter() - t)
    embedding = read_layers(files["llama.cpp-Q4_0"]["path"])["token_embd.weight"][0]
    print(f"llama.cpp's Q4_0 keeps token_embd (shared by the output) in {embedding}", flush=True)

    ours_variants = [("minmax", {}, "minmax"), (args.algorithm, {"signed_scales": True}, "")]
    if args.algorithm == "awq":  # AWQ's scales, then GPTQ on the scaled inputs
        ours_variants.append(("awq", {"gptq": True}, "awq-gptq"))
    for algorithm, overrides, label in ours_variants:
        if algorithm not in ("awq", "mse"):  # the others take no signed_scales
            overrides = {}
        label = label or algorithm + ("-signed" if overrides.get("signed_scales") else "")
        name = f"edgequant-Q4_0-{label}"
        how = f"edgequant {algorithm} {overrides} int4 g32 fp16 -> Q4_0, embedding {embedding}"
        if done(name, how):
            continue
        t = time.perf_counter()
        quantized, _ = edgequant.quantize(
            copy.deepcopy(model), ours(algorithm, embedding, overrides),
            calibration=data if algorithm in ("awq", "smoothquant", "gptq") else None,
        )  # fmt: skip
        seconds = time.perf_counter() - t
        to_gguf(quantized, folder / f"{name}.gguf", tokenizer_gguf=source, overwrite=True)
        record(name, how, seconds)
        files[name]["eager_model"] = quantized

    windows = ev.windows(ev.tokenize_file(tokenizer, ev.default_text()), 512, args.windows)
    reference = ev.float_logits(model, windows)
    rows = {}
    for name, f in files.items():
        print(f"evaluating {name} in llama.cpp on {len(windows)} windows ...", flush=True)
        program = GgufModel(f["path"], n_ctx=512, n_threads=THREADS)
        got = torch.stack([program(w[None])[0] for w in windows])
        rows[name] = {
            "variant": name,
            "how": f["how"],
            "seconds_to_make": f["seconds"],
            "gguf_bytes": f["path"].stat().st_size,
            **ev.compare(reference, got, windows),
        }
        if "eager_model" in f:
            eager_model = f.pop("eager_model")
            with torch.no_grad():
                eager = torch.stack([eager_logits(eager_model, w[None])[0] for w in windows])
            rows[name]["eager_kl"] = ev.compare(reference, eager, windows)["kl_divergence"]
        del program, got

    prompt = tokenizer.encode(", ".join(str(i) for i in range(1, 200)), bos=False)[:PROMPT_TOKENS]
    programs = {
        n: GgufModel(f["path"], n_ctx=512, n_threads=THREADS, last_only=True)
        for n, f in files.items()
    }
    samples: dict[str, list] = {n: [] for n in programs}
    for r in range(args.rounds):  # interleaved: drift moves every variant alike
        print(f"speed round {r + 1}/{args.rounds} ...", flush=True)
        for name, program in programs.items():
            s = ev.speed(program, prompt, NEW_TOKENS)
            samples[name].append((s["decode_tokens_per_s"], s["prefill_tokens_per_s"]))
    for name, row in rows.items():
        row["decode_tokens_per_s"] = statistics.median(s[0] for s in samples[name])
        row["prefill_tokens_per_s"] = statistics.median(s[1] for s in samples[name])

    print(
        f"\nSmolLM2-135M in llama.cpp (llama-cpp-python), {args.windows} x 512 tokens of "
        f"WikiText-2 test; speed: {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} decode steps, "
        f"{THREADS} threads, median of {args.rounds} interleaved rounds\n"
    )
    print("| variant | MB | perplexity | KL | top-1 % | eager KL | decode tok/s | prefill tok/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows.values():
        eager = f"{r['eager_kl']:.4f}" if "eager_kl" in r else "-"
        print(
            f"| {r['variant']} | {r['gguf_bytes'] / 1e6:.1f} | {r['perplexity']:.3f} | "
            f"{r['kl_divergence']:.4f} | {r['top1_agreement']:.1f} | {eager} | "
            f"{r['decode_tokens_per_s']:.1f} | {r['prefill_tokens_per_s']:.1f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"windows": args.windows, "rounds": args.rounds, "threads": THREADS,
            "calibration": data.source, "token_embd": embedding}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "rows": list(rows.values())}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
