"""Predicted decode speed of each runtime, before anything is exported.

Decoding one token reads every weight a matmul uses once (the linears and the output head; the
embedding only one row) and the KV cache. The predicted time per token is

    sum over weight kinds k of  bytes_k / (bandwidth x efficiency[runtime][k])

where ``bandwidth`` is this machine's read bandwidth at the size of what a token reads (measured
in a fraction of a second: a model that fits in the last-level cache reads faster than one that
does not), and ``efficiency`` is how much of that bandwidth each runtime's kernels reach for
weights stored as ``fp32``, ``fp16``, ``int8`` or ``int4`` (the KV cache counts as ``fp32``).
The efficiencies are measured once per machine by `calibrate` (``edgequant calibrate-speed``):
a random Llama-shaped model, not the model being predicted, written uniformly in each kind for
each runtime and timed there. Without that, `DEFAULT_EFFICIENCY` (measured on the machine this
was written on) is used.

The KV cache a token reads: ExecuTorch's and llama.cpp's attention read the positions filled so
far (llama.cpp stores them as f16); the ``.tflite`` decode signature attends over its whole
cache, which edgequant's runner also copies in and out on every step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

KINDS = ("fp32", "fp16", "int8", "int4")
RUNTIMES = ("pte", "tflite", "gguf")
# Measured by `calibrate` on the machine this was written on (2 cores of an Intel Xeon with
# AVX-512 and AMX and a 480 MiB L3; llama.cpp built for AVX2), 2026-12-05; see docs/speed.md.
# A machine's own `calibrate` replaces them.
DEFAULT_EFFICIENCY: dict[str, dict[str, float]] = {
    "pte": {"fp32": 0.883, "fp16": 0.712, "int8": 0.353, "int4": 0.245, "layer_s": 1.823e-05},
    "tflite": {"fp32": 0.913, "fp16": 0.395, "int8": 0.354, "int4": 0.254, "layer_s": 1.275e-04},
    "gguf": {"fp32": 0.963, "fp16": 0.683, "int8": 0.239, "int4": 0.262, "layer_s": 2.815e-05},
}
_KV_BYTES = {"pte": 4, "tflite": 4, "gguf": 2}  # bytes per cached value
_KV_WHOLE_CACHE_READS = 3  # .tflite: attention over the whole cache, copied in and out


def kind(scheme) -> str:
    """The efficiency class of a scheme: ``fp32`` (None, float), ``fp16`` (fp16, bf16),
    ``int8``, or ``int4`` (4 bits or fewer)."""
    if scheme is None or scheme.weight == "fp32":
        return "fp32"
    if not scheme.is_integer and not scheme.is_kquant:
        return "fp16"
    return "int8" if scheme.bits > 4 else "int4"


@dataclass(frozen=True)
class TokenBytes:
    """What one decoded token reads: weight bytes by kind, and KV-cache bytes."""

    weights: dict[str, int]
    kv: int

    @property
    def total(self) -> int:
        return sum(self.weights.values()) + self.kv


def token_bytes(plan, spec, runtime: str, position: int, max_seq_len: int) -> TokenBytes:
    """The bytes ``runtime`` reads to decode one token at ``position`` (tokens already in the
    cache) of a model with `DecoderSpec` ``spec`` quantized per ``plan``."""
    weights = dict.fromkeys(KINDS, 0)
    for lp in plan:
        if lp.kind == "embedding":
            continue  # one row per token
        weights[kind(lp.scheme)] += lp.bytes_after
    per_position = 2 * spec.n_layers * spec.n_kv_heads * spec.head_dim * _KV_BYTES[runtime]
    if runtime == "tflite":
        kv = per_position * max_seq_len * _KV_WHOLE_CACHE_READS
    else:
        kv = per_position * position
    return TokenBytes(weights, kv)


def read_bandwidth(nbytes: int, seconds: float = 0.3) -> float:
    """Bytes/s this machine reads from a buffer of ``nbytes`` (at least 1 MiB, at most 2 GiB)
    with torch's threads: the fastest of the passes made in ``seconds`` (at least 3), after
    one untimed pass. The fastest pass, not the mean: other work on the machine only ever
    slows a pass down."""
    n = max(2**20, min(int(nbytes), 2**31)) // 4
    buf = torch.ones(n)
    buf.sum()
    best, reps, started = float("inf"), 0, time.perf_counter()
    while time.perf_counter() - started < seconds or reps < 3:
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
        reps += 1
    return n * 4 / best


def machine_key() -> str:
    """What tells this machine's speed apart: processor, cores, torch threads."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} | {os.cpu_count()} cores | {torch.get_num_threads()} threads"


def calibration_path() -> Path:
    """Where `calibrate` stores this machine's efficiencies."""
    from edgequant.models.gguf import cache_dir

    digest = hashlib.sha256(machine_key().encode()).hexdigest()[:12]
    return cache_dir() / "speed" / f"{digest}.json"


def efficiency() -> tuple[dict[str, dict[str, float]], str]:
    """``(efficiencies, where from)``: this machine's calibration if there is one, else the
    shipped defaults."""
    from edgequant._io import load_json

    path = calibration_path()
    if path.is_file():
        data = load_json(path.read_text(), str(path))
        table = data.get("efficiency") if isinstance(data, dict) else None
        if isinstance(table, dict) and all(
            isinstance(table.get(r), dict) and {*KINDS, "layer_s"} <= set(table[r])
            for r in RUNTIMES
        ):
            return table, str(path)
        log.warning("%s is not a speed calibration; using the defaults", path)
    return DEFAULT_EFFICIENCY, "defaults (run `edgequant calibrate-speed` for this machine's)"


def predict(
    plan,
    spec,
    runtimes=RUNTIMES,
    *,
    position: int = 80,
    max_seq_len: int = 512,
    table: dict[str, dict[str, float]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Predicted decode tokens/s per runtime, with what it is made of: ``{runtime:
    {predicted_decode_tokens_per_s, token_bytes, bandwidth_gb_s}}``. ``position`` is how many
    tokens the cache holds (the main job's speed run averages 64 + 32 / 2 = 80)."""
    table = table or efficiency()[0]
    out = {}
    for runtime in runtimes:
        read = token_bytes(plan, spec, runtime, position, max_seq_len)
        bandwidth = read_bandwidth(read.total)
        eff = table[runtime]
        seconds = sum(b / (bandwidth * eff[k]) for k, b in read.weights.items() if b)
        seconds += read.kv / (bandwidth * eff["fp32"]) + spec.n_layers * eff["layer_s"]
        out[runtime] = {
            "predicted_decode_tokens_per_s": 1.0 / seconds,
            "token_bytes": read.total,
            "bandwidth_gb_s": bandwidth / 1e9,
        }
    return out


# --- calibration -------------------------------------------------------------------------------

# The calibration model: Llama-shaped, random, with SmolLM2's vocabulary (so the default model's
# tokenizer can be written into the GGUF file), shaped unlike the models it predicts.
CALIBRATION_SHAPE = dict(
    dim=768, n_layers=6, n_heads=12, n_kv_heads=4, head_dim=64, hidden_dim=2048,
    tied_embedding=False,
)  # fmt: skip
# A deep, thin second model (int4 only) separates each runtime's fixed cost per layer (op
# dispatch, thread wake-ups: llama.cpp decoded SmolLM2's 30 thin layers at a seventh of the
# speed per byte of the 6 wide ones above) from its per-byte cost.
THIN_SHAPE = dict(
    dim=256, n_layers=24, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=768,
    tied_embedding=False,
)  # fmt: skip


def _recipe(runtime: str, k: str):
    from edgequant.recipe import Recipe, Rule
    from edgequant.schemes import Scheme

    dynamic = dict(activation="int8_dynamic")
    scheme = {
        "fp32": None,
        "fp16": Scheme("fp16"),
        "int8": Scheme("int8", "per_group", 32, scale_dtype="fp16")
        if runtime == "gguf"
        else Scheme("int8", **dynamic),
        "int4": Scheme("int4", "per_group", 32, scale_dtype="fp16", **dynamic),
    }[k]
    return Recipe((Rule(scheme, role="default"), Rule(None, role="embedding")), name=k)


def _solve(runtime, kinds, reads, bandwidth, seconds, specs) -> dict[str, float]:
    """The efficiencies and per-layer cost of ``runtime`` from its timed files: fp32 and int4
    of the wide model and int4 of the thin one fix ``fp32``, ``int4`` and ``layer_s`` (a few
    rounds of substitution); every other kind then follows from its own file."""

    def key(name, k):
        return f"{name}/{runtime}/{k}"

    layers = {name: spec.n_layers for name, spec in specs.items()}
    eff = {"layer_s": 0.0}
    for _ in range(20 if "int4" in kinds else 1):
        w = key("wide", "fp32")
        rest = seconds[w] - layers["wide"] * eff["layer_s"]
        eff["fp32"] = reads[w].total / (bandwidth[w] * max(rest, 1e-9))
        if "int4" not in kinds:
            break

        def fixed(name):  # seconds of the int4 file outside its int4 weights
            k = key(name, "int4")
            return reads[k].kv / (bandwidth[k] * eff["fp32"])

        wide, thin = key("wide", "int4"), key("thin", "int4")
        a_w = reads[wide].weights["int4"] / bandwidth[wide]  # seconds x efficiency
        a_t = reads[thin].weights["int4"] / bandwidth[thin]
        # seconds - fixed = a / e + layers x c, for both models: two equations in 1/e and c
        y_w, y_t = seconds[wide] - fixed("wide"), seconds[thin] - fixed("thin")
        det = a_w * layers["thin"] - a_t * layers["wide"]
        inv_e = (y_w * layers["thin"] - y_t * layers["wide"]) / det
        c = (a_w * y_t - a_t * y_w) / det
        if inv_e <= 0 or c < 0:  # the thin model told nothing apart: no per-layer cost
            c, inv_e = 0.0, y_w / a_w
        eff["int4"], eff["layer_s"] = 1.0 / inv_e, c
    for k in kinds:
        if k in ("fp32", "int4"):
            continue
        w = key("wide", k)
        kv = reads[w].kv / (bandwidth[w] * eff["fp32"])
        rest = seconds[w] - kv - layers["wide"] * eff["layer_s"]
        eff[k] = reads[w].weights[k] / (bandwidth[w] * max(rest, 1e-9))
    return eff


def calibrate(
    runtimes=RUNTIMES,
    *,
    kinds=KINDS,
    rounds: int = 3,
    shape: dict[str, Any] | None = None,
    thin_shape: dict[str, Any] | None = None,
    store: bool = True,
) -> dict[str, Any]:
    """Measure this machine's `efficiency` table and (``store``) write it to
    `calibration_path`: each runtime runs the calibration model (`CALIBRATION_SHAPE`, or
    ``shape``) in each of ``kinds`` (``fp32`` first: the KV cache's share is taken at its
    efficiency); efficiency = bytes a token reads / (read bandwidth x measured seconds per
    token), less a fixed cost per decoder layer (``layer_s``) that a second, deep and thin model
    (`THIN_SHAPE`, or ``thin_shape``; int4) separates from the per-byte cost. Takes about 15
    minutes with the defaults on 2 cores."""
    if list(kinds)[:1] != ["fp32"] or not set(kinds) <= set(KINDS):
        raise ValueError(f"kinds must start with 'fp32' and be among {KINDS}, got {kinds!r}")
    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown:
        raise ValueError(f"unknown runtime(s) {unknown}; runtimes: {', '.join(RUNTIMES)}")
    import dataclasses
    import tempfile

    import edgequant
    from edgequant._io import atomic_write_text
    from edgequant._progress import progress_bar
    from edgequant.job import SPEED_NEW_TOKENS, SPEED_PROMPT_TOKENS
    from edgequant.models import default_model_path, load
    from edgequant.models.decoder import Decoder
    from edgequant.models.families import decoder_of
    from edgequant.targets import speeds, write

    source = default_model_path()
    reference, tokenizer, _ = load(source)
    base = decoder_of(reference).spec
    del reference
    shapes = {"wide": shape or CALIBRATION_SHAPE, "thin": thin_shape or THIN_SHAPE}
    specs = {name: dataclasses.replace(base, **sh) for name, sh in shapes.items()}
    prompt = list(range(1000, 1000 + SPEED_PROMPT_TOKENS))
    position = SPEED_PROMPT_TOKENS + SPEED_NEW_TOKENS // 2
    jobs = [("wide", r, k) for r in runtimes for k in kinds]
    if "int4" in kinds:
        jobs += [("thin", r, "int4") for r in runtimes]
    reads: dict[str, TokenBytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, runtime, k in progress_bar(jobs, len(jobs), "write", "file"):
            torch.manual_seed(0)
            model = Decoder(specs[name]).eval()
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0, 0.02)
            quantized, plan = edgequant.quantize(model, _recipe(runtime, k))
            suffix = {"pte": ".pte", "tflite": ".tflite", "gguf": ".gguf"}[runtime]
            key = f"{name}/{runtime}/{k}"
            paths[key] = write(
                quantized, tokenizer, runtime, Path(tmp) / f"{name}-{k}{suffix}",
                source=str(source), max_seq_len=512,
            )  # fmt: skip
            reads[key] = token_bytes(plan, specs[name], runtime, position, 512)
            del quantized, model
        timed = speeds(paths, prompt, SPEED_NEW_TOKENS, rounds)
    bandwidth = {key: read_bandwidth(read.total) for key, read in reads.items()}
    seconds = {key: 1.0 / t["decode_tokens_per_s"] for key, t in timed.items()}
    measured: dict[str, dict[str, Any]] = {r: {} for r in runtimes}
    table: dict[str, dict[str, float]] = {}
    for runtime in runtimes:
        table[runtime] = _solve(runtime, kinds, reads, bandwidth, seconds, specs)
        for key in (k for k in reads if k.split("/")[1] == runtime):
            name, _, k = key.split("/")
            measured[runtime][k if name == "wide" else f"{k} ({name})"] = {
                "decode_tokens_per_s": timed[key]["decode_tokens_per_s"],
                "token_bytes": reads[key].total,
                "bandwidth_gb_s": bandwidth[key] / 1e9,
                "n_layers": specs[name].n_layers,
            }
    for runtime in runtimes:  # kinds not measured keep the defaults
        table[runtime] = {**DEFAULT_EFFICIENCY[runtime], **table[runtime]}
    for runtime in set(RUNTIMES) - set(runtimes):
        table[runtime] = dict(DEFAULT_EFFICIENCY[runtime])
    result = {
        "machine": machine_key(),
        "models": {**shapes, "vocab_size": base.vocab_size, "seed": 0},
        "efficiency": table,
        "measured": measured,
        "rounds": rounds,
    }
    if store:
        path = calibration_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(result, indent=2) + "\n", overwrite=True)
    return result
