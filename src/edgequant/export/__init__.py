"""Exporters: ``to_pte`` (ExecuTorch, XNNPACK). Heavy dependencies are imported on use."""

from __future__ import annotations


def to_pte(*args, **kwargs):
    """See `edgequant.export.pte.to_pte`."""
    from edgequant.export.pte import to_pte as _to_pte

    return _to_pte(*args, **kwargs)
