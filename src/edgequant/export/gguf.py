"""Write a model (float or quantized by edgequant) as a GGUF file that llama.cpp runs.

The file is written with the ``gguf`` package's ``GGUFWriter``: llama.cpp's architecture
metadata, its tensor names, q/k rows permuted to its RoPE order, and the tokenizer (copied from a
source GGUF, or built from a llama2.c tokenizer). Packed layers go in bit for bit:

=============================================  ===========  =====================================
edgequant scheme                               GGUF type    block
=============================================  ===========  =====================================
int4, symmetric, group 32, fp16 scales         ``Q4_0``     fp16 ``d``, 32 nibbles ``q + 8``
int8, symmetric, group 32, fp16 scales         ``Q8_0``     fp16 ``d``, 32 int8 ``q``
fp16 / bf16 / fp32 (and float modules)         ``F16`` / ``BF16`` / ``F32``
=============================================  ===========  =====================================

Q4_0 computes ``d * (nibble - 8)``: edgequant's symmetric int4 ``q`` in [-8, 7] is ``nibble - 8``
one to one, and its fp16 scale is ``d``. Q8_0 holds ``d * q``. A scheme's activation mode does
not travel: llama.cpp's CPU kernels quantize activations themselves (to 8 bits in blocks of 32).
Any other scheme (per-channel int8, other groups, fp32 scales, asymmetric int4) has no exact
GGUF type: it is refused with the nearest exact scheme, or re-quantized with
``allow_requant=True`` (a warning gives each layer's added error).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgequant._io import atomic_path
from edgequant.export.pte import check_out
from edgequant.layers import QuantizedEmbedding, QuantizedLinear
from edgequant.schemes import Scheme

log = logging.getLogger(__name__)

# Model families the writer maps, by what `_describe` calls them.
SUPPORTED = ("llama (Hugging Face LlamaForCausalLM)", "llama2c (llama2.c / stories)")

_HF_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LLAMA2C_BLOCK = {
    "attention_norm": "attn_norm",
    "attention.wq": "attn_q",
    "attention.wk": "attn_k",
    "attention.wv": "attn_v",
    "attention.wo": "attn_output",
    "ffn_norm": "ffn_norm",
    "feed_forward.w1": "ffn_gate",
    "feed_forward.w3": "ffn_up",
    "feed_forward.w2": "ffn_down",
}


_LLAMA2C_TOP = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}
_HF_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


@dataclass(frozen=True)
class Hyper:
    """What llama.cpp's ``llama`` architecture reads from the metadata."""

    n_layers: int
    dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    norm_eps: float
    rope_theta: float
    tied: bool
    prefix: str  # decoder layers' FQN prefix
    block_names: dict
    top_names: dict  # module fqn -> GGUF base name


def _describe(model: nn.Module) -> Hyper:
    family = getattr(model, "edgequant_family", None)
    if family == "llama2c":
        a = model.args
        return Hyper(
            a.n_layers, a.dim, a.hidden_dim, a.n_heads, a.n_kv_heads, a.dim // a.n_heads,
            a.vocab_size, a.max_seq_len, a.norm_eps, a.rope_theta, a.tied_embedding, "layers",
            _LLAMA2C_BLOCK, _LLAMA2C_TOP,
        )  # fmt: skip
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type == "llama":
        c = config
        rope = (getattr(c, "rope_parameters", None) or {}).get("rope_theta") or getattr(
            c, "rope_theta", 10000.0
        )
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return Hyper(
            c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
            c.num_key_value_heads, head_dim, c.vocab_size, c.max_position_embeddings,
            c.rms_norm_eps, float(rope), bool(c.tie_word_embeddings), "model.layers", _HF_BLOCK,
            _HF_TOP,
        )  # fmt: skip
    what = model_type or family or type(model).__name__
    raise ValueError(
        f"architecture {what!r} has no GGUF mapping; supported: {', '.join(SUPPORTED)}"
    )


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


# ---- scheme -> GGUF type ---------------------------------------------------------------------


def exact_type(scheme: Scheme | None) -> str | None:
    """The GGUF type that holds ``scheme``'s values exactly (None: there is none).

    >>> exact_type(Scheme("int4", "per_group", 32, scale_dtype="fp16"))
    'Q4_0'
    >>> exact_type(Scheme("int8")) is None
    True
    """
    if scheme is None or scheme.weight == "fp32":
        return "F32"
    if scheme.weight in ("fp16", "bf16"):
        return {"fp16": "F16", "bf16": "BF16"}[scheme.weight]
    block = (
        scheme.granularity == "per_group"
        and scheme.group_size == 32
        and scheme.symmetric
        and scheme.scale_dtype == "fp16"
    )
    if block and scheme.weight == "int4":
        return "Q4_0"
    if block and scheme.weight == "int8":
        return "Q8_0"
    return None


def nearest_scheme(scheme: Scheme, cols: int = 32) -> Scheme:
    """The exact GGUF scheme closest to ``scheme`` for a weight of ``cols`` input features:
    int4 g32 sym fp16 (Q4_0) up to 4 bits, int8 g32 sym fp16 (Q8_0) above, fp16 (F16) when 32
    does not divide ``cols``.

    >>> nearest_scheme(Scheme("int8")).describe()
    'int8 g32 sym fp16-scales'
    >>> nearest_scheme(Scheme("int4", "per_group", 86), cols=172).describe()
    'fp16'
    """
    import dataclasses

    if cols % 32:
        return Scheme("fp16")
    weight = "int4" if scheme.bits <= 4 else "int8"
    return dataclasses.replace(
        scheme, weight=weight, granularity="per_group", group_size=32, symmetric=True,
        scale_dtype="fp16", algorithm="minmax", algorithm_params=(),
    )  # fmt: skip


def _q4_0_blocks(q: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """``[rows, cols // 32 * 18]`` bytes: per block fp16 ``d``, then byte ``j`` holds the
    nibbles of elements ``j`` (low) and ``j + 16`` (high), each ``q + 8``."""
    rows, cols = q.shape
    n = (q.to(torch.int16) + 8).to(torch.uint8).reshape(rows, cols // 32, 2, 16)
    packed = (n[:, :, 0] | (n[:, :, 1] << 4)).numpy()
    scales = d.to(torch.float16).reshape(rows, cols // 32, 1).numpy().view(np.uint8)
    return np.concatenate([scales, packed], axis=-1).reshape(rows, -1)


def _q8_0_blocks(q: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    rows, cols = q.shape
    values = q.to(torch.int8).reshape(rows, cols // 32, 32).numpy().view(np.uint8)
    scales = d.to(torch.float16).reshape(rows, cols // 32, 1).numpy().view(np.uint8)
    return np.concatenate([scales, values], axis=-1).reshape(rows, -1)


@dataclass
class _Tensor:
    name: str
    data: np.ndarray
    gguf_type: str  # F32, F16, BF16, Q4_0, Q8_0
    fqn: str


def _encode(fqn: str, module: nn.Module, permute: int | None, allow_requant: bool, requant):
    """``(data, type)`` of one module's weight; ``requant`` collects re-quantized layers."""
    if isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
        scheme = module.scheme
        kind = exact_type(scheme)
        if kind in ("Q4_0", "Q8_0"):
            q, d = module.int_weight(), module.scale
            if permute:
                q, d = permute_qk(q, permute), permute_qk(d, permute)
            blocks = _q4_0_blocks if kind == "Q4_0" else _q8_0_blocks
            return blocks(q, d), kind
        weight = module.dequantized_weight(torch.float32)
        if kind is None:
            target = exact_type(nearest_scheme(scheme, weight.shape[1]))
            if not allow_requant:
                return None, (scheme, weight.shape[1])
            return _requantize(fqn, weight, target, permute, requant), target
        values = weight.to(torch.float16 if kind == "F16" else torch.float32)
    else:
        values = module.weight.detach().float()
        kind = "F32"
    if permute:
        values = permute_qk(values, permute)
    if kind == "BF16":
        bits = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
        return bits.reshape(values.shape[0], -1), kind
    return values.contiguous().numpy(), kind


def _requantize(fqn, weight, target, permute, requant) -> np.ndarray:
    import gguf
    from edgequant.primitives import sqnr

    qtype = gguf.GGMLQuantizationType[target]
    w = permute_qk(weight, permute) if permute else weight
    if target == "F16":
        data = w.to(torch.float16).numpy()
        back = torch.from_numpy(data).float()
    else:
        data = gguf.quants.quantize(w.numpy(), qtype)
        back = torch.from_numpy(gguf.quants.dequantize(data, qtype).copy()).reshape(w.shape)
    requant.append((fqn, target, sqnr(w, back)))
    return data


def _tensors(model: nn.Module, h: Hyper, allow_requant: bool) -> tuple[list[_Tensor], list]:
    layers: list[_Tensor] = []
    refused: list[tuple[str, tuple[Scheme, int]]] = []
    requant: list[tuple[str, str, float]] = []
    modules = dict(model.named_modules())

    def add(fqn: str, name: str, permute: int | None = None) -> None:
        module = modules.get(fqn)
        if module is None:
            raise ValueError(f"the model has no module {fqn!r} ({name} in GGUF)")
        data, kind = _encode(fqn, module, permute, allow_requant, requant)
        if data is None:
            refused.append((fqn, kind))
            return
        layers.append(_Tensor(f"{name}.weight", data, kind, fqn))

    top = dict(h.top_names)
    emb_fqn, norm_fqn, out_fqn = list(top)
    add(emb_fqn, "token_embd")
    for i in range(h.n_layers):
        for part, name in h.block_names.items():
            permute = {"attn_q": h.n_heads, "attn_k": h.n_kv_heads}.get(name)
            add(f"{h.prefix}.{i}.{part}", f"blk.{i}.{name}", permute)
    add(norm_fqn, "output_norm")
    if not _tied(modules.get(emb_fqn), modules.get(out_fqn)):
        add(out_fqn, "output")
    if refused:
        listed = "; ".join(
            f"{fqn} ({s.describe()}; nearest exact: {nearest_scheme(s, cols).describe()} = "
            f"{exact_type(nearest_scheme(s, cols))})"
            for fqn, (s, cols) in refused[:6]
        )
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise ValueError(
            f"GGUF has no exact type for {len(refused)} layer(s): {listed}{more}. Exact: int4 g32 "
            "sym fp16-scales (Q4_0), int8 g32 sym fp16-scales (Q8_0), fp16, bf16, fp32; "
            "quantize with such a recipe, or pass allow_requant=True (--allow-requant) to "
            "re-quantize them with llama.cpp's own rounding"
        )
    for fqn, target, db in requant:
        log.warning("%s re-quantized to %s: %.1f dB against edgequant's values", fqn, target, db)
    return layers, requant


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


# ---- tokenizer ---------------------------------------------------------------------------------


def _copy_tokenizer(writer, source: str | Path) -> None:
    """Every ``tokenizer.*`` key of the GGUF file ``source``, as it is there."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    copied = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), vtype)
        copied += 1
    if copied == 0:
        raise ValueError(f"{str(source)!r} holds no tokenizer (no tokenizer.* metadata)")


def _llama2c_tokenizer(writer, tokenizer) -> None:
    """llama2.c's sentencepiece-style vocabulary as llama.cpp's ``llama`` (SPM) tokenizer."""
    import gguf

    tokens, types = [], []
    for i, piece in enumerate(tokenizer.pieces):
        if i == 0:
            tokens.append("<unk>")
            types.append(gguf.TokenType.UNKNOWN)
        elif i in (tokenizer.bos_id, tokenizer.eos_id):
            tokens.append("<s>" if i == tokenizer.bos_id else "</s>")
            types.append(gguf.TokenType.CONTROL)
        elif tokenizer._BYTE_PIECE.fullmatch(piece):
            tokens.append(piece.decode())
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(piece.decode("utf-8", errors="replace").replace(" ", "\u2581"))
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([float(s) for s in tokenizer.scores])
    writer.add_token_types(types)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


# ---- the writer --------------------------------------------------------------------------------


def to_gguf(
    model: nn.Module,
    out: str | Path,
    *,
    tokenizer=None,
    tokenizer_gguf: str | Path | None = None,
    name: str | None = None,
    allow_requant: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (float, or quantized by `edgequant.quantize` / loaded from a bundle) to
    ``out`` as a GGUF file llama.cpp runs; returns the path.

    The tokenizer comes from ``tokenizer_gguf`` (a GGUF file whose ``tokenizer.*`` metadata,
    chat template included, is copied) or from ``tokenizer`` (a llama2.c tokenizer). The file is
    written to a temporary name beside ``out`` and renamed; an existing ``out`` is refused
    unless ``overwrite``."""
    import gguf

    out = Path(out)
    check_out(out, overwrite, ".gguf")
    h = _describe(model)
    tensors, requant = _tensors(model, h, allow_requant)
    if tokenizer_gguf is None and tokenizer is None:
        raise ValueError(
            "a GGUF file needs a tokenizer: pass tokenizer_gguf= (a GGUF file to copy it from, "
            "e.g. the model's source) or tokenizer= (a llama2.c tokenizer)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(name or out.stem)
        writer.add_context_length(h.context_length)
        writer.add_embedding_length(h.dim)
        writer.add_block_count(h.n_layers)
        writer.add_feed_forward_length(h.hidden_dim)
        writer.add_head_count(h.n_heads)
        writer.add_head_count_kv(h.n_kv_heads)
        writer.add_layer_norm_rms_eps(float(h.norm_eps))
        writer.add_rope_freq_base(float(h.rope_theta))
        writer.add_rope_dimension_count(h.head_dim)
        writer.add_vocab_size(h.vocab_size)
        writer.add_file_type(_file_type(tensors))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if tokenizer_gguf is not None:
            _copy_tokenizer(writer, tokenizer_gguf)
        else:
            _llama2c_tokenizer(writer, tokenizer)
        for t in tensors:
            qtype = gguf.GGMLQuantizationType[t.gguf_type]
            raw = t.data.dtype == np.uint8
            writer.add_tensor(t.name, t.data, raw_dtype=qtype if raw else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def _file_type(tensors: list[_Tensor]) -> int:
    import gguf

    counts: dict[str, int] = {}
    for t in tensors:
        if t.name.startswith("blk."):
            counts[t.gguf_type] = counts.get(t.gguf_type, 0) + t.data.size
    common = max(counts, key=counts.get) if counts else "F32"
    table = {
        "F32": gguf.LlamaFileType.ALL_F32,
        "F16": gguf.LlamaFileType.MOSTLY_F16,
        "BF16": gguf.LlamaFileType.MOSTLY_BF16,
        "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    return int(table[common])


def read_layers(path: str | Path) -> dict[str, Any]:
    """``{tensor name: (GGUF type name, raw bytes as numpy)}`` of a GGUF file, for checks."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, np.array(t.data)) for t in reader.tensors}


# ---- llama.cpp's own quantizer: K-quants, IQ types, importance matrices ------------------------


def tensor_names(model: nn.Module) -> dict[str, str]:
    """Module FQN -> GGUF tensor name of every weight `to_gguf` writes."""
    h = _describe(model)
    emb, norm, out = list(h.top_names)
    names = {emb: "token_embd.weight", norm: "output_norm.weight", out: "output.weight"}
    for i in range(h.n_layers):
        for part, name in h.block_names.items():
            names[f"{h.prefix}.{i}.{part}"] = f"blk.{i}.{name}.weight"
    return names


@torch.no_grad()
def importance_matrix(model: nn.Module, calibration) -> tuple[dict[str, np.ndarray], int]:
    """llama.cpp's importance matrix from ``calibration`` (token batches, e.g.
    `edgequant.calibration.wikitext`): for every linear's GGUF tensor, the sum of each input
    column's squared activations over every calibration token (what ``llama-imatrix`` sums),
    and the number of tokens. The model should be the float one."""
    from edgequant.eval import progress_bar
    from edgequant.layerwise import run_model

    names = tensor_names(model)
    sums: dict[str, torch.Tensor] = {}
    handles = []
    rows = {"n": 0}

    def hook(name):
        def add(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + (x * x).sum(0).double()
            if name.startswith("blk.0.attn_q"):
                rows["n"] += x.shape[0]

        return add

    modules = dict(model.named_modules())
    for fqn, name in names.items():
        module = modules.get(fqn)
        if isinstance(module, (nn.Linear, QuantizedLinear)):
            handles.append(module.register_forward_hook(hook(name)))
    batches = list(calibration)
    try:
        for ids in progress_bar(batches, len(batches), "importance matrix", "batch"):
            run_model(model, ids)
    finally:
        for h in handles:
            h.remove()
    return {name: v.float().numpy() for name, v in sums.items()}, rows["n"]


def write_imatrix(
    path: str | Path, sums: dict[str, np.ndarray], tokens: int, *, dataset: str, chunk_size: int
) -> Path:
    """An importance matrix in llama.cpp's GGUF imatrix format (``general.type`` imatrix;
    ``<tensor>.in_sum2`` sums of squared activations, ``<tensor>.counts`` tokens), for
    ``llama-quantize --imatrix``; written to a temporary name and renamed."""
    import gguf

    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "")
        writer.add_key_value("general.type", "imatrix", gguf.GGUFValueType.STRING)
        writer.add_key_value("imatrix.datasets", [dataset], gguf.GGUFValueType.ARRAY,
                             sub_type=gguf.GGUFValueType.STRING)  # fmt: skip
        chunks = max(1, tokens // max(chunk_size, 1))
        writer.add_key_value("imatrix.chunk_count", chunks, gguf.GGUFValueType.UINT32)
        writer.add_key_value("imatrix.chunk_size", chunk_size, gguf.GGUFValueType.UINT32)
        for name, values in sums.items():
            writer.add_tensor(f"{name}.in_sum2", values.astype(np.float32).reshape(1, -1))
            writer.add_tensor(f"{name}.counts", np.array([[float(tokens)]], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def llama_quantize(
    source: str | Path,
    out: str | Path,
    file_type: str,
    *,
    tensor_types: dict[str, str] | None = None,
    imatrix: tuple[dict[str, np.ndarray], int] | None = None,
    pure: bool = False,
    threads: int | None = None,
    overwrite: bool = False,
) -> Path:
    """llama.cpp's own quantizer (``llama_model_quantize``, through llama-cpp-python) on a float
    GGUF file ``source`` (e.g. `to_gguf` of a float or fp16 model), as ``llama-quantize`` runs
    it: ``file_type`` is one of llama.cpp's mixes (``Q4_0``, ``Q4_K_M``, ``IQ4_NL``, ``Q8_0``,
    ...); ``tensor_types`` maps a regex over tensor names to a GGML type (``{"attn_v": "Q8_0"}``,
    its ``--tensor-type``); ``imatrix`` is `importance_matrix`'s result (its ``--imatrix``);
    ``pure`` gives every tensor the mix's base type (``--pure``). K-quants need rows divisible by
    256; llama.cpp falls back to another type for the others and says so in its log."""
    import ctypes

    import llama_cpp

    import gguf
    from edgequant.export.pte import check_out

    out = check_out(out, overwrite, ".gguf")
    try:
        ftype = int(gguf.LlamaFileType[f"MOSTLY_{file_type.upper()}"])
    except KeyError:
        known = [t.name[7:] for t in gguf.LlamaFileType if t.name.startswith("MOSTLY_")]
        raise ValueError(f"llama.cpp has no file type {file_type!r}; known: {known}") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or torch.get_num_threads()
    params.pure = pure
    params.allow_requantize = True  # a quantized source is dequantized and quantized again
    keep: list = []  # ctypes buffers that must outlive the call
    if tensor_types:
        entries = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (pattern, type_name) in enumerate(tensor_types.items()):
            try:
                type_id = int(gguf.GGMLQuantizationType[type_name.upper()])
            except KeyError:
                raise ValueError(
                    f"tensor type {type_name!r} (for {pattern!r}) is not a GGML type; e.g. "
                    "Q4_0, Q8_0, Q4_K, Q6_K, IQ4_NL, F16"
                ) from None
            pattern_bytes = ctypes.c_char_p(pattern.encode())
            keep.append(pattern_bytes)
            entries[i].pattern, entries[i].type = pattern_bytes.value, type_id
        params.tt_overrides = entries
        keep.append(entries)
    if imatrix is not None:
        sums, tokens = imatrix
        data = (llama_cpp.llama_model_imatrix_data * (len(sums) + 1))()
        for i, (name, values) in enumerate(sums.items()):
            mean = np.ascontiguousarray(values / max(tokens, 1), dtype=np.float32)
            keep.append(mean)
            data[i].name = name.encode()
            data[i].data = mean.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            data[i].size = mean.size
        params.imatrix = data
        keep.append(data)
    with atomic_path(out) as tmp:
        failed = llama_cpp.llama_model_quantize(
            str(source).encode(), str(tmp).encode(), ctypes.byref(params)
        )
        if failed:
            raise ValueError(f"llama.cpp could not quantize {str(source)!r} to {file_type}")
    return out


__all__ = [
    "SUPPORTED",
    "exact_type",
    "importance_matrix",
    "llama_quantize",
    "nearest_scheme",
    "permute_qk",
    "read_layers",
    "tensor_names",
    "to_gguf",
    "write_imatrix",
]
