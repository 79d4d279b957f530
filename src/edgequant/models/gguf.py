"""Load a GGUF file (llama.cpp's format) as a float Hugging Face model plus its tokenizer.

Weights are read and dequantized with the ``gguf`` package, renamed from llama.cpp's tensor
names to Hugging Face's, and the q/k rows are permuted back from llama.cpp's RoPE order to the
rotate-half order that transformers' Llama uses. The tokenizer is built from the GGUF metadata
by transformers (no download). The float model is cached as safetensors, keyed by the GGUF
file's sha256, so a second load takes seconds.
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

SUPPORTED_ARCHITECTURES = ("llama",)
# llama.cpp tensor name (inside blk.N.) -> Hugging Face Llama name (inside model.layers.N.)
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def cache_dir() -> Path:
    """``$EDGEQUANT_CACHE_DIR`` or ``~/.cache/edgequant``."""
    return Path(os.environ.get("EDGEQUANT_CACHE_DIR", Path.home() / ".cache" / "edgequant"))


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (its RoPE pairs adjacent rows; HF rotates halves).

    >>> w = torch.arange(8.0).reshape(8, 1)  # one head of 8 rows: llama.cpp order 0..7
    >>> unpermute_qk(w, 1).flatten().tolist()
    [0.0, 2.0, 4.0, 6.0, 1.0, 3.0, 5.0, 7.0]
    """
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_config(reader) -> dict[str, Any]:
    """A transformers ``LlamaConfig`` dict from the GGUF metadata; refuses other architectures."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def need(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}; cannot build the model")
        return value

    n_head = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = _field(reader, f"{arch}.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", n_head)),
        "head_dim": int(_field(reader, f"{arch}.rope.dimension_count", hidden // n_head)),
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        },
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }


def hf_name(gguf_name: str) -> str:
    """llama.cpp tensor name -> Hugging Face Llama parameter name.

    >>> hf_name("blk.3.attn_q.weight"), hf_name("token_embd.weight")
    ('model.layers.3.self_attn.q_proj.weight', 'model.embed_tokens.weight')
    """
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face Llama counterpart")


def read_state_dict(reader, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to float32, renamed, q/k rows un-permuted."""
    from gguf.quants import dequantize

    out = {}
    for tensor in tqdm(reader.tensors, desc="dequantize GGUF", unit="tensor", leave=False):
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        if not values.flags.writeable:  # F32 tensors come straight from the read-only map
            values = values.copy()
        shape = [int(d) for d in reversed(tensor.shape.tolist())]  # GGUF lists dims inner-first
        w = torch.from_numpy(np.ascontiguousarray(values).reshape(shape))
        name = hf_name(tensor.name)
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_qk(w, config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_qk(w, config["num_key_value_heads"])
        out[name] = w.contiguous()
    return out


def build_model(config: dict[str, Any], state: dict[str, torch.Tensor]):
    """A float32 ``LlamaForCausalLM`` holding ``state`` (tied lm_head when the config says so)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{k: v for k, v in config.items() if k not in ("model_type",)})
    model = LlamaForCausalLM(cfg).float().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"GGUF weights do not fit the model: missing {missing}, unexpected {unexpected}"
        )
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


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

    config, state = read_weights(path)
    model = build_model(config, state)
    tokenizer = HFTokenizer.from_gguf(path)
    if use_cache:
        _write_cache(cached, config, state, tokenizer)
    return model, tokenizer, {**info, "config": model.config.to_dict(), "cache": str(cached)}


def read_weights(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config, float state dict)`` of a GGUF file, without the tokenizer or any cache."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise ValueError(f"{str(path)!r} is not a readable GGUF file: {e}") from None
    config = read_config(reader)
    return config, read_state_dict(reader, config)


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
