"""Run a ``.pte`` written by `edgequant.export.to_pte` in ExecuTorch's Python runtime.

`PteModel` looks like edgequant's llama2.c model to the rest of the library: ``model(tokens)``
gives the logits of a whole sequence, and ``new_cache()`` / ``model(tokens, start_pos=...,
cache=...)`` decode incrementally, so `edgequant.generate` and `edgequant.eval` run on the file
itself. The program holds its own KV cache: one `PteModel` serves one sequence at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class PteArgs:
    max_seq_len: int
    vocab_size: int
    n_layers: int


class _Positions:
    """Stands for the KV cache, which lives inside the program."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len


def _load(path: Path, what: str, read):
    """``read(program)`` of the ExecuTorch program at ``path``; one clear error for a bad file."""
    from executorch.runtime import Runtime

    if not path.is_file():
        raise FileNotFoundError(f".pte file {str(path)!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(8)
    # ExecuTorch's flatbuffer identifier ("ET12"): a file without it aborts the process inside
    # the runtime (its error log fails on the bytes it quotes), so it never gets there
    if len(head) < 8 or head[4:6] != b"ET" or not head[6:8].isdigit():
        raise ValueError(
            f"{str(path)!r} is not a loadable {what}: no ExecuTorch program identifier "
            f"(bytes 4-8 are {head[4:8]!r}, expected b'ET' and two digits)"
        )
    try:
        return read(Runtime.get().load_program(str(path)))
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{str(path)!r} is not a loadable {what}: {e}") from None


class RuntimeModule:
    """What the library asks of a model beside calling it (``eval()``, ``parameters()``,
    ``buffers()``), for a model whose weights live inside a runtime's file."""

    def eval(self):
        return self

    def parameters(self):
        return iter(())

    def buffers(self):
        return iter(())


class ProgramModel(RuntimeModule):
    """edgequant's decoder calling convention over a program whose weights and KV cache live
    in its runtime (`PteModel`, `edgequant.export.gguf_runtime.GgufModel`): one sequence at a
    time; subclasses set ``args`` and ``what`` and run ``tokens`` after `_check`."""

    what = "a program"
    args: PteArgs

    def new_cache(self, batch: int = 1, max_len: int | None = None, **_) -> _Positions:
        if batch != 1:
            raise ValueError(f"{self.what} decodes one sequence; got batch {batch}")
        return _Positions(self.args.max_seq_len if max_len is None else max_len)

    def _check(self, tokens: torch.Tensor, start_pos: int) -> int:
        """The end position of ``tokens`` ``[1, T]`` at ``start_pos``, if the program holds it."""
        if tokens.dim() != 2 or tokens.shape[0] != 1:
            raise ValueError(f"tokens must be [1, seq], got shape {tuple(tokens.shape)}")
        end = start_pos + tokens.shape[1]
        if end > self.args.max_seq_len:
            raise ValueError(
                f"start_pos + seq must be <= max_seq_len={self.args.max_seq_len}, got "
                f"{start_pos} + {tokens.shape[1]}"
            )
        return end


class PteModel(ProgramModel):
    """A loaded ``.pte`` with edgequant's decoder calling convention."""

    what = "a .pte"

    def __init__(self, path: str | Path) -> None:
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (llama:: kernels)
        import executorch.kernels.quantized  # noqa: F401  (quantized embedding kernels)

        def read(program):
            def constant(name: str) -> int:
                return int(program.load_method(name).execute([])[0])

            args = PteArgs(
                max_seq_len=constant("get_max_seq_len"),
                vocab_size=constant("get_vocab_size"),
                n_layers=constant("get_n_layers"),
            )
            return program.load_method("forward"), args

        path = Path(path)
        self._forward, self.args = _load(
            path,
            "ExecuTorch LLM program (truncated, corrupted, or not written by "
            "edgequant.export.to_pte)",
            read,
        )
        self.path = path

    def __call__(self, tokens: torch.Tensor, start_pos: int = 0, cache=None) -> torch.Tensor:
        self._check(tokens, start_pos)
        inputs = [tokens.to(torch.long).contiguous(), torch.tensor([start_pos], dtype=torch.long)]
        return self._forward.execute(inputs)[0].float()  # [1, T, vocab]


class PteProgram:
    """Any ``.pte`` (e.g. a graph-mode model from `edgequant.graph.to_pte`): ``program(*inputs)``
    runs its ``forward`` in ``executorch.runtime`` and returns its outputs as a tuple."""

    def __init__(self, path: str | Path, method: str = "forward") -> None:
        import executorch.kernels.quantized  # noqa: F401  (quantize/dequantize kernels)

        path = Path(path)
        self._method = _load(
            path,
            f"ExecuTorch program with a {method!r} method (truncated or corrupted?)",
            lambda program: program.load_method(method),
        )
        self.path = path

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self._method.execute([t.contiguous() for t in inputs]))
