"""Run a ``.tflite`` written by `edgequant.export.litert.to_tflite` in the LiteRT runtime.

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


class TfliteModel:
    """A loaded ``.tflite`` decoder with ``prefill`` and ``decode`` signatures."""

    def __init__(self, path: str | Path, num_threads: int | None = None) -> None:
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.cpu_options import CpuOptions
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
        from ai_edge_litert.options import Options

        _NO_DELEGATES = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES

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
                Interpreter(model_path=str(path), experimental_op_resolver_type=_NO_DELEGATES)
                self._model = CompiledModel.from_file(str(path), options=options)
                signatures = self._model.get_signature_list()
                inputs = self._model.get_input_tensor_details("prefill")
                outputs = self._model.get_output_tensor_details("prefill")
                self._cache_shape = tuple(int(d) for d in inputs["args_2"]["shape"])
            except (RuntimeError, ValueError, KeyError) as e:
                errors = [line for line in log().splitlines() if line.startswith("ERROR")]
                raise ValueError(
                    f"{str(path)!r} is not a loadable LiteRT decoder with prefill and decode "
                    f"signatures (truncated, corrupted, or not written by "
                    f"edgequant.export.litert.to_tflite): {' '.join([str(e), *errors[:2]])}"
                ) from None
        self.args = TfliteArgs(
            max_seq_len=self._cache_shape[1],
            prefill_len=int(inputs["args_0"]["shape"][1]),
            n_layers=(len(signatures["prefill"]["inputs"]) - 2) // 2,
            vocab_size=int(outputs["output_0"]["shape"][-1]),
        )
        self.path, self.num_threads = path, threads
        # per signature: its token and position buffers, its logits buffer and logits shape
        self._io = {}
        for name in ("prefill", "decode"):
            out = self._model.get_output_tensor_details(name)["output_0"]
            self._io[name] = (
                self._model.create_input_buffer_by_name(name, "args_0"),
                self._model.create_input_buffer_by_name(name, "args_1"),
                self._model.create_output_buffer_by_name(name, "output_0"),
                tuple(int(d) for d in out["shape"]),
                self._model.get_signature_index(name),
            )

    def new_cache(self, batch: int = 1, max_len: int | None = None, **_) -> TfliteCache:
        if batch != 1:
            raise ValueError(f"a .tflite decodes one sequence; got batch {batch}")
        max_len = self.args.max_seq_len if max_len is None else max_len
        zeros = np.zeros(self._cache_shape, np.float32)
        n = 2 * self.args.n_layers
        model = self._model
        read = [model.create_input_buffer_by_name("decode", f"args_{i + 2}") for i in range(n)]
        write = [model.create_output_buffer_by_name("decode", f"output_{i + 1}") for i in range(n)]
        for buffer in read:  # slots past the current position are masked, but never garbage
            buffer.write(zeros)
        return TfliteCache(read, write, max_len)

    def _run(self, signature: str, ids: list[int], start: int, cache: TfliteCache) -> np.ndarray:
        tokens, positions, logits, shape, index = self._io[signature]
        tokens.write(np.array([ids], dtype=np.int32))
        positions.write(np.arange(start, start + len(ids), dtype=np.int32))
        self._model.run_by_index(index, [tokens, positions, *cache.read], [logits, *cache.write])
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
        while len(ids) - done >= P and P > 1:
            pieces.append(self._run("prefill", ids[done : done + P], start_pos + done, cache))
            done += P
        for i in range(done, len(ids)):
            pieces.append(self._run("decode", [ids[i]], start_pos + i, cache))
        return torch.from_numpy(np.concatenate(pieces))[None].float()  # [1, T, vocab]

    def eval(self) -> TfliteModel:
        return self

    def parameters(self):  # the weights live inside the file
        return iter(())

    def buffers(self):
        return iter(())
