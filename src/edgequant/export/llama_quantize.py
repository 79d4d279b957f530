"""llama.cpp's own quantizer (K-quants, IQ types, per-tensor types) and its importance matrix.

`llama_quantize` runs ``llama_model_quantize`` (through llama-cpp-python) on a float GGUF file
written by `edgequant.export.gguf.to_gguf`; `importance_matrix` sums what ``llama-imatrix``
sums from edgequant's calibration data, and `write_imatrix` writes it in llama.cpp's format.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgequant._io import atomic_path
from edgequant._progress import progress_bar
from edgequant.export.common import check_out
from edgequant.export.gguf import tensor_names
from edgequant.layers import QuantizedLinear


@torch.no_grad()
def importance_matrix(model: nn.Module, calibration) -> tuple[dict[str, np.ndarray], int]:
    """llama.cpp's importance matrix from ``calibration`` (token batches, e.g.
    `edgequant.calibration.wikitext`): for every linear's GGUF tensor, the sum of each input
    column's squared activations over every calibration token (what ``llama-imatrix`` sums),
    and the number of tokens. The model should be the float one."""
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

    import gguf
    import llama_cpp

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


__all__ = ["importance_matrix", "llama_quantize", "write_imatrix"]
