"""Where the shared test and evaluation data lives (never copied into the repository).

The folder is ``$EDGEQUANT_DATA_DIR`` if set, else ``../shared/data`` relative to the current
directory or to the repository root, e.g. ``data_dir() / "stories260K" / "tok512.bin"`` and
``wikitext2_test()`` (``wikitext-2-raw/wiki.test.raw``).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "EDGEQUANT_DATA_DIR"


def data_dir() -> Path:
    """The shared data folder; ``FileNotFoundError`` lists the places tried if there is none."""
    if env := os.environ.get(ENV_VAR):
        path = Path(env)
        if not path.is_dir():
            raise FileNotFoundError(f"{ENV_VAR}={env!r} is not a folder; point it at the data")
        return path
    repo_root = Path(__file__).resolve().parents[2]
    tried = [Path.cwd() / ".." / "shared" / "data", repo_root / ".." / "shared" / "data"]
    for path in tried:
        if path.is_dir():
            return path.resolve()
    raise FileNotFoundError(
        f"no shared data folder found; tried {[str(p) for p in tried]}. "
        f"Set {ENV_VAR} to the folder holding stories260K/ and wikitext-2-raw/."
    )


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"missing data file {path} (data folder: {data_dir()})")
    return path


def stories260k_dir() -> Path:
    """Folder with llama2.c's ``stories260K.bin`` and ``tok512.bin``; both must exist."""
    folder = data_dir() / "stories260K"
    for name in ("stories260K.bin", "tok512.bin"):
        _require(folder / name)
    return folder


def wikitext2_test() -> Path:
    """The WikiText-2 raw test split, ``wikitext-2-raw/wiki.test.raw``."""
    return _require(data_dir() / "wikitext-2-raw" / "wiki.test.raw")
