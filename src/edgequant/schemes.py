"""`Scheme`: how one layer is quantized. One frozen dataclass that validates itself.

A scheme is data, never guessed from a name: artifacts store it field by field.

Weight dtypes: ``int2`` .. ``int8`` (integers with scales), ``fp16`` / ``bf16`` (a plain cast),
``fp32`` (kept as is), ``q2_k`` .. ``q6_k`` (llama.cpp's K-quant blocks, rounded by llama.cpp's
own quantizer and stored as its bytes: `edgequant.kquants`; a GGUF runs them). Activation modes:
``none`` (float compute), ``int8_dynamic`` (each token's activations quantized to int8 at run
time with its own scale, integer matmul, float output), ``int8_static`` (one activation scale
from calibration).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from edgequant.primitives import FLOAT_DTYPES, GRANULARITIES

INT_DTYPES = tuple(f"int{b}" for b in range(2, 9))
# llama.cpp's K-quants: super-blocks of 256 values of a row (`edgequant.kquants`)
KQUANT_DTYPES = tuple(f"q{b}_k" for b in range(2, 7))
WEIGHT_DTYPES = INT_DTYPES + ("fp16", "bf16", "fp32") + KQUANT_DTYPES
ACTIVATIONS = ("none", "int8_dynamic", "int8_static")
# Algorithms (edgequant.algorithms) and the parameters each takes, with their types.
ALGORITHMS: dict[str, dict[str, type]] = {
    "minmax": {},
    "mse": {"steps": int, "min_ratio": float, "signed_scales": bool, "magnitude": float},
    "hqq": {
        "iters": int,
        "p": float,
        "beta": float,
        "kappa": float,
        "start": str,
        "magnitude": float,
    },
    "gptq": {
        "damp": float,
        "act_order": bool,
        "block": int,
        "scales": str,
        "magnitude": float,
        "sequential": bool,
        "gptaq": float,
        "gptaq_residual": float,
        "gptaq_head": float,
    },
    "awq": {
        "grid": int,
        "clip": bool,
        "tokens": int,
        "signed_scales": bool,
        "gptq": bool,
        "magnitude": float,
        "gptaq": float,
        "gptaq_residual": float,
        "gptaq_head": float,
    },
    "smoothquant": {"alpha": float, "grid": int, "tokens": int},
    # llama.cpp's quantizer weighing each input column by its calibration inputs' mean square
    # (what llama-imatrix gathers); K-quant weights only
    "imatrix": {},
}
# The values each parameter may take: (low, high) inclusive, low excluded where marked "(",
# or the allowed strings. The bounds keep out what cannot mean anything (NaN, negatives) and
# what would only exhaust the machine (a million search steps).
PARAM_RANGES: dict[str, tuple] = {
    "steps": (1, 4096),
    "min_ratio": ("(", 0.0, 1.0),
    "magnitude": (0.0, 8.0),
    "iters": (0, 1000),
    "p": ("(", 0.0, 2.0),
    "beta": ("(", 0.0, 1e6),
    "kappa": (1.0, 10.0),
    "start": ("mse", "minmax"),
    "damp": ("(", 0.0, 10.0),
    "block": (1, 65536),
    "scales": ("mse", "minmax"),
    "grid": (1, 1000),
    "tokens": (1, 1_000_000),
    "alpha": (0.0, 1.0),
    "gptaq": (0.0, 1.0),
    "gptaq_residual": (0.0, 1.0),
    "gptaq_head": (0.0, 1.0),
}


def _param_range_error(name: str, value: Any) -> str | None:
    """What is wrong with an algorithm parameter's value, or None (its type is checked
    before)."""
    import math

    allowed = PARAM_RANGES.get(name)
    if allowed is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        return None if value in allowed else f"one of {list(allowed)}"
    open_low = allowed[0] == "("
    low, high = allowed[1:] if open_low else allowed
    kind = "an integer" if isinstance(low, int) else "a number"
    text = f"{kind} in {'(' if open_low else '['}{low}, {high}]"
    if isinstance(value, float) and not math.isfinite(value):
        return text
    if value < low or value > high or (open_low and value == low):
        return text
    return None


# Algorithms that need calibration data (`edgequant.calibration`).
NEEDS_CALIBRATION = ("gptq", "awq", "smoothquant", "imatrix")


def parse_algorithm(text: str) -> tuple[str, dict[str, Any]]:
    """An algorithm with its parameters as one word (the CLI's ``--algorithm``, the benchmarks'
    variants): ``"gptq@gptaq=0.25@sequential"`` -> ``("gptq", {"gptaq": 0.25, "sequential":
    True})``; a name alone means true, a value is read as JSON (``0.25``, ``false``) or else
    kept as text (``scales=minmax``). The names and values are checked where the scheme is
    built (`Scheme`)."""
    import json

    name, *settings = text.split("@")
    params: dict[str, Any] = {}
    for setting in settings:
        key, eq, value = setting.partition("=")
        if not eq:
            params[key] = True
            continue
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return name, params


# Algorithms that rescale a linear's input channels and fold the inverse into the op before it.
SMOOTHING = ("awq", "smoothquant")


@dataclass(frozen=True)
class Scheme:
    """How one Linear / Embedding is stored and computed.

    >>> Scheme(weight="int4", granularity="per_group", group_size=32, activation="int8_dynamic")
    Scheme(weight='int4', granularity='per_group', group_size=32, symmetric=True, \
scale_dtype='fp32', activation='int8_dynamic', activation_symmetric=False, algorithm='minmax', \
algorithm_params=())
    >>> Scheme(weight="int4", granularity="per_group")
    Traceback (most recent call last):
    ...
    ValueError: Scheme: granularity 'per_group' needs a group_size (e.g. 32)
    """

    weight: str
    granularity: str = "per_channel"
    group_size: int | None = None
    symmetric: bool = True
    # fp32 scales by default; fp16 saves 2 bytes a group and is what GGUF's Q4_0/Q8_0 hold.
    scale_dtype: str = "fp32"
    activation: str = "none"
    # Per-token activation ranges are skewed (e.g. after SiLU), so asymmetric is the default, as
    # in ExecuTorch's 8da4w and XNNPACK's dynamically quantized linear.
    activation_symmetric: bool = False
    algorithm: str = "minmax"
    # the algorithm's parameters: a mapping, held as sorted (name, value) pairs (hashable)
    algorithm_params: Any = ()

    def __post_init__(self) -> None:
        def bad(field: str, value: Any, allowed: Any) -> ValueError:
            return ValueError(f"Scheme: {field} {value!r} is not allowed; allowed: {allowed}")

        for field in ("weight", "granularity", "scale_dtype", "activation", "algorithm"):
            if not isinstance(getattr(self, field), str):
                raise bad(field, getattr(self, field), "a name (string)")
        params = self.algorithm_params
        if isinstance(params, dict) and not all(isinstance(k, str) for k in params):
            raise bad("algorithm_params", params, "a mapping of parameter names to values")
        if isinstance(params, dict):
            params = tuple(sorted(params.items()))
        elif isinstance(params, (tuple, list)) and all(
            isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)
            for pair in params
        ):
            params = tuple(sorted((tuple(pair) for pair in params), key=lambda pair: pair[0]))
        else:
            raise bad("algorithm_params", params, "a mapping of parameter names to values")
        object.__setattr__(self, "algorithm_params", params)

        if self.weight not in WEIGHT_DTYPES:
            raise bad("weight", self.weight, list(WEIGHT_DTYPES))
        if self.activation not in ACTIVATIONS:
            raise bad("activation", self.activation, list(ACTIVATIONS))
        if self.algorithm not in ALGORITHMS:
            raise bad("algorithm", self.algorithm, list(ALGORITHMS))
        allowed_params = ALGORITHMS[self.algorithm]
        for name, value in params:
            if name not in allowed_params:
                raise ValueError(
                    f"Scheme: algorithm {self.algorithm!r} takes no parameter {name!r}; it takes "
                    f"{sorted(allowed_params) or 'none'}"
                )
            kind = allowed_params[name]
            ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                raise bad(f"{self.algorithm} parameter {name}", value, f"a {kind.__name__}")
            wrong = _param_range_error(name, value)
            if wrong:
                raise bad(f"{self.algorithm} parameter {name}", value, wrong)
        named = dict(params)
        if self.algorithm == "awq" and named.get("gptaq", 0) and not named.get("gptq", False):
            raise ValueError(
                "Scheme: awq parameter gptaq applies to the GPTQ rounding after AWQ's scales: "
                "it needs gptq: true"
            )
        for name in ("gptaq_residual", "gptaq_head"):
            if named.get(name, 0) and not named.get("gptaq", 0):
                raise ValueError(
                    f"Scheme: {self.algorithm} parameter {name} works with GPTAQ's float twin: "
                    "it needs gptaq > 0"
                )

        if self.algorithm != "minmax" and self.granularity == "per_tensor":
            raise ValueError(
                f"Scheme: algorithm {self.algorithm!r} works per channel or per group, not "
                "per_tensor"
            )
        if self.is_kquant and self.algorithm not in ("minmax", "imatrix"):
            raise ValueError(
                f"Scheme: a {self.weight} weight is rounded by llama.cpp's quantizer: algorithm "
                f"'minmax' (no importance) or 'imatrix' (weighed by calibration inputs), not "
                f"{self.algorithm!r}"
            )
        if self.algorithm == "imatrix" and not self.is_kquant:
            raise ValueError(
                f"Scheme: algorithm 'imatrix' is llama.cpp's quantizer for K-quant weights "
                f"{list(KQUANT_DTYPES)}, not {self.weight!r} (gptq weighs an integer weight by "
                "its calibration inputs)"
            )
        if self.algorithm != "minmax" and not self.is_integer and not self.is_kquant:
            raise ValueError(
                f"Scheme: algorithm {self.algorithm!r} chooses integers and scales; a "
                f"{self.weight} weight is a plain cast (leave algorithm at 'minmax')"
            )
        if self.algorithm == "smoothquant" and self.activation == "none":
            raise ValueError(
                "Scheme: algorithm 'smoothquant' moves activation outliers into the weights for "
                "int8 activations; this scheme computes with float activations (use 'awq', or "
                "activation 'int8_dynamic')"
            )
        if not isinstance(self.symmetric, bool):
            raise bad("symmetric", self.symmetric, [True, False])
        if not isinstance(self.activation_symmetric, bool):
            raise bad("activation_symmetric", self.activation_symmetric, [True, False])
        if self.granularity not in GRANULARITIES:
            raise bad("granularity", self.granularity, list(GRANULARITIES))
        if self.scale_dtype not in FLOAT_DTYPES:
            raise bad("scale_dtype", self.scale_dtype, list(FLOAT_DTYPES))
        if not self.is_integer:
            if self.activation != "none" and self.is_kquant:
                raise ValueError(
                    f"Scheme: a {self.weight} weight meets activations llama.cpp rounds itself "
                    f"(8-bit blocks); activation {self.activation!r} does not apply, leave it "
                    "at 'none'"
                )
            if self.activation != "none":
                raise ValueError(
                    f"Scheme: a {self.weight} weight computes in float; activation "
                    f"{self.activation!r} needs an integer weight (e.g. weight='int8')"
                )
            integer_only = {
                "granularity": "per_channel",
                "group_size": None,
                "symmetric": True,
                "scale_dtype": "fp32",
                "activation_symmetric": False,
            }
            for name, default in integer_only.items():
                if getattr(self, name) != default:
                    kind = "llama.cpp's blocks" if self.is_kquant else "a plain cast"
                    raise ValueError(
                        f"Scheme: {name} {getattr(self, name)!r} does not apply to a "
                        f"{self.weight} weight ({kind}); leave it at {default!r}"
                    )
            return
        if self.granularity == "per_group":
            if self.group_size is None:
                raise ValueError("Scheme: granularity 'per_group' needs a group_size (e.g. 32)")
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
                raise bad("group_size", self.group_size, "a positive integer")
            if self.group_size <= 0 or self.group_size % 2:
                raise bad("group_size", self.group_size, "a positive even integer")
        elif self.group_size is not None:
            raise ValueError(
                f"Scheme: group_size {self.group_size!r} is only meaningful with "
                f"granularity 'per_group', not {self.granularity!r}"
            )

    # ---- derived facts -----------------------------------------------------------------------
    @property
    def is_integer(self) -> bool:
        """True for int2..int8 weights (stored as integers plus scales)."""
        return self.weight in INT_DTYPES

    @property
    def is_kquant(self) -> bool:
        """True for llama.cpp's K-quant blocks (``q2_k`` .. ``q6_k``)."""
        return self.weight in KQUANT_DTYPES

    @property
    def bits(self) -> int:
        """Bits of one stored weight value (16 for fp16/bf16, 32 for fp32; a K-quant's integer
        width, 4 for ``q4_k``)."""
        if self.is_integer:
            return int(self.weight[3:])
        if self.is_kquant:
            return int(self.weight[1])
        return {"fp16": 16, "bf16": 16}.get(self.weight, 32)

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return FLOAT_DTYPES[self.scale_dtype]

    def bits_per_weight(self, rows: int, cols: int) -> float:
        """Stored bits per weight of a ``[rows, cols]`` weight, scales and zero points included.

        int2/int4 are packed (4 and 2 per byte); int3 and int5..int8 take one byte each.

        >>> Scheme("int4", "per_group", 32, scale_dtype="fp16").bits_per_weight(2048, 4096)
        4.5
        >>> Scheme("int3", "per_group", 32, scale_dtype="fp16").bits_per_weight(2048, 4096)
        8.5
        >>> Scheme("q6_k").bits_per_weight(2048, 4096)  # 210 bytes a block of 256
        6.5625
        """
        if self.is_kquant:
            from edgequant.kquants import BLOCK_BYTES, BLOCK_VALUES

            return 8 * BLOCK_BYTES[self.weight] / BLOCK_VALUES
        if not self.is_integer:
            return float(self.bits)
        value_bits = self.bits if self.bits in (2, 4) else 8
        if self.granularity == "per_group":
            groups = rows * (cols // self.group_size)
        else:
            groups = rows if self.granularity == "per_channel" else 1
        extra = torch.finfo(self.torch_scale_dtype).bits + (0 if self.symmetric else 8)
        return value_bits + extra * groups / (rows * cols)

    def rounded_by(self, algorithm: str, **params: Any) -> Scheme:
        """This scheme with its integers found by ``algorithm`` (and its ``params``); a float
        scheme is returned as it is.

        >>> Scheme("int8").rounded_by("hqq").algorithm, Scheme("fp16").rounded_by("hqq").algorithm
        ('hqq', 'minmax')

        A K-quant is rounded by llama.cpp's quantizer: with the importance of its calibration
        inputs (``imatrix``) when ``algorithm`` calibrates, without otherwise.

        >>> Scheme("q4_k").rounded_by("gptq").algorithm, Scheme("q4_k").rounded_by("hqq").algorithm
        ('imatrix', 'minmax')
        """
        if self.is_kquant:
            return dataclasses.replace(
                self, algorithm="imatrix" if algorithm in NEEDS_CALIBRATION else "minmax",
                algorithm_params=(),
            )  # fmt: skip
        if not self.is_integer:
            return self
        return dataclasses.replace(self, algorithm=algorithm, algorithm_params=params)

    def describe(self) -> str:
        """A short human label, e.g. ``int4 g32 sym fp16-scales, act int8 dynamic``.

        >>> Scheme("int8").describe()
        'int8 per-channel sym'
        """
        if self.is_kquant:
            return self.weight + (", imatrix" if self.algorithm == "imatrix" else "")
        if not self.is_integer:
            return self.weight
        gran = {"per_tensor": "per-tensor", "per_channel": "per-channel"}.get(
            self.granularity, f"g{self.group_size}"
        )
        parts = [self.weight, gran, "sym" if self.symmetric else "asym"]
        if self.scale_dtype != "fp32":
            parts.append(f"{self.scale_dtype}-scales")
        text = " ".join(parts)
        if self.activation != "none":
            kind = "sym" if self.activation_symmetric else "asym"
            text += f", act {self.activation.replace('_', ' ')} {kind}"
        if self.algorithm != "minmax":
            args = ", ".join(f"{k}={v}" for k, v in self.algorithm_params)
            text += f", {self.algorithm}" + (f"({args})" if args else "")
        return text

    # ---- file form ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (JSON/YAML ready)."""
        out = dataclasses.asdict(self)
        out["algorithm_params"] = dict(self.algorithm_params)
        return out

    @property
    def params(self) -> dict[str, Any]:
        """``algorithm_params`` as a dict."""
        return dict(self.algorithm_params)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "scheme") -> Scheme:
        """Build from a dict, naming ``where`` in errors (unknown keys, missing weight)."""
        if not isinstance(data, dict):
            raise TypeError(f"{where}: expected a mapping of scheme fields, got {data!r}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {allowed}")
        if "weight" not in data:
            raise ValueError(f"{where}: missing 'weight' (one of {list(WEIGHT_DTYPES)})")
        try:
            return cls(**data)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
