"""The recipe card: ``report.html`` beside the bundle, one self-contained page (no network, plots
inline as SVG) made from ``report.json``: the model and the recipe resolved per role and
layer, the eager model and every deployed file measured in its runtime, a KL-versus-bytes plot,
for a budget run its allocation and the predicted KL at other budgets,
the per-layer SQNR plot, and each file's greedy answer to one chat prompt.

Numbers are printed as in ``report.md`` (KL to 4 decimals, tokens/s to 1), so the page's text
holds exactly the values ``report.json`` has, rounded.
"""

from __future__ import annotations

import html
import io
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from edgequant._io import atomic_write_text

# (key, header, format) of the deployed-files table; bytes shown in MiB
TARGET_COLUMNS = [
    ("bytes", "MiB", ".1f"),
    ("bits_per_weight", "bits/weight", ".2f"),
    ("perplexity", "perplexity", ".3f"),
    ("kl_divergence", "KL nats/token", ".4f"),
    ("eager_kl_divergence", "eager KL in its arithmetic", ".4f"),
    ("top1_agreement", "top-1 %", ".1f"),
    ("decode_tokens_per_s", "decode tok/s", ".1f"),
    ("prefill_tokens_per_s", "prefill tok/s", ".1f"),
    ("predicted_decode_tokens_per_s", "predicted decode tok/s", ".1f"),
]


def cell(key: str, value: Any, spec: str) -> str:
    """One table cell as the card and ``report.md`` print it (``-`` for no value)."""
    if value is None:
        return "-"
    if key == "bytes":
        value = value / 2**20
    return format(value, spec)


def target_rows(report: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(name, where it ran, row)``: float and quantized eager PyTorch, then each target."""
    eager = {
        "bytes": report.get("quantized_bytes"),
        "bits_per_weight": report.get("bits_per_weight"),
        "perplexity": report.get("perplexity"),
        "kl_divergence": report.get("kl_divergence"),
        "top1_agreement": report.get("top1_agreement"),
        "decode_tokens_per_s": report.get("decode_tokens_per_s"),
        "prefill_tokens_per_s": report.get("prefill_tokens_per_s"),
    }
    floats = {
        "bytes": report.get("float_bytes"),
        "bits_per_weight": 32.0,
        "perplexity": report.get("float_perplexity"),
        "decode_tokens_per_s": report.get("float_decode_tokens_per_s"),
        "prefill_tokens_per_s": report.get("float_prefill_tokens_per_s"),
    }
    name = report["recipe"].get("name") or "recipe"
    rows = [("float", "eager PyTorch", floats), (name, "eager PyTorch", eager)]
    for target, row in (report.get("targets") or {}).items():
        rows.append((target, row.get("runtime", ""), row))
    return rows


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    text = buf.getvalue()
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)  # RDF names, a date
    return text[text.index("<svg") :]  # drop the XML prolog and doctype


def _finished(plt, fig) -> str:
    """The figure laid out, as SVG, and closed."""
    fig.tight_layout()
    svg = _svg(fig)
    plt.close(fig)
    return svg


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # text stays text in the page
    return plt, plt.subplots(figsize=(width, height))


def kl_bytes_plot(report: dict[str, Any]) -> str | None:
    """KL against MiB of the eager model and each measured file (and anchors), as SVG."""
    points = [
        (name, where, row)
        for name, where, row in target_rows(report) + anchor_rows(report)
        if row.get("kl_divergence") is not None and row.get("bytes")
    ]
    if not points:
        return None
    plt, (fig, ax) = _figure(6.5, 4)
    for name, where, row in points:
        x, y = row["bytes"] / 2**20, max(row["kl_divergence"], 1e-5)
        anchor = where.startswith("anchor")
        ax.scatter(x, y, marker="s" if anchor else "o", s=40, color="grey" if anchor else None)
        ax.annotate(name, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("KL(float || quantized), nats/token")
    ax.set_title("quality against size")
    return _finished(plt, fig)


def budget_plot(report: dict[str, Any]) -> str | None:
    """For a budget run (``report["allocation"]``): the predicted KL against the weights' bytes
    at other budgets (`edgequant.mixed.predicted_curve`), the chosen budget's prediction, and
    what was measured at it (the eager model, each file), as SVG."""
    allocation = report.get("allocation") or {}
    curve = allocation.get("curve")
    if not curve:
        return None
    plt, (fig, ax) = _figure(6.5, 4)
    mb = [p["allocated_bytes"] / 1e6 for p in curve]
    ax.plot(mb, [max(p["predicted_kl"], 1e-5) for p in curve], "o-", color="grey",
            label="predicted, other budgets")  # fmt: skip
    x = allocation["allocated_bytes"] / 1e6
    ax.scatter(x, max(allocation["predicted_kl"], 1e-5), marker="D", s=50,
               label=f"predicted, {allocation['budget']}")  # fmt: skip
    measured = [("eager", report.get("kl_divergence"))] + [
        (name, row.get("kl_divergence")) for name, row in (report.get("targets") or {}).items()
    ]
    for name, kl in measured:
        if kl is not None:
            ax.scatter(x, max(kl, 1e-5), marker="o", s=40, label=f"measured, {name}")
    ax.set_yscale("log")
    ax.set_xlabel("weights as the targets' files store them (MB)")
    ax.set_ylabel("KL(float || quantized), nats/token")
    ax.set_title("the budget: predicted and measured")
    ax.legend(fontsize=8)
    return _finished(plt, fig)


def allocation_rows(report: dict[str, Any]) -> list[list[str]]:
    """The budget run's facts as table rows (none without ``report["allocation"]``)."""
    a = report.get("allocation")
    if not a:
        return []
    counts: dict[str, int] = defaultdict(int)
    for m in a["modules"]:
        counts[m["scheme"] or "float"] += 1
    low, high = a["reachable_bytes"]
    by_count = sorted(counts.items(), key=lambda item: -item[1])
    return [
        ["budget", f"{a['budget']} = {a['budget_bytes']:,} bytes for {', '.join(a['targets'])}"],
        ["reachable", f"{low:,} to {high:,} bytes"],
        ["allocated", f"{a['allocated_bytes']:,} bytes"],
        ["predicted KL", f"{a['predicted_kl']:.4f} (the sum of each module's own)"],
        ["sensitivity", f"{a['sensitivity']} on {a['sensitivity_windows']} tokens"],
        ["schemes", "; ".join(f"{n} x {k}" for k, n in by_count)],
    ]  # fmt: skip


def sqnr_plot(report: dict[str, Any]) -> str | None:
    """Weight SQNR of every quantized module by decoder layer and role, as SVG."""
    layers = report.get("layers") or []
    if not layers:
        return None
    plt, (fig, ax) = _figure(6.5, 4)
    for role in sorted({str(x["role"]) for x in layers}):
        mine = [x for x in layers if str(x["role"]) == role]
        xs = [-1 if x["layer"] is None else x["layer"] for x in mine]
        ax.scatter(xs, [x["sqnr_db"] for x in mine], label=role, s=14)
    ax.set_xlabel("decoder layer (-1: outside the blocks)")
    ax.set_ylabel("weight SQNR (dB)")
    ax.set_title("per-layer weight SQNR by role")
    ax.legend(fontsize=8)
    return _finished(plt, fig)


def anchor_rows(report: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(name, "anchor: <runtime>", row)`` of each anchor that was measured."""
    return [
        (name, f"anchor: {row.get('runtime', '')}", row)
        for name, row in (report.get("anchors") or {}).items()
        if "skipped" not in row
    ]


def _spans(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``'0-2, 5'``."""
    out, start = [], None
    for i, n in enumerate(layers):
        if start is None:
            start = n
        if i + 1 == len(layers) or layers[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out)


def resolved_recipe(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The recipe as it fell on the model: one row per (role, scheme) with its layers, module
    count and stored bytes."""
    from edgequant.schemes import Scheme

    groups: dict[tuple[str, str], dict[str, Any]] = defaultdict(
        lambda: {"layers": set(), "modules": 0, "bytes": 0}
    )
    for lp in report.get("recipe_resolved") or []:
        scheme = "float (kept)" if lp["scheme"] is None else Scheme(**lp["scheme"]).describe()
        if lp.get("tied_to"):
            scheme += f" (shares {lp['tied_to']})"
        g = groups[(str(lp["role"]), scheme)]
        if lp["layer"] is not None:
            g["layers"].add(lp["layer"])
        g["modules"] += 1
        g["bytes"] += 0 if lp.get("tied_to") else lp["bytes_after"]
    return [
        {"role": role, "scheme": scheme, **g, "layers": _spans(sorted(g["layers"])) or "-"}
        for (role, scheme), g in groups.items()
    ]


def _table(head: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    def tr(cells, tag):
        out = []
        for i, c in enumerate(cells):
            cls = ' class="num"' if i >= numeric_from and tag == "td" else ""
            out.append(f"<{tag}{cls}>{html.escape(str(c))}</{tag}>")
        return "<tr>" + "".join(out) + "</tr>"

    body = "".join(tr(r, "td") for r in rows)
    return f"<table><thead>{tr(head, 'th')}</thead><tbody>{body}</tbody></table>"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; } th { background: #eef; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; } .plots svg { max-width: 540px; height: auto; }
pre { background: #f6f6f6; padding: 0.5em; white-space: pre-wrap; }
.skip { color: #a33; }
"""


def render(report: dict[str, Any]) -> str:
    """The card's HTML."""
    e = html.escape
    name = report["recipe"].get("name") or "recipe"
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>edgequant: {e(str(report['model']))} with {e(name)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>edgequant recipe card: {e(str(report['model']))} with {e(name)}</h1>",
        "<ul>",
        f"<li>model: <code>{e(str(report['model_source']))}</code> ({e(report['model_family'])})"
        "</li>",
        f"<li>bundle: <code>{e(str(report['bundle']))}</code></li>",
        f"<li>calibration: {e(str(report.get('calibration') or 'none (data-free)'))}</li>",
    ]
    if report.get("eval_windows"):
        parts.append(
            f"<li>evaluation: {report['eval_windows']} windows of {report['seq_len']} tokens of "
            f"<code>{e(str(report['text']))}</code>; KL and top-1 against the float model</li>"
        )
    parts.append(
        f"<li>speed: {report['speed_prompt_tokens']}-token prompt, {report['speed_new_tokens']}"
        " tokens decoded greedily by every model; eager rows run in PyTorch, the others in their"
        " own runtime, interleaved, the median of "
        f"{_rounds(report)} round(s), {report['torch_threads']} threads</li>"
    )
    parts.append(
        f"<li>edgequant {e(report['edgequant_version'])}, torch {e(report['torch_version'])}"
        "</li></ul>"
    )
    head = ["model", "runs in"] + [h for _, h, _ in TARGET_COLUMNS]
    rows, skipped = [], []
    for label, where, row in target_rows(report):
        if "skipped" in row:
            skipped.append((label, row["skipped"]))
            continue
        rows.append([label, where] + [cell(k, row.get(k), f) for k, _, f in TARGET_COLUMNS])
    parts += ["<h2>Eager model and deployed files</h2>", _table(head, rows, numeric_from=2)]
    for label, reason in skipped:
        parts.append(f"<p class='skip'>{e(label)} skipped: {e(reason)}</p>")
    anchors = report.get("anchors") or {}
    if anchors:
        rows = []
        for label, where, row in anchor_rows(report):
            rows.append([label, where] + [cell(k, row.get(k), f) for k, _, f in TARGET_COLUMNS])
        parts += ["<h2>Anchors: each runtime's own route on the same float weights</h2>",
                  _table(head, rows, numeric_from=2)]  # fmt: skip
        for label, row in anchors.items():
            if "skipped" in row:
                parts.append(f"<p class='skip'>{e(label)} skipped: {e(row['skipped'])}</p>")
    budget = allocation_rows(report)
    if budget:
        parts += ["<h2>The budget's allocation</h2>", _table(["", "value"], budget)]
    plots = [p for p in (kl_bytes_plot(report), budget_plot(report), sqnr_plot(report)) if p]
    if plots:
        parts += ["<h2>Plots</h2>", "<div class='plots'>", *plots, "</div>"]
    parts += ["<h2>Recipe, resolved per role and layer</h2>"]
    parts.append(
        _table(
            ["role", "scheme", "layers", "modules", "stored MiB"],
            [
                [r["role"], r["scheme"], r["layers"], r["modules"], f"{r['bytes'] / 2**20:.2f}"]
                for r in resolved_recipe(report)
            ],  # fmt: skip
            numeric_from=3,
        )
    )
    answers = report.get("answers")
    if answers:
        parts.append(f"<h2>Greedy answers to: {e(answers['prompt'])}</h2>")
        for label, text in answers.items():
            if label != "prompt":
                parts.append(f"<h3>{e(label)}</h3><pre>{e(text)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _rounds(report: dict[str, Any]) -> int:
    for row in (report.get("targets") or {}).values():
        if "speed_rounds" in row:
            return row["speed_rounds"]
    return 1


def write_card(report: dict[str, Any], out: str | Path) -> Path:
    """``report.html`` in ``out`` (written atomically)."""
    path = Path(out) / "report.html"
    atomic_write_text(path, render(report), overwrite=True)
    return path
