"""Run a ``.tflite`` decoder in the LiteRT runtime: edgequant's (`edgequant.export.litert`) or
litert-torch's own generative exports (its example converters' signature names).

`TfliteModel` has edgequant's decoder calling convention (as `PteModel`): ``model(tokens)`` gives
the logits of a whole sequence; ``new_cache()`` / ``model(tokens, start_pos=..., cache=...)``
decode incrementally. Whole chunks of the program's prefill length go through ``prefill``, the
rest token by token through ``decode``.

The file runs in LiteRT's ``CompiledModel`` (its CPU accelerator is XNNPACK) on LiteRT's own
tensor buffers: the KV cache is two sets of buffers that swap roles every step (one is read,
the other written), so it never passes through Python. The interpreter's signature runners copy
every cache in and out on every token: 135 ms per SmolLM2-135M decode step against 29 ms here.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgequant.export.pte_runtime import RuntimeModule


@dataclass(frozen=True)
class TfliteArgs:
    max_seq_len: int
    prefill_len: int
    n_layers: int
    vocab_size: int


class TfliteCache:
    """The KV cache of one sequence: two sets of LiteRT buffers, read and written in turn."""

    def __init__(self, read: list, write: list, max_len: int) -> None:
        self.read, self.write = read, write
        self.max_len = max_len

    def swap(self) -> None:
        self.read, self.write = self.write, self.read


@contextlib.contextmanager
def _native_log():
    """Keep LiteRT's native log lines (accelerator registration, plugins it cannot load) off
    the terminal; yields a function that returns them, for error messages."""
    with tempfile.TemporaryFile(mode="w+b") as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            yield lambda: (log.seek(0), log.read().decode(errors="replace"))[1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@dataclass(frozen=True)
class _Layout:
    """How a decoder file names its signatures' tensors."""

    tokens: str
    positions: str
    logits: str
    cache_pairs: tuple[tuple[str, str], ...]  # (input, output) of each cache, k_0, v_0, k_1, ..


def _layout(inputs: dict, outputs: dict) -> _Layout:
    """edgequant's names (args_0 tokens, args_1 positions, args_2.. caches -> output_0 logits,
    output_1.. caches) or litert-torch's (tokens, input_pos, kv_cache_k_<i>/kv_cache_v_<i> ->
    logits and the same cache names)."""
    if "args_0" in inputs:
        n = len(inputs) - 2
        pairs = tuple((f"args_{i + 2}", f"output_{i + 1}") for i in range(n))
        return _Layout("args_0", "args_1", "output_0", pairs)
    layers = sum(1 for name in inputs if name.startswith("kv_cache_k_"))
    pairs = tuple(
        (f"kv_cache_{kv}_{i}", f"kv_cache_{kv}_{i}") for i in range(layers) for kv in "kv"
    )
    if "mask" in inputs:
        raise ValueError("decoders taking their attention mask as an input are not supported")
    return _Layout("tokens", "input_pos", "logits", pairs)


class TfliteModel(RuntimeModule):
    """A loaded ``.tflite`` decoder with a ``decode`` signature and a prefill signature
    (``prefill``, or litert-torch's ``prefill_<T>``); edgequant's files or litert-torch's own
    (``output_logits_on_prefill=True`` to prefill with it; otherwise every token is decoded)."""

    def __init__(self, path: str | Path, num_threads: int | None = None) -> None:
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.cpu_options import CpuOptions
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
        from ai_edge_litert.options import Options

        no_delegates = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f".tflite file {str(path)!r} does not exist")
        threads = num_threads or os.cpu_count() or 1
        options = Options(
            hardware_accelerators=HardwareAccelerator.CPU,
            cpu_options=CpuOptions(num_threads=threads),
        )
        with _native_log() as log:
            try:
                # the interpreter verifies the flatbuffer (CompiledModel crashes on a truncated
                # file); without delegates it only maps the file
                Interpreter(model_path=str(path), experimental_op_resolver_type=no_delegates)
                self._model = model = CompiledModel.from_file(str(path), options=options)
                prefills = [s for s in model.get_signature_list() if s.startswith("prefill")]
                details = {
                    name: (
                        model.get_input_tensor_details(name),
                        model.get_output_tensor_details(name),
                    )
                    for name in ["decode", *prefills[:1]]
                }
                self._layout = _layout(*details["decode"])
                tokens = self._layout.tokens
                cache_shape = details["decode"][0][self._layout.cache_pairs[0][0]]["shape"]
            except (RuntimeError, ValueError, KeyError, IndexError) as e:
                errors = [line for line in log().splitlines() if line.startswith("ERROR")]
                raise ValueError(
                    f"{str(path)!r} is not a loadable LiteRT decoder with prefill and decode "
                    f"signatures (truncated, corrupted, or not written by "
                    f"edgequant.export.litert.to_tflite): {' '.join([str(e), *errors[:2]])}"
                ) from None
        logits = self._layout.logits
        # a prefill signature without logits (litert-torch's default) cannot be evaluated
        prefill = next((p for p in prefills[:1] if logits in details[p][1]), None)
        self._cache_shape = tuple(int(d) for d in cache_shape)
        self.args = TfliteArgs(
            max_seq_len=self._cache_shape[1],
            prefill_len=int(details[prefill][0][tokens]["shape"][1]) if prefill else 1,
            n_layers=len(self._layout.cache_pairs) // 2,
            vocab_size=int(details["decode"][1][logits]["shape"][-1]),
        )
        self.path, self.num_threads = path, threads
        # per signature: its token, position and logits buffers, and the logits' shape
        self._io = {}
        for kind, name in (("prefill", prefill), ("decode", "decode")):
            if name is None:
                continue
            self._io[kind] = (
                name,
                model.create_input_buffer_by_name(name, tokens),
                model.create_input_buffer_by_name(name, self._layout.positions),
                model.create_output_buffer_by_name(name, logits),
                tuple(int(d) for d in details[name][1][logits]["shape"]),
            )

    def new_cache(self, batch: int = 1, max_len: int | None = None, **_) -> TfliteCache:
        if batch != 1:
            raise ValueError(f"a .tflite decodes one sequence; got batch {batch}")
        max_len = self.args.max_seq_len if max_len is None else max_len
        zeros = np.zeros(self._cache_shape, np.float32)
        model, pairs = self._model, self._layout.cache_pairs
        read = [model.create_input_buffer_by_name("decode", i) for i, _ in pairs]
        write = [model.create_output_buffer_by_name("decode", o) for _, o in pairs]
        for buffer in read:  # slots past the current position are masked, but never garbage
            buffer.write(zeros)
        return TfliteCache(read, write, max_len)

    def _run(self, kind: str, ids: list[int], start: int, cache: TfliteCache) -> np.ndarray:
        name, tokens, positions, logits, shape = self._io[kind]
        tokens.write(np.array([ids], dtype=np.int32))
        positions.write(np.arange(start, start + len(ids), dtype=np.int32))
        layout = self._layout
        inputs = {layout.tokens: tokens, layout.positions: positions}
        outputs = {layout.logits: logits}
        for (i, o), read, write in zip(layout.cache_pairs, cache.read, cache.write, strict=True):
            inputs[i], outputs[o] = read, write
        self._model.run_by_name(name, inputs, outputs)
        cache.swap()
        return logits.read(int(np.prod(shape)), np.float32).reshape(shape)[0]  # [T, vocab]

    def __call__(
        self, tokens: torch.Tensor, start_pos: int = 0, cache: TfliteCache | None = None
    ) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[0] != 1:
            raise ValueError(f"tokens must be [1, seq], got shape {tuple(tokens.shape)}")
        ids = tokens[0].tolist()
        if start_pos + len(ids) > self.args.max_seq_len:
            raise ValueError(
                f"start_pos + seq must be <= max_seq_len={self.args.max_seq_len}, got "
                f"{start_pos} + {len(ids)}"
            )
        cache = self.new_cache() if cache is None else cache
        P, pieces, done = self.args.prefill_len, [], 0
        while len(ids) - done >= P and "prefill" in self._io:
            pieces.append(self._run("prefill", ids[done : done + P], start_pos + done, cache))
            done += P
        for i in range(done, len(ids)):
            pieces.append(self._run("decode", [ids[i]], start_pos + i, cache))
        return torch.from_numpy(np.concatenate(pieces))[None].float()  # [1, T, vocab]
