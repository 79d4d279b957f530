"""Load a GGUF file (llama.cpp's format) as a float Hugging Face model plus its tokenizer.

The architecture (``general.architecture``: llama, qwen2, qwen3, gemma3, phi3) picks the family file
(`edgequant.models.families`), which builds the transformers config from the metadata. Weights
are read and dequantized with the ``gguf`` package, renamed from llama.cpp's tensor names to
Hugging Face's with gguf-py's ``TensorNameMap``, and, for architectures whose RoPE pairs
adjacent rows (llama), q/k rows are permuted back to the rotate-half order transformers uses.
The tokenizer is built from the GGUF metadata by transformers (no download). The float model is
cached as safetensors, keyed by the GGUF file's sha256, so a second load takes seconds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from edgequant._io import publish_mode, sha256_file

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """``$EDGEQUANT_CACHE_DIR`` or ``~/.cache/edgequant``."""
    return Path(os.environ.get("EDGEQUANT_CACHE_DIR", Path.home() / ".cache" / "edgequant"))


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (its ``llama`` RoPE pairs adjacent rows; Hugging
    Face rotates halves); weights ``[rows, cols]`` or biases ``[rows]``.

    >>> w = torch.arange(8.0).reshape(8, 1)  # one head of 8 rows: llama.cpp order 0..7
    >>> unpermute_qk(w, 1).flatten().tolist()
    [0.0, 2.0, 4.0, 6.0, 1.0, 3.0, 5.0, 7.0]
    """
    rows, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_config(reader) -> dict[str, Any]:
    """A transformers config dict from the GGUF metadata, through the architecture's family
    file (`edgequant.models.families`); refuses architectures no family covers."""
    from edgequant.models.families import for_gguf_arch

    arch = _field(reader, "general.architecture")
    family = for_gguf_arch(arch)
    tokens = _field(reader, "tokenizer.ggml.tokens")

    def get(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None and key == "vocab_size" and tokens is not None:
            return len(tokens)
        return value

    config = family.hf_config(get, {t.name: t for t in reader.tensors})
    config["bos_token_id"] = _field(reader, "tokenizer.ggml.bos_token_id")
    config["eos_token_id"] = _field(reader, "tokenizer.ggml.eos_token_id")
    config["pad_token_id"] = _field(reader, "tokenizer.ggml.padding_token_id")  # Phi3Config's
    # default (32000) is outside a smaller vocabulary
    return config


def _hf_config(config: dict[str, Any]):
    from transformers import AutoConfig

    values = {k: v for k, v in config.items() if k != "model_type"}
    return AutoConfig.for_model(config["model_type"], **values)


def tensor_names(config: dict[str, Any]) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face parameter name for a model of ``config``, from gguf-py's
    `TensorNameMap` over the parameters of that model (built on the meta device).

    >>> cfg = {"model_type": "llama", "vocab_size": 8, "hidden_size": 8,
    ...        "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}
    >>> tensor_names(cfg)["blk.0.attn_q.weight"]
    'model.layers.0.self_attn.q_proj.weight'
    """
    import gguf
    from transformers import AutoModelForCausalLM

    from edgequant.models.families import for_model_type

    family = for_model_type(config["model_type"])
    hf_config = _hf_config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    arch = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}[family.gguf_arch]
    names = gguf.get_tensor_name_map(arch, hf_config.num_hidden_layers)
    out = {}
    for key in model.state_dict():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is not None:
            out[name] = key
    return out


def read_state_dict(reader, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to float32, renamed, q/k rows un-permuted where the family's
    llama.cpp architecture permutes them."""
    tensors = weight_tensors(reader, config)
    return {
        name: read_tensor(tensor, name, config)
        for name, tensor in tqdm(
            tensors.items(), desc="dequantize GGUF", unit="tensor", leave=False
        )
    }


def weight_tensors(reader, config: dict[str, Any]) -> dict[str, Any]:
    """Hugging Face parameter name -> the GGUF file's tensor (gguf-py's ``ReaderTensor``, whose
    data is a view of the memory-mapped file: nothing is read until it is dequantized)."""
    from edgequant.models.families import for_model_type

    family = for_model_type(config["model_type"])
    names = tensor_names(config)
    out = {}
    for tensor in reader.tensors:
        if tensor.name in family.gguf_config_tensors:
            continue
        name = names.get(tensor.name)
        if name is None:
            raise ValueError(
                f"GGUF tensor {tensor.name!r} has no place in a {config['model_type']} model "
                f"(known: {', '.join(sorted(names)[:6])}, ...)"
            )
        out[name] = tensor
    return out


def read_tensor(tensor, name: str, config: dict[str, Any], data=None) -> torch.Tensor:
    """One GGUF tensor as the float32 Hugging Face parameter ``name``: dequantized, q/k rows
    un-permuted for families whose llama.cpp architecture permutes them, Gemma's norm shift
    undone. ``data``: the tensor's bytes as ``tensor.data`` holds them, read elsewhere (default:
    the reader's memory map)."""
    from gguf.quants import dequantize

    from edgequant.models.families import for_model_type

    family = for_model_type(config["model_type"])
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    data = tensor.data if data is None else data
    values = _dequantized(data, tensor.tensor_type, dequantize)
    if not values.flags.writeable:  # F32 tensors come straight from the read-only map
        values = values.copy()
    shape = [int(d) for d in reversed(tensor.shape.tolist())]  # GGUF lists dims inner-first
    w = torch.from_numpy(np.ascontiguousarray(values).reshape(shape))
    proj = name.rsplit(".", 2)[-2]
    if family.permute_qk and proj in heads and ".self_attn." in name:
        w = unpermute_qk(w, heads[proj])
    if family.gguf_norm_shift and tensor.name.endswith("norm.weight"):
        w = w - family.gguf_norm_shift  # llama.cpp's gemma stores 1 + w
    return w.contiguous()


def _dequantized(data: np.ndarray, kind, dequantize, block: int = 1 << 22) -> np.ndarray:
    """float32 values of a GGUF tensor's ``data`` (``[rows, bytes or values per row]``),
    dequantized a block of rows (about ``block`` values) at a time into one array: gguf's
    numpy dequantizers make several temporaries the size of what they dequantize (3.3 GB at
    once for Qwen2.5-1.5B's 151,936 x 1,536 Q4_K embedding)."""
    from gguf import GGMLQuantizationType

    if kind == GGMLQuantizationType.F32 or data.ndim < 2:
        return dequantize(data, kind).astype(np.float32, copy=False)
    from edgequant.primitives import by_row_blocks, rows_per_block

    step = rows_per_block(dequantize(data[:1], kind).size, block)
    return by_row_blocks(
        data.shape[0], step, lambda i, j: dequantize(data[i:j], kind).astype(np.float32)
    )


def build_model(config: dict[str, Any], state: dict[str, torch.Tensor]):
    """A float32 Hugging Face causal LM of ``config`` holding ``state`` (tied lm_head when the
    config says so). The model is built on the meta device and takes ``state``'s tensors as
    its parameters (no second copy: a 1.5B model peaks at its size, not twice it); modules whose
    buffers transformers computes in ``__init__`` (RoPE tables) are built again for real."""

    cfg = _hf_config(config)
    model = skeleton(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"GGUF weights do not fit the model: missing {missing}, unexpected {unexpected}"
        )
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise AssertionError(f"not loaded from the GGUF weights: {left}")
    return model.eval()


def skeleton(cfg) -> torch.nn.Module:
    """A float32 Hugging Face causal LM of the transformers config ``cfg`` whose parameters are
    on the meta device (no memory) and whose computed buffers (RoPE tables, Gemma's embedding
    factor) are real: parameters are assigned next (``load_state_dict(..., assign=True)``, or a
    decoder layer at a time by `edgequant.models.lazy`)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    for name, module in list(model.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        if hasattr(module, "scalar_embed_scale"):  # Gemma's scaled embedding: its factor
            module.register_buffer(
                "embed_scale", torch.tensor(module.scalar_embed_scale), persistent=False
            )
        else:  # RoPE tables
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, type(module)(config=cfg))
    return model.eval()


def load(path: str | Path, use_cache: bool = True):
    """``(model, tokenizer, info)`` from a GGUF file; float model cached under `cache_dir()`."""
    from edgequant.models.tokenizer import HFTokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    digest = sha256_file(path)
    cached = cache_dir() / "gguf" / digest
    info = {"family": "hf", "format": "gguf", "source": str(path), "sha256": digest}
    if use_cache and (cached / "model.safetensors").is_file():
        from safetensors.torch import load_file

        config = json.loads((cached / "config.json").read_text())
        model = build_model(config, load_file(str(cached / "model.safetensors")))
        tokenizer = HFTokenizer.load(cached / "tokenizer")
        log.info("loaded %s from the cache %s", path.name, cached)
        return model, tokenizer, {**info, "config": model.config.to_dict(), "cache": str(cached)}

    open_reader(path, tokenizer=True)  # a readable file with a vocabulary, before any work
    config, state = read_weights(path)
    model = build_model(config, state)
    tokenizer = HFTokenizer.from_gguf(path)
    if use_cache:
        _write_cache(cached, config, state, tokenizer)
    return model, tokenizer, {**info, "config": model.config.to_dict(), "cache": str(cached)}


def read_weights(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config, float state dict)`` of a GGUF file, without the tokenizer or any cache."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    reader = open_reader(path)
    config = read_config(reader)
    return config, read_state_dict(reader, config)


def open_reader(path: Path, tokenizer: bool = False):
    """gguf-py's reader over ``path``, after checking what it read: a header whose counts or
    lengths run past the file (gguf-py raises whatever numpy raises), tensors outside the data
    or overlapping each other, a dimension of 0 and (``tokenizer``) a file without a vocabulary
    are refused as ``ValueError`` naming the file."""
    import struct

    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError, TypeError, OverflowError, struct.error,
            MemoryError) as e:  # fmt: skip
        raise ValueError(
            f"{str(path)!r} is not a readable GGUF file: {type(e).__name__}: {e}"
        ) from None
    size = path.stat().st_size
    spans = []
    for t in reader.tensors:
        dims = [int(d) for d in t.shape.tolist()]
        if not dims or min(dims) <= 0:
            raise ValueError(
                f"{str(path)!r}: tensor {t.name!r} has shape {dims}; every dimension must be >= 1"
            )
        start, end = int(t.data_offset), int(t.data_offset) + int(t.n_bytes)
        if start < 0 or end > size:
            raise ValueError(
                f"{str(path)!r}: tensor {t.name!r} spans bytes {start}..{end} of a {size}-byte file"
            )
        spans.append((start, end, t.name))
    spans.sort()
    for (_, end, name), (start, _, other) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise ValueError(
                f"{str(path)!r}: tensors {name!r} and {other!r} overlap in the file "
                f"(byte {start} < {end})"
            )
    if tokenizer and "tokenizer.ggml.tokens" not in reader.fields:
        raise ValueError(
            f"{str(path)!r} has no tokenizer (no tokenizer.ggml.tokens); edgequant needs the "
            "vocabulary stored in the GGUF file"
        )
    return reader


def _write_cache(cached: Path, config: dict, state: dict[str, torch.Tensor], tokenizer) -> None:
    from safetensors.torch import save_file

    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cached.name}.", suffix=".tmp", dir=cached.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save(tmp / "tokenizer")
        publish_mode(tmp)
        if cached.exists():  # another process filled it meanwhile
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, cached)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
