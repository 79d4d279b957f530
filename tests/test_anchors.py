"""Anchors: each runtime's own route on the same float weights, measured beside the targets."""

from __future__ import annotations

import importlib.util
import json

import pytest

from edgequant import anchors
from edgequant.cli import main


def test_parse_and_refuse_unknown():
    assert anchors.parse("llama.cpp-Q4_0,all")[0] == "llama.cpp-Q4_0"
    assert len(anchors.parse("all")) == 4
    with pytest.raises(ValueError, match="unknown anchor 'gptq'; anchors: executorch-8da4w"):
        anchors.parse("gptq")


def test_an_anchor_not_installed_is_named(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "torchao" else real(name)
    )
    assert anchors.missing("executorch-8da4w") == (
        "torchao is not installed (the executorch-8da4w anchor runs it)"
    )
    assert anchors.missing("llama.cpp-Q4_0") is None


def test_anchors_without_targets_are_refused(tmp_path, capsys):
    args = ["quantize", "--recipe", "8da4w", "--out", str(tmp_path / "b"), "--compare-anchors"]
    assert main(args) == 2
    assert "--compare-anchors compares with the deployed files: pass --targets too" in (
        capsys.readouterr().err
    )


def test_llama_cpp_anchor_is_measured_and_an_unfit_one_skipped(stories260k, tmp_path, capsys):
    out = tmp_path / "b"
    args = [
        "quantize", "--model", "stories260k", "--recipe", "examples/stories260k-deploy.yaml",
        "--out", str(out), "--targets", "gguf", "--eval-windows", "1", "--seq-len", "64",
        "--speed-rounds", "1", "--compare-anchors", "llama.cpp-Q4_0,litert-torch-int4",
    ]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "skipped anchor litert-torch-int4: litert-torch's own route needs its re-authored" in err
    report = json.loads((out / "report.json").read_text())
    row = report["anchors"]["llama.cpp-Q4_0"]
    assert row["runtime"] == "llama.cpp" and row["bytes"] == (out / row["path"]).stat().st_size
    assert 0 < row["kl_divergence"] < 1 and row["decode_tokens_per_s"] > 0
    assert report["answers"]["anchor:llama.cpp-Q4_0"] == row["answer"]
    assert "skipped" in report["anchors"]["litert-torch-int4"]
    page = (out / "report.html").read_text()
    assert "Anchors: each runtime's own route on the same float weights" in page
    assert format(row["kl_divergence"], ".4f") in page
