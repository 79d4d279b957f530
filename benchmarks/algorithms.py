"""Quantization algorithms on SmolLM2-135M's decoder linears: KL, perplexity and top-1 against
float for each algorithm and scheme, with the time each quantization took and its peak memory,
beside torchao 0.18's own min-max and HQQ quantizers on the same work, in one run.

    python benchmarks/algorithms.py [--schemes g32,g64,int8] [--algorithms minmax,mse,hqq,awq,...]
        [--windows 8] [--calibration wikitext:128x512] [--out FILE]

Schemes: ``g32`` / ``g64`` (8da4w: int4 symmetric group-wise, fp16 scales, int8 dynamic
per-token activations), ``int8`` (int8-dynamic). Scope: the 210 decoder linears (embedding and
lm_head float), the scope of the reference points quoted in docs/algorithms.md. Writes JSON and a
PNG (KL against bits per weight, one line per algorithm).
"""

from __future__ import annotations

import argparse
import copy
import json
import threading
import time
from pathlib import Path

import torch

import edgequant
from edgequant import calibration as cal
from edgequant import eval as ev
from edgequant.job import with_algorithm
from edgequant.models import load
from edgequant.models.base import logits
from edgequant.recipe import Recipe, Rule
from edgequant.schemes import ALGORITHMS, NEEDS_CALIBRATION

SCHEMES = {"g32": ("8da4w", {}), "g64": ("8da4w", {"group_size": 64}), "int8": ("int8-dynamic", {})}


def decoder_linears(name: str, overrides: dict) -> Recipe:
    preset = edgequant.recipes.get(name, **overrides)
    keep = (Rule(None, role="embedding"), Rule(None, role="lm_head"))
    return Recipe(preset.rules + keep, name=preset.name)


class PeakRSS:
    """Peak resident memory (MiB) above the start, sampled every 50 ms from /proc."""

    def __init__(self) -> None:
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mib(self) -> float:
        return self.peak - self.start


def torchao_route(model, scheme_key: str, algorithm: str):
    """torchao 0.18's own quantizer on the decoder linears (what ExecuTorch's export uses)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    if scheme_key == "int8":
        weight = dict(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    else:
        group = 32 if scheme_key == "g32" else 64
        weight = dict(weight_dtype=torch.int4, weight_granularity=PerGroup(group))
    config = Int8DynamicActivationIntxWeightConfig(
        **weight, intx_choose_qparams_algorithm="hqq_scale_only" if algorithm == "hqq" else "affine"
    )
    decoder = model.model.layers
    quantize_(decoder, config)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", default="g32,g64,int8")
    parser.add_argument(
        "--algorithms",
        default="minmax,mse,mse/magnitude=0,hqq,hqq/magnitude=0,awq,smoothquant,gptq,"
        "torchao-minmax,torchao-hqq",
        help="edgequant algorithms (name/param=value/... sets parameters) and torchao-minmax, "
        "torchao-hqq",
    )
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--calibration", default="wikitext:128x512")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "algorithms.json"))
    args = parser.parse_args()

    model, tokenizer, _ = load("default")
    windows = ev.windows(ev.tokenize_file(tokenizer, ev.default_text()), 512, args.windows)
    reference = ev.float_logits(model, windows)
    calibration = cal.parse(args.calibration, tokenizer, model=model)
    rows = []
    out = Path(args.out)
    for key in args.schemes.split(","):
        preset, overrides = SCHEMES[key]
        base = decoder_linears(preset, overrides)
        for algorithm in args.algorithms.split(","):
            if algorithm == "torchao-hqq" and key == "int8":
                continue  # HQQ's scale-only search is for sub-8-bit grids
            name, params = _spec(algorithm)
            if key == "int8" and params == {"magnitude": 0.0}:
                continue  # int8's default already (algorithms.default_magnitude)
            work = copy.deepcopy(model)
            started = time.perf_counter()
            with PeakRSS() as memory:
                if algorithm.startswith("torchao-"):
                    quantized, plan = torchao_route(work, key, algorithm.split("-")[1]), None
                else:
                    recipe = with_algorithm(base, name, **params)
                    data = calibration if name in NEEDS_CALIBRATION else None
                    quantized, plan = edgequant.quantize(work, recipe, calibration=data)
            seconds = time.perf_counter() - started
            with torch.inference_mode():
                got = torch.stack([logits(quantized, w[None])[0] for w in windows])
            row = {
                "scheme": key,
                "algorithm": algorithm,
                **ev.compare(reference, got, windows),
                "bits_per_weight_decoder_linears": _decoder_bits(model, base),
                "quantize_seconds": seconds,
                "peak_memory_mib": memory.mib,
                "calibration": calibration.source if name in NEEDS_CALIBRATION else None,
            }
            rows.append(row)
            print(
                f"{key:5s} {algorithm:15s} KL {row['kl_divergence']:.4f}  ppl "
                f"{row['perplexity']:7.3f}  top-1 {row['top1_agreement']:5.1f}%  "
                f"{seconds:6.1f} s  +{memory.mib:6.0f} MiB",
                flush=True,
            )
            del work, quantized, got
            _write(out, args, rows)
    print("\n| scheme | algorithm | KL | perplexity | top-1 % | quantize s | peak MiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['scheme']} | {r['algorithm']} | {r['kl_divergence']:.4f} | "
            f"{r['perplexity']:.3f} | {r['top1_agreement']:.1f} | {r['quantize_seconds']:.1f} | "
            f"{r['peak_memory_mib']:.0f} |"
        )
    _plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def _spec(text: str) -> tuple[str, dict]:
    """``"hqq/magnitude=0/iters=10"`` -> ``("hqq", {"magnitude": 0.0, "iters": 10})``."""
    name, *pairs = text.split("/")
    params = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        kind = ALGORITHMS.get(name, {}).get(key)
        if kind is None or not value:
            raise SystemExit(f"--algorithms: {pair!r} is not a parameter of {name!r}")
        params[key] = value.lower() == "true" if kind is bool else kind(value)
    return name, params


def _decoder_bits(model, recipe: Recipe) -> float:
    plan = edgequant.plan(model, recipe)
    rows = [lp for lp in plan if lp.scheme is not None]
    weights = sum(lp.shape[0] * lp.shape[1] for lp in rows)
    return 8 * sum(lp.bytes_after for lp in rows) / max(weights, 1)


def _write(out: Path, args, rows) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"windows": args.windows, "seq_len": 512, "calibration": args.calibration}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for algorithm in dict.fromkeys(r["algorithm"] for r in rows):
        pts = sorted(
            (r["bits_per_weight_decoder_linears"], r["kl_divergence"])
            for r in rows
            if r["algorithm"] == algorithm
        )
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=algorithm)
    ax.set_xlabel("bits per weight (decoder linears)")
    ax.set_ylabel("KL against float (nats/token)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: algorithm vs min-max")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
