"""Run a GGUF file in llama.cpp (llama-cpp-python) with edgequant's decoder calling convention.

`GgufModel` looks like the other program runners (`PteModel`, `TfliteModel`): ``model(tokens)``
gives the logits of every position of a sequence (llama.cpp computes them with
``logits_all=True``), and ``new_cache()`` / ``model(tokens, start_pos=..., cache=...)`` decode
incrementally, so `edgequant.eval` and `edgequant.generate` measure the file inside llama.cpp.
The KV cache lives inside llama.cpp: one `GgufModel` serves one sequence at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgequant.export.pte_runtime import ProgramModel, PteArgs


def check_file(path: str | Path) -> dict:
    """The metadata of a readable GGUF file (``{key: value}`` of the scalar fields); a
    truncated or corrupted file is a ValueError naming it (llama.cpp itself would abort)."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as e:  # the reader raises whatever numpy raises on a short map
        raise ValueError(
            f"{str(path)!r} is not a readable GGUF file (truncated or corrupted): {e}"
        ) from None
    size = path.stat().st_size
    if end > size:
        raise ValueError(
            f"{str(path)!r} is truncated: its tensors need {end} bytes, the file has {size}"
        )
    out = {}
    for key, field in reader.fields.items():
        if field.types and field.types[0] != gguf.GGUFValueType.ARRAY:
            out[key] = field.contents()
        elif key == "tokenizer.ggml.tokens":
            out["n_tokens"] = len(field.data)
    return out


def has_amx() -> bool:
    """Whether llama.cpp was built with, and this CPU has, Intel AMX."""
    import llama_cpp

    return b"AMX_INT8 = 1" in (llama_cpp.llama_print_system_info() or b"")


def _load(path: Path, extra_buffers: bool, **kwargs):
    """``Llama(path, **kwargs)`` with llama.cpp's extra weight buffers (repacked layouts: AMX,
    CPU_REPACK) on or off (llama-cpp-python has no argument for it; llama.cpp's own tools call it
    ``--no-repack``)."""
    import llama_cpp.llama_cpp as native
    from llama_cpp import Llama

    defaults = native.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = extra_buffers
        return p

    native.llama_model_default_params = params
    try:
        return Llama(model_path=str(path), **kwargs)
    finally:
        native.llama_model_default_params = defaults


class GgufModel(ProgramModel):
    """A GGUF file loaded in llama.cpp, with ``n_ctx`` positions (default: the model's
    context length, at most 1024) and ``n_threads`` (default: torch's thread count).

    ``extra_buffers`` (llama.cpp's repacked weight layouts) defaults to on, except where
    llama.cpp uses Intel AMX: its AMX kernels crashed (segfault) on small matrices here
    (stories260K's 64-wide layers, in Q8_0 and Q4_0).

    ``last_only=True`` is how llama.cpp's own tools run (for speed measurements): llama.cpp
    computes the logits of the last position of each call only, and a call returns
    ``[1, 1, vocab]``."""

    what = "a GGUF model here"

    def __init__(
        self,
        path: str | Path,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        extra_buffers: bool | None = None,
        last_only: bool = False,
    ) -> None:
        try:
            import llama_cpp  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "running a GGUF file needs llama-cpp-python: pip install 'edgequant[gguf]' "
                "(built from source on first install, about 3 minutes on 2 cores)"
            ) from e
        path = Path(path)
        meta = check_file(path)
        arch = meta.get("general.architecture", "llama")
        context = int(meta.get(f"{arch}.context_length", 1024))
        n_ctx = min(context, 1024) if n_ctx is None else n_ctx
        if extra_buffers is None:
            extra_buffers = not has_amx()
        self._llm = _load(
            path,
            extra_buffers,
            n_ctx=n_ctx,
            n_batch=min(n_ctx, 512),
            n_threads=n_threads or torch.get_num_threads(),
            logits_all=not last_only,
            verbose=False,
        )
        self.last_only = last_only
        self.args = PteArgs(
            max_seq_len=n_ctx,
            vocab_size=int(self._llm.n_vocab()),
            n_layers=int(meta.get(f"{arch}.block_count", 0)),
        )
        self.path = path

    def __call__(self, tokens: torch.Tensor, start_pos: int = 0, cache=None) -> torch.Tensor:
        end = self._check(tokens, start_pos)
        if start_pos > self._llm.n_tokens:
            raise ValueError(
                f"start_pos {start_pos} skips positions: llama.cpp holds {self._llm.n_tokens}"
            )
        self._llm.n_tokens = start_pos  # eval() drops the cache past this position
        self._llm.eval(tokens[0].tolist())
        if self.last_only:
            last = np.ctypeslib.as_array(self._llm._ctx.get_logits(), shape=(self.args.vocab_size,))
            return torch.from_numpy(last.copy())[None, None]  # [1, 1, vocab]
        scores = np.array(self._llm.scores[start_pos:end], dtype=np.float32)
        return torch.from_numpy(scores)[None]  # [1, T, vocab]


__all__ = ["GgufModel", "check_file", "has_amx"]
