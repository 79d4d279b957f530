"""The README's Python example runs as written (in a scratch folder)."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch, readme_python_blocks):
    blocks = readme_python_blocks
    assert blocks, "the README shows a Python example"
    monkeypatch.chdir(tmp_path)
    # the LiteRT block runs in tests/generative/test_convert.py, which reads its file back
    for block in [b for b in blocks if "convert(" not in b]:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)
    assert (tmp_path / "build" / "smollm2-int8" / "manifest.json").is_file()
    assert (tmp_path / "build" / "smollm2-int8" / "tokenizer" / "tokenizer.json").is_file()


def test_readme_first_screen_shows_the_two_setup_commands():
    first_screen = "\n".join(README.read_text().splitlines()[:25])
    assert "make demo" in first_screen and "make test" in first_screen
