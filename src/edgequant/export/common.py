"""What the three exporters (``.pte``, ``.tflite``, ``.gguf``) share.

- the output check made before any work: `check_out`;
- the packed-module walk and swap: `packed_modules`, `swap_module`, and `float_twin`, the float
  module that holds a packed module's dequantized weights;
- refusing what a backend cannot run as stored: `unsupported` lists the packed modules a
  backend's ``problem_of`` rejects (as `Unsupported`), `negative_scales` is one such problem
  (XNNPACK's kernels need positive scales), and `refuse_or_warn` raises or, with
  ``allow_fallback``, warns that they are kept in float.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from edgequant.layers import QuantizedEmbedding, QuantizedLinear
from edgequant.models.decoder import ScaledEmbedding
from edgequant.schemes import Scheme

log = logging.getLogger(__name__)


def check_out(path: str | Path, overwrite: bool, suffix: str = ".pte") -> Path:
    """``path`` as a Path, if a program may be written there (checked before any work)."""
    path = Path(path)
    if path.suffix != suffix:
        raise ValueError(f"output {str(path)!r} must end in {suffix} (its runtime expects it)")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise FileExistsError(f"{str(path)!r} is a folder; name a {suffix} file")
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{str(path)!r} exists; pass overwrite=True (--overwrite) to replace it"
        )
    return path


# ---- the packed-module walk --------------------------------------------------------------------


def packed_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(fqn, module)`` of every packed module (`QuantizedLinear`, `QuantizedEmbedding`) in
    ``model``; take a ``list`` of it to swap modules while walking."""
    for fqn, module in model.named_modules():
        if isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
            yield fqn, module


def swap_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    """Put ``new`` in ``model`` at ``fqn`` (a dotted name from ``named_modules``)."""
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def float_twin(module: nn.Module) -> nn.Module:
    """The ``nn.Linear`` / ``nn.Embedding`` holding a packed module's dequantized weights (and
    its bias): what a backend runs in float for a module it cannot hold as stored."""
    weight = module.dequantized_weight()
    if isinstance(module, QuantizedEmbedding):
        if module.embed_scale is None:
            return nn.Embedding(*weight.shape, _weight=weight.clone())
        out = ScaledEmbedding(*weight.shape, module.embed_scale)  # Gemma: rows * sqrt(dim)
        out.weight = nn.Parameter(weight.clone(), requires_grad=False)
        return out
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
    out.weight = nn.Parameter(weight.clone(), requires_grad=False)
    if module.bias is not None:
        out.bias = nn.Parameter(module.bias.clone(), requires_grad=False)
    return out


# ---- what a backend cannot run as stored -------------------------------------------------------


@dataclass(frozen=True)
class Unsupported:
    """A packed module a backend cannot run as stored: why, and the nearest scheme it can."""

    fqn: str
    scheme: Scheme
    reason: str
    nearest: str


def unsupported(
    model: nn.Module, problem_of: Callable[[nn.Module], tuple[str, str] | None]
) -> list[Unsupported]:
    """Every packed module for which ``problem_of(module)`` gives ``(reason, nearest)``."""
    out = []
    for fqn, module in packed_modules(model):
        problem = problem_of(module)
        if problem:
            out.append(Unsupported(fqn, module.scheme, *problem))
    return out


def negative_scales(module: nn.Module) -> tuple[str, str] | None:
    """XNNPACK (ExecuTorch's and LiteRT's CPU kernels) refuses negative scales, which ``mse``
    with ``signed_scales`` chooses (GGUF's Q4_0 convention)."""
    scale = getattr(module, "scale", None)
    if scale is None or not module.scheme.is_integer or float(scale.min()) >= 0:
        return None
    return (
        f"XNNPACK needs positive scales; {int((scale < 0).sum())} of its scales are negative "
        "(mse with signed_scales)",
        "the same algorithm without signed_scales",
    )


def refuse_or_warn(problems: list[Unsupported], backend: str, allow_fallback: bool) -> None:
    """Refuse modules ``backend`` cannot hold as stored (naming them and the nearest scheme),
    or, with ``allow_fallback``, warn that they are kept in float."""
    if problems and not allow_fallback:
        first = problems[0]
        names = ", ".join(p.fqn for p in problems[:4])
        more = f" and {len(problems) - 4} more" if len(problems) > 4 else ""
        raise ValueError(
            f"{backend} cannot run {len(problems)} module(s) as the recipe stores them "
            f"({names}{more}): {first.reason}; nearest supported: {first.nearest}. "
            "Change the recipe, or pass allow_fallback=True (--allow-fallback) to keep them in "
            "float"
        )
    if problems:
        log.warning(
            "kept in float for %s (their dequantized weights; activations are no longer "
            "quantized there): %s",
            backend,
            ", ".join(f"{p.fqn} ({p.scheme.describe()}: {p.reason})" for p in problems),
        )


def default_max_seq_len(model: nn.Module, preferred: int = 512) -> int:
    """The cache length the exporters use when none is given: ``preferred`` positions, or the
    model's whole context when it is shorter."""
    from edgequant.models.families import decoder_of

    return min(preferred, decoder_of(model).spec.max_seq_len)
