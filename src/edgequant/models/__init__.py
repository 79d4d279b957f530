"""Model loaders and definitions.

``load(name_or_path)`` returns ``(model, tokenizer, info)``. Known today: a llama2.c checkpoint
(a ``.bin`` file, or a folder holding one and its ``tok<vocab>.bin``) and the name
``stories260k`` for the copy in the shared data folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

NAMES = ("stories260k",)


def load(name_or_path: str | Path) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, tokenizer, info)`` for a model name or a local path; never downloads.

    ``info`` holds ``family``, ``source`` (the resolved path) and ``config``.
    """
    from edgequant.models import llama2c

    if str(name_or_path).lower() == "stories260k":
        from edgequant.data import stories260k_dir

        path = stories260k_dir()
    else:
        path = Path(name_or_path)
        if not path.exists():
            raise FileNotFoundError(
                f"model {str(name_or_path)!r} is neither a known name ({', '.join(NAMES)}) nor "
                "an existing path"
            )
    if path.is_dir() or path.suffix == ".bin":
        model, tokenizer = llama2c.load(path)
        info = {"family": "llama2c", "source": str(path), "config": model.edgequant_config()}
        return model, tokenizer, info
    raise ValueError(
        f"{str(path)!r}: cannot tell the model format; expected a llama2.c .bin checkpoint or a "
        "folder holding one"
    )
