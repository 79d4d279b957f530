"""Reports: logits comparison, and the files the main job writes (JSON, Markdown, PNG)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from edgequant._io import atomic_write_text
from edgequant.primitives import sqnr


def compare_logits(reference: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """SQNR (dB), mean KL(float || quantized) in nats/token, and top-1 agreement (%).

    Both are ``[..., vocab]`` logits for the same positions.

    >>> ref = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    >>> out = compare_logits(ref, ref.clone())
    >>> out["sqnr_db"], out["kl"], out["top1_pct"]
    (inf, 0.0, 100.0)
    """
    ref = reference.reshape(-1, reference.shape[-1]).double()
    out = logits.reshape(-1, logits.shape[-1]).double()
    if ref.shape != out.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref.shape)} vs {tuple(out.shape)}")
    log_p, log_q = F.log_softmax(ref, -1), F.log_softmax(out, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().clamp(min=0.0)
    top1 = (ref.argmax(-1) == out.argmax(-1)).double().mean() * 100
    return {"sqnr_db": sqnr(ref, out), "kl": float(kl), "top1_pct": float(top1)}


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


SUMMARY_COLUMNS = [
    # (key, header, format)
    ("recipe", "recipe", "s"),
    ("bits_per_weight", "bits/weight", ".2f"),
    ("quantized_bytes", "MiB", ".1f"),
    ("perplexity", "perplexity", ".3f"),
    ("kl_divergence", "KL nats/token", ".4f"),
    ("top1_agreement", "top-1 %", ".1f"),
    ("decode_tokens_per_s", "decode tok/s", ".1f"),
    ("prefill_tokens_per_s", "prefill tok/s", ".1f"),
]


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the summary columns, one row per recipe."""
    head = "| " + " | ".join(h for _, h, _ in SUMMARY_COLUMNS) + " |"
    rule = "|" + "|".join("---" if f == "s" else "---:" for _, _, f in SUMMARY_COLUMNS) + "|"
    lines = [head, rule]
    for row in rows:
        cells = []
        for key, _, spec in SUMMARY_COLUMNS:
            value = row.get(key)
            if key == "quantized_bytes" and value is not None:
                value = value / 2**20
            cells.append(_fmt(value, spec))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Float and quantized rows of one main-job report, for `table`."""
    name = report["recipe"].get("name") or "recipe"
    float_row = {
        "recipe": "float",
        "bits_per_weight": 32.0,
        "quantized_bytes": report.get("float_bytes"),
        "perplexity": report.get("float_perplexity"),
        "decode_tokens_per_s": report.get("float_decode_tokens_per_s"),
        "prefill_tokens_per_s": report.get("float_prefill_tokens_per_s"),
    }
    return [float_row, {**report, "recipe": name}]


def markdown(report: dict[str, Any]) -> str:
    """``report.md``: what was run, the summary table, the worst layers."""
    lines = [
        f"# edgequant report: {report['model']} with {report['recipe'].get('name') or 'recipe'}",
        "",
        f"- model: `{report['model_source']}` ({report['model_family']})",
        f"- bundle: `{report['bundle']}`",
    ]
    if report.get("eval_windows"):
        lines.append(
            f"- evaluation: {report['eval_windows']} windows of {report['seq_len']} tokens of "
            f"`{report['text']}` (non-overlapping, no BOS, loss after each window's first token)"
        )
    else:
        lines.append("- evaluation: skipped (`--eval-windows 0`)")
    lines += [
        f"- speed: {report['speed_prompt_tokens']}-token prompt, {report['speed_new_tokens']} new "
        "tokens, greedy, KV cache, eager PyTorch on this CPU",
        "",
        table(summary_rows(report)),
        "",
    ]
    if report.get("targets"):
        lines += [
            "## Deployed files, each measured in its own runtime",
            "",
            target_table(report),
            "",
        ]
    by_role = report.get("bytes_by_role") or {}
    if by_role:
        total = sum(r["bytes_after"] for r in by_role.values()) or 1
        lines += [
            "## Bytes by role",
            "",
            "| role | weights | float MiB | stored MiB | share of stored |",
            "|---|---:|---:|---:|---:|",
        ]
        for role, r in by_role.items():
            lines.append(
                f"| {role} | {r['n_weights']:,} | {r['bytes_before'] / 2**20:.2f} | "
                f"{r['bytes_after'] / 2**20:.2f} | {100 * r['bytes_after'] / total:.1f}% |"
            )
        lines.append("")
    lines += [
        "## Lowest weight SQNR",
        "",
        "| module | role | layer | scheme | SQNR dB |",
        "|---|---|---:|---|---:|",
    ]
    for layer in sorted(report["layers"], key=lambda r: r["sqnr_db"])[:10]:
        lines.append(
            f"| {layer['fqn']} | {layer['role'] or '-'} | {_fmt(layer['layer'], 'd')} | "
            f"{layer['scheme']} | {layer['sqnr_db']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def target_table(report: dict[str, Any]) -> str:
    """Markdown: the eager model (float, quantized) and each deployed file, as the card shows
    them; a skipped target's row says why."""
    from edgequant.card import TARGET_COLUMNS, anchor_rows, cell, target_rows

    head = ["model", "runs in"] + [h for _, h, _ in TARGET_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(TARGET_COLUMNS)]
    for name, where, row in target_rows(report) + anchor_rows(report):
        if "skipped" in row:
            cells = [f"skipped: {row['skipped']}"] + [""] * (len(TARGET_COLUMNS) - 1)
        else:
            cells = [cell(k, row.get(k), f) for k, _, f in TARGET_COLUMNS]
        lines.append("| " + " | ".join([name, where, *cells]) + " |")
    return "\n".join(lines)


def _plot(layers: list[dict], points: list[dict], highlight: str | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if points else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    roles = sorted({str(layer["role"]) for layer in layers})
    for role in roles:
        mine = [x for x in layers if str(x["role"]) == role]
        xs = [-1 if x["layer"] is None else x["layer"] for x in mine]
        ax.scatter(xs, [x["sqnr_db"] for x in mine], label=role, s=14)
    ax.set_xlabel("decoder layer (-1: outside the blocks)")
    ax.set_ylabel("weight SQNR (dB)")
    ax.set_title("per-layer weight SQNR by role")
    ax.legend(fontsize=8)
    if points:
        ax = axes[0][1]
        for p in points:
            if p.get("kl_divergence") is None or p["recipe"] == "float":
                continue
            mark = "*" if p["recipe"] == highlight else "o"
            ax.scatter(p["bits_per_weight"], max(p["kl_divergence"], 1e-6), marker=mark, s=60)
            ax.annotate(
                p["recipe"],
                (p["bits_per_weight"], max(p["kl_divergence"], 1e-6)),
                fontsize=8,
                xytext=(4, 4),
                textcoords="offset points",
            )
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight")
        ax.set_ylabel("KL(float || quantized), nats/token")
        ax.set_title("size vs quality, presets")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_report(report: dict[str, Any], out: Path) -> None:
    """``report.json``, ``report.md``, ``report.png`` and the recipe card ``report.html`` in
    ``out`` (each written atomically)."""
    from edgequant.card import write_card

    out = Path(out)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n", overwrite=True)
    atomic_write_text(out / "report.md", markdown(report), overwrite=True)
    _plot(report["layers"], [], None, out / "report.png")
    write_card(report, out)


def write_compare(rows: list[dict], out: Path, model: str, highlight: str | None) -> None:
    """``compare.json``, ``compare.md`` and ``compare.png`` (per-layer panel of ``highlight``)."""
    out = Path(out)
    atomic_write_text(out / "compare.json", json.dumps(rows, indent=2) + "\n", overwrite=True)
    text = f"# edgequant presets on {model}\n\n{table(rows)}\n"
    skipped = [r for r in rows if r.get("skipped")]
    if skipped:
        text += "\nSkipped:\n\n" + "".join(f"- {r['recipe']}: {r['skipped']}\n" for r in skipped)
    atomic_write_text(out / "compare.md", text, overwrite=True)
    report = json.loads((out / "report.json").read_text())
    _plot(report["layers"], rows, highlight, out / "compare.png")
