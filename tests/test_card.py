"""The recipe card (report.html): its parts, and the page as headless Chromium renders it."""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from edgequant import card

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
]  # fmt: skip


def test_layer_spans():
    assert card._spans([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert card._spans([]) == ""


def test_resolved_recipe_groups_roles_schemes_and_layers(deployed):
    _, report = deployed
    rows = {(r["role"], r["scheme"]): r for r in card.resolved_recipe(report)}
    ff_int4 = rows[("feedforward", "int4 g32 sym fp16-scales, act int8 dynamic asym")]
    ff_fp16 = rows[("feedforward", "fp16")]
    assert (ff_int4["layers"], ff_int4["modules"]) == ("0-4", 10)  # w1 and w3 of 5 layers
    assert (ff_fp16["layers"], ff_fp16["modules"]) == ("0-4", 5)  # w2
    head = rows[("lm_head", "int4 g32 sym fp16-scales, act int8 dynamic asym (shares "
                 "tok_embeddings)")]  # fmt: skip
    assert head["bytes"] == 0  # stored once, with the embedding
    assert sum(r["bytes"] for r in rows.values()) == report["quantized_bytes"]


class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.parts: list[str] = []

    def handle_data(self, data):
        self.parts.append(data)


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "Chromium is not installed (make test installs Debian's chromium as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def test_chromium_renders_the_card_with_every_target_number(deployed, tmp_path):
    from PIL import Image

    out, report = deployed
    page = (out / "report.html").as_uri()
    browser = _chromium()
    common = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "card.png"
    subprocess.run(
        [*common, "--window-size=1200,2400", f"--screenshot={shot}", page],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    image = Image.open(shot).convert("L")
    assert image.size == (1200, 2400)
    histogram = image.histogram()
    dark = sum(histogram[:128]) / (image.size[0] * image.size[1])
    assert dark > 0.005, f"the screenshot is blank ({dark:.4%} dark pixels)"
    assert sum(1 for n in histogram if n) > 20  # text, tables and plots, not one flat colour

    dom = subprocess.run(
        [*common, "--dump-dom", page], check=True, capture_output=True, text=True, timeout=120
    ).stdout
    parser = _Text()
    parser.feed(dom)
    text = " ".join(parser.parts)
    assert "edgequant recipe card: stories260k with stories260k-deploy" in text
    for name, row in report["targets"].items():
        for key, spec in (
            ("kl_divergence", ".4f"),
            ("decode_tokens_per_s", ".1f"),
            ("prefill_tokens_per_s", ".1f"),
            ("predicted_decode_tokens_per_s", ".1f"),
            ("perplexity", ".3f"),
        ):
            assert format(row[key], spec) in text, (name, key, format(row[key], spec))
    assert "quality against size" in text and "per-layer weight SQNR by role" in text
    assert text.count(report["answers"]["pte"].strip()[:20]) >= 1


def test_the_card_is_self_contained(deployed):
    out, _ = deployed
    page = (out / "report.html").read_text()
    for reference in ("http://", "https://", "<script src", "<link "):
        # an SVG names its XML namespaces by URL; nothing is fetched from them
        hits = [line for line in page.splitlines() if reference in line and "xmlns" not in line]
        assert not hits, hits[:3]
