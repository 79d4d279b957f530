"""One linear layer per scheme, timed as a ratio of fp32 ``F.linear`` in the same run.

Shapes: tokens M in {1, 32} x (in K, out N) in {(2048, 8192), (8192, 2048)}. Variants are
interleaved round by round and each ratio is a median over rounds, so a drifting machine moves
all variants alike. Prints a table and writes JSON (default benchmarks/results/kernels.json).

    python benchmarks/kernels.py [--rounds 7] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import edgequant
from edgequant import kernels
from edgequant.layers import QuantizedLinear

SCHEMES = ["fp16", "int8-weight-only", "int8-dynamic", "8da4w", "int4-weight-only"]
SHAPES = [(1, 2048, 8192), (1, 8192, 2048), (32, 2048, 8192), (32, 8192, 2048)]


def _time(fn, x, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn(x)
    return (time.perf_counter() - start) / iters


def run(rounds: int) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    for m, k, n in SHAPES:
        linear = nn.Linear(k, n, bias=False)
        x = torch.randn(m, k)
        variants = {"fp32": lambda t, w=linear.weight: F.linear(t, w)}
        layers = {}
        for name in SCHEMES:
            scheme = edgequant.recipes.get(name).rules[0].scheme
            layer = QuantizedLinear.from_float(linear, scheme)
            layers[name] = layer
            variants[name] = layer
        with torch.no_grad():
            for fn in variants.values():  # warm up, build prepacked weights
                fn(x)
            iters = max(3, int(0.05 / max(_time(variants["fp32"], x, 3), 1e-6)))
            samples = {name: [] for name in variants}
            for _ in range(rounds):
                for name, fn in variants.items():
                    samples[name].append(_time(fn, x, iters))
        base = statistics.median(samples["fp32"])
        for name in variants:
            t = statistics.median(samples[name])
            layer = layers.get(name)
            rows.append(
                {
                    "M": m,
                    "K": k,
                    "N": n,
                    "scheme": name,
                    "kernel": "F.linear" if layer is None else kernels.kernel_name(layer),
                    "ms": t * 1e3,
                    "ratio_vs_fp32": t / base,
                    "weight_bytes": k * n * 4 if layer is None else layer.weight_bytes(),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels.json"))
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    rows = run(args.rounds)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{torch.backends.cpu.get_cpu_capability()}, {platform.processor() or platform.machine()}"
    )
    print(
        f"{'M':>3} {'K x N':>11}  {'scheme':<17} {'kernel':<17} {'ms':>8} {'x fp32':>7} {'MiB':>7}"
    )
    for r in rows:
        print(
            f"{r['M']:>3} {r['K']:>5}x{r['N']:<5}  {r['scheme']:<17} {r['kernel']:<17} "
            f"{r['ms']:>8.3f} {r['ratio_vs_fp32']:>7.2f} {r['weight_bytes'] / 2**20:>7.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "rounds": args.rounds,
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
