"""The progress bar every long loop shows (evaluation, calibration, layer-wise passes)."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(iterable, total: int | None, desc: str, unit: str):
    """A progress bar, shown only when there may be more than one step (and stderr is a TTY);
    ``total`` None when the length is unknown."""
    few = total is not None and total <= 1
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=few or None)
