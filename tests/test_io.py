"""edgequant._io: the writer's lock that keeps two processes from mixing one target's files."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import edgequant
from edgequant import job
from edgequant._io import writer_lock

HOLD = """
import sys, time
from edgequant._io import writer_lock
with writer_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_naming_the_holder(fresh_stories260k, tmp_path):
    target = tmp_path / "bundle"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        model, _ = fresh_stories260k()
        with pytest.raises(
            FileExistsError,
            match=re.escape(
                f"{str(target)!r} is being written by another edgequant process (pid "
                f"{holder.pid}); wait for it to finish or choose another path"
            ),
        ):
            edgequant.save(model, target)
        with pytest.raises(FileExistsError, match="is being written by another edgequant"):
            job.run(str(tmp_path / "no-model"), "8da4w", target)  # refused before any work
        assert not target.exists()
    finally:
        holder.kill()
        holder.wait()
    # the kernel drops a dead holder's lock: the next writer goes ahead and removes the file
    model, _ = fresh_stories260k()
    edgequant.save(model, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_the_lock_is_reentrant_in_one_process_and_removed_after(tmp_path):
    target = tmp_path / "out.pte"
    with writer_lock(target):
        with writer_lock(target):
            assert (tmp_path / ".out.pte.lock").read_text() == str(os.getpid())
    assert list(tmp_path.iterdir()) == []


def test_an_output_under_a_file_is_refused_before_any_work(tmp_path):
    # a model that does not exist: the refusal must come before loading it
    (tmp_path / "file").write_text("x")
    with pytest.raises(
        FileExistsError,
        match=re.escape(f"{str(tmp_path / 'file')!r} is a file, not a folder: cannot write"),
    ):
        job.run(str(tmp_path / "no-model"), "8da4w", tmp_path / "file" / "bundle")
