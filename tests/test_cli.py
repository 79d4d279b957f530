"""The edgequant command, called as a user would (through main(), and once as a process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from edgequant.cli import main

STORIES_8DA4W = "examples/stories260k-8da4w.yaml"


def test_recipes_lists_and_prints_presets(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()] == [
        "fp16",
        "int8-weight-only",
        "int8-dynamic",
        "8da4w",
        "int4-weight-only",
    ]
    assert main(["recipes", "8da4w"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["rules"][0]["scheme"]["group_size"] == 32


def test_quantize_saves_and_reports(stories260k, tmp_path, capsys):
    out = tmp_path / "b"
    assert (
        main(["quantize", "--model", "stories260k", "--recipe", STORIES_8DA4W, "--out", str(out)])
        == 0
    )
    text = capsys.readouterr().out
    assert "32 x int4 g32 sym fp16-scales, act int8 dynamic asym" in text
    assert "weights: 0.989 MiB -> 0.137 MiB (7.22x smaller)" in text
    assert "logits SQNR" in text and "top-1 agreement" in text
    assert "(reloaded: identical logits)" in text
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "quantized modules: 37, tied tensors: 2" in text and "(verified)" in text


def test_plan_prints_a_table(stories260k, capsys):
    assert main(["plan", "--model", "stories260k", "--recipe", "int8-dynamic"]) == 0
    assert "output" in capsys.readouterr().out


def test_user_errors_exit_2_with_the_message(stories260k, tmp_path, capsys):
    assert main(["quantize", "--model", "stories260k", "--recipe", "8da4w"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "edgequant quantize: error: rules[0] (role=default): layers.0.feed_forward.w2"
    )
    assert main(["inspect", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["plan", "--model", str(tmp_path / "x.bin"), "--recipe", "fp16"]) == 2
    assert "neither a known name (default, stories260k) nor an existing path" in capsys.readouterr().err


def test_console_script_runs():
    script = Path(sys.executable).parent / "edgequant"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "edgequant 0.1.0"


def test_existing_out_is_refused_before_any_work(stories260k, tmp_path, capsys):
    out = tmp_path / "b"
    out.mkdir()
    code = main(["quantize", "--model", "stories260k", "--recipe", "fp16", "--out", str(out)])
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing was quantized
    assert f"{str(out)!r} exists; pass --overwrite to replace it" in captured.err


def test_tokens_must_be_at_least_2(capsys):
    import pytest

    with pytest.raises(SystemExit) as info:
        main(["quantize", "--model", "stories260k", "--recipe", "fp16", "--tokens", "0"])
    assert info.value.code == 2
    assert "--tokens: must be at least 2 tokens, got 0" in capsys.readouterr().err
