"""Every Python block of the README and docs/ that runs a written file in its runtime's own
runner (ExecuTorch's TextLLMRunner, LiteRT's interpreter, llama.cpp) runs as written, on files
of the `8da4w` preset laid out as `make demo` writes them, each in a fresh interpreter (an op
library imported by edgequant's own exporter must not hide a missing import in the block)."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = "build/smollm2-8da4w/model."


def runtime_blocks() -> list[tuple[str, str]]:
    """``(file, block)`` of every Python block naming one of the demo's written files."""
    out = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for block in re.findall(r"^( *)```python\n(.*?)^\1```", text, flags=re.S | re.M):
            indent, body = block
            code = "\n".join(line[len(indent) :] for line in body.splitlines())
            if DEMO in code:
                out.append((doc.name, code))
    return out


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    """A small random decoder with SmolLM2's vocabulary and tokenizer, quantized with the
    `8da4w` preset and written as the demo lays its files out."""
    import edgequant
    from edgequant.export import to_gguf, to_pte, to_tflite
    from edgequant.models import default_model_path, load
    from edgequant.models.decoder import Decoder
    from edgequant.models.families import decoder_of

    reference, tokenizer, _ = load("default")
    spec = dataclasses.replace(
        decoder_of(reference).spec, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
        hidden_dim=128,
    )  # fmt: skip
    del reference
    torch.manual_seed(0)
    model = Decoder(spec).eval()
    model, _ = edgequant.quantize(model, "8da4w")
    root = tmp_path_factory.mktemp("demo")
    bundle = root / "build" / "smollm2-8da4w"
    edgequant.save(model, bundle, tokenizer=tokenizer)
    to_pte(model, bundle / "model.pte", max_seq_len=128, bos_id=tokenizer.bos_id,
           eos_id=tokenizer.eos_id)  # fmt: skip
    to_tflite(model, bundle / "model.tflite", max_seq_len=128)
    to_gguf(model, bundle / "model.gguf", tokenizer_gguf=default_model_path())
    return root


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_each_runtime_has_a_block():
    named = " ".join(code for _, code in runtime_blocks())
    for suffix in ("pte", "tflite", "gguf"):
        assert DEMO + suffix in named, suffix


@pytest.mark.parametrize("where,code", runtime_blocks(), ids=lambda v: v[:40])
def test_block_runs_as_written(demo_files, where, code):
    done = _run(code, demo_files)
    assert done.returncode == 0, f"{where}: {done.stderr[-2000:]}"
    assert "Generation failed" not in done.stdout + done.stderr, where


def test_the_runner_fails_without_the_quantized_kernels(demo_files):
    """What the ExecuTorch block guards against: an int4 embedding needs
    executorch.kernels.quantized (a test that cannot fail would not show this)."""
    ((where, code),) = [b for b in runtime_blocks() if "TextLLMRunner(" in b[1]]
    without = code.replace("import executorch.kernels.quantized", "pass  #")
    done = _run(without, demo_files)
    output = done.stdout + done.stderr
    assert done.returncode != 0 or "Generation failed" in output
    assert "embedding_4bit" in output
