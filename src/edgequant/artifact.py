"""`save` and `load`: an edgequant bundle is a folder with two files.

- ``model.safetensors``: every tensor of the model's ``state_dict`` (packed integers, scales,
  float tensors), a tensor shared by tied modules stored once;
- ``manifest.json``: format and version, edgequant and torch versions, the recipe, the model
  family and config (when the model declares them), each quantized module's scheme, the tied
  tensor names, and the sha256 and size of ``model.safetensors``.

The folder is written under a temporary name and renamed into place, so a reader never sees a
half-written bundle; an existing bundle is replaced only with ``overwrite=True``. ``load``
checks the sha256 before reading a byte of tensor data, and refuses a truncated or altered file
by name.
"""

from __future__ import annotations

import json
import os
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from edgequant import __version__
from edgequant._io import (
    check_nesting,
    load_json,
    publish_mode,
    replace_dir,
    sha256_file,
    writer_lock,
)
from edgequant.layers import QuantizedEmbedding, QuantizedLinear, embed_scale_of, linear_weight
from edgequant.quantize import _set_module
from edgequant.recipe import Recipe
from edgequant.schemes import Scheme

FORMAT = "edgequant.bundle"
FORMAT_VERSION = 1
TENSORS = "model.safetensors"
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"


def _families() -> dict[str, Any]:
    from edgequant.models import hf, llama2c

    return {"llama2c": llama2c.build, "hf": hf.build}


def _model_record(model: nn.Module) -> dict[str, Any] | None:
    """``{"family", "config"}`` when edgequant can rebuild this model's architecture."""
    family = getattr(model, "edgequant_family", None)
    if family is not None and hasattr(model, "edgequant_config"):
        return {"family": family, "config": model.edgequant_config()}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict") and hasattr(config, "model_type"):
        return {"family": "hf", "config": json.loads(json.dumps(config.to_dict(), default=str))}
    return None


def _tokenizer_kind(tokenizer) -> str:
    from edgequant.models.llama2c import Tokenizer as Llama2cTokenizer
    from edgequant.models.tokenizer import HFTokenizer

    if isinstance(tokenizer, HFTokenizer):
        return "hf"
    if isinstance(tokenizer, Llama2cTokenizer):
        return "llama2c"
    raise TypeError(f"cannot store a {type(tokenizer).__name__} tokenizer in a bundle")


def load_tokenizer(path: str | Path):
    """The tokenizer stored in a bundle (checked like every bundle file), or None."""
    from edgequant.models.llama2c import Tokenizer as Llama2cTokenizer
    from edgequant.models.tokenizer import HFTokenizer

    path = Path(path)
    manifest = read_manifest(path)
    record, listed = manifest.get("tokenizer"), manifest["files"]
    if record is None:
        return None
    folder = path / TOKENIZER_DIR
    names = record.get("files") if isinstance(record, dict) else None
    if (
        not isinstance(record, dict)
        or record.get("kind") not in ("hf", "llama2c")
        or not isinstance(names, list)
        or not names
        or any(not isinstance(n, str) or f"{TOKENIZER_DIR}/{n}" not in listed for n in names)
    ):
        raise ValueError(
            f"{str(path / MANIFEST)!r}: tokenizer must be {{'kind': 'hf' or 'llama2c', 'files': "
            f"[names listed under files as {TOKENIZER_DIR}/<name>]}}, got {record!r}"
        )
    unlisted = sorted(p.name for p in folder.iterdir() if p.name not in names)
    if unlisted:  # the tokenizer would read them, and the manifest vouches only for its own
        raise ValueError(
            f"{str(folder)!r} holds file(s) the manifest does not list: {unlisted}; remove them "
            "(they would change the tokenizer without failing the integrity check)"
        )
    if record["kind"] == "hf":
        return HFTokenizer.load(folder)
    return Llama2cTokenizer(folder / record["files"][0])


def save(
    model: nn.Module, path: str | Path, *, tokenizer=None, overwrite: bool = False, read=None
) -> Path:
    """Write ``model`` (quantized or not) as a bundle folder at ``path``; returns the path.

    With ``tokenizer`` its files are stored too (``tokenizer/``), so that the bundle alone can
    be evaluated and generate text. ``read(name) -> tensor`` gives the values of tensors the
    model holds on the meta device (`edgequant.stream` keeps finished layers on disk): the file
    is written one tensor at a time, byte for byte what it would be with every tensor in memory.

    >>> import torch.nn as nn, tempfile, edgequant
    >>> m, _ = edgequant.quantize(nn.Sequential(nn.Linear(64, 8)), "8da4w")
    >>> out = save(m, tempfile.mkdtemp() + "/bundle")
    >>> sorted(p.name for p in out.iterdir())
    ['manifest.json', 'model.safetensors']
    """
    path = Path(path)
    with writer_lock(path):
        return _save(model, path, tokenizer, overwrite, read)


def _save(model: nn.Module, path: Path, tokenizer, overwrite: bool, read=None) -> Path:
    check_writable(path, overwrite)
    state = model.state_dict(keep_vars=True)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    for name, tensor in state.items():
        key = (
            tensor.untyped_storage().data_ptr() if not tensor.is_meta else -id(tensor),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.dtype,
        )
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = tensor.detach()
    if read is None and any(t.is_meta for t in tensors.values()):
        meta = [n for n, t in tensors.items() if t.is_meta]
        raise ValueError(f"the model holds no values for {meta[:4]} (meta tensors) to save")
    layers = {
        fqn: {
            "kind": "embedding" if isinstance(m, QuantizedEmbedding) else "linear",
            "scheme": m.scheme.to_dict(),
        }
        for fqn, m in model.named_modules()
        if isinstance(m, (QuantizedLinear, QuantizedEmbedding))
    }
    recipe = getattr(model, "edgequant_recipe", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        if read is None:
            contiguous = {n: t.contiguous() for n, t in tensors.items()}
            save_file(contiguous, str(tmp / TENSORS), metadata={"format": FORMAT})
            del contiguous
        else:
            from edgequant import _safetensors

            entries = [
                (n, t.dtype, tuple(t.shape), partial(read, n) if t.is_meta else t.contiguous)
                for n, t in tensors.items()
            ]
            _safetensors.write(tmp / TENSORS, entries, metadata={"format": FORMAT})
        files = [TENSORS]
        tokenizer_record = None
        if tokenizer is not None:
            kind = _tokenizer_kind(tokenizer)
            names = tokenizer.save(tmp / TOKENIZER_DIR)
            files += [f"{TOKENIZER_DIR}/{n}" for n in names]
            tokenizer_record = {"kind": kind, "files": names}
        folders = [tmp] + ([tmp / TOKENIZER_DIR] if tokenizer is not None else [])
        for item in folders + [tmp / f for f in files]:
            publish_mode(item)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "edgequant_version": __version__,
            "torch_version": torch.__version__,
            "model": _model_record(model),
            "tokenizer": tokenizer_record,
            "recipe": recipe.to_dict() if isinstance(recipe, Recipe) else None,
            "calibration": getattr(model, "edgequant_calibration", None),
            "layers": layers,
            "aliases": aliases,
            "files": {
                name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                for name in files
            },
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        publish_mode(tmp / MANIFEST)
        replace_dir(tmp, path, overwrite)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _empty(module: nn.Module, kind: str, scheme: Scheme) -> nn.Module:
    """A packed module of ``scheme`` shaped like ``module`` (its tensors to be loaded)."""
    if kind == "embedding":
        return QuantizedEmbedding(
            module.num_embeddings, module.embedding_dim, scheme, embed_scale_of(module)
        )
    rows, cols = linear_weight(module).shape
    return QuantizedLinear(cols, rows, scheme, bias=module.bias is not None)


def _check_model_size(build, config: dict[str, Any], path: Path) -> None:
    """Refuse a ``model.config`` describing a float model far larger than the bundle's tensors
    could fill (an edited manifest would otherwise allocate it), measured on the meta device."""
    with torch.device("meta"):
        skeleton = build(config)
    float_bytes = sum(p.numel() * 4 for p in skeleton.parameters())
    stored = (path / TENSORS).stat().st_size
    if float_bytes > 16 * stored + (1 << 30):  # 2-bit weights are 1/16 of fp32
        raise ValueError(
            f"model.config describes {float_bytes / 1e9:.1f} GB of float weights, which "
            f"{TENSORS} ({stored / 1e6:.1f} MB) cannot fill"
        )


def _check_fields(manifest: dict[str, Any], where: Path) -> None:
    """Every manifest field `load` reads has the type it needs; refused naming the field."""

    def refuse(field: str, value: Any, allowed: str) -> ValueError:
        return ValueError(f"{str(where)!r}: {field} must be {allowed}, got {value!r}"[:500])

    for fqn, facts in manifest["layers"].items():
        if not isinstance(facts, dict) or facts.get("kind") not in ("linear", "embedding"):
            raise refuse(f"layers[{fqn!r}]", facts, "{'kind': 'linear' or 'embedding', ...}")
        if not isinstance(facts.get("scheme"), dict):
            raise refuse(f"layers[{fqn!r}].scheme", facts.get("scheme"), "a mapping")
    for name, target in manifest["aliases"].items():
        if not isinstance(target, str):
            raise refuse(f"aliases[{name!r}]", target, "a tensor name")
    info = manifest.get("model")
    if info is not None and not (
        isinstance(info, dict) and isinstance(info.get("family"), str)
        and isinstance(info.get("config"), dict)
    ):  # fmt: skip
        raise refuse("model", info, "null or {'family': name, 'config': mapping}")
    if not isinstance(manifest.get("recipe"), (dict, type(None))):
        raise refuse("recipe", manifest.get("recipe"), "null or a recipe mapping")


def check_writable(path: Path, overwrite: bool) -> None:
    """Refuse a bundle path that exists, unless ``overwrite`` and it is an edgequant bundle
    (never replace some other folder or file)."""
    path = Path(path)
    for parent in path.absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise FileExistsError(
                f"{str(parent)!r} is a file, not a folder: cannot write {str(path)!r} under it"
            )
    if not path.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{str(path)!r} exists; pass overwrite=True to replace it")
    manifest = path / MANIFEST
    try:
        found = load_json(manifest.read_text(), str(manifest)) if path.is_dir() else None
    except (OSError, ValueError):
        found = None
    if not (isinstance(found, dict) and found.get("format") == FORMAT):
        raise FileExistsError(
            f"{str(path)!r} exists and is not an edgequant bundle; refusing to replace it"
        )
    listed = found.get("files")
    foreign = _not_written_by_edgequant(path, listed if isinstance(listed, dict) else {})
    if foreign:
        raise FileExistsError(
            f"{str(path)!r} holds file(s) edgequant did not write: {foreign[:8]}"
            f"{' and more' if len(foreign) > 8 else ''}; overwrite would delete them: move them "
            "out first"
        )


# what the main job writes beside a bundle's own files (edgequant.report, edgequant.card and
# the files of edgequant.targets.TARGETS and edgequant.anchors.ANCHORS)
REPORT_FILES = (
    "report.json", "report.md", "report.png", "report.html", "compare.json", "compare.md",
    "compare.png", "model.pte", "model.tflite", "model.gguf", "anchor-executorch-8da4w.pte",
    "anchor-litert-torch-int4.tflite", "anchor-llama.cpp-Q4_0.gguf",
    "anchor-llama.cpp-Q4_0-imatrix.gguf",
)  # fmt: skip


def _not_written_by_edgequant(path: Path, listed) -> list[str]:
    """The entries of an existing bundle folder that are neither the files its manifest lists
    (``listed``) nor the main job's reports (what ``overwrite`` would delete and edgequant
    cannot vouch for)."""
    ours = {MANIFEST, *REPORT_FILES, *listed}
    out = []
    for folder, dirs, files in os.walk(path):  # links are listed, never followed
        for entry in [*dirs, *files]:
            name = (Path(folder) / entry).relative_to(path).as_posix()
            item = path / name
            if name in ours or (name == TOKENIZER_DIR and item.is_dir() and not item.is_symlink()):
                continue
            out.append(name)
    return sorted(out)


_HEX = frozenset("0123456789abcdef")


def _check_listed(path: Path, manifest_path: Path, name: Any, facts: Any) -> None:
    """A manifest's file entry names a file inside the bundle (``model.safetensors`` or
    ``tokenizer/<name>``, no other folder, no ``..``, no absolute path, no link leaving the
    folder) and gives its size and sha256; refused naming the entry otherwise."""
    where = f"{str(manifest_path)!r}: files[{name!r}]"
    parts = name.split("/") if isinstance(name, str) else []
    plain = all(p and p not in (".", "..") and "\\" not in p and "\0" not in p for p in parts)
    if not plain or not (parts == [TENSORS] or (len(parts) == 2 and parts[0] == TOKENIZER_DIR)):
        raise ValueError(
            f"{where}: a bundle lists only {TENSORS!r} and {TOKENIZER_DIR}/<name> files inside "
            "its folder (no other folder, '..', absolute path or backslash)"
        )
    file = path / name
    if file.is_symlink() or (path / parts[0]).is_symlink():
        raise ValueError(f"{where}: is a symbolic link; a bundle holds its own files")
    if not isinstance(facts, dict):
        raise ValueError(f"{where}: must be a mapping with 'bytes' and 'sha256'")
    size, digest = facts.get("bytes"), facts.get("sha256")
    if type(size) is not int or size < 0:
        raise ValueError(f"{where}.bytes: must be a whole number >= 0, got {size!r}")
    if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX:
        raise ValueError(f"{where}.sha256: must be 64 lowercase hex digits, got {digest!r}")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The bundle's manifest, after checking that it and every file it lists are intact."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"bundle folder {str(path)!r} does not exist")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{str(manifest_path)!r} is missing: not an edgequant bundle")
    try:
        text = manifest_path.read_text()
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(manifest_path)!r} is corrupted (not valid JSON: {e})") from None
    try:  # nesting first: the C decoder recurses on the C stack
        check_nesting(text, str(manifest_path))
    except ValueError:
        raise ValueError(f"{str(manifest_path)!r} is corrupted (nested too deeply)") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(manifest_path)!r} is corrupted (not valid JSON: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{str(manifest_path)!r} is not an edgequant bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{str(manifest_path)!r}: format_version {manifest.get('format_version')!r} is not "
            f"supported (this edgequant reads {FORMAT_VERSION})"
        )
    missing = [k for k in ("files", "layers", "aliases") if not isinstance(manifest.get(k), dict)]
    if missing:
        raise ValueError(f"{str(manifest_path)!r} is corrupted: {missing} missing or not mappings")
    if TENSORS not in manifest["files"]:
        raise ValueError(f"{str(manifest_path)!r}: files does not list {TENSORS!r}")
    for name, facts in manifest["files"].items():  # every name and fact before reading a file
        _check_listed(path, manifest_path, name, facts)
    for name, facts in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise FileNotFoundError(f"{str(file)!r} is missing from the bundle")
        size = file.stat().st_size
        if size != facts["bytes"]:
            raise ValueError(
                f"{str(file)!r} is truncated or altered: {size} bytes, the manifest says "
                f"{facts['bytes']}"
            )
        digest = sha256_file(file)
        if digest != facts["sha256"]:
            raise ValueError(
                f"{str(file)!r} is corrupted or altered: sha256 {digest}, the manifest says "
                f"{facts['sha256']}"
            )
    return manifest


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a saved model with identical outputs.

    ``model`` is a float skeleton of the same architecture; it may be omitted when the bundle
    records a model family edgequant knows (``manifest["model"]``). Its modules and tensors are
    replaced by the bundle's, never written into: a `edgequant._modules.shallow_copy` of a
    float model can take a bundle without a second copy of the weights or a change to them.
    """
    path = Path(path)
    manifest = read_manifest(path)
    _check_fields(manifest, path / MANIFEST)
    if model is None:
        info = manifest.get("model")
        families = _families()
        if not info or info.get("family") not in families:
            raise ValueError(
                f"{str(path)!r} does not record a model family edgequant can build "
                f"({', '.join(families)}); pass the float model: load(path, model=...)"
            )
        try:
            _check_model_size(families[info["family"]], info["config"], path)
            model = families[info["family"]](info["config"], meta=True)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(
                f"{str(path / MANIFEST)!r}: model.config cannot build a {info['family']} model "
                f"({type(e).__name__}: {e})"
            ) from None
    # Swap in empty packed modules; tied ones share the first one's buffers.
    aliases: dict[str, str] = manifest["aliases"]
    built: dict[str, nn.Module] = {}
    for fqn, facts in manifest["layers"].items():
        scheme = Scheme.from_dict(facts["scheme"], where=f"{MANIFEST}: layers.{fqn}")
        try:
            module = model.get_submodule(fqn)
        except AttributeError:
            raise ValueError(f"the model has no module {fqn!r} that the bundle quantized") from None
        try:
            with torch.device("meta"):  # its tensors are the bundle's, assigned below
                new = _empty(module, facts["kind"], scheme)
        except (AttributeError, TypeError, ValueError) as e:
            raise ValueError(
                f"{MANIFEST}: layers.{fqn}: a {facts['kind']} of this scheme does not fit the "
                f"model's {type(module).__name__} ({type(e).__name__}: {e})"
            ) from None
        built[fqn] = new
    for fqn, new in built.items():
        for buf in new.packed_buffers():
            target = aliases.get(f"{fqn}.{buf}")
            if target is not None:
                owner, _, owner_buf = target.rpartition(".")
                if owner in built:
                    setattr(new, buf, getattr(built[owner], owner_buf))
        _set_module(model, fqn, new)
    state = load_file(str(path / TENSORS))
    for name, target in aliases.items():
        if target not in state:
            raise ValueError(
                f"{MANIFEST}: aliases[{name!r}] names {target!r}, which {TENSORS} does not hold"
            )
        state[name] = state[target]
    # tensors the skeleton shares between modules (a tied embedding and head) stay one tensor:
    # assign gives each name its own Parameter
    shared: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False),
                    *model.named_buffers(remove_duplicate=False)]:  # fmt: skip
        shared.setdefault(id(t), []).append(name)
    try:
        model.load_state_dict(state, strict=True, assign=True)  # replaced, not written into
    except RuntimeError as e:
        reason = " ".join(str(e).split())[:400]
        raise ValueError(
            f"{str(path)!r}: the bundle's tensors do not fit the model: {reason}"
        ) from None
    for first, *others in (names for names in shared.values() if len(names) > 1):
        owner, _, attr = first.rpartition(".")
        tensor = getattr(model.get_submodule(owner), attr)
        for name in others:
            if state.get(name) is not state.get(first):
                continue  # the bundle holds values of its own (a head a rotation untied)
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, tensor)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{str(path)!r}: the bundle holds no values for {left[:4]}")
    if manifest.get("recipe") is not None:
        model.edgequant_recipe = Recipe.from_dict(manifest["recipe"], where=f"{MANIFEST}: recipe")
    return model.eval()
