"""edgequant.layerwise: the Hessians GPTQ reads."""

from __future__ import annotations

import torch

from edgequant import layerwise


def _sums(batches, cols, readers):
    shared: dict = {}
    hessians = [layerwise._Hessian(cols, shared) for _ in range(readers)]
    for x in batches:
        for h in hessians:  # the linears reading one input see the same tensor, in turn
            h(None, (x,), None)
    return hessians


def test_hessian_sums_are_the_same_made_whole_or_by_row_blocks(monkeypatch):
    torch.manual_seed(0)
    cols = 2100  # blocks of 499 rows, the last of 104
    batches = [torch.randn(1, 256, cols) * torch.rand(cols) * 4 for _ in range(3)]
    whole = _sums(batches, cols, readers=3)
    monkeypatch.setattr(layerwise, "SHARED_PRODUCT", 0)  # every product by row blocks
    blocks = _sums(batches, cols, readers=3)
    x = torch.cat(batches, 1)[0].double()
    for a, b in zip(whole, blocks, strict=True):
        assert torch.equal(a.sum, b.sum) and a.rows == b.rows == 768
        assert torch.allclose(a.sum, x.T @ x, rtol=1e-5, atol=1e-3)
    assert torch.equal(whole[0].sum, whole[2].sum)
    expected = 2.0 * whole[1].sum / 768
    assert torch.equal(whole[1].take(), expected) and whole[1].sum is None
