"""`RecipeQuantizer`: a PT2E `Quantizer` whose annotations come from an edgequant recipe.

Each operator node of an exported graph is resolved to a recipe rule through its module stack
(``node.meta["nn_module_stack"]``: the FQN of the innermost module that ran it, its role and
layer index as `edgequant.roles` reads them from the FQN; nodes outside any module resolve as
the root, ``""``, so only ``default`` rules reach them). The resolved `Scheme` becomes a
`QuantizationConfig` and the node is annotated with it by the same pattern annotators
ExecuTorch's `XNNPACKQuantizer` uses (linear, linear+relu, conv, conv+relu, conv+bn(+relu),
add(+relu), mul(+relu)); matmul/bmm and embedding lookups are annotated here. torchao's PT2E
engine then prepares, calibrates and converts.

Precedence: rules naming a module (exact FQN or regex, including `set_module_name`) >
`set_module_type` > `set_operator_type` > role rules > ``default`` (`set_global`); among the
type and operator setters the later call wins.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e import (
    FakeQuantize,
    FusedMovingAvgObsFakeQuantize,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
    PlaceholderObserver,
)
from torchao.quantization.pt2e.quantizer import (
    QuantizationAnnotation,
    QuantizationConfig,
    QuantizationSpec,
    Quantizer,
)

from edgequant.graph.backends import ACTIVATION_ONLY, Backend
from edgequant.graph.backends import get as get_backend
from edgequant.quantize import as_recipe
from edgequant.recipe import Recipe, Rule
from edgequant.roles import role_of_name
from edgequant.schemes import Scheme

log = logging.getLogger(__name__)

_ANNOTATION = "quantization_annotation"
aten = torch.ops.aten
KIND_OF_OP = {
    aten.linear.default: "linear",
    aten.conv1d.default: "conv",
    aten.conv1d.padding: "conv",
    aten.conv2d.default: "conv",
    aten.conv2d.padding: "conv",
    aten.matmul.default: "matmul",
    aten.bmm.default: "matmul",
    aten.add.Tensor: "add",
    aten.add_.Tensor: "add",
    aten.mul.Tensor: "mul",
    aten.mul_.Tensor: "mul",
    aten.embedding.default: "embedding",
}
# ExecuTorch's XNNPACK pattern annotators per kind, fused patterns first.
_PATTERNS = {
    "conv": ("conv_bn_relu", "conv_bn", "conv_relu", "conv"),
    "linear": ("linear_relu", "linear"),
    "add": ("add_relu", "add"),
    "mul": ("mul_relu", "mul"),
}
_EPS = 2**-12


@dataclass(frozen=True)
class Decision:
    """What the quantizer did with one operator node."""

    node: str
    kind: str
    module: str  # FQN of the innermost module that ran it ("" = the root)
    scheme: Scheme | None  # None: left float
    # what decided: "rules[i] (...)", "module_type ...", "operator_type ...", "no rule",
    # "another quantizer"
    rule: str
    annotated: bool  # False when a scheme was resolved but no pattern took the node
    note: str = ""


def _module_of(node: Node) -> tuple[str, list[str]]:
    """``(innermost module FQN, type names of every module on the stack)``."""
    stack = node.meta.get("nn_module_stack") or {}
    entries = list(stack.values())
    if not entries:
        return "", []
    return str(entries[-1][0]), [_type_name(t) for _, t in entries]


def _type_name(t: type | str) -> str:
    return t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}"


def _is_annotated(node: Node) -> bool:
    a = node.meta.get(_ANNOTATION)
    return a is not None and a._annotated


class RecipeQuantizer(Quantizer):
    """Annotate an exported graph from ``recipe`` for ``backend`` (``"xnnpack"`` or
    ``"generic"``; see `edgequant.graph.backends`).

    >>> from edgequant.schemes import Scheme
    >>> q = RecipeQuantizer("int8-dynamic").set_module_name("head", None)
    >>> [r.selector() for r in q.recipe.rules]
    ['role=default', 'module=re:head(?:\\\\..*)?']
    """

    def __init__(self, recipe: Any = None, backend: str | Backend = "xnnpack", is_qat=False):
        super().__init__()
        self.recipe: Recipe = as_recipe(recipe) if recipe is not None else Recipe(())
        self.backend = get_backend(backend)
        self.is_qat = is_qat
        self._module_types: list[tuple[str, Scheme | None]] = []
        self._operator_types: list[tuple[Any, Scheme | None]] = []
        self.decisions: list[Decision] = []

    # ---- the setters ExecuTorch's quantizers have, as recipe rules ----------------------------
    def _add(self, rule: Rule) -> RecipeQuantizer:
        self.recipe = Recipe(self.recipe.rules + (rule,), name=self.recipe.name)
        return self

    def set_global(self, scheme: Scheme | None) -> RecipeQuantizer:
        """Every node no other rule decides (a ``role: default`` rule)."""
        return self._add(Rule(scheme, role="default"))

    def set_module_name(self, name: str, scheme: Scheme | None) -> RecipeQuantizer:
        """The module ``name`` and everything inside it (a regex module rule)."""
        return self._add(Rule(scheme, module=f"re:{re.escape(name)}(?:\\..*)?"))

    def set_module_type(self, module_type: type | str, scheme: Scheme | None) -> RecipeQuantizer:
        """Nodes run inside any module of this type (e.g. ``torch.nn.Conv2d``)."""
        self._module_types.append((_type_name(module_type), scheme))
        return self

    def set_operator_type(self, op: Any, scheme: Scheme | None) -> RecipeQuantizer:
        """Nodes calling this aten operator (e.g. ``torch.ops.aten.linear.default``)."""
        self._operator_types.append((op, scheme))
        return self

    # ---- resolution ---------------------------------------------------------------------------
    def resolve(self, node: Node) -> tuple[Scheme | None, str]:
        """``(scheme, what decided)`` for one operator node."""
        fqn, types = _module_of(node)
        kind = KIND_OF_OP.get(node.target)
        scheme, index = self.recipe.resolve(fqn, *role_of_name(fqn, kind == "embedding"))
        if index is not None and self.recipe.rules[index].kind in ("fqn", "regex"):
            return scheme, f"rules[{index}] ({self.recipe.rules[index].selector()})"
        for type_name, s in reversed(self._module_types):
            if type_name in types:
                return s, f"module_type {type_name}"
        for op, s in reversed(self._operator_types):
            if node.target == op or getattr(node.target, "overloadpacket", None) == op:
                return s, f"operator_type {op}"
        if index is None:
            return None, "no rule"
        return scheme, f"rules[{index}] ({self.recipe.rules[index].selector()})"

    # ---- annotation ---------------------------------------------------------------------------
    def annotate(self, model: GraphModule) -> GraphModule:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils import (
            OP_TO_ANNOTATOR,
            propagate_annotation,
        )

        nodes = [n for n in model.graph.nodes if n.op == "call_function" and n.target in KIND_OF_OP]
        before = {n for n in nodes if _is_annotated(n)}  # by a quantizer composed before us
        chosen: dict[Node, tuple[Scheme | None, str]] = {}
        problems: dict[str, list[str]] = {}
        notes: dict[Node, str] = {}
        for n in nodes:
            scheme, why = self.resolve(n)
            kind = KIND_OF_OP[n.target]
            if scheme is not None and n not in before:
                problem = self.backend.problem(scheme, kind)
                if problem and kind in ACTIVATION_ONLY:
                    notes[n] = problem  # a weight-less op the backend runs in float here
                    scheme = None
                elif problem:
                    problems.setdefault(f"{problem} ({why})", []).append(n.name)
            chosen[n] = (scheme, why)
        if problems:
            lines = []
            for problem, names in problems.items():
                more = f" and {len(names) - 4} more" if len(names) > 4 else ""
                lines.append(f"{', '.join(names[:4])}{more}: {problem}")
            raise ValueError(
                f"the recipe asks backend {self.backend.name!r} for what it cannot run: "
                + "; ".join(lines)
            )

        schemes = {s for s, _ in chosen.values() if s is not None}
        anchors = set(chosen)
        for scheme in sorted(schemes, key=lambda s: s.describe()):
            config = self.config(scheme)

            def take(n: Node, scheme=scheme) -> bool:  # the anchor op decides its pattern
                return n not in anchors or chosen[n][0] == scheme

            for patterns in _PATTERNS.values():
                for pattern in patterns:
                    OP_TO_ANNOTATOR[pattern](model, config, take)
            _annotate_matmul(model, config, take)
            _annotate_embedding(model, config, take)
        if any(s.activation == "int8_static" for s in schemes):
            propagate_annotation(model)

        self.decisions = []
        missed = []
        live = set(model.graph.nodes)  # the pattern matchers drop dead code (an unused pooler)
        for n in nodes:
            if n not in live:
                continue
            scheme, why = chosen[n]
            fqn, _ = _module_of(n)
            if n in before:
                scheme, why, note = None, "another quantizer", "annotated before this one"
            else:
                note = notes.get(n, "")
            annotated = scheme is not None and _is_annotated(n)
            if scheme is not None and not annotated:
                missed.append(n.name)
                note = f"no {self.backend.name} pattern took it; left float"
            self.decisions.append(
                Decision(n.name, KIND_OF_OP[n.target], fqn, scheme, why, annotated, note)
            )
        if missed:
            log.warning(
                "left float (no %s pattern took them): %s", self.backend.name, ", ".join(missed)
            )
        return model

    def validate(self, model: GraphModule) -> None:
        pass

    # ---- scheme -> PT2E specs -----------------------------------------------------------------
    def config(self, scheme: Scheme) -> QuantizationConfig:
        """The `QuantizationConfig` of one scheme on this backend."""
        act = None
        if scheme.activation != "none":
            act = _activation_spec(scheme, self.is_qat)
        output = act if scheme.activation == "int8_static" else None
        return QuantizationConfig(act, output, self._weight_spec(scheme), None, self.is_qat)

    def _weight_spec(self, scheme: Scheme) -> QuantizationSpec | None:
        if not scheme.is_integer:
            return None
        bits = scheme.bits
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        if bits == 8 and self.backend.name == "xnnpack":
            qmin = -127  # XNNPACK's int8 weights keep -128 unused, as its own quantizer does
        per_channel = scheme.granularity == "per_channel"
        if per_channel:
            qscheme = torch.per_channel_symmetric if scheme.symmetric else torch.per_channel_affine
            observer = (
                MovingAveragePerChannelMinMaxObserver if self.is_qat else PerChannelMinMaxObserver
            )
        else:
            qscheme = torch.per_tensor_symmetric if scheme.symmetric else torch.per_tensor_affine
            observer = MovingAverageMinMaxObserver if self.is_qat else MinMaxObserver
        ctr = (
            FusedMovingAvgObsFakeQuantize.with_args(observer=observer, eps=_EPS)
            if self.is_qat
            else observer.with_args(eps=_EPS)
        )
        return QuantizationSpec(
            dtype=torch.int8,
            quant_min=qmin,
            quant_max=qmax,
            qscheme=qscheme,
            ch_axis=0 if per_channel else None,
            is_dynamic=False,
            observer_or_fake_quant_ctr=ctr,
        )


def _activation_spec(scheme: Scheme, is_qat: bool) -> QuantizationSpec:
    dynamic = scheme.activation == "int8_dynamic"
    if dynamic and not is_qat:  # per token, as the scheme means in source mode and as
        # XNNPACK's dynamically quantized linear computes it (one range per row)
        from torchao.quantization import PerToken
        from torchao.quantization.pt2e import MappingType
        from torchao.quantization.pt2e._affine_quantization import (
            AffineQuantizedPlaceholderObserver,
        )

        mapping = MappingType.SYMMETRIC if scheme.activation_symmetric else MappingType.ASYMMETRIC
        return QuantizationSpec(
            dtype=torch.int8,
            quant_min=-128,
            quant_max=127,
            qscheme=torch.per_tensor_affine,  # read by the annotators' checks only
            is_dynamic=True,
            observer_or_fake_quant_ctr=AffineQuantizedPlaceholderObserver.with_args(
                mapping_type=mapping,
                target_dtype=torch.int8,
                granularity=PerToken(),
                quant_min=-128,
                quant_max=127,
                eps=torch.finfo(torch.float32).eps,
                is_dynamic=True,
            ),
        )
    qscheme = torch.per_tensor_symmetric if scheme.activation_symmetric else torch.per_tensor_affine
    if is_qat:  # dynamic: per tensor, the range recomputed on every batch (ExecuTorch's form)
        ctr = (
            FakeQuantize.with_args(
                observer=MovingAverageMinMaxObserver, averaging_constant=1, eps=_EPS
            )
            if dynamic
            else FusedMovingAvgObsFakeQuantize.with_args(
                observer=MovingAverageMinMaxObserver, eps=_EPS
            )
        )
    else:
        ctr = (PlaceholderObserver if dynamic else MinMaxObserver).with_args(eps=_EPS)
    return QuantizationSpec(
        dtype=torch.int8,
        quant_min=-128,
        quant_max=127,
        qscheme=qscheme,
        is_dynamic=dynamic,
        observer_or_fake_quant_ctr=ctr,
    )


def _annotate_matmul(model: GraphModule, config: QuantizationConfig, take) -> None:
    spec = config.input_activation
    if spec is None:
        return
    for n in model.graph.nodes:
        if n.op != "call_function" or KIND_OF_OP.get(n.target) != "matmul":
            continue
        if _is_annotated(n) or not take(n):
            continue
        a, b = n.args[:2]
        n.meta[_ANNOTATION] = QuantizationAnnotation(
            input_qspec_map={a: spec, b: spec},
            output_qspec=config.output_activation,
            _annotated=True,
        )


def _annotate_embedding(model: GraphModule, config: QuantizationConfig, take) -> None:
    weight_spec = config.weight
    if weight_spec is None:
        return
    for n in model.graph.nodes:
        if n.op != "call_function" or n.target != aten.embedding.default:
            continue
        if _is_annotated(n) or not take(n):
            continue
        n.meta[_ANNOTATION] = QuantizationAnnotation(
            input_qspec_map={n.args[0]: weight_spec}, _annotated=True
        )
