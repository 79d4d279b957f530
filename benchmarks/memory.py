"""Peak resident memory, time and KL of the main job, streaming (one decoder layer at a time)
against in memory, on SmolLM2-135M and Qwen2.5-Coder-1.5B, and of ``export --format gguf``.

Each run is an ``edgequant`` command in a child process; its peak resident memory (the
kernel's ``ru_maxrss`` of that child, from ``os.wait4``), wall, user and system time are
measured from outside, its KL read from the report it wrote. Prints a Markdown table and writes
JSON (default benchmarks/results/memory.json). Run on a quiet machine with nothing else running
(the 1.5B model's in-memory run peaks near 20 GB)::

    python benchmarks/memory.py                       # every case, about an hour here
    python benchmarks/memory.py --cases smollm2-hqq   # one case
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

# benchmarks/gguf.py would shadow the gguf package edgequant imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

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


def run(args: list[str]) -> dict:
    """Run ``edgequant args`` in a child process: wall, user, system seconds, peak RSS."""
    start = time.perf_counter()
    child = subprocess.Popen([*EDGEQUANT, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if child.returncode != 0:
        tail = output.decode(errors="replace")[-3000:]
        raise RuntimeError(f"edgequant {' '.join(args)} failed ({child.returncode}):\n{tail}")
    return {
        "wall_s": round(wall, 1),
        "user_s": round(usage.ru_utime, 1),
        "sys_s": round(usage.ru_stime, 1),
        "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3),  # ru_maxrss is in KiB on Linux
    }


def float_bytes(model: str) -> int:
    from edgequant.models.lazy import open_source

    return 4 * open_source(model).n_weights()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"any of {', '.join(CASES)}")
    parser.add_argument("--paths", default="memory,stream", help="memory, stream or both")
    parser.add_argument("--work", help="folder for the bundles (default: a temporary one)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory.json"))
    args = parser.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="edgequant-memory-"))
    rows = []
    for case in cases:
        model, options, paths = CASES[case]
        size = float_bytes(model)
        for path in [p for p in paths if p in args.paths.split(",")]:
            out = work / f"{case}-{path}"
            shutil.rmtree(out, ignore_errors=True)
            flag = "--stream" if path == "stream" else "--no-stream"
            print(f"{case} {path} ...", file=sys.stderr, flush=True)
            measured = run(["quantize", "--model", model, *options, "--out", str(out), flag])
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
    for r in rows:
        kl = "-" if r.get("kl_divergence") is None else f"{r['kl_divergence']:.4f}"
        top1 = "-" if r.get("top1_agreement") is None else f"{r['top1_agreement']:.1f}"
        lines.append(
            f"| {r['case']} | {r['step']} | {r['path']} | {r['peak_rss_gb']:.2f} | "
            f"{r['peak_over_float32']:.2f} | {r['wall_s']:.0f} | {r['user_s']:.0f} | "
            f"{r['sys_s']:.0f} | {kl} | {top1} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
