"""The ``edgequant`` command: parses arguments and calls library functions, nothing more.

Verbs: ``recipes`` (list presets or print one as a recipe file), ``plan`` (what a recipe would do
to a model), ``quantize`` (quantize, compare with float, save a bundle), ``inspect`` (check and
summarise a bundle).
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

SAMPLE = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park. One day, she saw a big, red ball. She wanted to play with it, but it was too high."
)


def _sample_ids(tokenizer, tokens: int, text_path: str | None):
    """The first ``tokens`` token ids of a text (WikiText-2 test by default, else SAMPLE)."""
    import torch

    from edgequant.data import wikitext2_test

    if text_path is None:
        try:
            text_path = str(wikitext2_test())
        except FileNotFoundError:
            text_path = None
    text = Path(text_path).read_text()[: tokens * 16] if text_path else SAMPLE
    ids = tokenizer.encode(text)[:tokens]
    return torch.tensor([ids]), (text_path or "built-in sample text")


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

    model, _, _ = load(args.model)
    print(edgequant.plan(model, args.recipe).table())
    return 0


def _summary(plan) -> str:
    counts = Counter("float (kept)" if lp.scheme is None else lp.scheme.describe() for lp in plan)
    return "\n".join(f"  {n:>4} x {label}" for label, n in counts.most_common())


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    import edgequant
    from edgequant.artifact import check_writable
    from edgequant.models import load
    from edgequant.report import compare_logits

    if args.out:  # fail before the work, not after it
        try:
            check_writable(Path(args.out), args.overwrite)
        except FileExistsError as e:
            raise FileExistsError(
                str(e).replace("pass overwrite=True", "pass --overwrite")
            ) from None
    model, tokenizer, info = load(args.model)
    ids, source = _sample_ids(tokenizer, args.tokens, args.text)
    with torch.no_grad():
        reference = model(ids)
    model, plan = edgequant.quantize(model, args.recipe)
    print(f"model: {info['source']} ({info['family']})")
    print(f"recipe: {plan.recipe.name or args.recipe}")
    print(_summary(plan))
    print(
        f"weights: {plan.bytes_before / 2**20:.3f} MiB -> {plan.bytes_after / 2**20:.3f} MiB "
        f"({plan.bytes_before / max(plan.bytes_after, 1):.2f}x smaller)"
    )
    with torch.no_grad():
        logits = model(ids)
    m = compare_logits(reference, logits)
    print(
        f"vs float on {ids.shape[1]} tokens of {source}: logits SQNR {m['sqnr_db']:.2f} dB, "
        f"KL {m['kl']:.5f} nats/token, top-1 agreement {m['top1_pct']:.1f}%"
    )
    if args.out:
        out = edgequant.save(model, args.out, overwrite=args.overwrite)
        reloaded = edgequant.load(out)
        with torch.no_grad():
            same = torch.equal(reloaded(ids), logits)
        print(f"saved: {out} (reloaded: {'identical logits' if same else 'LOGITS DIFFER'})")
        if not same:
            return EXIT_CHECK_FAILED
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from edgequant.artifact import read_manifest
    from edgequant.schemes import Scheme

    manifest = read_manifest(args.path)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    counts = Counter(
        f"{facts['kind']}: {Scheme(**facts['scheme']).describe()}"
        for facts in manifest["layers"].values()
    )
    files = manifest["files"]
    print(f"bundle: {args.path} (format {manifest['format']} v{manifest['format_version']})")
    print(f"made by edgequant {manifest['edgequant_version']}, torch {manifest['torch_version']}")
    model = manifest.get("model") or {}
    print(f"model family: {model.get('family', 'unknown')}")
    print(f"recipe: {(manifest.get('recipe') or {}).get('name', 'none recorded')}")
    for name, facts in files.items():
        print(f"file: {name} {facts['bytes']} bytes, sha256 {facts['sha256'][:16]}... (verified)")
    print(f"quantized modules: {len(manifest['layers'])}, tied tensors: {len(manifest['aliases'])}")
    for label, n in counts.most_common():
        print(f"  {n:>4} x {label}")
    return 0


def _at_least_2(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 tokens, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from edgequant import __version__

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

    model_help = "a model name (stories260k) or a local checkpoint path"
    recipe_help = "a preset name (see `edgequant recipes`) or a .json/.yaml recipe file"
    p = sub.add_parser("plan", help="show what a recipe would do to each module")
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--recipe", required=True, help=recipe_help)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("quantize", help="quantize, compare with float, save a bundle")
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--recipe", required=True, help=recipe_help)
    p.add_argument("--out", help="bundle folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.add_argument("--text", help="text file for the float comparison (default: WikiText-2 test)")
    p.add_argument("--tokens", type=_at_least_2, default=256, help="tokens compared (default 256)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("inspect", help="verify a bundle and summarise its manifest")
    p.add_argument("path", help="bundle folder")
    p.add_argument("--json", action="store_true", help="print the whole manifest")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotImplementedError) as e:
        print(f"edgequant {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
