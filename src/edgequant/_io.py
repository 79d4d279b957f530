"""Safe file I/O: writes via a temporary name and a rename (never overwriting silently), one
writer per target, and readers of untrusted text and JSON that refuse what would crash or
exhaust the process."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_mode(path: Path) -> None:
    """Give a file or folder made by mkstemp/mkdtemp (0600/0700) the usual mode under umask."""
    base = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, base & ~_umask())


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write; renamed onto ``path`` (usual mode) when the
    block ends, removed if it raises, so ``path`` is never half-written."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


MAX_JSON_DEPTH = 64


def check_nesting(text: str, where: str, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse text whose ``[``/``{`` nesting (outside strings) is deeper than ``max_depth``,
    before a parser sees it: Python's C JSON decoder recurses on the C stack, and with the
    recursion limit raised (torch.export raises it) deep nesting crashed the process instead of
    raising RecursionError."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                raise ValueError(f"{where}: nested deeper than {max_depth} levels")
        elif ch in "]}":
            depth -= 1


def load_json(text: str, where: str, max_depth: int = MAX_JSON_DEPTH):
    """``json.loads(text)`` of untrusted text: nesting checked first (`check_nesting`); invalid
    JSON is a ValueError naming ``where``."""
    import json

    check_nesting(text, where, max_depth)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON: {e}") from None


def read_text_file(path: Path, what: str, max_bytes: int | None = None) -> str:
    """A UTF-8 text file's contents; a folder, an oversized file or bytes that are not UTF-8
    are refused naming the file (and the byte offset)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a folder, not a text file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise ValueError(f"{what} {str(path)!r} is {size} bytes; at most {max_bytes} are read")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{what} {str(path)!r} is not UTF-8 text: byte {e.start} is {data[e.start]:#04x}"
        ) from None


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` as ``path`` via `atomic_path`; returns ``path``. Whether ``path`` may be
    replaced is the caller's check (e.g. `edgequant.export.common.check_out`)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def atomic_write_text(path: Path, text: str, overwrite: bool = False) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def replace_dir(tmp_dir: Path, final: Path, overwrite: bool) -> None:
    """Move a fully written ``tmp_dir`` to ``final``; an existing ``final`` needs ``overwrite``.

    The old folder is moved aside first and removed only after the new one is in place, so a
    failure at any step leaves one complete folder at ``final`` (the old or the new).
    """
    if not final.exists():
        os.replace(tmp_dir, final)
        return
    if not overwrite:
        raise FileExistsError(f"{str(final)!r} exists; pass overwrite=True to replace it")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.replace(final, old)
    try:
        os.replace(tmp_dir, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_HELD: set[Path] = set()  # targets this process holds a writer's lock on


@contextmanager
def writer_lock(target: Path) -> Iterator[None]:
    """Hold the one writer's lock of ``target`` while the block runs: a second edgequant process
    writing the same target is refused at once, naming the holder's pid, instead of the two
    mixing their files. The lock is ``.<name>.lock`` beside ``target`` (an exclusive ``flock``,
    released by the kernel if the holder dies); re-entrant within one process."""
    import fcntl

    target = Path(os.path.abspath(target))
    if target in _HELD:
        yield
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.with_name(f".{target.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FileExistsError(
                f"{str(target)!r} is being written by another edgequant process (pid {holder}); "
                "wait for it to finish or choose another path"
            ) from None
        try:  # the file may have been removed by its last holder between open and flock
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _HELD.add(target)
        yield
    finally:
        _HELD.discard(target)
        lock.unlink(missing_ok=True)
        os.close(fd)
