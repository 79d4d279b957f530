"""Write a model (float or quantized by edgequant) as a GGUF file that llama.cpp runs.

The file is written with the ``gguf`` package's ``GGUFWriter`` (`to_gguf`) as the model
family's own llama.cpp architecture (llama, qwen2, qwen3, gemma3, phi3:
`edgequant.models.families`): its metadata from the decoder's spec, its tensor names from
gguf-py's ``TensorNameMap`` (`layout`, `tensor_names`), q/k rows permuted to its RoPE order
where the architecture wants it (`permute_qk`), and the tokenizer
(`edgequant.export.gguf_tokenizer`: copied from a source GGUF, built from a llama2.c tokenizer
or from a Hugging Face ``tokenizer.json``); `read_layers` reads a written file's tensors back.
How each weight is encoded (packed layers bit for bit as ``Q4_0`` / ``Q5_0`` / ``Q8_0`` /
``F16`` / ``BF16``, other schemes refused or re-quantized with ``allow_requant=True``) is in
`edgequant.export.gguf_blocks`; llama.cpp's own quantizer and importance matrix are in
`edgequant.export.llama_quantize`.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgequant._io import atomic_path
from edgequant.export.common import check_out
from edgequant.export.gguf_blocks import encode, exact_type, file_type, nearest_scheme
from edgequant.layers import QuantizedEmbedding, QuantizedLinear
from edgequant.models.decoder import RMSNorm
from edgequant.models.families import Family
from edgequant.models.spec import DecoderSpec
from edgequant.schemes import Scheme

_PACKED = (QuantizedLinear, QuantizedEmbedding)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """Where each weight of ``model`` goes in a GGUF file: its family (llama.cpp
    architecture, q/k row order), its decoder's spec, and every decoder module with the
    model's own name for it and the GGUF tensor name (from gguf-py's ``TensorNameMap``)."""

    family: Family
    spec: DecoderSpec
    modules: list[tuple[nn.Module, str, str]]  # (module, model FQN, GGUF base name)
    output: str | None  # GGUF base name of the lm_head, None when tied to the embedding


def layout(model: nn.Module) -> Layout:
    """The `Layout` of ``model`` (a `Decoder` or a Hugging Face model of a known family)."""
    import gguf

    from edgequant.models.families import decoder_of, for_model

    family = for_model(model)
    decoder = decoder_of(model)
    spec = decoder.spec
    arch = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}[family.gguf_arch]
    names = gguf.get_tensor_name_map(arch, spec.n_layers)
    modules = []
    for name, module in decoder.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding, RMSNorm, *_PACKED)):
            continue
        fqn = name if model is decoder else family.hf_name(name)
        base = names.get_name(fqn)
        if base is None:
            raise ValueError(
                f"{fqn} has no tensor name in llama.cpp's {family.gguf_arch!r} architecture"
            )
        modules.append((module, fqn, base))
    tied = _tied(decoder.tok_embeddings, decoder.output)
    output = None if tied else next(base for m, _, base in modules if m is decoder.output)
    if tied:
        modules = [entry for entry in modules if entry[0] is not decoder.output]
    return Layout(family, spec, modules, output)


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows from the rotate-half order (Hugging Face, edgequant's llama2.c model) to llama.cpp's
    adjacent-pair RoPE order; the inverse of `edgequant.models.gguf.unpermute_qk`. Works on any
    tensor with one row per output feature (weights, integers, scales).

    >>> permute_qk(torch.arange(8.0).reshape(8, 1), 1).flatten().tolist()
    [0.0, 4.0, 1.0, 5.0, 2.0, 6.0, 3.0, 7.0]
    """
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_head, 2, rows // n_head // 2, *rest).transpose(1, 2).reshape(rows, *rest)


@dataclass
class _Tensor:
    name: str
    data: np.ndarray
    gguf_type: str  # F32, F16, BF16, Q4_0, Q5_0, Q8_0
    fqn: str


@dataclass
class _Header:
    """A tensor's facts for the file's header, without its values."""

    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int
    size: int


def _tensors(lay: Layout, allow_requant: bool) -> tuple[list[_Tensor], list]:
    """Every tensor's header facts (``data`` a `_Header`: each is encoded and dropped, so one
    is in memory at a time) and the re-quantized layers; raises naming the layers GGUF cannot
    hold."""
    refused: list[tuple[str, tuple[Scheme, int]]] = []
    requant: list[tuple[str, str, float]] = []
    layers = [
        _Tensor(t.name, _Header(tuple(t.data.shape), t.data.dtype, t.data.nbytes, t.data.size),
                t.gguf_type, t.fqn)
        for t in _encoded(lay, allow_requant, refused, requant)
    ]  # fmt: skip
    if refused:
        listed = "; ".join(
            f"{fqn} ({s.describe()}; nearest exact: {nearest_scheme(s, cols).describe()} = "
            f"{exact_type(nearest_scheme(s, cols))})"
            for fqn, (s, cols) in refused[:6]
        )
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise ValueError(
            f"GGUF has no exact type for {len(refused)} layer(s): {listed}{more}. Exact: int4 g32 "
            "sym fp16-scales (Q4_0), int5 g32 sym fp16-scales (Q5_0), int8 g32 sym fp16-scales "
            "(Q8_0), fp16, bf16, fp32; "
            "quantize with such a recipe, or pass allow_requant=True (--allow-requant) to "
            "re-quantize them with llama.cpp's own rounding"
        )
    for fqn, target, db in requant:
        log.warning("%s re-quantized to %s: %.1f dB against edgequant's values", fqn, target, db)
    return layers, requant


def _encoded(lay: Layout, allow_requant: bool, refused: list, requant: list) -> Iterator[_Tensor]:
    """The file's tensors in order, each encoded when it is asked for (one in memory at a
    time); a layer GGUF cannot hold goes to ``refused``, a re-quantized one to ``requant``."""
    spec = lay.spec
    q_scale = _q_scale(lay)
    for module, fqn, base in lay.modules:
        permute = None
        kind = base.rsplit(".", 1)[-1]
        heads = {"attn_q": spec.n_heads, "attn_k": spec.n_kv_heads}.get(kind)
        if heads and lay.family.permute_qk:
            permute = functools.partial(permute_qk, n_head=heads)
        if isinstance(module, RMSNorm):  # llama.cpp multiplies by the stored weight itself
            values = module.weight.detach().float() + module.offset
            if kind == "attn_q_norm" and q_scale != 1.0:
                values = values * q_scale
            yield _Tensor(f"{base}.weight", values.numpy(), "F32", fqn)
            continue
        data, kind = encode(fqn, module, permute, allow_requant, requant)
        if data is None:
            refused.append((fqn, kind))
            continue
        yield _Tensor(f"{base}.weight", data, kind, fqn)
        bias = getattr(module, "bias", None)
        if bias is not None:
            bias = bias.detach().float()
            yield _Tensor(f"{base}.bias", (permute(bias) if permute else bias).numpy(), "F32", fqn)
    for name, values in lay.family.gguf_tensors(spec).items():
        yield _Tensor(name, np.asarray(values, dtype=np.float32), "F32", name)


def _q_scale(lay: Layout) -> float:
    """The factor on q that makes llama.cpp's attention scale the spec's: 1 when they agree;
    else folded into the q norm (q scaled before RoPE scales the logits alike), and refused
    for a family without one."""
    spec = lay.spec
    runtime = lay.family.gguf_attention_scale(spec)
    if math.isclose(spec.scale, runtime, rel_tol=1e-7):
        return 1.0
    if not spec.qk_norm:
        raise ValueError(
            f"llama.cpp's {lay.family.gguf_arch!r} scales attention logits by {runtime:.6g}, "
            f"the model by {spec.scale:.6g}; without a q norm to carry the difference GGUF "
            "cannot hold it"
        )
    return spec.scale / runtime


def _tied(embedding: nn.Module | None, output: nn.Module | None) -> bool:
    """Whether the lm_head reads the embedding's own values (llama.cpp then omits output)."""
    if embedding is None or output is None:
        return output is None
    if isinstance(embedding, QuantizedEmbedding) and isinstance(output, QuantizedLinear):
        a, b = embedding.packed_buffers(), output.packed_buffers()
        return all(a[k] is b.get(k) for k in a)
    if isinstance(embedding, nn.Embedding) and isinstance(output, nn.Linear):
        return embedding.weight is output.weight
    return False


# ---- the writer --------------------------------------------------------------------------------


def to_gguf(
    model: nn.Module,
    out: str | Path,
    *,
    tokenizer=None,
    tokenizer_gguf: str | Path | None = None,
    tokenizer_pre: str | None = None,
    name: str | None = None,
    allow_requant: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (float, or quantized by `edgequant.quantize` / loaded from a bundle; any
    family in `edgequant.models.families`) to ``out`` as a GGUF file llama.cpp runs as the
    family's own architecture; returns the path.

    The tokenizer comes from ``tokenizer_gguf`` (a GGUF file whose ``tokenizer.*`` metadata,
    chat template included, is copied) or from ``tokenizer``: a llama2.c tokenizer, or a
    Hugging Face one (`edgequant.models.tokenizer.HFTokenizer`, converted by
    `edgequant.export.gguf_tokenizer.add_hf_tokenizer`; ``tokenizer_pre`` names llama.cpp's
    pre-tokenizer, by default the family's). The file is written to a temporary name beside
    ``out`` and renamed; an existing ``out`` is refused unless ``overwrite``."""
    import gguf

    from edgequant.export import gguf_tokenizer

    out = Path(out)
    check_out(out, overwrite, ".gguf")
    lay = layout(model)
    spec = lay.spec
    scaling = spec.rope_scaling
    tensor_rope = scaling is not None and scaling.type in ("llama3", "longrope")
    if tensor_rope and not lay.family.gguf_tensors(spec):
        raise ValueError(
            f"{scaling.type} rope scaling has no GGUF form in llama.cpp's "
            f"{lay.family.gguf_arch!r} architecture (edgequant writes llama3 as rope_freqs for "
            "llama, longrope as rope_factors_long / _short for phi3)"
        )
    lay.family.gguf_metadata(None, spec)  # refuses what the architecture cannot run, first
    tensors, requant = _tensors(lay, allow_requant)
    if tokenizer_gguf is None and tokenizer is None:
        raise ValueError(
            "a GGUF file needs a tokenizer: pass tokenizer_gguf= (a GGUF file to copy it from, "
            "e.g. the model's source) or tokenizer= (the model's llama2.c or Hugging Face "
            "tokenizer)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), lay.family.gguf_arch)
        writer.add_name(name or out.stem)
        writer.add_context_length(spec.max_seq_len)
        writer.add_embedding_length(spec.dim)
        writer.add_block_count(spec.n_layers)
        writer.add_feed_forward_length(spec.hidden_dim)
        writer.add_head_count(spec.n_heads)
        writer.add_head_count_kv(spec.n_kv_heads)
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
        writer.add_layer_norm_rms_eps(float(spec.norm_eps))
        writer.add_rope_freq_base(float(spec.rope_theta))
        writer.add_rope_dimension_count(spec.rotary_dim)
        if spec.rope_scaling is not None and spec.rope_scaling.type == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(spec.rope_scaling.factor)
        lay.family.gguf_metadata(writer, spec)
        writer.add_vocab_size(spec.vocab_size)
        writer.add_file_type(file_type(tensors))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if tokenizer_gguf is not None:
            gguf_tokenizer.copy_tokenizer(writer, tokenizer_gguf)
        elif hasattr(tokenizer, "pieces"):  # llama2.c's tok*.bin
            gguf_tokenizer.add_llama2c_tokenizer(writer, tokenizer)
        else:
            pre = tokenizer_pre or lay.family.gguf_pre
            gguf_tokenizer.add_hf_tokenizer(writer, tokenizer, pre=pre, vocab_size=spec.vocab_size)
        for t in tensors:
            qtype = gguf.GGMLQuantizationType[t.gguf_type]
            raw = t.data.dtype == np.uint8
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes,
                                   raw_dtype=qtype if raw else None)  # fmt: skip
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        # encoded again, one at a time: the file's data never all in memory
        for t, header in zip(_encoded(lay, allow_requant, [], []), tensors, strict=True):
            if t.name != header.name or t.data.nbytes != header.data.nbytes:
                raise AssertionError(f"{t.name}: encoded differently the second time")
            writer.write_tensor_data(t.data)
        writer.close()
    return out


def read_layers(path: str | Path) -> dict[str, Any]:
    """``{tensor name: (GGUF type name, raw bytes as numpy)}`` of a GGUF file, for checks."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, np.array(t.data)) for t in reader.tensors}


def tensor_names(model: nn.Module) -> dict[str, str]:
    """Module FQN (the model's own) -> GGUF tensor name of every weight `to_gguf` writes."""
    lay = layout(model)
    names = {fqn: f"{base}.weight" for _, fqn, base in lay.modules}
    if lay.output is None:  # tied: llama.cpp computes the head with token_embd; the lm_head
        # still gets a name, as the importance matrix has always summed its inputs under it
        from edgequant.models.families import decoder_of

        head = decoder_of(model).output
        fqn = next((n for n, m in model.named_modules() if m is head), None)
        if fqn is not None:
            names[fqn] = "output.weight"
    return names


__all__ = ["Layout", "layout", "permute_qk", "read_layers", "tensor_names", "to_gguf"]
