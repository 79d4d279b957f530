"""Where a per-input-channel scale can be folded (AWQ, SmoothQuant), and the fold itself.

A group is the linears that read one input and the op that produces it: a decoder layer's
attention norm and its q/k/v projections, the feedforward norm and its gate/up projections, the
value projection and the output projection (through attention, which mixes positions but not
channels), the up projection and the down projection (through ``act(gate) * up``). Folding
``s`` multiplies the linears' input columns by ``s`` and divides the producing op's output by
it (a norm's weight, a linear's rows), so the float model computes the same function and its
graph is unchanged; only the values the quantizer sees move.

The groups are the decoder's (`edgequant.models.families.base.SMOOTHING`), found under the
decoder's own names (llama2.c) or under each family's Hugging Face names (Llama, Qwen2, Qwen3,
SmolLM, Gemma 3). Gemma's norms multiply by ``1 + weight``: the fold keeps ``1 + weight``
divided by ``s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def _patterns() -> dict[str, tuple[list[tuple[str, tuple[str, ...], bool, str | None]], set[str]]]:
    """Per naming, relative to a decoder layer: the groups' (producer, consumers, through
    attention) and every module name a layer of that naming has; the decoder's own names
    (llama2.c), then each family's Hugging Face names."""
    from edgequant.models.families import FAMILIES
    from edgequant.models.families.base import SMOOTHING

    by_pattern: dict[tuple, list[str]] = {}
    layer_names: dict[tuple, set[str]] = {}
    for family in FAMILIES.values():
        pattern = tuple(family.smoothing())
        by_pattern.setdefault(pattern, []).append(family.name)
        inside = {hf.split("{}.", 1)[1] for key, hf in family.names.items() if "{}" in key}
        layer_names.setdefault(pattern, set()).update(inside)
    own = {k.split("{}.", 1)[1] for f in FAMILIES.values() for k in f.names if "{}" in k}
    out = {"llama2c (edgequant's decoder)": (list(SMOOTHING), own)}
    for pattern, names in by_pattern.items():
        out[f"Hugging Face {' / '.join(names)}"] = (list(pattern), layer_names[pattern])
    return out


@dataclass(frozen=True)
class Group:
    """Linears (``consumers``, names inside the layer) reading the output of ``producer``;
    ``tie = (n_rep, head_dim)`` when the producer is a value projection whose rows serve
    ``n_rep`` attention heads each."""

    producer: str
    consumers: tuple[str, ...]
    tie: tuple[int, int] | None = None
    rows: tuple[int, int] | None = None  # the producer's rows feeding the consumers (packed)


def groups(layer: nn.Module) -> list[Group]:
    """The foldable groups of one decoder layer (empty when its family is unknown)."""
    names = dict(layer.named_modules())
    # every naming whose groups the layer has; the one that names most of the layer wins (a
    # Gemma layer also has a "post_attention_layernorm", which in Llama's naming feeds the MLP)
    matching = [
        (len(known & set(names)), pattern)
        for pattern, known in _patterns().values()
        if all(p in names and all(c in names for c in cs) for p, cs, _, _ in pattern)
    ]
    if not matching:
        return []
    _, pattern = max(matching, key=lambda m: m[0])
    out = []
    for producer, consumers, through_attention, part in pattern:
        parent = names[producer.rsplit(".", 1)[0]]
        rows = None
        if part == "last":  # a packed producer: only its last rows feed the consumers
            total, width = names[producer].weight.shape[0], names[consumers[0]].weight.shape[1]
            feeding = width if not through_attention else (total - width) // 2  # up; v
            rows = (total - feeding, total)
        tie = (
            _tie(names[producer], names[consumers[0]], parent, rows) if through_attention else None
        )
        out.append(Group(producer, consumers, tie, rows))
    for g in out:
        _check_producer(g.producer, names[g.producer])
    return out


def family_names() -> list[str]:
    return list(_patterns())


def _tie(
    v: nn.Module, o: nn.Module, attention: nn.Module, rows: tuple[int, int] | None = None
) -> tuple[int, int] | None:
    v_rows = v.weight.shape[0] if rows is None else rows[1] - rows[0]
    n_rep = o.weight.shape[1] // v_rows
    if n_rep == 1:
        return None
    head_dim = getattr(attention, "head_dim", None)
    if not isinstance(head_dim, int):
        raise ValueError(
            f"{type(attention).__name__} shares each value head among {n_rep} heads but has no "
            "integer head_dim attribute to tie their scales by"
        )
    return n_rep, head_dim


def _check_producer(name: str, module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        return
    kind = type(module).__name__
    if not kind.endswith("RMSNorm") or not hasattr(module, "weight"):
        raise ValueError(
            f"cannot fold scales into {name} ({kind}): only an RMSNorm (multiplying by its "
            "weight, or by 1 + weight as Gemma's) or a linear can absorb them"
        )


def norm_offset(module: nn.Module) -> float:
    """What an RMSNorm adds to its weight before multiplying: 1 for Gemma's, else 0."""
    offset = getattr(module, "offset", None)  # edgequant's RMSNorm says
    if offset is not None:
        return float(offset)
    return 1.0 if type(module).__name__.startswith("Gemma") else 0.0


@torch.no_grad()
def fold(layer: nn.Module, group: Group, s: torch.Tensor) -> None:
    """Multiply the consumers' input columns by ``s`` and divide the producer's output by it."""
    producer = layer.get_submodule(group.producer)
    inverse = 1.0 / s.double()
    if group.tie is not None:  # s is over the heads; the producer has one row per kv channel
        n_rep, head_dim = group.tie
        inverse = inverse.view(-1, n_rep, head_dim)[:, 0].reshape(-1)
    if isinstance(producer, nn.Linear):
        lo, hi = group.rows or (0, producer.weight.shape[0])
        w = producer.weight[lo:hi]  # a view: the packed producer's other rows stay
        w.copy_((w.double() * inverse[:, None]).to(w.dtype))
        if producer.bias is not None:
            b = producer.bias[lo:hi]
            b.copy_((b.double() * inverse).to(b.dtype))
    else:  # a norm multiplying by offset + w: offset + w' = (offset + w) / s
        w, offset = producer.weight, norm_offset(producer)
        w.copy_(((w.double() + offset) * inverse - offset).to(w.dtype))
    for name in group.consumers:
        w = layer.get_submodule(name).weight
        w.copy_((w.double() * s.double()[None, :]).to(w.dtype))


__all__ = ["Group", "family_names", "fold", "groups", "norm_offset"]
