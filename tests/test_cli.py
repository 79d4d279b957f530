"""The edgequant command, called as a user would (through main(), and once as a process)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
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
        "int8-static",
    ]
    assert main(["recipes", "8da4w"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["rules"][0]["scheme"]["group_size"] == 32


def test_quantize_runs_the_main_job(stories260k, tmp_path, capsys):
    out = tmp_path / "b"
    args = [
        "quantize",
        "--model",
        "stories260k",
        "--recipe",
        STORIES_8DA4W,
        "--out",
        str(out),
        "--eval-windows",
        "2",
        "--seq-len",
        "128",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "evaluated on 2 windows of 128 tokens of" in text
    assert "| float | 32.00 |" in text and "| stories260k-8da4w | 4.43 |" in text
    report = json.loads((out / "report.json").read_text())
    for key in (
        "model",
        "recipe",
        "float_bytes",
        "quantized_bytes",
        "bits_per_weight",
        "float_perplexity",
        "perplexity",
        "kl_divergence",
        "top1_agreement",
        "decode_tokens_per_s",
        "float_decode_tokens_per_s",
        "eval_windows",
        "seq_len",
    ):
        assert key in report, key
    assert report["recipe"]["name"] == "stories260k-8da4w"
    assert report["bundle_reloads_identically"] is True
    assert report["torch_threads"] >= 1 and sum(report["kernels"].values()) == 36
    assert (report["eval_windows"], report["seq_len"]) == (2, 128)
    assert report["quantized_bytes"] == 143712 and abs(report["bits_per_weight"] - 4.433) < 1e-3
    assert report["float_perplexity"] < report["perplexity"]
    assert len(report["layers"]) == 37
    by_role = report["bytes_by_role"]
    assert list(by_role) == ["embedding", "attention", "feedforward"]
    assert sum(r["bytes_after"] for r in by_role.values()) == report["quantized_bytes"]
    assert sum(r["n_weights"] for r in by_role.values()) == report["n_weights"]
    md = (out / "report.md").read_text()
    assert md.startswith("# edgequant report: stories260k")
    assert "## Bytes by role" in md and "| embedding | 32,768 | 0.12 | 0.02 | 12.8% |" in md
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main(["inspect", str(out), "--layers"]) == 0
    text = capsys.readouterr().out
    assert "quantized modules: 37, tied tensors: 2" in text and "(verified)" in text
    assert "tokenizer: llama2c" in text and "[shares tok_embeddings]" in text

    assert main(["eval", str(out), "--eval-windows", "2", "--seq-len", "128"]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| stories260k-8da4w")]
    assert rows and f"| {report['perplexity']:.3f} |" in rows[0]  # the bundle gives the same

    assert main(["generate", "--artifact", str(out), "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip()


def test_eval_windows_0_skips_evaluation(stories260k, tmp_path):
    out = tmp_path / "b"
    args = [
        "quantize",
        "--model",
        "stories260k",
        "--recipe",
        "int8-dynamic",
        "--out",
        str(out),
        "--eval-windows",
        "0",
    ]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["eval_windows"] == 0 and "perplexity" not in report
    assert report["decode_tokens_per_s"] > 0


def test_generate_reproduces_the_reference_story(stories260k, capsys):
    assert main(["generate", "--model", "stories260k", "--max-new-tokens", "40"]) == 0
    assert capsys.readouterr().out.startswith(
        "Once upon a time, there was a little girl named Lily. She loved to play outside"
    )


def test_plan_prints_a_table(stories260k, capsys):
    assert (
        main(["plan", "--model", "stories260k", "--recipe", "examples/stories260k-8da4w.yaml"]) == 0
    )
    out = capsys.readouterr().out
    assert "output" in out
    # bytes per role: the tied embedding/head counted once, under the embedding; shares of the
    # 0.137 MiB total
    assert "embedding          32,768      0.125       0.018  12.8%" in out
    assert "feedforward       165,120      0.630       0.087  63.1%" in out


def test_user_errors_exit_2_with_the_message(stories260k, tmp_path, capsys):
    assert (
        main(
            [
                "quantize",
                "--model",
                "stories260k",
                "--recipe",
                "8da4w",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith(
        "edgequant quantize: error: rules[0] (role=default): layers.0.feed_forward.w2"
    )
    assert main(["inspect", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["plan", "--model", str(tmp_path / "x.bin"), "--recipe", "fp16"]) == 2
    assert (
        "neither a known name (default, stories260k, qwen2.5-1.5b) nor an existing path"
        in capsys.readouterr().err
    )


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


def test_window_options_are_checked(capsys):
    import pytest

    with pytest.raises(SystemExit) as info:
        main(["quantize", "--recipe", "fp16", "--out", "x", "--seq-len", "1"])
    assert info.value.code == 2
    assert "--seq-len: must be at least 2, got 1" in capsys.readouterr().err


def test_compare_runs_every_preset_on_one_float_pass(stories260k, tmp_path, capsys):
    out = tmp_path / "b"
    args = [
        "quantize",
        "--model",
        "stories260k",
        "--recipe",
        "int8-dynamic",
        "--out",
        str(out),
        "--eval-windows",
        "1",
        "--seq-len",
        "64",
        "--compare",
    ]
    assert main(args) == 0
    assert "all presets (compare.md, compare.png):" in capsys.readouterr().out
    rows = {r["recipe"]: r for r in json.loads((out / "compare.json").read_text())}
    assert list(rows) == [
        "float",
        "fp16",
        "int8-weight-only",
        "int8-dynamic",
        "8da4w",
        "int4-weight-only",
    ]
    # group 32 cannot hold stories260K's 172-wide w2: those presets are skipped, saying why
    assert "group_size 32 does not divide its 172 input features" in rows["8da4w"]["skipped"]
    assert rows["fp16"]["kl_divergence"] < rows["int8-dynamic"]["kl_divergence"]
    report = json.loads((out / "report.json").read_text())
    assert rows["int8-dynamic"]["kl_divergence"] == pytest.approx(report["kl_divergence"])
    assert "Skipped:" in (out / "compare.md").read_text()
    assert (out / "compare.png").is_file()


def test_generate_argument_conflicts(capsys):
    assert main(["generate", "--model", "stories260k", "--top-k", "5"]) == 2
    assert "--top-k/--top-p shape sampling; pass --temperature > 0" in capsys.readouterr().err
    assert main(["generate", "--model", "stories260k", "--artifact", "x"]) == 2
    assert "pass --model or --artifact, not both" in capsys.readouterr().err


STORIES_XNNPACK = "examples/stories260k-xnnpack.yaml"


def _bundle(tmp_path, recipe: str, name: str = "b") -> Path:
    out = tmp_path / name
    args = ["quantize", "--model", "stories260k", "--recipe", recipe, "--out", str(out)]
    assert main([*args, "--eval-windows", "0"]) == 0
    return out


def test_export_pte_then_eval_and_generate_on_the_file(stories260k, tmp_path, capsys):
    bundle = _bundle(tmp_path, STORIES_XNNPACK)
    pte = tmp_path / "m.pte"
    export = ["export", "--format", "pte", "--artifact", str(bundle), "--out", str(pte)]
    assert main([*export, "--max-seq-len", "64"]) == 0
    assert f"wrote {pte}" in capsys.readouterr().out

    assert main([*export, "--max-seq-len", "64"]) == 2  # the file exists now
    assert f"{str(pte)!r} exists; pass overwrite=True (--overwrite)" in capsys.readouterr().err

    # a 64-position program: the speed run shrinks its 64 + 32 tokens to fit
    eval_pte = ["eval", "--pte", str(pte), "--model", "stories260k", "--eval-windows", "2"]
    assert main([*eval_pte, "--seq-len", "64"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| m.pte")]
    assert len(rows) == 1
    assert main([*eval_pte, "--seq-len", "128"]) == 2
    assert (
        "--seq-len 128 is longer than the program's max_seq_len 64; pass --seq-len 64 or less"
        in capsys.readouterr().err
    )

    gen = ["generate", "--pte", str(pte), "--artifact", str(bundle), "--max-new-tokens", "20"]
    assert main(gen) == 0
    from_file = capsys.readouterr().out
    assert main(["generate", "--artifact", str(bundle), "--max-new-tokens", "20"]) == 0
    assert from_file == capsys.readouterr().out  # same greedy text as the eager bundle


def test_export_refuses_bad_input_before_any_work(stories260k, tmp_path, capsys, caplog):
    bundle = _bundle(tmp_path, STORIES_8DA4W)  # w2 in groups of 86: no XNNPACK kernel
    export = ["export", "--format", "pte", "--artifact", str(bundle), "--max-seq-len", "32"]

    assert main([*export, "--out", str(tmp_path / "no" / "m.pte")]) == 2
    assert f"folder {str(tmp_path / 'no')!r} does not exist" in capsys.readouterr().err
    assert main([*export, "--out", str(tmp_path / "m.bin")]) == 2
    assert "must end in .pte" in capsys.readouterr().err

    out = tmp_path / "m.pte"
    assert main([*export, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "edgequant export: error: XNNPACK cannot run 5 module(s) as the recipe stores them "
        "(layers.0.feed_forward.w2, "
    )
    assert "nearest supported: a group of 32, 64, 128 or 256" in err
    assert "--allow-fallback" in err and not out.exists()

    with caplog.at_level(logging.WARNING):
        assert main([*export, "--out", str(out), "--allow-fallback"]) == 0
    assert "kept in float for XNNPACK" in caplog.text and out.is_file()


def test_a_truncated_pte_is_a_clear_error(stories260k, tmp_path, capsys):
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"\0" * 4096)
    assert main(["eval", "--pte", str(bad), "--model", "stories260k"]) == 2
    assert "is not a loadable ExecuTorch LLM program" in capsys.readouterr().err
    assert main(["generate", "--pte", str(bad), "--model", "stories260k"]) == 2
    assert "is not a loadable ExecuTorch LLM program" in capsys.readouterr().err


def test_export_tflite_then_eval_and_generate_on_the_file(stories260k, tmp_path, capsys):
    bundle = _bundle(tmp_path, "fp16")
    out = tmp_path / "m.tflite"
    export = ["export", "--format", "tflite", "--artifact", str(bundle), "--out", str(out)]
    assert main([*export, "--max-seq-len", "64", "--prefill-len", "16"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out

    eval_file = ["eval", "--tflite", str(out), "--model", "stories260k", "--eval-windows", "2"]
    assert main([*eval_file, "--seq-len", "64"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| m.tflite")]
    assert len(rows) == 1

    gen = ["generate", "--artifact", str(bundle), "--max-new-tokens", "20"]
    assert main([*gen, "--tflite", str(out)]) == 0
    from_file = capsys.readouterr().out.split("\n[")[0]
    assert main(gen) == 0
    assert from_file == capsys.readouterr().out.split("\n[")[0]  # fp16 weights, fp32 compute

    assert main([*gen, "--tflite", str(out), "--pte", str(tmp_path / "m.pte")]) == 2
    assert "pass one of --pte, --tflite, --gguf" in capsys.readouterr().err


def test_export_gguf_then_eval_and_generate_in_llama_cpp(stories260k, tmp_path, capsys):
    from edgequant.export.gguf import read_layers

    bundle = _bundle(tmp_path, "examples/stories260k-gguf.yaml")
    out = tmp_path / "m.gguf"
    export = ["export", "--format", "gguf", "--artifact", str(bundle), "--out", str(out)]
    assert main(export) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert main(export) == 2
    assert f"{str(out)!r} exists; pass overwrite=True (--overwrite)" in capsys.readouterr().err

    eval_file = ["eval", "--gguf", str(out), "--model", "stories260k", "--eval-windows", "2"]
    assert main([*eval_file, "--seq-len", "128"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| m.gguf")]
    assert len(rows) == 1

    gen = ["generate", "--artifact", str(bundle), "--max-new-tokens", "20", "--gguf", str(out)]
    assert main(gen) == 0
    text = capsys.readouterr().out
    assert text.startswith("Once upon a time")

    mixed = tmp_path / "mixed.gguf"
    llama = [*export[:-1], str(mixed), "--llama-quantize", "Q4_0", "--tensor-type", "attn_v=Q8_0"]
    assert main([*llama, "--tensor-type", "attn_v"]) == 2
    assert "--tensor-type 'attn_v': expected PATTERN=TYPE" in capsys.readouterr().err
    assert main([*llama, "--imatrix", "wikitext:4x64"]) == 0
    kinds = {name: kind for name, (kind, _) in read_layers(mixed).items()}
    assert kinds["blk.0.attn_v.weight"] == "Q8_0" and kinds["blk.0.ffn_gate.weight"] == "Q4_0"
    assert list(tmp_path.glob("tmp*")) == []  # the float intermediate is gone

    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(out.read_bytes()[:5000])
    assert main(["eval", "--gguf", str(truncated), "--model", "stories260k"]) == 2
    assert "is not a readable GGUF file (truncated or corrupted)" in capsys.readouterr().err


def test_export_gguf_refuses_inexact_schemes_unless_asked(stories260k, tmp_path, capsys, caplog):
    bundle = _bundle(tmp_path, "int8-weight-only")
    out = tmp_path / "m.gguf"
    export = ["export", "--format", "gguf", "--artifact", str(bundle), "--out", str(out)]
    assert main(export) == 2
    err = capsys.readouterr().err
    assert "GGUF has no exact type for 36 layer(s): tok_embeddings (int8 per-channel sym; " in err
    assert "--allow-requant" in err and not out.exists()
    with caplog.at_level(logging.WARNING):
        assert main([*export, "--allow-requant"]) == 0
    assert "layers.0.attention.wq re-quantized to Q8_0: " in caplog.text and out.is_file()


def test_quantize_with_an_algorithm_and_calibration(stories260k, tmp_path, capsys):
    out = tmp_path / "g"
    base = ["quantize", "--model", "stories260k", "--recipe", "examples/stories260k-8da4w.yaml"]
    assert main([*base, "--algorithm", "gptx", "--out", str(out)]) == 2
    assert (
        "algorithm 'gptx' does not exist; choose from ['minmax', 'mse', 'hqq', 'gptq', 'awq', "
        "'smoothquant', 'imatrix']" in capsys.readouterr().err
    )
    assert main([*base, "--algorithm", "gptq", "--out", str(out)]) == 2
    assert "needs calibration data: pass --calibration wikitext:128x512" in capsys.readouterr().err
    assert main([*base, "--algorithm", "gptq@gptaqq=0.25", "--out", str(out)]) == 2
    assert (
        "Scheme: algorithm 'gptq' takes no parameter 'gptaqq'; it takes ['act_order', 'block', "
        "'damp', 'gptaq', 'gptaq_head', 'gptaq_residual', 'magnitude', 'scales', 'sequential']"
        in capsys.readouterr().err
    )
    assert not out.exists()  # refused before any work
    calibrated = ["--calibration", "wikitext:8x128", "--out", str(out)]
    args = [*base, "--algorithm", "gptq@damp=0.02@sequential", *calibrated]
    assert main([*args, "--eval-windows", "2", "--seq-len", "128"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"] == "wikitext-2 test, after token 32768: 8 x 128 tokens, seed 0"
    scheme = report["recipe"]["rules"][0]["scheme"]
    assert scheme["algorithm"] == "gptq"
    assert scheme["algorithm_params"] == {"damp": 0.02, "sequential": True}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["calibration"] == report["calibration"]
