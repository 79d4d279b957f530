"""Shared fixtures: the real stories260K model from the shared data folder (see data.py)."""

from __future__ import annotations

import os

import pytest


def require_data(reason: str) -> None:
    """Skip the test when shared data is missing, but fail in CI (``CI=true``), where it must be."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"shared data missing in CI: {reason}")
    pytest.skip(f"shared data missing: {reason}")


@pytest.fixture(scope="session")
def stories260k():
    """``(Transformer, Tokenizer)`` for llama2.c's stories260K, loaded once per session."""
    from edgequant.data import stories260k_dir
    from edgequant.models import llama2c

    try:
        folder = stories260k_dir()
    except FileNotFoundError as e:
        require_data(str(e))
    return llama2c.load(folder)
