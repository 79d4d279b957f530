"""The main job's targets: each runtime's file written, evaluated and timed in its runtime."""

from __future__ import annotations

import json

import pytest

from edgequant import targets
from edgequant.cli import main


def test_parse_names_and_refuses_unknown():
    assert targets.parse("pte, gguf,pte") == ["pte", "gguf"]
    assert targets.parse(["all"]) == ["pte", "tflite", "gguf"]
    assert targets.parse(None) == []
    with pytest.raises(ValueError, match=r"unknown target 'onnx'; targets: pte, tflite, gguf"):
        targets.parse("pte,onnx")
    with pytest.raises(ValueError, match="no target named"):
        targets.parse(",")


def test_every_target_matches_the_eager_model(deployed):
    out, report = deployed
    rows = report["targets"]
    assert list(rows) == ["pte", "tflite", "gguf"]
    for name, row in rows.items():
        assert "skipped" not in row, (name, row.get("skipped"))
        path = out / {"pte": "model.pte", "tflite": "model.tflite", "gguf": "model.gguf"}[name]
        assert row["path"] == str(path) and row["bytes"] == path.stat().st_size
        assert row["bits_per_weight"] == pytest.approx(row["bytes"] * 8 / report["n_weights"])
        # the same quantized values run in each runtime: quality within 0.01 of the eager
        # model's KL computing as that runtime computes (llama.cpp: Q8_0 activation blocks)
        assert row["eager_arithmetic"] == targets.ARITHMETIC.get(name, "scheme")
        assert abs(row["kl_divergence"] - row["eager_kl_divergence"]) < 0.01, name
        assert abs(row["top1_agreement"] - report["top1_agreement"]) < 5.0, name
        for key in ("decode_tokens_per_s", "prefill_tokens_per_s"):
            assert row[key] > 0, (name, key)
        assert row["predicted_decode_tokens_per_s"] > 0
        assert row["speed_rounds"] == 1 and row["fallback"] is None
        assert row["answer"] == report["answers"][name]
    assert rows["pte"]["eager_kl_divergence"] == report["kl_divergence"]
    assert rows["gguf"]["eager_kl_divergence"] != report["kl_divergence"]
    assert report["answers"]["prompt"] == targets.ANSWER_PROMPT
    assert set(report["speed_model"]["predicted"]) == {"pte", "tflite", "gguf"}
    md = (out / "report.md").read_text()
    assert "## Deployed files, each measured in its own runtime" in md
    kl = format(rows["gguf"]["kl_divergence"], ".4f")
    assert any(line.startswith("| gguf | llama.cpp |") and kl in line for line in md.splitlines())


def test_a_target_that_cannot_hold_the_recipe_is_skipped_or_falls_back(
    stories260k, tmp_path, capsys
):
    out = tmp_path / "b"
    args = [
        "quantize", "--model", "stories260k", "--recipe", "int8-dynamic", "--out", str(out),
        "--targets", "gguf", "--eval-windows", "1", "--seq-len", "64", "--speed-rounds", "1",
    ]  # fmt: skip
    assert main(args + ["--strict"]) == 3  # without --strict: skipped, exit 0
    captured = capsys.readouterr()
    reason = (
        "llama.cpp cannot run tok_embeddings (int8 per-channel sym, act int8 dynamic asym) as "
        "stored (and 36 more module(s)): GGUF has no exact type"
    )
    assert f"skipped gguf: {reason}" in captured.err
    assert "--strict: 1 target(s) skipped" in captured.err
    report = json.loads((out / "report.json").read_text())
    assert report["targets"]["gguf"]["skipped"].startswith(reason)
    assert not (out / "model.gguf").exists()
    assert "gguf skipped: llama.cpp cannot run" in (out / "report.html").read_text()

    assert main(args + ["--overwrite", "--allow-fallback"]) == 0
    row = json.loads((out / "report.json").read_text())["targets"]["gguf"]
    assert row["fallback"].startswith(reason)  # written as the nearest exact type, Q8_0
    assert (out / "model.gguf").is_file() and row["kl_divergence"] < 0.05


def test_unknown_target_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "b"
    args = ["quantize", "--recipe", "8da4w", "--out", str(out), "--targets", "pte,coreml"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "unknown target 'coreml'; targets: pte, tflite, gguf (or all)" in err
    assert not out.exists()


def test_a_child_writer_reports_a_reason_or_fails_loudly(deployed, tmp_path):
    out, _ = deployed
    # the .pte is written by a child process from the saved bundle (the job's fast path)
    child = targets._start_child_writer(
        out, "pte", tmp_path / "m.pte", source=None, max_seq_len=0, allow_fallback=False
    )
    reason = targets._finish_child_writer(child, "pte")
    assert reason is not None and "max_seq_len" in reason, reason
    assert not (tmp_path / "m.pte").exists()
    child = targets._start_child_writer(
        tmp_path / "nothing", "pte", tmp_path / "m.pte", source=None, max_seq_len=64,
        allow_fallback=False,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match=r"writing target pte in a child process failed"):
        targets._finish_child_writer(child, "pte")
