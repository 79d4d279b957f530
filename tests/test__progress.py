"""Progress outside a terminal: a plain line at most every LOG_EVERY seconds, none for the last
item, the pace's estimate of the time left."""

from __future__ import annotations

from edgequant._progress import _duration, progress_bar, progress_lines


def test_lines_every_interval_with_the_time_left():
    ticks = iter([0, 10, 70, 75, 140, 190, 500])  # start, then after each item
    lines: list[str] = []
    items = list(
        progress_lines(range(6), 6, "gptq", "layer", 60, lambda: next(ticks), lines.append)
    )
    assert items == list(range(6))
    # after item 2 (70 s: 35 s an item, 4 left), after item 4 (140 s); not after the last
    assert lines == [
        "gptq: layer 2 of 6 done, 1m10s elapsed, about 2m20s left",
        "gptq: layer 4 of 6 done, 2m20s elapsed, about 1m10s left",
    ]


def test_an_unknown_total_counts_without_an_estimate():
    ticks = iter([0, 61, 62])
    lines: list[str] = []
    list(progress_lines(iter("ab"), None, "calibration inputs", "batch", 60, lambda: next(ticks),
                        lines.append))  # fmt: skip
    assert lines == ["calibration inputs: batch 1 done, 1m01s elapsed"]


def test_durations():
    assert [_duration(s) for s in (7, 95.2, 3725)] == ["7s", "1m35s", "1h02m05s"]


def test_not_a_terminal_gives_lines_and_one_step_gives_nothing(capsys):
    # pytest's captured stderr is not a terminal
    assert list(progress_bar([1, 2, 3], 3, "x", "step")) == [1, 2, 3]
    assert capsys.readouterr().err == ""  # quicker than LOG_EVERY: no line
    assert list(progress_bar([1], 1, "x", "step")) == [1]
