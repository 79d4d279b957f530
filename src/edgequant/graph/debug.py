"""Per-node numeric debugging: where in a converted graph did accuracy go?

Both graphs run on the same inputs. For every operator node of the float graph that is still in
the converted graph (same node name), two SQNRs of its output against the float output:

- ``local_sqnr_db``: the node fed the *float* values of its inputs (the converted graph's own
  quantize/dequantize of those inputs and of its weights still apply), so it measures the error
  this node adds by itself; the table is sorted by it, worst first;
- ``sqnr_db``: the node in the converted graph run end to end (errors of everything before it
  included).

Nodes the PT2E engine folded away (a batch norm folded into its convolution) are matched through
their producer: the converted convolution is compared with the float batch norm's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Interpreter, Node

from edgequant.graph.quantizer import _module_of
from edgequant.primitives import sqnr


@dataclass(frozen=True)
class NodeError:
    node: str
    op: str
    module: str
    local_sqnr_db: float
    sqnr_db: float


@dataclass(frozen=True)
class DebugReport:
    rows: tuple[NodeError, ...]  # worst local SQNR first

    @property
    def worst(self) -> NodeError:
        if not self.rows:
            raise ValueError("no node of the converted graph could be compared with float")
        return self.rows[0]

    def table(self, limit: int | None = None) -> str:
        """Markdown table, worst first (``limit`` rows)."""
        lines = [
            "| node | op | module | local SQNR dB | SQNR dB |",
            "|---|---|---|---:|---:|",
        ]
        for r in self.rows[:limit]:
            lines.append(
                f"| {r.node} | {r.op} | {r.module or '(root)'} | {r.local_sqnr_db:.2f} | "
                f"{r.sqnr_db:.2f} |"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


class _Record(Interpreter):
    """Runs a graph, keeping every call_function node's tensor output; with ``substitute``,
    a node that has a float counterpart passes the float value on instead of its own."""

    def __init__(self, gm: GraphModule, substitute: dict[str, torch.Tensor] | None = None):
        super().__init__(gm)
        self.values: dict[str, torch.Tensor] = {}
        self.substitute = substitute or {}

    def run_node(self, n: Node) -> Any:
        out = super().run_node(n)
        if n.op == "call_function" and isinstance(out, torch.Tensor):
            self.values[n.name] = out.detach()
            if n.name in self.substitute:
                return self.substitute[n.name]
        return out


def _is_batch_norm(node: Node) -> bool:
    return node.op == "call_function" and "batch_norm" in str(node.target)


def _counterparts(float_gm: GraphModule, converted: GraphModule) -> dict[str, str]:
    """converted node name -> float node name whose output it should equal."""
    converted_names = {n.name for n in converted.graph.nodes if n.op == "call_function"}
    out = {}
    for n in float_gm.graph.nodes:
        if n.op != "call_function" or n.name not in converted_names:
            continue
        target = n
        while len(target.users) == 1:  # a batch norm folded into this node's weights
            (user,) = target.users
            if user.name in converted_names or not _is_batch_norm(user):
                break
            target = user
        out[n.name] = target.name
    return out


def debug(
    float_model: nn.Module | GraphModule, converted: GraphModule, inputs: tuple
) -> DebugReport:
    """Per-node SQNR of ``converted`` against ``float_model`` on ``inputs`` (a tuple of the
    model's arguments), worst first. ``float_model`` may be the eager model (it is exported on
    ``inputs``) or its exported graph module."""
    from edgequant.graph.workflow import capture

    float_gm = float_model if isinstance(float_model, GraphModule) else capture(float_model, inputs)
    with torch.no_grad():
        ref = _Record(float_gm)
        ref.run(*inputs)
        pairs = _counterparts(float_gm, converted)
        float_of = {name: ref.values[f] for name, f in pairs.items() if f in ref.values}
        local = _Record(converted, substitute=float_of)
        local.run(*inputs)
        chained = _Record(converted)
        chained.run(*inputs)
    nodes = {n.name: n for n in converted.graph.nodes}
    rows = []
    for name, expected in float_of.items():
        node = nodes[name]
        if not _is_compute(node) or name not in local.values:
            continue
        if not expected.is_floating_point() or not expected.any():  # no signal to compare
            continue
        rows.append(
            NodeError(
                node=name,
                op=str(getattr(node.target, "__name__", node.target)),
                module=_module_of(node)[0],
                local_sqnr_db=float(sqnr(expected, local.values[name])),
                sqnr_db=float(sqnr(expected, chained.values[name])),
            )
        )
    rows.sort(key=lambda r: r.local_sqnr_db)
    return DebugReport(tuple(rows))


def _is_compute(node: Node) -> bool:
    """Operator nodes worth a row (not quantize/dequantize or shape bookkeeping)."""
    name = str(node.target)
    return not any(k in name for k in ("quantize", "choose_qparams", "getitem", "view", "reshape"))
