"""The progress bar every long loop shows (evaluation, calibration, layer-wise passes).

On a terminal it is tqdm's bar. When stderr is not a terminal (a log file, ``nohup``, CI) a
bar's carriage returns would make one unreadable line, and tqdm shows nothing at all there, so
a calibrated quantization of a 1.5B model said nothing for 40 minutes: instead a plain line
goes to stderr at most every `LOG_EVERY` seconds, e.g.
``gptq: layer 12 of 28 done, 16m04s elapsed, about 21m25s left``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator

from tqdm.auto import tqdm

LOG_EVERY = 60.0  # seconds between progress lines when stderr is not a terminal


def progress_bar(iterable, total: int | None, desc: str, unit: str):
    """A progress bar, shown only when there may be more than one step: tqdm's on a terminal,
    a line at most every `LOG_EVERY` seconds otherwise (`progress_lines`); ``total`` None when
    the length is unknown."""
    few = total is not None and total <= 1
    if few or sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=few or None)
    return progress_lines(iterable, total, desc, unit)


def progress_lines(
    iterable: Iterable,
    total: int | None,
    desc: str,
    unit: str,
    every: float = LOG_EVERY,
    clock: Callable[[], float] = time.monotonic,
    write: Callable[[str], object] | None = None,
) -> Iterator:
    """``iterable``'s items; after an item's work (when the next is asked for), a line to
    ``write`` (stderr) if ``every`` seconds passed since the last line and it is not the last
    item: the count done, the time since the start and, with a ``total``, the time left at the
    mean pace so far.

    >>> ticks = iter(range(0, 1000, 50))
    >>> list(progress_lines("abcd", 4, "gptq", "layer", 60, lambda: next(ticks), print))
    gptq: layer 2 of 4 done, 1m40s elapsed, about 1m40s left
    ['a', 'b', 'c', 'd']
    """
    write = write or (lambda line: print(line, file=sys.stderr, flush=True))
    start = last = clock()
    done = 0
    for item in iterable:
        yield item
        done += 1
        now = clock()
        if now - last < every or (total is not None and done >= total):
            continue
        last = now
        count = f"{done} of {total}" if total is not None else f"{done}"
        line = f"{desc}: {unit} {count} done, {_duration(now - start)} elapsed"
        if total is not None:
            line += f", about {_duration((now - start) / done * (total - done))} left"
        write(line)


def _duration(seconds: float) -> str:
    """``95.2`` -> ``1m35s``; ``3725`` -> ``1h02m05s``; ``7`` -> ``7s``."""
    s = round(seconds)
    h, m, s = s // 3600, s // 60 % 60, s % 60
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    return f"{m}m{s:02d}s" if m else f"{s}s"
