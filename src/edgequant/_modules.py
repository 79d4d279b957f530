"""Module-tree helpers shared across layers of the package."""

from __future__ import annotations

import copy

from torch import nn


def shallow_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree that shares its parameters and buffers: modules can be
    swapped or given new tensors in the copy without touching ``model``, and no weight is
    copied. Writing into a shared tensor in place writes into ``model``'s."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo=shared)
