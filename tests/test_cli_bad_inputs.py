"""Bad input through the CLI: every case ends in one line, ``edgequant <verb>: error: ...``,
exit 2, no traceback, and nothing left behind."""

from __future__ import annotations

import errno
import json
import random

import pytest

import edgequant
from edgequant.cli import main


def _bomb() -> str:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    return "\n".join([*lines, "rules: [{scheme: {weight: int8}}]"]) + "\n"


def _gguf_without_vocabulary(path):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _case(tmp_path, name):
    """``(argv, verb, fragment of the message)`` of one bad input, made in ``tmp_path``."""
    t = tmp_path
    if name == "recipe is a folder":
        (t / "r.yaml").mkdir()
        return ["plan", "--model", "stories260k", "--recipe", str(t / "r.yaml")], "is a folder"
    if name == "recipe alias bomb":
        (t / "b.yaml").write_text(_bomb())
        return ["plan", "--model", "stories260k", "--recipe", str(t / "b.yaml")], (
            "expands to more than 100000 values"
        )
    if name == "recipe not UTF-8":
        (t / "l.yaml").write_bytes(b"name: caf\xe9\nrules: []\n")
        return ["plan", "--model", "stories260k", "--recipe", str(t / "l.yaml")], (
            "is not UTF-8 text: byte 9 is 0xe9"
        )
    if name == "recipe NaN parameter":
        (t / "n.yaml").write_text(
            "rules: [{scheme: {weight: int8, algorithm: mse, algorithm_params: {min_ratio: .nan}}}]"
        )
        return ["plan", "--model", "stories260k", "--recipe", str(t / "n.yaml")], (
            "mse parameter min_ratio nan is not allowed; allowed: a number in (0.0, 1.0]"
        )
    if name == "recipe deep JSON":
        (t / "d.json").write_text("[" * 100000 + "]" * 100000)
        return ["plan", "--model", "stories260k", "--recipe", str(t / "d.json")], (
            "nested deeper than 32 levels"
        )
    if name == "model GGUF without vocabulary":
        _gguf_without_vocabulary(t / "v.gguf")
        return ["plan", "--model", str(t / "v.gguf"), "--recipe", "fp16"], "has no tokenizer"
    if name == "model GGUF of random bytes":
        (t / "r.gguf").write_bytes(b"GGUF" + random.Random(0).randbytes(2000))
        return ["plan", "--model", str(t / "r.gguf"), "--recipe", "fp16"], (
            "is not a readable GGUF file"
        )
    if name == "pte of random bytes":
        (t / "r.pte").write_bytes(random.Random(0).randbytes(4000))
        return ["eval", "--pte", str(t / "r.pte"), "--model", "stories260k"], (
            "no ExecuTorch program identifier"
        )
    if name == "tflite of random bytes":
        (t / "r.tflite").write_bytes(b"\0\0\0\0TFL3" + random.Random(0).randbytes(4000))
        return ["eval", "--tflite", str(t / "r.tflite"), "--model", "stories260k"], (
            "is not a loadable LiteRT decoder"
        )
    if name == "gguf program of random bytes":
        (t / "p.gguf").write_bytes(b"GGUF" + random.Random(1).randbytes(4000))
        return ["eval", "--gguf", str(t / "p.gguf"), "--model", "stories260k"], (
            "is not a readable GGUF file"
        )
    if name == "out under a file":
        (t / "f").write_text("x")
        return ["quantize", "--model", "stories260k", "--recipe", "fp16", "--out",
                str(t / "f" / "b")], "is a file, not a folder"  # fmt: skip
    if name == "text is a folder":
        return ["quantize", "--model", "stories260k", "--recipe", "fp16", "--out", str(t / "b"),
                "--text", str(t)], "is a folder, not a text file"  # fmt: skip
    if name == "bundle lists a file outside itself":
        from edgequant.models import load

        path = edgequant.save(load("stories260k")[0], t / "bundle")
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["files"]["../../etc/hostname"] = {"bytes": 1, "sha256": "0" * 64}
        (path / "manifest.json").write_text(json.dumps(manifest))
        return ["inspect", str(path)], "a bundle lists only 'model.safetensors'"
    if name == "bundle manifest bytes edited":
        from edgequant.models import load

        path = edgequant.save(load("stories260k")[0], t / "bundle")
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["files"]["model.safetensors"]["bytes"] = "many"
        (path / "manifest.json").write_text(json.dumps(manifest))
        return ["inspect", str(path)], ".bytes: must be a whole number >= 0, got 'many'"
    if name == "bundle manifest nested deeply":
        from edgequant.models import load

        path = edgequant.save(load("stories260k")[0], t / "bundle")
        (path / "manifest.json").write_text("[" * 100000 + "]" * 100000)
        return ["inspect", str(path)], "is corrupted (nested too deeply)"
    if name == "model is a symlink loop":
        (t / "loop").symlink_to(t / "loop")
        return ["plan", "--model", str(t / "loop"), "--recipe", "fp16"], "nor an existing path"
    if name == "recipe absurd steps":
        (t / "s.yaml").write_text(
            "rules: [{scheme: {weight: int8, algorithm: mse, "
            "algorithm_params: {steps: 10000000000}}}]"
        )
        return ["plan", "--model", "stories260k", "--recipe", str(t / "s.yaml")], (
            "allowed: an integer in [1, 4096]"
        )
    if name == "overwrite a bundle holding user files":
        from edgequant.models import load

        path = edgequant.save(load("stories260k")[0], t / "bundle")
        (path / "notes.txt").write_text("mine")
        return ["quantize", "--model", "stories260k", "--recipe", "fp16", "--out", str(path),
                "--overwrite"], "holds file(s) edgequant did not write: ['notes.txt']"  # fmt: skip
    if name == "bundle tokenizer names an outside file":
        from edgequant.models import load

        model, tokenizer, _ = load("stories260k")
        path = edgequant.save(model, t / "bundle", tokenizer=tokenizer)
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["tokenizer"]["files"] = ["../../../etc/hostname"]
        (path / "manifest.json").write_text(json.dumps(manifest))
        return ["generate", "--artifact", str(path), "--max-new-tokens", "2"], "tokenizer must be"
    if name == "model GGUF with overlapping tensors":
        import struct

        import gguf
        import numpy as np

        writer = gguf.GGUFWriter(str(t / "o.gguf"), "llama")
        writer.add_tensor("a", np.ones((4, 8), np.float32))
        writer.add_tensor("b", np.ones((4, 8), np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        data = bytearray((t / "o.gguf").read_bytes())
        at = data.index(struct.pack("<Q", 1) + b"b") + 9 + 4 + 16 + 4  # b's offset field
        struct.pack_into("<Q", data, at, 0)
        (t / "o.gguf").write_bytes(bytes(data))
        return ["plan", "--model", str(t / "o.gguf"), "--recipe", "fp16"], "overlap in the file"
    raise AssertionError(name)


CASES = [
    "recipe is a folder", "recipe alias bomb", "recipe not UTF-8", "recipe NaN parameter",
    "recipe deep JSON", "model GGUF without vocabulary", "model GGUF of random bytes",
    "pte of random bytes", "tflite of random bytes", "gguf program of random bytes",
    "out under a file", "text is a folder",
    "bundle lists a file outside itself", "bundle manifest bytes edited",
    "bundle manifest nested deeply", "model is a symlink loop", "recipe absurd steps",
    "overwrite a bundle holding user files", "bundle tokenizer names an outside file",
    "model GGUF with overlapping tensors",
]  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_error_line(stories260k, tmp_path, capsys, name):
    argv, fragment = _case(tmp_path, name)
    capsys.readouterr()
    assert main(argv) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.err, out.err
    assert lines[0].startswith(f"edgequant {argv[0]}: error: "), lines[0]
    assert fragment in lines[0], lines[0]


def test_a_full_disk_is_one_line_and_leaves_nothing(stories260k, tmp_path, capsys, monkeypatch):
    import edgequant.artifact as artifact

    def full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(artifact, "save_file", full)
    out = tmp_path / "b"
    argv = ["quantize", "--model", "stories260k", "--recipe", "fp16", "--out", str(out),
            "--eval-windows", "0"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgequant quantize: error: '") and err.endswith(
        "model.safetensors': No space left on device"
    ), err
    assert list(tmp_path.iterdir()) == []  # no bundle, no temporary folder, no lock
