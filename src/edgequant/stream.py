"""Quantize and evaluate a model larger than memory: one decoder layer in float at a time.

`quantize` reads the float model from a `edgequant.models.lazy.Source` (a GGUF file mapped, a
safetensors folder read tensor by tensor, a llama2.c file mapped) onto a skeleton on the meta
device, and for each decoder layer in turn:

1. fills the layer's float weights from the file;
2. runs the evaluation windows' hidden states through it (the float reference: the windows'
   hidden states are in memory, never the float model);
3. runs the calibrated algorithms on the calibration batches' hidden states
   (`edgequant.layerwise.LayerByLayer`, the same steps as the in-memory path), packs every
   module the recipe quantizes (`edgequant.quantize.pack`) and measures each one's weight SQNR;
4. writes the layer's packed tensors to a shard and the hidden states to a carry file in the
   work folder beside the bundle (``.<bundle>.partial``), then gives the layer's memory back.

The embedding is packed first, the final norm and head last (the float head gives the windows'
float logits, written to disk one window at a time). The bundle's ``model.safetensors`` is then
assembled from the shards (`edgequant._safetensors.write`, byte for byte what `edgequant.save`
writes for the in-memory path's model) with the same manifest. A stopped run continues from its
last finished layer with ``resume=True``; the bundle is the same as an uninterrupted run's.

The quantized model is evaluated in the same pass: the windows' hidden states also go through
each packed layer as soon as it is packed, and at the end each window's logits are compared with
the float ones on disk (`edgequant.eval.Comparison`: the sums `compare` makes, in the same
order), so neither model is ever whole in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgequant import __version__, kernels
from edgequant._memory import give_back
from edgequant._progress import progress_bar
from edgequant.eval import weight_sqnr
from edgequant.models.families import module_name
from edgequant.models.lazy import Source, release
from edgequant.quantize import (
    Plan,
    _set_module,
    _weight,
    as_recipe,
    calibrated_schemes,
    check_finite,
    needs_calibration,
    pack,
    plan,
)
from edgequant.schemes import SMOOTHING

log = logging.getLogger(__name__)

FLOAT_LOGITS = "float-logits.npy"
CARRY = "carry.safetensors"
STATE = "state.json"


class Stopped(RuntimeError):
    """Raised by `quantize` after the layer ``stop_after`` names (to test resuming)."""


@dataclass
class Streamed:
    """What `quantize` returns: the plan, the packed modules' weight SQNR (the entries
    `edgequant.eval.layer_sqnr` gives), the float logits of the windows on disk (``None``
    without windows), the work folder (removed by `finish`) and the quantized model's
    `edgequant.eval.compare` metrics on the windows."""

    plan: Plan
    layers: list[dict[str, Any]]
    float_logits: Path | None
    work: Path
    metrics: dict[str, float] | None = None  # `edgequant.eval.compare`'s, with windows
    first_window: str | None = None  # `logits_digest` of the first window's quantized logits
    kernels: dict[str, int] | None = None  # `edgequant.kernels.counts` of the packed model

    def finish(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


def work_dir(out: Path) -> Path:
    """The folder a streaming run of bundle ``out`` keeps its shards and hidden states in."""
    return out.parent / f".{out.name}.partial"


@torch.no_grad()
def quantize(
    source: Source,
    recipe: Any,
    out: str | Path,
    *,
    tokenizer=None,
    calibration=None,
    windows: torch.Tensor | None = None,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
) -> Streamed:
    """Quantize ``source`` with ``recipe`` one decoder layer at a time into the bundle ``out``;
    with ``windows`` (``[n, L]`` token ids) also compute the float model's logits on them."""
    from edgequant.artifact import check_writable
    from edgequant.layerwise import LayerByLayer, decoder_layers, gptaq_param

    out = Path(out)
    check_writable(out, overwrite)
    recipe = as_recipe(recipe)
    if recipe.rotate is not None:
        raise ValueError(
            f"rotate {recipe.rotate!r} turns every layer with one matrix, which a streamed run "
            "does not do yet: quantize in memory (--no-stream)"
        )
    model = source.skeleton()
    p = plan(model, recipe)
    todo = [lp for lp in p if lp.scheme is not None and lp.scheme.weight != "fp32"]
    schemes = calibrated_schemes(todo)
    fitted = sorted(f for f, s in schemes.items() if gptaq_param(s, "gptaq_head"))
    if fitted:
        raise ValueError(
            f"gptaq_head ({fitted[0]}{' and others' if len(fitted) > 1 else ''}) fits the float "
            "head to the rounded model, which a streamed run does not do yet: quantize in "
            "memory (--no-stream) or drop gptaq_head"
        )
    if schemes and calibration is None:
        needs_calibration(schemes)  # raises, naming the modules
    prefix, layers = decoder_layers(model)
    decoder = _parts(model)  # a family edgequant's decoder runs: before any work
    work = _open_work(out, source, recipe, calibration, windows, len(layers), resume)
    done_layers = _finished(work)
    rows: dict[str, dict[str, Any]] = {}
    packed: dict[str, nn.Module] = {}

    outside = [lp for lp in todo if not lp.fqn.startswith(f"{prefix}.")]
    first = [lp for lp in outside if lp.kind == "embedding"]
    source.fill(model, f"{module_name(model, 'tok_embeddings')}.")  # runs before the layers
    check_finite(model)  # what is filled so far; each layer below as it is read
    steps = LayerByLayer(model, schemes, calibration) if schemes else None
    hidden = _embedded(decoder(), windows) if windows is not None else None
    for lp in first:
        packed[lp.fqn] = pack(model, lp, None, packed)
        rows[lp.fqn] = _sqnr_row(lp, _weight(model.get_submodule(lp.fqn)), packed[lp.fqn])
        release(model, f"{lp.fqn}.")
        _set_module(model, lp.fqn, packed[lp.fqn])
    # the quantized model's hidden states of the windows, beside the float ones
    quantized = _embedded(decoder(), windows) if windows is not None else None

    if done_layers:
        carried, facts = _read_carry(work)
        if steps is not None:
            n = range(len(steps.batches))
            floats = [carried[f"calibration_float.{k}"] for k in n] if steps.gptaq else None
            steps.set_hidden([carried[f"calibration.{k}"] for k in n], floats)
        if hidden is not None:
            hidden = [carried[f"window.{k}"] for k in range(len(hidden))]
            quantized = [carried[f"quantized.{k}"] for k in range(len(hidden))]
        rows.update(facts["sqnr"])
        for i in range(done_layers):  # their packed modules, on the meta device
            for lp in todo:
                if lp.fqn.startswith(f"{prefix}.{i}."):
                    _set_module(model, lp.fqn, _empty_packed(model, lp))
        log.info("resuming %s after layer %d of %d", out, done_layers - 1, len(layers))

    if windows is not None:  # what `Decoder.forward` gives each block, for every window
        ropes, attend = decoder().eager_context(windows.shape[1], device=windows.device)
    for i in progress_bar(range(done_layers, len(layers)), len(layers) - done_layers,
                          "quantize layer by layer", "layer"):  # fmt: skip
        where = f"{prefix}.{i}."
        source.fill(model, where)
        give_back()  # reading (and dequantizing) the layer's tensors left freed blocks
        check_finite(model.get_submodule(where[:-1]))
        mine = [lp for lp in todo if lp.fqn.startswith(where)]
        modules = {lp.fqn: model.get_submodule(lp.fqn) for lp in mine}
        folds = steps is not None and any(
            lp.fqn in schemes and schemes[lp.fqn].algorithm in SMOOTHING for lp in mine
        )  # AWQ / SmoothQuant fold scales into the weights in place (GPTQ rounds a copy)
        reference = {
            fqn: _weight(m).detach().clone() if folds else _weight(m) for fqn, m in modules.items()
        }  # the float weights, before calibration folds scales into them
        if hidden is not None:
            layer = decoder(f"layers.{i}")
            hidden = [layer.run_layer(i, h, ropes, attend) for h in hidden]
            del layer  # it holds the layer's float modules
        results = steps.step(i) if steps is not None else {}
        for lp in mine:
            packed[lp.fqn] = pack(model, lp, results.get(lp.fqn), packed)
            rows[lp.fqn] = _sqnr_row(lp, reference[lp.fqn], packed[lp.fqn])
            _set_module(model, lp.fqn, packed[lp.fqn])
        del reference, modules, results  # the float linears go with the last references
        if quantized is not None:
            layer = decoder(f"layers.{i}")  # now holding the packed modules
            quantized = [layer.run_layer(i, h, ropes, attend) for h in quantized]
            del layer
        _write_layer(work, model, where, i)
        _write_carry(work, i, steps, hidden, quantized, rows)
        release(model, where)
        for lp in mine:
            packed.pop(lp.fqn)._kernel_cache.clear()  # a fast kernel's copy of the weights
        give_back()
        if stop_after is not None and i == stop_after:
            raise Stopped(f"stopped after layer {i} (stop_after={stop_after})")

    rest = [lp for lp in outside if lp.kind != "embedding"]
    late = {lp.fqn: lp.scheme for lp in rest if lp.fqn in schemes}
    if not late:
        steps = None  # the calibration batches' hidden states: nothing after the layers reads them
    for name, t in model.named_parameters():  # the final norm (and an untied head, below)
        if t.is_meta and not name.startswith(f"{prefix}.") and not _under(name, rest):
            source.fill(model, name)
    for lp in rest:  # the float head: the windows' logits, its SQNR, its rounding
        source.fill(model, f"{lp.fqn}.")
    check_finite(model)
    float_logits = None
    if hidden is not None:
        float_logits = _float_logits(work, decoder("norm", "output"), hidden)
    results = {}
    reference = {
        lp.fqn: _weight(model.get_submodule(lp.fqn)).detach() for lp in rest
    }  # what calibration changes in place is cloned first
    reference.update({f: reference[f].clone() for f, s in late.items() if s.algorithm in SMOOTHING})
    if late and steps is not None:
        results = steps.outside(model, late, _final_norm(model))
    for lp in rest:
        packed[lp.fqn] = pack(model, lp, results.pop(lp.fqn, None), packed)
        rows[lp.fqn] = _sqnr_row(lp, reference[lp.fqn], packed[lp.fqn])
    del reference, results, steps
    for lp in rest:  # the float head goes with the module (its tensor may be the embedding's)
        _set_module(model, lp.fqn, packed[lp.fqn])
    give_back()
    metrics, digest = None, None
    if quantized is not None:
        metrics, digest = _compare(float_logits, decoder("norm", "output"), quantized, windows)
    model.edgequant_recipe = p.recipe
    if calibration is not None:
        model.edgequant_calibration = getattr(calibration, "source", "token batches given")
    _assemble(model, out, work, prefix, len(layers), tokenizer, overwrite)
    order = [lp.fqn for lp in p if lp.fqn in rows]
    return Streamed(p, [rows[f] for f in order], float_logits, work, metrics, digest,
                    kernels.counts(model))  # fmt: skip


# ---- pieces ----------------------------------------------------------------------------------


def _parts(model: nn.Module):
    """``decoder(*parts)``: the one decoder holding the model's modules named (all of them
    without names) — the model itself for llama2.c."""
    from edgequant.models.decoder import Decoder
    from edgequant.models.families import for_model

    if isinstance(model, Decoder):
        return lambda *parts: model
    family = for_model(model)
    return lambda *parts: family.adopt(model, parts or ("tok_embeddings",))


def _embedded(decoder, windows: torch.Tensor) -> list[torch.Tensor]:
    return [decoder.tok_embeddings(windows[k : k + 1]) for k in range(windows.shape[0])]


def _compare(float_logits: Path, decoder, quantized, windows) -> tuple[dict[str, float], str]:
    """`edgequant.eval.compare` of the quantized model's logits with the float ones on disk,
    one window at a time (the same sums, in the same order), and the sha256 of the first
    window's quantized logits (what the bundle, reloaded, must give again)."""
    from edgequant.eval import Comparison

    totals = Comparison()
    digest = ""
    for k, h in enumerate(quantized):
        f = torch.from_numpy(_read_window(float_logits, k))
        q = decoder.head(h).float()[0]
        if k == 0:
            digest = logits_digest(q)
        totals.add(f, q, windows[k])
        del f, q
    return totals.result(), digest


def logits_digest(logits: torch.Tensor) -> str:
    """sha256 of a logits tensor's bytes (read in place: ``tobytes`` would copy a 512-token
    window's 311 MB)."""
    return hashlib.sha256(logits.contiguous().numpy().data).hexdigest()


def _float_logits(work: Path, decoder, hidden: list[torch.Tensor]) -> Path:
    """The float model's logits of each window, written one window at a time (a ``.npy`` file
    of ``[windows, L, vocab]`` float32). Written and read (`_read_window`) with plain file
    calls: pages of a mapped file count as the process's resident memory while mapped (311 MB
    a window for a 152k vocabulary)."""
    path = work / FLOAT_LOGITS
    with open(path, "wb") as f:
        for k, h in enumerate(hidden):
            lg = decoder.head(h).float()[0].numpy()
            if k == 0:
                header = {"descr": "<f4", "fortran_order": False,
                          "shape": (len(hidden), *lg.shape)}  # fmt: skip
                np.lib.format.write_array_header_1_0(f, header)
            f.write(np.ascontiguousarray(lg, dtype="<f4").data)  # in place, not a copy
            del lg
    return path


def _read_window(path: Path, k: int) -> np.ndarray:
    """Window ``k``'s logits ``[L, vocab]`` from the file `_float_logits` wrote."""
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        shape, _, _ = np.lib.format.read_array_header_1_0(f)
        one = int(np.prod(shape[1:]))
        f.seek(k * one * 4, 1)
        out = np.empty(shape[1:], dtype="<f4")
        if f.readinto(memoryview(out).cast("B")) != one * 4:
            raise ValueError(f"{str(path)!r} ends before window {k} of {shape[0]}")
    return out


def window_digest(model: nn.Module, window: torch.Tensor) -> str:
    """`logits_digest` of ``model``'s (a packed model's) logits of ``window [1, L]``, computed
    as `quantize`'s pass does, one block at a time, each block's kernel copies of its weights
    dropped after it runs: the packed model in memory, not also every kernel's copy of it.
    What a bundle reloaded must give again (`Streamed.first_window`)."""
    from edgequant.models.families import decoder_of

    decoder = decoder_of(model)
    ropes, attend = decoder.eager_context(window.shape[1], device=window.device)
    h = decoder.tok_embeddings(window)
    for i, layer in enumerate(decoder.layers):
        h = decoder.run_layer(i, h, ropes, attend)
        for m in layer.modules():
            if hasattr(m, "_kernel_cache"):
                m._kernel_cache.clear()
    return logits_digest(decoder.head(h).float()[0])


def _final_norm(model: nn.Module) -> nn.Module:
    """The model's own last norm (what an lm_head reads)."""
    return model.get_submodule(module_name(model, "norm"))


def _under(name: str, lps) -> bool:
    return any(name.startswith(f"{lp.fqn}.") for lp in lps)


def _sqnr_row(lp, reference: torch.Tensor, new: nn.Module) -> dict[str, Any]:
    return {"fqn": lp.fqn, "role": lp.role, "layer": lp.layer, "scheme": new.scheme.describe(),
            "shape": [new.rows, new.cols], "sqnr_db": weight_sqnr(reference, new)}  # fmt: skip


def _empty_packed(model: nn.Module, lp) -> nn.Module:
    from edgequant.layers import QuantizedEmbedding, QuantizedLinear, embed_scale_of

    module = model.get_submodule(lp.fqn)
    with torch.device("meta"):
        if lp.kind == "embedding":
            return QuantizedEmbedding(lp.shape[0], lp.shape[1], lp.scheme, embed_scale_of(module))
        return QuantizedLinear(lp.shape[1], lp.shape[0], lp.scheme, module.bias is not None)


# ---- the work folder -------------------------------------------------------------------------


def _key(source: Source, recipe, calibration, windows, n_layers: int) -> dict[str, Any]:
    """What a run is: a stopped run continues only with the same key."""
    digest = None
    if windows is not None:
        digest = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
    path = Path(source.info["source"]).resolve()
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    return {
        "edgequant_version": __version__,
        "source": str(path),
        "sha256": source.info.get("sha256"),
        # a folder or .bin is not hashed (a 15 GB read): its files' sizes and times instead
        "files": {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()},
        "recipe": recipe.to_dict(),
        "calibration": None if calibration is None else getattr(calibration, "source", "given"),
        "windows": digest,
        "layers": n_layers,
    }


def _open_work(out, source, recipe, calibration, windows, n_layers, resume) -> Path:
    work = work_dir(out)
    key = _key(source, recipe, calibration, windows, n_layers)
    if work.exists():
        state = work / STATE
        old = json.loads(state.read_text()) if state.is_file() else None
        if old != key:
            differ = sorted(k for k in key if old is None or old.get(k) != key[k])
            raise ValueError(
                f"{str(work)!r} holds a stopped run with another {', '.join(differ)}; remove it "
                "to start again, or resume with the same model, recipe, calibration and windows"
            )
        if not resume:
            raise FileExistsError(
                f"{str(work)!r} holds a stopped run of this bundle ({_finished(work)} of "
                f"{n_layers} layers done); pass --resume (resume=True) to continue it, or remove "
                "the folder to start again"
            )
        return work
    work.mkdir(parents=True)
    (work / STATE).write_text(json.dumps(key, indent=2) + "\n")
    return work


def _finished(work: Path) -> int:
    """Layers a run finished: one past the layer its carry file records (0 without one)."""
    from safetensors import safe_open

    carry = work / CARRY
    if not carry.is_file():
        return 0
    with safe_open(str(carry), framework="pt") as f:
        return int(f.metadata()["layer"]) + 1


def _write_layer(work: Path, model: nn.Module, where: str, i: int) -> None:
    from safetensors.torch import save_file

    from edgequant._io import atomic_path

    tensors = {n: t.detach().contiguous() for n, t in model.state_dict().items()
               if n.startswith(where)}  # fmt: skip
    with atomic_path(work / f"layer-{i:05d}.safetensors") as tmp:
        save_file(tensors, str(tmp))


def _write_carry(work: Path, i: int, steps, hidden, quantized, rows) -> None:
    """The hidden states after layer ``i`` and every SQNR row so far: what resuming needs."""
    from safetensors.torch import save_file

    from edgequant._io import atomic_path

    tensors = {}
    if steps is not None:
        tensors.update({f"calibration.{k}": h.contiguous() for k, h in enumerate(steps.hidden())})
        for k, h in enumerate(steps.floats or []):  # GPTAQ's: the float model's
            tensors[f"calibration_float.{k}"] = h.contiguous()
    if hidden is not None:
        tensors.update({f"window.{k}": h.contiguous() for k, h in enumerate(hidden)})
        tensors.update({f"quantized.{k}": h.contiguous() for k, h in enumerate(quantized)})
    facts = {"sqnr": rows}
    with atomic_path(work / CARRY) as tmp:
        save_file(tensors, str(tmp), metadata={"layer": str(i), "facts": json.dumps(facts)})


def _read_carry(work: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(str(work / CARRY), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        facts = json.loads(f.metadata()["facts"])
    return tensors, facts


def _assemble(model, out: Path, work: Path, prefix: str, n_layers: int, tokenizer, overwrite):
    """The bundle: every tensor of a layer read back from its shard, the rest from memory."""
    from safetensors import safe_open

    from edgequant.artifact import save

    def read(name: str) -> torch.Tensor:
        i = int(name[len(prefix) + 1 :].split(".", 1)[0])
        with safe_open(str(work / f"layer-{i:05d}.safetensors"), framework="pt") as f:
            return f.get_tensor(name)

    save(model, out, tokenizer=tokenizer, overwrite=overwrite, read=read)
