"""`import edgequant` stays cheap: no heavy optional dependency is imported with it."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module", ["transformers", "executorch", "torchao", "ai_edge_litert", "gguf"]
)
def test_import_edgequant_does_not_import(module):
    code = (
        "import sys, edgequant, edgequant.generative.quant_recipes, edgequant.quantizers, "
        f"edgequant.cli; print({module!r} in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_public_api():
    import edgequant

    assert set(edgequant.__all__) == {
        "Plan",
        "Recipe",
        "Rule",
        "Scheme",
        "__version__",
        "load",
        "plan",
        "quantize",
        "recipes",
        "save",
    }
