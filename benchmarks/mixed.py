"""SmolLM2-135M under byte budgets (`edgequant.mixed`): for each runtime, the allocator's
recipes at several budgets against the uniform presets and the runtimes' own mixes at the same
bytes, each file written and measured in its runtime (KL, top-1, perplexity against the float
model on the same windows); the sensitivity's cost; and how the Fisher estimate ranks
candidates against measuring every one (Spearman's rank correlation on a few layers).

    python benchmarks/mixed.py [--targets pte,gguf] [--algorithm hqq]
        [--calibration wikitext:128x512] [--windows 8] [--bpw 4.25,4.75,5.5,6.5,8]
        [--rho-layers 0,14,29] [--rotate hadamard] [--folder build/mixed] [--out FILE]
        [--png FILE]

``--algorithm`` may carry the algorithm's parameters: ``gptq@sequential@act_order``.
``--unmeasured-references "ExecuTorch Llama 3.2 layout"`` sets the budget at a reference's
bytes without making its file (measured in an earlier run).

Budgets are bytes of the quantizable weights as the target's file stores them (as `quantize
--budget`; `mixed.written_bytes`: a ``.pte`` keeps a tied embedding and head twice); a budget
"at" a reference file is that file's weights counted the same way (llama.cpp's mix: its file's
bytes less what the uniform file writes besides its weights). The sensitivity is measured on
WikiText-2 past the evaluation windows (`mixed.sensitivity_windows`), GPTQ's candidates
rounded by GPTQ on the calibration data (`mixed.gptq_rounded`). Files already in
--folder are reused when their sidecar ``.json`` names the same recipe. Time the sensitivity
on a quiet machine. With ``--rotate``, the allocator's recipes rotate the model first
(`edgequant.rotation`) and their sensitivity is measured on the rotated model; the references
stay as they are.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

import edgequant
from edgequant import calibration as cal
from edgequant import eval as ev
from edgequant import mixed, rotation
from edgequant.export import load_program
from edgequant.job import with_algorithm
from edgequant.models import load
from edgequant.models.base import logits as eager_logits
from edgequant.recipe import ROTATIONS, Recipe, Rule
from edgequant.schemes import NEEDS_CALIBRATION, Scheme, parse_algorithm
from edgequant.targets import write

MAX_SEQ_LEN = 512
INT8 = Scheme("int8")  # per channel, weight only: ExecuTorch's 8-bit embedding
INT8_DYNAMIC = Scheme("int8", activation="int8_dynamic")  # its 8-bit output layer (8da8w)
Q4_0 = Scheme("int4", "per_group", 32, scale_dtype="fp16")


def references(target: str) -> dict[str, Recipe]:
    """The uniform recipes a budget is set against (name -> recipe)."""
    if target == "pte":
        base = edgequant.recipes.get("8da4w")
        layout = Recipe(
            base.rules + (Rule(INT8, role="embedding"), Rule(INT8_DYNAMIC, role="lm_head")),
            name="executorch-llama3.2-layout",
        )  # 8da4w g32 linears, 8-bit per-channel output layer (8da8w) and embedding
        return {"uniform 8da4w": base, "ExecuTorch Llama 3.2 layout": layout}
    if target == "gguf":
        return {"uniform Q4_0": Recipe((Rule(Q4_0, role="default"),), name="q4_0")}
    base = edgequant.recipes.get("8da4w")
    return {"uniform 8da4w": base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--targets", default="pte,gguf")
    parser.add_argument("--algorithm", default="hqq")
    parser.add_argument("--calibration", default="wikitext:128x512")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--bpw", default="4.25,4.75,5.5,6.5,8")
    parser.add_argument("--rho-layers", default="0,14,29")
    parser.add_argument("--rotate", choices=ROTATIONS, default=None)
    parser.add_argument("--unmeasured-references", default="",
                        help="references (by name) whose bytes set a budget but whose files "
                        "are not made (measured in an earlier run)")  # fmt: skip
    parser.add_argument("--folder", default="build/mixed")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "mixed.json"))
    parser.add_argument("--png", default=str(Path(__file__).parent / "results" / "mixed.png"))
    args = parser.parse_args()
    algorithm, params = parse_algorithm(args.algorithm)  # e.g. gptq@sequential
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    targets = args.targets.split(",")

    model, tokenizer, info = load(args.model)
    source = info["source"]
    windows = ev.windows(ev.tokenize_file(tokenizer, ev.default_text()), 512, args.windows)
    reference = ev.float_logits(model, windows)
    sensitivity_windows = mixed.sensitivity_windows(tokenizer)
    data = None
    if algorithm in NEEDS_CALIBRATION:
        data = cal.parse(args.calibration, tokenizer, model=model)
    groups = mixed.groups_of(model)
    n_weights = mixed.counted_weights(groups)
    meta: dict = {"algorithm": args.algorithm, "windows": args.windows, "n_weights": n_weights,
                  "rotate": args.rotate,
                  "calibration": data.source if data else None,
                  "sensitivity_windows": list(sensitivity_windows.shape)}  # fmt: skip
    rows: list[dict] = []

    def measure(target: str, name: str, recipe: Recipe, **facts) -> dict:
        """Quantize with ``recipe``, write ``target``, evaluate the file in its runtime."""
        recipe = with_algorithm(recipe, algorithm, **params) if algorithm != "minmax" else recipe
        path = folder / f"{target}-{name.replace(' ', '_').replace('.', '_')}.{target}"
        sidecar = path.with_suffix(".json")
        how = json.dumps(recipe.to_dict(), sort_keys=True)
        if path.is_file() and sidecar.is_file() and json.loads(sidecar.read_text())["how"] == how:
            row = json.loads(sidecar.read_text())["row"]
            print(f"{target} {name}: reused {path}", flush=True)
        else:
            print(f"{target} {name}: quantizing, writing, evaluating ...", flush=True)
            t = time.perf_counter()
            quantized, plan = edgequant.quantize(copy.deepcopy(model), recipe, calibration=data)
            seconds = time.perf_counter() - t
            with torch.no_grad():
                eager = torch.stack([eager_logits(quantized, w[None])[0] for w in windows])
            write(quantized, tokenizer, target, path, source=source, max_seq_len=MAX_SEQ_LEN)
            program = load_program(path)
            with torch.inference_mode():
                got = torch.stack([program(w[None])[0] for w in windows])
            row = {
                "weight_bytes": plan.bytes_after,  # in the bundle
                "written_bytes": mixed.recipe_bytes(model, recipe, [target]),  # in the file
                "file_bytes": path.stat().st_size,
                "quantize_seconds": seconds,
                "eager_kl": ev.compare(reference, eager, windows)["kl_divergence"],
                **ev.compare(reference, got, windows),
            }
            del program, got, quantized
            sidecar.write_text(json.dumps({"how": how, "row": row}) + "\n")
        row = {"target": target, "variant": name, **row, **facts}
        rows.append(row)
        print(f"  {row['file_bytes'] / 1e6:.2f} MB, KL {row['kl_divergence']:.4f} "
              f"(eager {row['eager_kl']:.4f})", flush=True)  # fmt: skip
        return row

    measured = model  # the model the sensitivity is measured on
    if args.rotate:
        measured = copy.deepcopy(model)
        rotation.rotate(measured, args.rotate)
    rotated = f"-{args.rotate}" if args.rotate else ""
    for target in targets:
        # a .pte keeps the tied embedding and head apart anyway: each takes its own scheme
        apart = mixed.groups_of(measured, apart=mixed.decided_apart([target]))
        options = {g: mixed.options_for(g, [target], algorithm, **params) for g in apart}
        name = f"{target}-{args.algorithm}{rotated}"
        table, seconds = sensitivity_table(measured, options, sensitivity_windows, folder, name,
                                           target, data)  # fmt: skip
        meta[f"{target}_sensitivity_seconds"] = seconds
        print(f"{target}: sensitivity {seconds:.0f} s", flush=True)
        if args.rho_layers and target == targets[0]:
            layers = {int(x) for x in args.rho_layers.split(",")}
            subset = {g: o for g, o in options.items() if g.layer in layers}
            t = time.perf_counter()
            every = mixed.sensitivity(measured, subset, sensitivity_windows, measure="every",
                                      calibration=data)  # fmt: skip
            est = [o.cost for g in subset for o in table[g] if o.scheme is not None]
            got = [c for g in subset for c, s in zip(every[g], options[g], strict=True) if s]
            meta["rank_correlation"] = {
                "target": target, "layers": sorted(layers), "pairs": len(est),
                "spearman": mixed.rank_correlation(est, got),
                "estimated_over_measured": sum(est) / sum(got),
                "seconds_measuring_every": time.perf_counter() - t,
            }  # fmt: skip
            print(f"  Fisher estimate against measuring: {meta['rank_correlation']}", flush=True)

        overhead = None
        budgets: list[tuple[str, int]] = []
        unmeasured = [n for n in args.unmeasured_references.split(",") if n]
        for name, recipe in references(target).items():
            written = mixed.recipe_bytes(model, recipe, [target])
            if name not in unmeasured:
                row = measure(target, name, recipe)
                overhead = row["file_bytes"] - written if overhead is None else overhead
            budgets.append((f"at {name}", written))
        if target == "gguf":
            if overhead is None:
                raise SystemExit("the budget at llama.cpp's bytes needs the uniform Q4_0 measured")
            data = data or cal.parse(args.calibration, tokenizer, model=model)
            row = llama_cpp_mix(model, tokenizer, folder, data, reference, windows, source)
            rows.append(row)
            budgets.append(("at llama.cpp Q4_K_M imatrix", row["file_bytes"] - overhead))
        budgets += [(f"{b}bpw", int(float(b) * n_weights / 8)) for b in args.bpw.split(",") if b]
        for label, limit in budgets:
            try:
                recipe, facts = mixed.choose(table, mixed.Budget(limit, "bytes"))
            except ValueError as e:
                print(f"{target} {label}: {e}", flush=True)
                continue
            chosen: dict[str, int] = {}
            for m in facts["modules"]:
                chosen[str(m["scheme"])] = chosen.get(str(m["scheme"]), 0) + 1
            if args.rotate:
                recipe = dataclasses.replace(recipe, rotate=args.rotate)
            measure(target, f"budget {label}{rotated}", recipe, budget_bytes=limit,
                    predicted_kl=facts["predicted_kl"], schemes=chosen)  # fmt: skip

    print(f"\nSmolLM2-135M, {args.windows} x 512 tokens of WikiText-2 test, each file in its "
          f"runtime; algorithm {args.algorithm}\n")  # fmt: skip
    print("| target | variant | weights MB | file MB | predicted KL | eager KL | KL | top-1 % |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        pred = f"{r['predicted_kl']:.4f}" if "predicted_kl" in r else "-"
        eager = f"{r['eager_kl']:.4f}" if "eager_kl" in r else "-"
        weights = f"{r['written_bytes'] / 1e6:.2f}" if r.get("written_bytes") else "-"
        kl, top1 = r["kl_divergence"], r["top1_agreement"]
        print(f"| {r['target']} | {r['variant']} | {weights} | {r['file_bytes'] / 1e6:.2f} | "
              f"{pred} | {eager} | {kl:.4f} | {top1:.1f} |")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    plot(rows, Path(args.png))


def sensitivity_table(model, options, windows, folder: Path, name: str, target: str, data):
    """`mixed.option_table` (GPTQ's candidates rounded on the calibration ``data``) and the
    seconds it took, kept in ``folder`` (reused when the same schemes were measured so)."""
    path = folder / f"sensitivity-{name}.json"
    schemes = {g.name: [s.describe() if s else None for s in opts] for g, opts in options.items()}
    source = data.source if data is not None else None
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept["schemes"] == schemes and kept.get("calibration") == source:
            table = {g: [mixed.Option(s, mixed.stored_bytes(g, s, [target]), c)
                         for s, c in zip(opts, kept["costs"][g.name], strict=True)]
                     for g, opts in options.items()}  # fmt: skip
            return table, kept["seconds"]
    t = time.perf_counter()
    table = mixed.option_table(model, options, windows, targets=[target], calibration=data)
    seconds = time.perf_counter() - t
    costs = {g.name: [o.cost for o in opts] for g, opts in table.items()}
    kept = {"seconds": seconds, "schemes": schemes, "calibration": source, "costs": costs}
    path.write_text(json.dumps(kept) + "\n")
    return table, seconds


def llama_cpp_mix(model, tokenizer, folder: Path, data, reference, windows, source) -> dict:
    """llama.cpp's own Q4_K_M with an importance matrix, on edgequant's F32 file."""
    from edgequant.export.llama_quantize import importance_matrix, llama_quantize

    path = folder / "gguf-llama.cpp-Q4_K_M-imatrix.gguf"
    if not path.is_file():
        f32 = write(model, tokenizer, "gguf", folder / "f32.gguf", source=source)
        llama_quantize(f32, path, "Q4_K_M", imatrix=importance_matrix(model, data), overwrite=True)
        f32.unlink()
    program = load_program(path)
    with torch.inference_mode():
        got = torch.stack([program(w[None])[0] for w in windows])
    return {"target": "gguf", "variant": "llama.cpp Q4_K_M imatrix",
            "file_bytes": path.stat().st_size, **ev.compare(reference, got, windows)}  # fmt: skip


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({r["target"] for r in rows})
    fig, axes = plt.subplots(1, len(targets), figsize=(6 * len(targets), 4.5), squeeze=False)
    for ax, target in zip(axes[0], targets, strict=True):
        mine = sorted((r for r in rows if r["target"] == target and "budget_bytes" in r),
                      key=lambda r: r["file_bytes"])  # fmt: skip
        ax.plot([r["file_bytes"] / 1e6 for r in mine], [r["kl_divergence"] for r in mine],
                "o-", label="edgequant budget")  # fmt: skip
        for r in (r for r in rows if r["target"] == target and "budget_bytes" not in r):
            ax.plot(r["file_bytes"] / 1e6, r["kl_divergence"], "s", label=r["variant"])
        ax.set(xlabel="file MB", ylabel="KL (nats/token)", yscale="log", title=target)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
