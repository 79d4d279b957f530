"""What each graph-mode backend can represent, as a table a recipe's schemes are checked against.

A backend lists, per kind of operator, the activation modes it runs, and the weight formats it
accepts. A scheme outside the table is refused before anything is prepared, naming the nodes.
Graph mode quantizes weights per tensor or per output channel with fp32 scales (the forms the
PT2E ``quantize_per_tensor`` / ``quantize_per_channel`` ops hold); group-wise schemes belong to
source mode (`edgequant.quantize`).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgequant.schemes import Scheme

# Operator kinds the quantizer annotates (see quantizer.py for the aten ops of each).
OP_KINDS = ("linear", "conv", "matmul", "add", "mul", "embedding")
# Kinds without weights: a scheme whose activation mode the backend does not run on them
# (weight-only or dynamic schemes, for most backends) leaves them float rather than failing.
ACTIVATION_ONLY = ("matmul", "add", "mul")


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    weight_bits: tuple[int, ...]
    weight_granularities: tuple[str, ...]
    asymmetric_weights: bool
    # op kind -> activation modes it runs ("none" = weight-only, float activations)
    activations: dict[str, tuple[str, ...]]

    def problem(self, scheme: Scheme, kind: str) -> str | None:
        """Why this backend cannot run ``scheme`` on an operator of ``kind`` (None if it can)."""
        modes = self.activations.get(kind, ())
        if kind == "embedding":  # a lookup: only its table is quantized
            act = "none"
        else:
            act = scheme.activation
        if not modes:
            return f"{self.name} does not quantize {kind}"
        if act not in modes:
            return f"{self.name} runs {kind} with activation {', '.join(modes)}, not {act!r}"
        if kind in ACTIVATION_ONLY:  # no weights: the activation mode is all that matters
            return None
        if not scheme.is_integer:
            return f"graph mode holds integer weights; {scheme.weight} belongs to source mode"
        if scheme.bits not in self.weight_bits:
            bits = ", ".join(f"int{b}" for b in self.weight_bits)
            return f"{self.name} takes {bits} weights, not {scheme.weight}"
        if scheme.granularity not in self.weight_granularities:
            return (
                f"{self.name} quantizes weights {' or '.join(self.weight_granularities)}, not "
                f"{scheme.granularity} (group-wise schemes: use edgequant.quantize)"
            )
        if not scheme.symmetric and not self.asymmetric_weights:
            return f"{self.name} takes symmetric weights only"
        if scheme.scale_dtype != "fp32":
            return f"graph mode keeps fp32 scales, not {scheme.scale_dtype}"
        if scheme.algorithm != "minmax":
            return f"graph mode observes min-max ranges, not {scheme.algorithm}"
        return None


XNNPACK = Backend(
    name="xnnpack",
    description=(
        "XNNPACK through ExecuTorch: int8 symmetric weights (per channel or per tensor); "
        "static int8 activations (per tensor, from calibration) or dynamic int8 activations "
        "on linears and 2-D convolutions"
    ),
    weight_bits=(8,),
    weight_granularities=("per_channel", "per_tensor"),
    asymmetric_weights=False,
    activations={
        "linear": ("int8_static", "int8_dynamic"),
        "conv": ("int8_static", "int8_dynamic"),  # dynamic: 2-D, not depthwise
        "matmul": (),
        "add": ("int8_static",),
        "mul": ("int8_static",),
        "embedding": ("none",),  # ExecuTorch's portable lookup of int8 rows
    },
)

GENERIC = Backend(
    name="generic",
    description=(
        "a generic integer backend (PT2E's reference quantized representation): int2..int8 "
        "symmetric weights, per channel or per tensor; weight-only, static or dynamic int8 "
        "activations"
    ),
    weight_bits=(2, 3, 4, 5, 6, 7, 8),
    weight_granularities=("per_channel", "per_tensor"),
    # ExecuTorch's pattern annotators (torchao's get_weight_qspec) take symmetric weights only
    asymmetric_weights=False,
    activations={
        "linear": ("none", "int8_static", "int8_dynamic"),
        "conv": ("none", "int8_static", "int8_dynamic"),
        "matmul": ("int8_static", "int8_dynamic"),
        "add": ("int8_static",),
        "mul": ("int8_static",),
        "embedding": ("none",),
    },
)

BACKENDS = {b.name: b for b in (XNNPACK, GENERIC)}


def get(name: str | Backend) -> Backend:
    """The backend called ``name``.

    >>> get("tpu")
    Traceback (most recent call last):
    ...
    ValueError: unknown backend 'tpu'; available: xnnpack, generic
    """
    if isinstance(name, Backend):
        return name
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    return BACKENDS[name]
