"""Anchors: each runtime's own 4-bit route, applied to the same float weights the main job
quantized, so the recipe card can put edgequant's files beside what a user of each toolchain
would get without edgequant (``edgequant quantize --targets ... --compare-anchors``).

- ``executorch-8da4w``: torchao's ``Int8DynamicActivationIntxWeightConfig`` (int4, group 32,
  min-max "affine" rounding) on every decoder linear, the embedding float: the source transform
  ExecuTorch's LLM export applies; written as a ``.pte`` (XNNPACK).
- ``litert-torch-int4``: litert-torch's own route: its re-authored SmolLM2 example converted by
  its converter with ``quantize="dynamic_int4_block32"`` (it has an example for SmolLM2-135M
  only here; other models are skipped with that reason).
- ``llama.cpp-Q4_0`` and ``llama.cpp-Q4_0-imatrix``: llama.cpp's own quantizer on the float
  model's F32 GGUF file, the second with an importance matrix from `IMATRIX_DATA`.

An anchor whose toolchain is not installed, or that cannot take the model, is skipped with the
reason.
"""

from __future__ import annotations

import copy
import importlib.machinery
import importlib.util
import logging
import sys
import tempfile
import types
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from edgequant._progress import progress_bar
from edgequant.targets import file_row, parse_names, write

log = logging.getLogger(__name__)

# name -> (runtime, file written in the bundle folder, module the route needs)
ANCHORS: dict[str, tuple[str, str, str]] = {
    "executorch-8da4w": ("ExecuTorch (XNNPACK)", "anchor-executorch-8da4w.pte", "torchao"),
    "litert-torch-int4": ("LiteRT (XNNPACK)", "anchor-litert-torch-int4.tflite", "litert_torch"),
    "llama.cpp-Q4_0": ("llama.cpp", "anchor-llama.cpp-Q4_0.gguf", "llama_cpp"),
    "llama.cpp-Q4_0-imatrix": ("llama.cpp", "anchor-llama.cpp-Q4_0-imatrix.gguf", "llama_cpp"),
}
IMATRIX_DATA = "wikitext:32x512"  # past the evaluation windows, as every calibration default
LITERT_PREFILL = 32


def parse(text: str | Sequence[str] | None) -> list[str]:
    """Anchor names from ``"all"`` or a comma-separated list.

    >>> parse("all")[:2]
    ['executorch-8da4w', 'litert-torch-int4']
    >>> parse("gptq")
    Traceback (most recent call last):
    ...
    ValueError: unknown anchor 'gptq'; anchors: executorch-8da4w, litert-torch-int4, \
llama.cpp-Q4_0, llama.cpp-Q4_0-imatrix (or all)
    """
    return parse_names(text, list(ANCHORS), "anchor")


def missing(name: str) -> str | None:
    """Why the anchor's toolchain cannot run here (None: it can)."""
    module = ANCHORS[name][2]
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed (the {name} anchor runs it)"
    return None


def executorch_8da4w(model: nn.Module, path: Path, *, max_seq_len: int, tokenizer) -> Path:
    """torchao's 8da4w on every decoder linear, as ExecuTorch's LLM export applies it."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    from edgequant.models.families import decoder_of

    native = decoder_of(copy.deepcopy(model))
    config = Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4, weight_granularity=PerGroup(32),
        intx_choose_qparams_algorithm="affine",
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(native, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    return write(native, tokenizer, "pte", path, max_seq_len=max_seq_len)


def _is_smollm2_135m(model: nn.Module) -> bool:
    from edgequant.models.families import decoder_of

    s = decoder_of(model).spec
    return (s.vocab_size, s.dim, s.n_layers, s.n_heads, s.n_kv_heads, s.hidden_dim) == (
        49152, 576, 30, 9, 3, 1536,
    )  # fmt: skip


def litert_torch_int4(model: nn.Module, path: Path, *, max_seq_len: int, tokenizer) -> Path:
    """litert-torch's SmolLM2 example with the model's weights, converted by litert-torch's
    converter with its ``dynamic_int4_block32`` recipe."""
    if not _is_smollm2_135m(model):
        raise ValueError(
            "litert-torch's own route needs its re-authored example of the architecture; "
            "edgequant drives its SmolLM2-135M example only"
        )
    return litert_torch_route(
        model, path, quantize="dynamic_int4_block32", max_seq_len=max_seq_len,
        prefill=LITERT_PREFILL,
    )  # fmt: skip


def litert_torch_route(
    model: nn.Module, path: Path, *, quantize: str, max_seq_len: int, prefill: int
) -> Path:
    """SmolLM2-135M (``model``'s weights) through litert-torch's own example and converter,
    with its ``quantize`` recipe (``none``, ``dynamic_int8``, ``dynamic_int4_block32``, ...),
    written to ``path``."""
    # litert-torch's LoRA helpers import TensorFlow's flatbuffer schema; LiteRT ships the same
    # module, so TensorFlow need not be installed
    import ai_edge_litert.schema_py_generated as schema

    for name in ("tensorflow", "tensorflow.lite", "tensorflow.lite.python"):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            module.__path__ = []
            sys.modules[name] = module
    sys.modules.setdefault("tensorflow.lite.python.schema_py_generated", schema)
    from litert_torch.generative.examples.smollm import smollm
    from litert_torch.generative.utilities import converter

    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    theirs = smollm.build_model_v2(
        "(edgequant's loaded weights)", custom_loader=lambda _: dict(state),
        mask_cache_size=max_seq_len,
    )  # fmt: skip
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        written = converter.convert_to_tflite(
            theirs, output_path=tmp, output_name_prefix="anchor", prefill_seq_len=prefill,
            kv_cache_max_len=max_seq_len, quantize=quantize, config=theirs.config,
            export_config=converter.ExportConfig(output_logits_on_prefill=True),
        )  # fmt: skip
        Path(written).replace(path)
    return path


def llama_cpp_q4_0(
    model: nn.Module, path: Path, *, tokenizer, source: str | None, imatrix: bool
) -> Path:
    """llama.cpp's quantizer (Q4_0, optionally with an importance matrix) on the F32 file."""
    from edgequant import calibration
    from edgequant.export.llama_quantize import importance_matrix, llama_quantize

    matrix = None
    if imatrix:
        data = calibration.parse(IMATRIX_DATA, tokenizer, model=model)
        matrix = importance_matrix(model, data)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        f32 = write(model, tokenizer, "gguf", Path(tmp) / "f32.gguf", source=source)
        return llama_quantize(f32, path, "Q4_0", imatrix=matrix, overwrite=True)


def write_all(
    float_model: nn.Module,
    tokenizer,
    names: Sequence[str],
    out: Path,
    *,
    n_weights: int,
    max_seq_len: int,
    source: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Write each anchor into ``out``; ``{name: row}`` with the file's size facts,
    or ``{"runtime", "skipped": reason}``."""
    rows: dict[str, dict[str, Any]] = {}
    for name in progress_bar(names, len(names), "anchors", "file"):
        runtime, filename, _ = ANCHORS[name]
        reason = missing(name)
        if reason:
            log.warning("anchor %s skipped: %s", name, reason)
            rows[name] = {"runtime": runtime, "skipped": reason}
            continue
        path = Path(out) / filename
        log.info("writing anchor %s", path)
        try:
            if name == "executorch-8da4w":
                executorch_8da4w(float_model, path, max_seq_len=max_seq_len, tokenizer=tokenizer)
            elif name == "litert-torch-int4":
                litert_torch_int4(float_model, path, max_seq_len=max_seq_len, tokenizer=tokenizer)
            else:
                llama_cpp_q4_0(
                    float_model, path, tokenizer=tokenizer, source=source,
                    imatrix=name.endswith("imatrix"),
                )  # fmt: skip
        except (ValueError, NotImplementedError) as e:
            log.warning("anchor %s skipped: %s", name, e)
            rows[name] = {"runtime": runtime, "skipped": str(e)}
            continue
        rows[name] = file_row(runtime, path, n_weights)
    return rows
