"""Predicted decode speed: the bytes a token reads, the efficiency table, calibration."""

from __future__ import annotations

import json

import pytest

import edgequant
from edgequant import speed
from edgequant.models.decoder import Decoder
from edgequant.models.spec import DecoderSpec
from edgequant.schemes import Scheme

SPEC = DecoderSpec(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                   hidden_dim=128, max_seq_len=512)  # fmt: skip


def test_kinds():
    assert speed.kind(None) == "fp32"
    assert speed.kind(Scheme("fp16")) == speed.kind(Scheme("bf16")) == "fp16"
    assert speed.kind(Scheme("int8")) == "int8"
    assert speed.kind(Scheme("int4", "per_group", 32)) == "int4"


def test_token_bytes_count_linears_and_head_not_the_embedding():
    _, plan = edgequant.quantize(Decoder(SPEC), "8da4w")
    read = speed.token_bytes(plan, SPEC, "pte", position=10, max_seq_len=512)
    linears = sum(lp.bytes_after for lp in plan if lp.kind != "embedding")
    assert read.weights == {"fp32": 0, "fp16": 0, "int8": 0, "int4": linears}
    # 8da4w: 4 bits and one fp16 scale per 32 weights; the head reads all 256 x 64 weights
    per_layer = (64 * 64 * 2 + 2 * 32 * 64 + 3 * 64 * 128) * 9 // 16
    assert linears == 2 * per_layer + 256 * 64 * 9 // 16
    assert read.kv == 2 * 2 * 2 * 16 * 10 * 4  # k and v, layers, kv heads, head_dim, fp32
    gguf = speed.token_bytes(plan, SPEC, "gguf", position=10, max_seq_len=512)
    assert gguf.kv == read.kv // 2  # llama.cpp's f16 cache
    tflite = speed.token_bytes(plan, SPEC, "tflite", position=10, max_seq_len=512)
    assert tflite.kv == 2 * 2 * 2 * 16 * 512 * 4 * 3  # the whole cache, read and copied in/out


def test_prediction_follows_the_bytes():
    float_plan = edgequant.plan(Decoder(SPEC), edgequant.Recipe(()))
    _, int4_plan = edgequant.quantize(Decoder(SPEC), "8da4w")
    flat = {r: {**dict.fromkeys(speed.KINDS, 0.5), "layer_s": 0.0} for r in speed.RUNTIMES}
    a = speed.predict(float_plan, SPEC, ["pte"], table=flat)["pte"]
    b = speed.predict(int4_plan, SPEC, ["pte"], table=flat)["pte"]
    assert a["token_bytes"] > 4 * b["token_bytes"]  # the KV cache (80 positions) is the same
    assert b["predicted_decode_tokens_per_s"] > a["predicted_decode_tokens_per_s"] > 0
    assert a["bandwidth_gb_s"] > 0


def test_efficiency_reads_this_machines_calibration(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("EDGEQUANT_CACHE_DIR", str(tmp_path))
    table, source = speed.efficiency()
    assert table == speed.DEFAULT_EFFICIENCY and source.startswith("defaults")
    path = speed.calibration_path()
    assert path.parent == tmp_path / "speed"
    path.parent.mkdir()
    path.write_text(json.dumps({"efficiency": {"pte": {}}}))
    assert speed.efficiency()[0] == speed.DEFAULT_EFFICIENCY
    assert "is not a speed calibration; using the defaults" in caplog.text
    mine = {r: {**dict.fromkeys(speed.KINDS, 0.42), "layer_s": 1e-4} for r in speed.RUNTIMES}
    path.write_text(json.dumps({"efficiency": mine}))
    assert speed.efficiency() == (mine, str(path))


def test_calibrate_measures_and_stores(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQUANT_CACHE_DIR", str(tmp_path))
    small = dict(n_heads=4, n_kv_heads=2, head_dim=16, tied_embedding=False)
    wide = dict(dim=64, n_layers=2, hidden_dim=128, **small)
    thin = dict(dim=32, n_layers=6, hidden_dim=64, **small)
    result = speed.calibrate(["gguf"], kinds=["fp32", "int4"], rounds=1, shape=wide,
                             thin_shape=thin)  # fmt: skip
    measured = result["measured"]["gguf"]
    assert set(measured) == {"fp32", "int4", "int4 (thin)"}
    assert [measured[k]["n_layers"] for k in measured] == [2, 2, 6]
    for m in measured.values():
        assert m["decode_tokens_per_s"] > 0 and m["token_bytes"] > 0 and m["bandwidth_gb_s"] > 0
    table, source = speed.efficiency()
    assert source == str(speed.calibration_path())
    assert table["gguf"]["int4"] > 0 and table["gguf"]["fp32"] > 0 and table["gguf"]["layer_s"] >= 0
    assert table["gguf"]["fp16"] == speed.DEFAULT_EFFICIENCY["gguf"]["fp16"]  # not measured
    assert table["pte"] == speed.DEFAULT_EFFICIENCY["pte"]


def test_solve_recovers_known_efficiencies_and_layer_cost():
    """Timings made up from known efficiencies and a known per-layer cost are solved back."""
    specs = {"wide": SPEC, "thin": SPEC.__class__(**{**SPEC.__dict__, "n_layers": 8})}
    truth = {"fp32": 0.8, "int8": 0.3, "int4": 0.25, "layer_s": 2e-4}
    reads, bandwidth, seconds = {}, {}, {}
    for name, k, weights in (("wide", "fp32", 4e8), ("wide", "int8", 1e8), ("wide", "int4", 6e7),
                             ("thin", "int4", 2e7)):  # fmt: skip
        key = f"{name}/gguf/{k}"
        reads[key] = speed.TokenBytes({**dict.fromkeys(speed.KINDS, 0), k: int(weights)}, 10**6)
        bandwidth[key] = 3e10
        seconds[key] = (weights / (3e10 * truth[k]) + 1e6 / (3e10 * truth["fp32"])
                        + specs[name].n_layers * truth["layer_s"])  # fmt: skip
    solved = speed._solve("gguf", ["fp32", "int8", "int4"], reads, bandwidth, seconds, specs)
    for k, v in truth.items():
        assert solved[k] == pytest.approx(v, rel=1e-6), k


def test_calibrate_refuses_bad_arguments():
    with pytest.raises(ValueError, match="kinds must start with 'fp32'"):
        speed.calibrate(kinds=["int4"])
    with pytest.raises(ValueError, match=r"unknown runtime\(s\) \['coreml'\]"):
        speed.calibrate(["coreml"])


def test_plan_prints_predictions(stories260k, capsys):
    from edgequant.cli import main

    recipe = "examples/stories260k-deploy.yaml"
    assert (
        main(["plan", "--model", "stories260k", "--recipe", recipe, "--targets", "pte,gguf"]) == 0
    )
    text = capsys.readouterr().out
    assert "predicted decode speed (kernel efficiencies:" in text
    lines = [line.split() for line in text.splitlines() if line.startswith("  ")]
    assert [line[0] for line in lines[-2:]] == ["pte", "gguf"]
    assert all(float(line[1]) > 0 for line in lines[-2:])
