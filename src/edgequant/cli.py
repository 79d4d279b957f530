"""The ``edgequant`` command: parses arguments and calls library functions, nothing more.

Verbs: ``recipes`` (list presets or print one as a recipe file), ``plan`` (what a recipe would
do to a model), ``quantize`` (the main job: quantize, save, evaluate, report), ``eval`` (measure
a saved bundle), ``generate`` (text from a model or a bundle), ``inspect`` (check and summarise
a bundle), ``export`` (a bundle as a runtime's file), ``calibrate-speed`` (this machine's kernel
efficiencies for predicted speeds).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path

EXIT_USER_ERROR = 2  # bad arguments, recipe, model or bundle: the message says which
EXIT_CHECK_FAILED = 3  # the work ran but a check on its result failed


def cmd_recipes(args: argparse.Namespace) -> int:
    from edgequant import recipes

    if args.name is None:
        width = max(map(len, recipes.names()))
        for name in recipes.names():
            print(f"{name:<{width}}  {recipes.describe(name)}")
        return 0
    recipe = recipes.get(args.name)
    print(recipe.to_json() if args.format == "json" else recipe.to_yaml(), end="")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import edgequant
    from edgequant.models import load

    model, tokenizer, _ = load(args.model)
    recipe = args.recipe
    if args.rotate is not None and args.budget is not None:  # measured on the rotated model
        from edgequant.rotation import rotate

        rotate(model, args.rotate)
    if args.budget is not None:
        from edgequant import mixed, targets

        names = targets.parse(args.targets)
        if not names:
            raise ValueError("--budget chooses among the schemes a runtime runs exactly: pass "
                             "--targets (pte, tflite, gguf; with several, only schemes all of "
                             "them run)")  # fmt: skip
        windows = mixed.sensitivity_windows(tokenizer)
        recipe, allocation = mixed.budget_recipe(model, args.budget, names, windows)
    if args.rotate is not None:
        import dataclasses

        from edgequant.quantize import as_recipe

        recipe = dataclasses.replace(as_recipe(recipe), rotate=args.rotate)
    plan = edgequant.plan(model, recipe)
    print(plan.table())
    if args.budget is not None:
        print(
            f"\nbudget {allocation['budget']} ({allocation['budget_bytes']:,} bytes of weights; "
            f"reachable {allocation['reachable_bytes'][0]:,}..{allocation['reachable_bytes'][1]:,}"
            f"): allocated {allocation['allocated_bytes']:,} bytes, predicted KL "
            f"{allocation['predicted_kl']:.4f} (the sum of each module's KL alone)"
        )
    if args.targets:
        from edgequant import speed, targets
        from edgequant.models.families import decoder_of

        names = targets.parse(args.targets)
        spec = decoder_of(model).spec
        table, source = speed.efficiency()
        predicted = speed.predict(plan, spec, names, max_seq_len=min(512, spec.max_seq_len),
                                  table=table)  # fmt: skip
        print(f"\npredicted decode speed (kernel efficiencies: {source}):")
        for name, p in predicted.items():
            print(
                f"  {name:<7} {p['predicted_decode_tokens_per_s']:7.1f} tok/s  "
                f"({p['token_bytes'] / 2**20:.1f} MiB per token at "
                f"{p['bandwidth_gb_s']:.1f} GB/s)"
            )
    return 0


def cmd_calibrate_speed(args: argparse.Namespace) -> int:
    from edgequant import speed

    result = speed.calibrate(rounds=args.rounds)
    print(f"machine: {result['machine']}")
    print("| runtime | file | layers | decode tok/s | MiB per token | GB/s |")
    print("|---|---|---:|---:|---:|---:|")
    for runtime, files in result["measured"].items():
        for label, m in files.items():
            print(
                f"| {runtime} | {label} | {m['n_layers']} | {m['decode_tokens_per_s']:.1f} | "
                f"{m['token_bytes'] / 2**20:.1f} | {m['bandwidth_gb_s']:.1f} |"
            )
    print("\n| runtime | fp32 | fp16 | int8 | int4 | ms per layer |")
    print("|---|---:|---:|---:|---:|---:|")
    for runtime, eff in result["efficiency"].items():
        kinds = " | ".join(f"{eff[k]:.3f}" for k in ("fp32", "fp16", "int8", "int4"))
        print(f"| {runtime} | {kinds} | {1000 * eff['layer_s']:.3f} |")
    print(f"wrote {speed.calibration_path()}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from edgequant import job
    from edgequant.artifact import check_writable
    from edgequant.report import summary_rows, table

    try:  # fail before the work, not after it
        check_writable(Path(args.out), args.overwrite)
    except FileExistsError as e:
        raise FileExistsError(str(e).replace("pass overwrite=True", "pass --overwrite")) from None
    report = job.run(
        args.model,
        args.recipe,
        args.out,
        eval_windows=args.eval_windows,
        seq_len=args.seq_len,
        text=args.text,
        overwrite=args.overwrite,
        compare_presets=args.compare,
        algorithm=args.algorithm,
        calibration=args.calibration,
        targets=args.targets,
        allow_fallback=args.allow_fallback,
        speed_rounds=args.speed_rounds,
        compare_anchors=args.compare_anchors,
        stream=args.stream,
        resume=args.resume,
        speed=args.speed,
        budget=args.budget,
        rotate=args.rotate,
    )
    print(f"model: {report['model_source']}")
    print(f"bundle: {args.out}  (report.json, report.md, report.png, report.html)")
    if report["bundle_reloads_identically"] is False:  # None: nothing ran on the bundle
        print("CHECK FAILED: the saved bundle, reloaded, gives different logits", file=sys.stderr)
        return EXIT_CHECK_FAILED
    if report["eval_windows"]:
        print(
            f"evaluated on {report['eval_windows']} windows of {report['seq_len']} tokens of "
            f"{report['text']}"
        )
    print(table(summary_rows(report)))
    if args.compare:
        rows = json.loads((Path(args.out) / "compare.json").read_text())
        print(f"\nall presets (compare.md, compare.png):\n{table(rows)}")
    skipped = {}
    if report.get("targets"):
        from edgequant.report import target_table

        print("\ndeployed files, each measured in its own runtime:")
        print(target_table(report))
        skipped = {n: r["skipped"] for n, r in report["targets"].items() if "skipped" in r}
        for name, reason in skipped.items():
            print(f"skipped {name}: {reason}", file=sys.stderr)
        for name, row in (report.get("anchors") or {}).items():
            if "skipped" in row:
                print(f"skipped anchor {name}: {row['skipped']}", file=sys.stderr)
    print(f"\nrecipe card: {Path(args.out) / 'report.html'}")
    if skipped and args.strict:
        print(f"--strict: {len(skipped)} target(s) skipped", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return 0


def _program_arg(args: argparse.Namespace) -> str | None:
    given = [p for p in (args.pte, args.tflite, args.gguf) if p]
    if len(given) > 1:
        raise ValueError("pass one of --pte, --tflite, --gguf")
    return given[0] if given else None


def cmd_eval(args: argparse.Namespace) -> int:
    from edgequant import job
    from edgequant.report import table

    options = dict(eval_windows=args.eval_windows, seq_len=args.seq_len, text=args.text)
    program = _program_arg(args)
    if program:
        if args.bundle or not args.model:
            raise ValueError(
                "--pte/--tflite/--gguf FILE takes its float reference from --model M (no bundle)"
            )
        rows = job.evaluate_program(program, reference=args.model, **options)
    elif args.bundle:
        rows = job.evaluate_bundle(args.bundle, reference=args.model, **options)
    else:
        raise ValueError("pass a bundle folder, or --pte/--tflite/--gguf FILE with --model M")
    print(table(rows))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import edgequant
    from edgequant.artifact import load_tokenizer
    from edgequant.export import to_gguf, to_pte, to_tflite
    from edgequant.export.common import check_out

    check_out(args.out, args.overwrite, f".{args.format}")  # before loading anything
    model = edgequant.load(args.artifact)
    tokenizer = load_tokenizer(args.artifact)
    if args.format == "gguf":
        source = args.tokenizer_gguf or _source_gguf(args.artifact)
        options = dict(
            tokenizer=None if source else tokenizer,
            tokenizer_gguf=source,
            tokenizer_pre=args.tokenizer_pre,
        )
        if args.llama_quantize:
            path = _llama_quantized(args, model, tokenizer, options)
        else:
            path = to_gguf(
                model, args.out, allow_requant=args.allow_requant, overwrite=args.overwrite,
                **options,
            )  # fmt: skip
        print(f"wrote {path} ({path.stat().st_size} bytes)")
        return 0
    common = dict(
        max_seq_len=args.max_seq_len, allow_fallback=args.allow_fallback, overwrite=args.overwrite
    )
    if args.format == "tflite":
        path = to_tflite(model, args.out, prefill_len=args.prefill_len, **common)
    else:
        bos, eos = getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)
        path = to_pte(model, args.out, bos_id=bos, eos_id=eos, **common)
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    if tokenizer is not None and args.format == "pte":
        print(f"tokenizer for ExecuTorch's runner: {Path(args.artifact) / 'tokenizer'}")
    return 0


def _llama_quantized(args: argparse.Namespace, model, tokenizer, options: dict) -> Path:
    """The bundle as a GGUF file, then llama.cpp's own quantizer on it (``--llama-quantize``)."""
    import tempfile

    from edgequant.export import to_gguf
    from edgequant.export.common import check_out
    from edgequant.export.llama_quantize import importance_matrix, llama_quantize

    types = {}
    for item in args.tensor_type or []:
        pattern, sep, kind = item.rpartition("=")
        if not sep or not pattern or not kind:
            raise ValueError(f"--tensor-type {item!r}: expected PATTERN=TYPE, e.g. attn_v=Q8_0")
        types[pattern] = kind
    check_out(args.out, args.overwrite, ".gguf")
    imatrix = None
    if args.imatrix:
        from edgequant import calibration

        data = calibration.parse(args.imatrix, tokenizer, model=model)
        imatrix = importance_matrix(model, data)
    with tempfile.TemporaryDirectory(dir=Path(args.out).parent) as tmp:
        source = to_gguf(model, Path(tmp) / "source.gguf", allow_requant=True, **options)
        return llama_quantize(
            source, args.out, args.llama_quantize, tensor_types=types, imatrix=imatrix,
            overwrite=args.overwrite,
        )  # fmt: skip


def _source_gguf(artifact: str) -> str | None:
    """The GGUF file the bundle's model was loaded from (its report.json), if it still exists."""
    from edgequant._io import load_json

    report = Path(artifact) / "report.json"
    if not report.is_file():
        return None
    data = load_json(report.read_text(), str(report))
    source = data.get("model_source") if isinstance(data, dict) else None
    is_gguf = isinstance(source, str) and source.endswith(".gguf") and Path(source).is_file()
    return source if is_gguf else None


def cmd_generate(args: argparse.Namespace) -> int:
    from edgequant.generate import generate

    if (args.top_k is not None or args.top_p is not None) and args.temperature == 0:
        raise ValueError("--top-k/--top-p shape sampling; pass --temperature > 0 with them")
    if args.artifact and args.model:
        raise ValueError("pass --model or --artifact, not both")
    if args.artifact:
        import edgequant
        from edgequant.artifact import load_tokenizer

        model, tokenizer = edgequant.load(args.artifact), load_tokenizer(args.artifact)
        if tokenizer is None:
            raise ValueError(f"bundle {args.artifact!r} stores no tokenizer; pass --model instead")
    elif args.model:
        from edgequant.models import load

        model, tokenizer, _ = load(args.model)
    else:
        raise ValueError(
            "pass --model M, --artifact DIR, or --pte/--tflite/--gguf FILE with one of them"
        )
    program = _program_arg(args)
    if program:  # the program generates; the model above only lends its tokenizer
        from edgequant.export import load_program

        model = load_program(program)
    result = generate(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        chat=not args.no_chat,
    )
    print(result.text)
    print(
        f"\n[{len(result.prompt_ids)} prompt tokens, {len(result.new_ids)} new; prefill "
        f"{result.prefill_tokens_per_s:.1f} tokens/s, decode {result.decode_tokens_per_s:.1f} "
        "tokens/s]",
        file=sys.stderr,
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from edgequant.artifact import read_manifest
    from edgequant.schemes import Scheme

    manifest = read_manifest(args.path)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    print(f"bundle: {args.path} (format {manifest['format']} v{manifest['format_version']})")
    print(f"made by edgequant {manifest['edgequant_version']}, torch {manifest['torch_version']}")
    model = manifest.get("model") or {}
    print(f"model family: {model.get('family', 'unknown')}")
    tokenizer = manifest.get("tokenizer")
    print(f"tokenizer: {tokenizer['kind'] if tokenizer else 'none stored'}")
    print(f"recipe: {(manifest.get('recipe') or {}).get('name', 'none recorded')}")
    for name, facts in manifest["files"].items():
        print(f"file: {name} {facts['bytes']} bytes, sha256 {facts['sha256'][:16]}... (verified)")
    layers = manifest["layers"]
    print(f"quantized modules: {len(layers)}, tied tensors: {len(manifest['aliases'])}")
    counts = Counter(
        f"{facts['kind']}: {Scheme(**facts['scheme']).describe()}" for facts in layers.values()
    )
    for label, n in counts.most_common():
        print(f"  {n:>4} x {label}")
    if args.layers:
        width = max((len(f) for f in layers), default=6)
        print(f"\n{'module':<{width}}  {'kind':<9}  scheme")
        tied = {a.rpartition(".")[0]: t.rpartition(".")[0] for a, t in manifest["aliases"].items()}
        for fqn, facts in layers.items():
            label = Scheme(**facts["scheme"]).describe()
            if fqn in tied:
                label += f" [shares {tied[fqn]}]"
            print(f"{fqn:<{width}}  {facts['kind']:<9}  {label}")
    return 0


def _count(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    from edgequant import __version__
    from edgequant.recipe import ROTATIONS

    parser = argparse.ArgumentParser(
        prog="edgequant", description="Quantize an LLM from one recipe and measure the result."
    )
    parser.add_argument("--version", action="version", version=f"edgequant {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("recipes", help="list presets, or print one as a recipe file")
    p.add_argument("name", nargs="?", help="a preset to print")
    p.add_argument("--format", choices=("yaml", "json"), default="yaml")
    p.set_defaults(func=cmd_recipes)

    model_help = (
        "'default' (SmolLM2-135M-Instruct), 'stories260k', 'qwen2.5-1.5b' (after make "
        "model-qwen2.5-1.5b), a .gguf file, a Hugging Face folder or a llama2.c .bin"
    )
    recipe_help = "a preset name (see `edgequant recipes`) or a .json/.yaml recipe file"
    rotate_help = (
        "fold the norms and an orthogonal rotation of the residual stream and of each head's "
        "values into the float weights before rounding (the recipe's rotate field; "
        "docs/rotation.md)"
    )
    text_help = "text file for evaluation (default: WikiText-2 raw test from the data folder)"

    def add_eval_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--eval-windows",
            type=_count(0),
            default=8,
            help="windows of --seq-len tokens to evaluate on (0 skips evaluation; default 8)",
        )
        p.add_argument("--seq-len", type=_count(2), default=512, help="window length (512)")
        p.add_argument("--text", help=text_help)

    p = sub.add_parser("plan", help="show what a recipe would do to each module")
    p.add_argument("--model", required=True, help=model_help)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--recipe", help=recipe_help)
    how.add_argument(
        "--budget",
        help="show the recipe quantize --budget SIZE would choose (with --targets): measures "
        "each module's sensitivity",
    )
    p.add_argument(
        "--targets", help="also predict decode tok/s in these runtimes: pte, tflite, gguf or all"
    )
    p.add_argument("--rotate", choices=ROTATIONS, help=rotate_help)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("quantize", help="the main job: quantize, save, evaluate, report")
    p.add_argument("--model", default="default", help=model_help + " (default: default)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--recipe", help=recipe_help)
    how.add_argument(
        "--budget",
        help="choose the recipe instead: a scheme per module, among those every --targets "
        "runtime runs exactly, the least KL whose weights fit SIZE (4.5bpw or 92.5MB); "
        "the choice is stored as the bundle's recipe",
    )
    p.add_argument("--out", required=True, help="bundle folder to write (reports go inside)")
    p.add_argument("--rotate", choices=ROTATIONS, help=rotate_help)
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.add_argument("--compare", action="store_true", help="also run every preset; one table")
    p.add_argument(
        "--algorithm",
        help="minmax, mse, hqq, gptq, awq or smoothquant for every integer rule of the recipe, "
        "its parameters after @ (gptq@gptaq=0.25@sequential; a name alone means true); a "
        "K-quant rule takes imatrix for a calibrated one (default: the recipe's own)",
    )
    p.add_argument(
        "--calibration",
        help="calibration data for gptq, awq, smoothquant: wikitext[:NxL] (default 128x512, "
        "WikiText-2 past the evaluation windows), file:PATH[:NxL], model[:NxL] (the float "
        "model's own samples)",
    )
    p.add_argument(
        "--targets",
        help="also write, evaluate and time the model in each runtime: any of pte, tflite, gguf "
        "(comma-separated) or all",
    )
    p.add_argument(
        "--allow-fallback",
        action="store_true",
        help="with --targets: write a target that cannot run some layers as stored (pte/tflite "
        "keep them float, gguf re-quantizes them) instead of skipping it",
    )
    p.add_argument(
        "--strict", action="store_true", help="with --targets: exit 3 when a target is skipped"
    )
    p.add_argument(
        "--speed-rounds",
        type=_count(1),
        default=3,
        help="with --targets: interleaved speed rounds per file, the median reported (3)",
    )
    p.add_argument(
        "--compare-anchors",
        nargs="?",
        const="all",
        metavar="NAMES",
        help="with --targets: also each runtime's own 4-bit route on the same float weights "
        "(executorch-8da4w, litert-torch-int4, llama.cpp-Q4_0, llama.cpp-Q4_0-imatrix; default "
        "all), measured the same way; one not installed is skipped with the reason",
    )
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="read, quantize and evaluate one decoder layer at a time, so that only one layer's "
        "float weights are in memory (default: when the float32 weights exceed 2 GB); the "
        "float model's speed is then not measured",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="with --stream: continue a stopped run of this bundle from its last finished layer",
    )
    p.add_argument(
        "--speed",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the float and the quantized model (default); --no-speed skips it (timing "
        "holds the packed model whole with the CPU kernels' copy of its weights)",
    )
    add_eval_options(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser(
        "calibrate-speed",
        help="measure this machine's kernel efficiency per runtime and scheme, for predicted "
        "speeds (a few minutes; cached per machine)",
    )
    p.add_argument("--rounds", type=_count(1), default=3, help="interleaved speed rounds (3)")
    p.set_defaults(func=cmd_calibrate_speed)

    p = sub.add_parser("eval", help="measure a bundle or a .pte against its float model")
    p.add_argument("bundle", nargs="?", help="bundle folder")
    p.add_argument("--pte", help="an ExecuTorch program written by `edgequant export`")
    p.add_argument("--tflite", help="a LiteRT program written by `edgequant export`")
    p.add_argument("--gguf", help="a GGUF file, run in llama.cpp (llama-cpp-python)")
    p.add_argument(
        "--model", help="the float model to compare with (default: the one in report.json)"
    )
    add_eval_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="generate text from a model or a bundle")
    p.add_argument("--model", help=model_help)
    p.add_argument("--artifact", help="a bundle folder (uses its stored tokenizer)")
    p.add_argument("--pte", help="generate with this .pte (tokenizer from --artifact or --model)")
    p.add_argument("--tflite", help="generate with this .tflite (tokenizer as for --pte)")
    p.add_argument("--gguf", help="generate with this .gguf in llama.cpp (tokenizer as for --pte)")
    p.add_argument("--prompt", default="", help="the prompt (empty: start from BOS)")
    p.add_argument("--max-new-tokens", type=_count(1), default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="write a bundle as an on-device program")
    p.add_argument(
        "--format",
        choices=("pte", "tflite", "gguf"),
        required=True,
        help="pte: ExecuTorch, XNNPACK; tflite: LiteRT (fp32, fp16, int8 per-channel, int4 "
        "blocks); gguf: llama.cpp (Q4_0, Q5_0, Q8_0, Q2_K..Q6_K, F16, BF16, F32)",
    )
    p.add_argument("--artifact", required=True, help="the bundle folder to export")
    p.add_argument("--out", required=True, help="the file to write")
    p.add_argument(
        "--max-seq-len",
        type=_count(2),
        default=None,
        help="KV cache length (512, or the model's context when shorter)",
    )
    p.add_argument(
        "--prefill-len", type=_count(1), default=32, help="tflite: prefill signature length (32)"
    )
    p.add_argument(
        "--allow-fallback",
        action="store_true",
        help="keep layers the backend cannot run in float (with a warning) instead of refusing",
    )
    p.add_argument(
        "--allow-requant",
        action="store_true",
        help="gguf: re-quantize layers with no exact GGUF type (warns with each layer's error)",
    )
    p.add_argument(
        "--tokenizer-gguf",
        help="gguf: copy the tokenizer from this GGUF file (default: the bundle's source model "
        "when it was a GGUF file; a llama2.c tokenizer is converted)",
    )
    p.add_argument(
        "--tokenizer-pre",
        help="gguf: llama.cpp's pre-tokenizer name for a converted tokenizer.json (default: the "
        "family's: llama-bpe for llama, qwen2 for qwen2/qwen3; e.g. smollm for SmolLM)",
    )
    p.add_argument(
        "--llama-quantize",
        metavar="FTYPE",
        help="gguf: then run llama.cpp's own quantizer with this mix (Q4_0, Q4_K_M, IQ4_NL, ...) "
        "on the written file (best from a float or fp16 bundle)",
    )
    p.add_argument(
        "--tensor-type",
        action="append",
        metavar="PATTERN=TYPE",
        help="with --llama-quantize: tensors matching the regex get this GGML type (repeatable)",
    )
    p.add_argument(
        "--imatrix",
        metavar="SPEC",
        help="with --llama-quantize: an importance matrix from this calibration data "
        "(wikitext[:NxL], file:PATH[:NxL], model[:NxL])",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("inspect", help="verify a bundle and summarise its manifest")
    p.add_argument("path", help="bundle folder")
    p.add_argument("--layers", action="store_true", help="list every quantized module")
    p.add_argument("--json", action="store_true", help="print the whole manifest")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s: %(message)s",
    )
    if not args.verbose:  # optional libraries' import-time chatter (CUDA .so files, pytree)
        for name in ("torchao", "torch.utils._pytree"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotImplementedError) as e:
        print(f"edgequant {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:  # permission, read-only or full disk: one line, the file named
        print(f"edgequant {args.command}: error: {_os_error(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RecursionError:
        print(f"edgequant {args.command}: error: an input is nested too deeply", file=sys.stderr)
        return EXIT_USER_ERROR


def _os_error(e: OSError) -> str:
    """``'<file>': <reason>`` for an OSError (both files of a failed rename)."""
    reason = e.strerror or str(e)
    files = [f for f in (e.filename, e.filename2) if f is not None]
    return f"{' -> '.join(repr(str(f)) for f in files)}: {reason}" if files else reason


if __name__ == "__main__":
    sys.exit(main())
