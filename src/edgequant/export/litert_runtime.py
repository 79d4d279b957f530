"""Run a ``.tflite`` written by `edgequant.export.litert.to_tflite` in the LiteRT interpreter.

`TfliteModel` has edgequant's decoder calling convention (as `PteModel`): ``model(tokens)`` gives
the logits of a whole sequence; ``new_cache()`` / ``model(tokens, start_pos=..., cache=...)``
decode incrementally. Whole chunks of the program's prefill length go through ``prefill``, the
rest token by token through ``decode``. The KV cache lives in numpy arrays passed in and out
of the signatures.
"""

from __future__ import annotations

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
    def __init__(self, shape: tuple[int, ...], n_layers: int, max_len: int) -> None:
        self.arrays = [np.zeros(shape, np.float32) for _ in range(2 * n_layers)]
        self.max_len = max_len


class TfliteModel:
    """A loaded ``.tflite`` decoder with ``prefill`` and ``decode`` signatures."""

    def __init__(self, path: str | Path, num_threads: int | None = None) -> None:
        from ai_edge_litert.interpreter import Interpreter

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f".tflite file {str(path)!r} does not exist")
        try:
            self._interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
            signatures = self._interpreter.get_signature_list()
            self._prefill = self._interpreter.get_signature_runner("prefill")
            self._decode = self._interpreter.get_signature_runner("decode")
        except (RuntimeError, ValueError) as e:
            raise ValueError(
                f"{str(path)!r} is not a loadable LiteRT decoder with prefill and decode "
                f"signatures (truncated, corrupted, or not written by "
                f"edgequant.export.litert.to_tflite): {e}"
            ) from None
        inputs = self._prefill.get_input_details()
        outputs = self._prefill.get_output_details()
        self._cache_shape = tuple(int(d) for d in inputs["args_2"]["shape"])
        self.args = TfliteArgs(
            max_seq_len=self._cache_shape[2],
            prefill_len=int(inputs["args_0"]["shape"][1]),
            n_layers=(len(signatures["prefill"]["inputs"]) - 2) // 2,
            vocab_size=int(outputs["output_0"]["shape"][-1]),
        )
        self.path = path

    def new_cache(self, batch: int = 1, max_len: int | None = None, **_) -> TfliteCache:
        if batch != 1:
            raise ValueError(f"a .tflite decodes one sequence; got batch {batch}")
        max_len = self.args.max_seq_len if max_len is None else max_len
        return TfliteCache(self._cache_shape, self.args.n_layers, max_len)

    def _run(self, runner, ids: list[int], start: int, cache: TfliteCache) -> np.ndarray:
        feed = {
            "args_0": np.array([ids], dtype=np.int32),
            "args_1": np.arange(start, start + len(ids), dtype=np.int32),
        }
        for i, array in enumerate(cache.arrays):
            feed[f"args_{i + 2}"] = array
        out = runner(**feed)
        cache.arrays = [out[f"output_{i + 1}"] for i in range(len(cache.arrays))]
        return out["output_0"][0]  # [T, vocab]

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
            pieces.append(self._run(self._prefill, ids[done : done + P], start_pos + done, cache))
            done += P
        for i in range(done, len(ids)):
            pieces.append(self._run(self._decode, [ids[i]], start_pos + i, cache))
        return torch.from_numpy(np.concatenate(pieces))[None].float()  # [1, T, vocab]

    def eval(self) -> TfliteModel:
        return self

    def parameters(self):  # the weights live inside the file
        return iter(())

    def buffers(self):
        return iter(())
