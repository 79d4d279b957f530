"""Peak resident memory, time and KL of the main job, streaming (one decoder layer at a time)
against in memory, on SmolLM2-135M and Qwen2.5-Coder-1.5B, and of ``export --format gguf``.

Each run is an ``edgequant`` command in a child process; its peak resident memory (the
kernel's ``ru_maxrss`` of that child, from ``os.wait4``), wall, user and system time are
measured from outside, its KL read from the report it wrote. Prints a Markdown table and writes
JSON (default benchmarks/results/memory.json). Run on a quiet machine with nothing else running
(the 1.5B model's in-memory run peaks near 20 GB)::

    python benchmarks/memory.py                       # every case but the 7B, about 2 h here
    python benchmarks/memory.py --cases smollm2-hqq   # one case
    python benchmarks/memory.py --cases qwen2-7b-synthetic   # ~15 GB of disk while it runs

``qwen2-7b-synthetic`` writes a checkpoint with the exact shapes of Qwen2-7B (28 layers, hidden
3584, ffn 18944, 28 heads / 4 kv heads, vocab 152,064, untied head) as bf16 safetensors shards of
seeded random values and Qwen2.5's tokenizer (from the assembled Qwen2.5-Coder GGUF), quantizes
it (hqq 8da4w, streamed, no evaluation, not timed: ``--eval-windows 0 --no-speed``), writes the
bundle as GGUF, has llama.cpp load the file and generate 16 tokens, and deletes the checkpoint
(``--keep`` keeps it); it reports each step's time and peak memory and the disk each file took.
``--layers N`` writes only N decoder layers (a quick look at the per-layer peaks).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EDGEQUANT = [sys.executable, "-m", "edgequant.cli"]
QWEN = "qwen2.5-1.5b"
HQQ = ["--recipe", "8da4w", "--eval-windows", "2"]
GPTQ = [*HQQ, "--algorithm", "gptq", "--calibration", "wikitext:64x512"]
# case -> (model, quantize arguments, paths to run: "memory" and/or "stream")
CASES = {
    "smollm2-hqq": ("default", HQQ, ("memory", "stream")),
    "qwen1.5b-hqq": (QWEN, HQQ, ("memory", "stream")),
    "qwen1.5b-gptq": (QWEN, GPTQ, ("stream",)),  # in memory: ~20 GB and an hour; not run
    "qwen1.5b-gptq16": (
        QWEN,
        [*HQQ, "--algorithm", "gptq", "--calibration", "wikitext:16x512"],
        ("stream",),
    ),  # fmt: skip
}


# Qwen2-7B's config.json (Qwen/Qwen2-7B), the shapes of the synthetic checkpoint
QWEN2_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 151643,
    "eos_token_id": 151643, "sliding_window": 131072, "use_sliding_window": False,
}  # fmt: skip
SYNTHETIC = {"qwen2-7b-synthetic": QWEN2_7B}


def run(args: list[str], command=EDGEQUANT) -> dict:
    """Run ``command args`` (``edgequant`` by default) in a child process: wall, user, system
    seconds, peak RSS, and what it printed (``output``)."""
    start = time.perf_counter()
    child = subprocess.Popen([*command, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if child.returncode != 0:
        tail = output.decode(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(map(str, [*command, *args]))} failed "
                           f"({child.returncode}):\n{tail}")  # fmt: skip
    return {
        "wall_s": round(wall, 1),
        "user_s": round(usage.ru_utime, 1),
        "sys_s": round(usage.ru_stime, 1),
        "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3),  # ru_maxrss is in KiB on Linux
        "output": output.decode(errors="replace"),
    }


def write_synthetic(folder: Path, config: dict, layers: int | None = None, seed: int = 0,
                    shard_bytes: int = 2_000_000_000) -> None:  # fmt: skip
    """A Hugging Face folder with ``config``'s exact shapes (``layers`` decoder layers when
    given): seeded N(0, 0.02) bf16 weights (norms 1) in safetensors shards, and Qwen2.5's
    tokenizer (from the assembled Qwen2.5-Coder GGUF)."""
    import torch
    from safetensors.torch import save_file

    from edgequant.models import resolve
    from edgequant.models.tokenizer import HFTokenizer

    config = {**config, "num_hidden_layers": layers or config["num_hidden_layers"]}
    folder.mkdir(parents=True)
    HFTokenizer.from_gguf(resolve(QWEN)).tok.save_pretrained(folder)
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = d // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(config["num_hidden_layers"]):
        at, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        shapes.update({
            f"model.layers.{i}.input_layernorm.weight": (d,),
            f"{at}.q_proj.weight": (d, d), f"{at}.q_proj.bias": (d,),
            f"{at}.k_proj.weight": (kv, d), f"{at}.k_proj.bias": (kv,),
            f"{at}.v_proj.weight": (kv, d), f"{at}.v_proj.bias": (kv,),
            f"{at}.o_proj.weight": (d, d),
            f"model.layers.{i}.post_attention_layernorm.weight": (d,),
            f"{mlp}.gate_proj.weight": (f, d), f"{mlp}.up_proj.weight": (f, d),
            f"{mlp}.down_proj.weight": (d, f),
        })  # fmt: skip
    shapes["model.norm.weight"] = (d,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    generator = torch.Generator().manual_seed(seed)
    shard: dict = {}
    weight_map, written = {}, 0

    def flush() -> None:
        nonlocal written
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        written += (folder / name).stat().st_size
        shard.clear()

    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = torch.randn(shape, generator=generator).mul_(0.02).to(torch.bfloat16)
        if shard and 2 * (sum(x.numel() for x in shard.values()) + t.numel()) > shard_bytes:
            flush()
        shard[name] = t
    flush()
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": written}, "weight_map": weight_map}, indent=2))  # fmt: skip


def synthetic_case(case: str, work: Path, layers: int | None, keep: bool) -> list[dict]:
    """The synthetic case's rows: write, quantize, export as GGUF, generate in llama.cpp."""
    folder, bundle, gguf = work / case, work / f"{case}-bundle", work / f"{case}.gguf"
    for old in (folder, bundle):
        shutil.rmtree(old, ignore_errors=True)
    rows = []
    start = time.perf_counter()
    # in a child: this process stays small (a child's ru_maxrss starts from its parent's peak)
    script = [sys.executable, __file__, "--write-synthetic", str(folder), "--cases", case]
    run(["--layers", str(layers)] if layers else [], command=script)
    checkpoint_bytes = sum(p.stat().st_size for p in folder.iterdir())
    size = float_bytes(str(folder))
    common = {"case": case, "float32_gb": round(size / 1e9, 3), "path": "stream"}
    wall = round(time.perf_counter() - start, 1)
    rows.append({**common, "step": "write checkpoint", "wall_s": wall,
                 "disk_gb": round(checkpoint_bytes / 1e9, 3)})  # fmt: skip
    steps = [
        ("quantize", ["quantize", "--model", str(folder), "--recipe", "8da4w", "--eval-windows",
                      "0", "--no-speed", "--stream", "--out", str(bundle)], bundle),
        ("export gguf", ["export", "--artifact", str(bundle), "--format", "gguf", "--out",
                         str(gguf), "--overwrite"], gguf),
    ]  # fmt: skip
    for step, args, made in steps:
        print(f"{case} {step} ...", file=sys.stderr, flush=True)
        measured = run(args)
        measured.pop("output")
        files = made.rglob("*") if made.is_dir() else [made]
        on_disk = sum(p.stat().st_size for p in files)
        over = round(measured["peak_rss_gb"] * 1e9 / size, 3)
        rows.append({**common, "step": step, **measured, "disk_gb": round(on_disk / 1e9, 3),
                     "peak_over_float32": over})  # fmt: skip
    print(f"{case} llama.cpp ...", file=sys.stderr, flush=True)
    measured = run([GENERATE, str(gguf)], command=[sys.executable, "-c"])
    generated = json.loads(measured.pop("output").strip().splitlines()[-1])
    rows.append({**common, "step": "llama.cpp load + generate", "path": "gguf", **measured,
                 "peak_over_float32": round(measured["peak_rss_gb"] * 1e9 / size, 3),
                 "generated": generated})  # fmt: skip
    if not keep:
        shutil.rmtree(folder)
    return rows


# a child process: llama.cpp loads the GGUF and generates 16 tokens greedily
GENERATE = """
import json, sys, time
from llama_cpp import Llama
start = time.perf_counter()
llm = Llama(model_path=sys.argv[1], n_ctx=128, n_threads=2, verbose=False)
loaded = time.perf_counter()
out = llm("The capital of France is", max_tokens=16, temperature=0.0)
print(json.dumps({"load_s": round(loaded - start, 1), "tokens": out["usage"]["completion_tokens"],
                  "text": out["choices"][0]["text"]}))
"""


def float_bytes(model: str) -> int:
    from edgequant.models.lazy import open_source

    return 4 * open_source(model).n_weights()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"any of {', '.join(CASES)}")
    parser.add_argument("--paths", default="memory,stream", help="memory, stream or both")
    parser.add_argument("--work", help="folder for the bundles (default: a temporary one)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory.json"))
    parser.add_argument("--layers", type=int, help="synthetic cases: this many decoder layers")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    parser.add_argument("--write-synthetic", metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_synthetic:  # the child process of `synthetic_case`
        write_synthetic(Path(args.write_synthetic), SYNTHETIC[args.cases], args.layers)
        return 0
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES and c not in SYNTHETIC]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join([*CASES, *SYNTHETIC])}")
    work = Path(args.work or tempfile.mkdtemp(prefix="edgequant-memory-"))
    rows = []
    for case in cases:
        if case in SYNTHETIC:
            rows.extend(synthetic_case(case, work, args.layers, args.keep))
            write(args.out, rows, work)
            continue
        model, options, paths = CASES[case]
        size = float_bytes(model)
        for path in [p for p in paths if p in args.paths.split(",")]:
            out = work / f"{case}-{path}"
            shutil.rmtree(out, ignore_errors=True)
            flag = "--stream" if path == "stream" else "--no-stream"
            print(f"{case} {path} ...", file=sys.stderr, flush=True)
            measured = run(["quantize", "--model", model, *options, "--out", str(out), flag])
            measured.pop("output")
            report = json.loads((out / "report.json").read_text())
            rows.append({
                "case": case, "step": "quantize + eval", "path": path, **measured,
                "float32_gb": round(size / 1e9, 3),
                "peak_over_float32": round(measured["peak_rss_gb"] * 1e9 / size, 3),
                "kl_divergence": report.get("kl_divergence"),
                "top1_agreement": report.get("top1_agreement"),
                "bundle_sha256": json.loads((out / "manifest.json").read_text())["files"][
                    "model.safetensors"]["sha256"],
            })  # fmt: skip
            if path == "stream" and case.startswith("qwen"):
                gguf = work / f"{case}.gguf"
                measured = run(["export", "--artifact", str(out), "--format", "gguf",
                                "--out", str(gguf), "--overwrite"])  # fmt: skip
                measured.pop("output")
                over = round(measured["peak_rss_gb"] * 1e9 / size, 3)
                rows.append({"case": case, "step": "export gguf", "path": "bundle",
                             **measured, "float32_gb": round(size / 1e9, 3),
                             "peak_over_float32": over})  # fmt: skip
            write(args.out, rows, work)  # after every run: a later failure loses nothing
    print(table(rows))
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


def write(out: str, rows: list[dict], work: Path) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out).with_suffix(".tmp")
    tmp.write_text(json.dumps({"rows": rows, "work": str(work)}, indent=2) + "\n")
    os.replace(tmp, out)


def table(rows: list[dict]) -> str:
    head = ("| case | step | path | peak RSS GB | / fp32 weights | wall s | user s | sys s | "
            "KL | top-1 % |")  # fmt: skip
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def number(r: dict, key: str, form: str) -> str:
        return "-" if r.get(key) is None else format(r[key], form)

    for r in rows:
        lines.append(
            f"| {r['case']} | {r['step']} | {r['path']} | {number(r, 'peak_rss_gb', '.2f')} | "
            f"{number(r, 'peak_over_float32', '.2f')} | {r['wall_s']:.0f} | "
            f"{number(r, 'user_s', '.0f')} | {number(r, 'sys_s', '.0f')} | "
            f"{number(r, 'kl_divergence', '.4f')} | {number(r, 'top1_agreement', '.1f')} |"
        )
    disk = [r for r in rows if r.get("disk_gb") is not None]
    if disk:
        lines.append("\n" + "\n".join(f"{r['case']} {r['step']}: {r['disk_gb']:.2f} GB on disk"
                                       for r in disk))  # fmt: skip
    said = [r for r in rows if r.get("generated")]
    for r in said:
        lines.append(f"{r['case']}: llama.cpp generated {r['generated']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
