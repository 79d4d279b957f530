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
    "pte": {"fp32": 0.833, "fp16": 0.623, "int8": 0.328, "int4": 0.257},
    "tflite": {"fp32": 0.752, "fp16": 0.342, "int8": 0.280, "int4": 0.214},
    "gguf": {"fp32": 0.905, "fp16": 0.564, "int8": 0.259, "int4": 0.295},
}
_KV_BYTES = {"pte": 4, "tflite": 4, "gguf": 2}  # bytes per cached value
_KV_WHOLE_CACHE_READS = 3  # .tflite: attention over the whole cache, copied in and out


def kind(scheme) -> str:
    """The efficiency class of a scheme: ``fp32`` (None, float), ``fp16`` (fp16, bf16),
    ``int8``, or ``int4`` (4 bits or fewer)."""
    if scheme is None or scheme.weight == "fp32":
        return "fp32"
    if not scheme.is_integer:
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
            isinstance(table.get(r), dict) and set(KINDS) <= set(table[r]) for r in RUNTIMES
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
        seconds += read.kv / (bandwidth * eff["fp32"])
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


def calibrate(
    runtimes=RUNTIMES,
    *,
    kinds=KINDS,
    rounds: int = 3,
    shape: dict[str, Any] | None = None,
    store: bool = True,
) -> dict[str, Any]:
    """Measure this machine's `efficiency` table and (``store``) write it to
    `calibration_path`: each runtime runs the calibration model (`CALIBRATION_SHAPE`, or
    ``shape``) in each of ``kinds`` (``fp32`` first: the KV cache's share is taken at its
    efficiency); efficiency = bytes a token reads / (read bandwidth x measured seconds per
    token). Takes a few minutes with the defaults."""
    if list(kinds)[:1] != ["fp32"] or not set(kinds) <= set(KINDS):
        raise ValueError(f"kinds must start with 'fp32' and be among {KINDS}, got {kinds!r}")
    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown:
        raise ValueError(f"unknown runtime(s) {unknown}; runtimes: {', '.join(RUNTIMES)}")
    import copy
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
    spec = dataclasses.replace(decoder_of(reference).spec, **(shape or CALIBRATION_SHAPE))
    del reference
    torch.manual_seed(0)
    model = Decoder(spec).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    prompt = list(range(1000, 1000 + SPEED_PROMPT_TOKENS))
    position = SPEED_PROMPT_TOKENS + SPEED_NEW_TOKENS // 2
    measured: dict[str, dict[str, Any]] = {r: {} for r in runtimes}
    table: dict[str, dict[str, float]] = {r: {} for r in runtimes}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(r, k) for r in runtimes for k in kinds]
        paths, plans = {}, {}
        for runtime, k in progress_bar(jobs, len(jobs), "write", "file"):
            quantized, plan = edgequant.quantize(copy.deepcopy(model), _recipe(runtime, k))
            suffix = {"pte": ".pte", "tflite": ".tflite", "gguf": ".gguf"}[runtime]
            path = write(
                quantized, tokenizer, runtime, Path(tmp) / f"{k}{suffix}", source=str(source),
                max_seq_len=512,
            )  # fmt: skip
            paths[f"{runtime}/{k}"] = path
            plans[(runtime, k)] = plan
            del quantized
        timed = speeds(paths, prompt, SPEED_NEW_TOKENS, rounds)
    for runtime in runtimes:
        for k in kinds:  # fp32 first: the KV cache's share needs its efficiency
            read = token_bytes(plans[(runtime, k)], spec, runtime, position, 512)
            bandwidth = read_bandwidth(read.total)
            seconds = 1.0 / timed[f"{runtime}/{k}"]["decode_tokens_per_s"]
            if k == "fp32":
                eff = read.total / (bandwidth * seconds)
            else:
                kv_seconds = read.kv / (bandwidth * table[runtime]["fp32"])
                eff = read.weights[k] / (bandwidth * max(seconds - kv_seconds, 1e-9))
            table[runtime][k] = eff
            measured[runtime][k] = {
                "decode_tokens_per_s": timed[f"{runtime}/{k}"]["decode_tokens_per_s"],
                "token_bytes": read.total,
                "bandwidth_gb_s": bandwidth / 1e9,
                "efficiency": eff,
            }
    for runtime in runtimes:  # kinds not measured keep the defaults
        table[runtime] = {**DEFAULT_EFFICIENCY[runtime], **table[runtime]}
    for runtime in set(RUNTIMES) - set(runtimes):
        table[runtime] = dict(DEFAULT_EFFICIENCY[runtime])
    result = {
        "machine": machine_key(),
        "model": {"shape": shape or CALIBRATION_SHAPE, "vocab_size": spec.vocab_size, "seed": 0},
        "efficiency": table,
        "measured": measured,
        "rounds": rounds,
    }
    if store:
        path = calibration_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(result, indent=2) + "\n", overwrite=True)
    return result
