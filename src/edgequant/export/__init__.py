"""Exporters: ``to_pte`` (ExecuTorch, XNNPACK), ``to_tflite`` (LiteRT) and ``to_gguf``
(llama.cpp), and `load_program` to run what they write. Heavy dependencies are imported on use."""

from __future__ import annotations

from pathlib import Path


def to_pte(*args, **kwargs):
    """See `edgequant.export.pte.to_pte`."""
    from edgequant.export.pte import to_pte as _to_pte

    return _to_pte(*args, **kwargs)


def to_tflite(*args, **kwargs):
    """See `edgequant.export.litert.to_tflite`."""
    from edgequant.export.litert import to_tflite as _to_tflite

    return _to_tflite(*args, **kwargs)


def to_gguf(*args, **kwargs):
    """See `edgequant.export.gguf.to_gguf`."""
    from edgequant.export.gguf import to_gguf as _to_gguf

    return _to_gguf(*args, **kwargs)


def load_program(path: str | Path):
    """A written decoder program with edgequant's model calling convention: a ``.pte`` in
    ExecuTorch's runtime (`PteModel`), a ``.tflite`` in LiteRT (`TfliteModel`) or a ``.gguf``
    in llama.cpp (`GgufModel`).

    >>> load_program("model.onnx")
    Traceback (most recent call last):
    ...
    ValueError: 'model.onnx': a program file ends in .pte (ExecuTorch), .tflite (LiteRT) or \
.gguf (llama.cpp)
    """
    suffix = Path(path).suffix
    if suffix == ".pte":
        from edgequant.export.pte_runtime import PteModel

        return PteModel(path)
    if suffix == ".tflite":
        from edgequant.export.litert_runtime import TfliteModel

        return TfliteModel(path)
    if suffix == ".gguf":
        from edgequant.export.gguf_runtime import GgufModel

        return GgufModel(path)
    raise ValueError(
        f"{str(path)!r}: a program file ends in .pte (ExecuTorch), .tflite (LiteRT) or .gguf "
        "(llama.cpp)"
    )
