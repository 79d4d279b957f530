"""Models read a tensor at a time: a skeleton on the meta device, filled one layer at a time.

``open_source(name_or_path)`` gives a `Source` for a GGUF file (memory-mapped by gguf-py; a
tensor is dequantized when it is asked for, or read from edgequant's float cache of that file
when there is one), a Hugging Face folder (safetensors, read tensor by tensor with
``safe_open``) or a llama2.c ``.bin`` (memory-mapped). ``source.skeleton()`` is the model with
every parameter on the meta device (no memory; computed buffers such as RoPE tables are real);
``source.fill(model, prefix)`` loads the parameters under ``prefix`` (a decoder layer) as
float32, ``release(model, prefix)`` gives their memory back. A tensor shared by two modules (a
tied embedding and head) is loaded once and stays shared.

    >>> from edgequant.data import stories260k_dir
    >>> source = open_source(stories260k_dir())
    >>> model = source.skeleton()
    >>> model.layers[0].attention.wq.weight.is_meta
    True
    >>> source.fill(model, "layers.0.")
    >>> model.layers[0].attention.wq.weight.is_meta, model.layers[1].attention.wq.weight.is_meta
    (False, True)
    >>> release(model, "layers.0.")
    >>> model.layers[0].attention.wq.weight.is_meta
    True
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

Reader = Callable[[str], torch.Tensor]


class Source:
    """A model's float tensors by parameter name, read one at a time.

    ``info`` is what `edgequant.models.load` returns as its third value (``family``,
    ``format``, ``source``, ``config``, and ``sha256`` for a GGUF file); ``shapes`` maps every
    stored parameter name to its shape."""

    def __init__(
        self,
        info: dict[str, Any],
        shapes: dict[str, tuple[int, ...]],
        read: Reader,
        build: Callable[[], nn.Module],
        tokenizer: Callable[[], Any],
    ) -> None:
        self.info, self.shapes = info, shapes
        self._read, self._build, self._tokenizer = read, build, tokenizer
        self.tied: dict[str, str] = {}  # a tied tensor's other names -> the stored one

    def tokenizer(self):
        return self._tokenizer()

    def read(self, name: str) -> torch.Tensor:
        """The float32 tensor ``name`` (a new tensor the caller owns)."""
        if name not in self.shapes:
            raise KeyError(f"{self.info['source']} holds no tensor {name!r}")
        t = self._read(name).float()
        if tuple(t.shape) != self.shapes[name]:
            raise ValueError(
                f"{self.info['source']}: tensor {name!r} has shape {tuple(t.shape)}, expected "
                f"{self.shapes[name]}"
            )
        return t.contiguous()

    def skeleton(self) -> nn.Module:
        """The model, every parameter on the meta device, in eval mode."""
        model = self._build()
        missing = []
        for names in _tensor_groups(model).values():
            stored = [n for n in names if n in self.shapes]
            if not stored:
                missing.append(names[0])
            self.tied.update({n: stored[0] for n in names if stored and n not in self.shapes})
        if missing:
            raise ValueError(
                f"{self.info['source']} holds no values for {missing[:4]}"
                f"{' ...' if len(missing) > 4 else ''}"
            )
        return model

    def fill(self, model: nn.Module, prefix: str = "") -> None:
        """Load every meta parameter of ``model`` whose name starts with ``prefix``."""
        for names in _tensor_groups(model).values():
            if not any(n.startswith(prefix) for n in names):
                continue
            if not _get(model, names[0]).is_meta:
                continue
            stored = [n for n in names if n in self.shapes] or [self.tied[n] for n in names]
            tensor = self.read(stored[0])
            expected = tuple(_get(model, names[0]).shape)
            if tuple(tensor.shape) != expected:
                raise ValueError(
                    f"{self.info['source']}: tensor {stored[0]!r} has shape "
                    f"{tuple(tensor.shape)}; the model's config makes {names[0]} {expected}"
                )
            _assign(model, names, tensor)

    def n_weights(self) -> int:
        """Values of every stored tensor (a tied tensor once)."""
        return sum(math.prod(s) for s in self.shapes.values())


def release(model: nn.Module, prefix: str = "") -> None:
    """Put every parameter and buffer of ``model`` under ``prefix`` back on the meta device
    (a tensor shared with a module outside ``prefix`` too: every name keeps sharing it)."""
    for names in _tensor_groups(model).values():
        if any(n.startswith(prefix) for n in names):
            t = _get(model, names[0])
            if not t.is_meta:
                _assign(model, names, torch.empty_like(t, device="meta"))


def _tensor_groups(model: nn.Module) -> dict[int, list[str]]:
    """Parameters and persistent buffers by identity: each tensor's names (a tied one has
    several)."""
    groups: dict[int, list[str]] = {}
    for name, t in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(t), []).append(name)
    for name, t in model.named_buffers(remove_duplicate=False):
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if attr not in module._non_persistent_buffers_set:
            groups.setdefault(id(t), []).append(name)
    return groups


def _get(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


def _assign(model: nn.Module, names: list[str], tensor: torch.Tensor) -> None:
    value: torch.Tensor | None = None
    for name in names:
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if attr in module._parameters:
            if value is None or not isinstance(value, nn.Parameter):
                value = nn.Parameter(tensor, requires_grad=False)
            module._parameters[attr] = value
        else:
            module._buffers[attr] = tensor


# ---- sources ---------------------------------------------------------------------------------


def open_source(name_or_path: str | Path) -> Source:
    """A `Source` for a model name or path (what `edgequant.models.load` accepts)."""
    from edgequant.models import hf, resolve

    path = resolve(name_or_path)
    if path.suffix == ".gguf":
        return _gguf_source(path)
    if path.is_dir() and (path / "config.json").is_file():
        hf.check_folder(path)
        return _folder_source(path)
    if path.suffix == ".bin" or (path.is_dir() and any(path.glob("*.bin"))):
        return _llama2c_source(path)
    raise ValueError(
        f"{str(path)!r}: cannot read this model a layer at a time; expected a .gguf file, a "
        "Hugging Face folder (config.json + *.safetensors), or a llama2.c .bin checkpoint"
    )


def _gguf_source(path: Path) -> Source:
    from edgequant._io import sha256_file
    from edgequant.models import gguf
    from edgequant.models.tokenizer import HFTokenizer

    reader = gguf.open_reader(path, tokenizer=True)
    digest = sha256_file(path)
    cached = gguf.cache_dir() / "gguf" / digest
    if (cached / "model.safetensors").is_file():  # as `gguf.load` builds it from its cache
        config = json.loads((cached / "config.json").read_text())
    else:
        config = gguf.read_config(reader)
    hf_config = gguf._hf_config(config)
    info = {"family": "hf", "format": "gguf", "source": str(path), "sha256": digest,
            "config": hf_config.to_dict()}  # fmt: skip
    if (cached / "model.safetensors").is_file():  # the float values `gguf.load` cached
        shapes, read = _safetensors_reader([cached / "model.safetensors"])
        info["cache"] = str(cached)
    else:
        tensors = {n: _GGUFTensor.of(t) for n, t in gguf.weight_tensors(reader, config).items()}
        shapes = {n: tuple(int(d) for d in reversed(t.shape.tolist())) for n, t in tensors.items()}

        def read(name: str) -> torch.Tensor:  # read, not mapped (see _safetensors_reader)
            t = tensors[name]
            raw = _read_bytes(path, t.data_offset, t.n_bytes).numpy()
            return gguf.read_tensor(t, name, config, raw.view(t.dtype).reshape(t.data_shape))

    del reader  # gguf-py's reader holds a Python object per part of every metadata field

    def tokenizer():
        if (cached / "tokenizer" / "tokenizer.json").is_file():
            return HFTokenizer.load(cached / "tokenizer")
        return HFTokenizer.from_gguf(path)

    return Source(info, shapes, read, lambda: gguf.skeleton(hf_config), tokenizer)


@dataclass(frozen=True)
class _GGUFTensor:
    """What `edgequant.models.gguf.read_tensor` needs of one of gguf-py's reader tensors, so the
    reader can go: its objects for every part of every metadata field (a 151,936-token
    vocabulary's strings and merges) took 0.5 GB for as long as it was kept."""

    name: str
    tensor_type: Any
    shape: np.ndarray  # GGUF's dims, inner first
    data_offset: int
    n_bytes: int
    dtype: np.dtype  # of the stored data, in `data_shape`
    data_shape: tuple[int, ...]

    @classmethod
    def of(cls, t) -> _GGUFTensor:
        return cls(t.name, t.tensor_type, np.array(t.shape), int(t.data_offset),
                   int(t.n_bytes), t.data.dtype, tuple(t.data.shape))  # fmt: skip


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def _safetensors_reader(files: list[Path]) -> tuple[dict[str, tuple[int, ...]], Reader]:
    """Shapes and a reader of the tensors of safetensors files. A tensor is read with ``read``
    into memory of its own, not mapped: the file's pages do not stay in the process (a mapped
    file counts in its resident memory for as long as it is mapped)."""
    where: dict[str, tuple[Path, int, int, torch.dtype]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, facts in header.items():
            if name == "__metadata__":
                continue
            if facts["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(f"{file}: tensor {name!r} has dtype {facts['dtype']}, not a float")
            begin, end = facts["data_offsets"]
            where[name] = (file, 8 + size + begin, end - begin, _SAFETENSORS_DTYPES[facts["dtype"]])
            shapes[name] = tuple(facts["shape"])

    def read(name: str) -> torch.Tensor:
        file, offset, n, dtype = where[name]
        return _read_bytes(file, offset, n).view(dtype).reshape(shapes[name])

    return shapes, read


def _read_bytes(file: Path, offset: int, n: int) -> torch.Tensor:
    """``n`` bytes of ``file`` from ``offset``, as a uint8 tensor."""
    buffer = torch.empty(n, dtype=torch.uint8)
    with open(file, "rb") as f:
        f.seek(offset)
        got = f.readinto(memoryview(buffer.numpy()))
    if got != n:
        raise ValueError(f"{file}: expected {n} bytes at {offset}, got {got} (truncated?)")
    return buffer


def _folder_source(folder: Path) -> Source:
    from transformers import AutoConfig

    from edgequant.models.gguf import skeleton
    from edgequant.models.tokenizer import HFTokenizer

    hf_config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    shapes, read = _safetensors_reader(sorted(folder.glob("*.safetensors")))
    info = {"family": "hf", "format": "hf", "source": str(folder), "config": hf_config.to_dict()}
    return Source(info, shapes, read, lambda: skeleton(hf_config), lambda: HFTokenizer.load(folder))


def _llama2c_source(path: Path) -> Source:
    from edgequant.models import llama2c
    from edgequant.models.llama2c_bin import checkpoint_layout
    from edgequant.models.llama2c_tokenizer import Tokenizer

    if path.is_dir():
        bins = sorted(p for p in path.glob("*.bin") if not p.name.startswith("tok"))
        if len(bins) != 1:
            raise ValueError(f"expected exactly one model *.bin in {path}, found {bins}")
        path = bins[0]
    args, layout = checkpoint_layout(path)
    values = np.memmap(path, dtype="<f4", mode="r", offset=28)
    shapes = {name: shape for name, (_, shape, _) in layout.items()}
    if args.tied_embedding:  # the skeleton ties it: read (and counted) as the embedding
        shapes.pop("output.weight")

    def read(name: str) -> torch.Tensor:
        offset, shape, reorder = layout[name]
        t = torch.from_numpy(np.array(values[offset : offset + math.prod(shape)])).view(shape)
        return reorder(t) if reorder else t

    info = {"family": "llama2c", "format": "llama2c", "source": str(path),
            "config": args.to_dict()}  # fmt: skip
    tok = path.parent / f"tok{args.vocab_size}.bin"
    return Source(
        info, shapes, read, lambda: llama2c.build(args.to_dict(), meta=True), lambda: Tokenizer(tok)
    )
