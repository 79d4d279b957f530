"""How far a quantized model's outputs are from the float model's, on the same tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgequant.primitives import sqnr


def compare_logits(reference: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """SQNR (dB), mean KL(float || quantized) in nats/token, and top-1 agreement (%).

    Both are ``[..., vocab]`` logits for the same positions.

    >>> ref = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    >>> out = compare_logits(ref, ref.clone())
    >>> out["sqnr_db"], out["kl"], out["top1_pct"]
    (inf, 0.0, 100.0)
    """
    ref = reference.reshape(-1, reference.shape[-1]).double()
    out = logits.reshape(-1, logits.shape[-1]).double()
    if ref.shape != out.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref.shape)} vs {tuple(out.shape)}")
    log_p, log_q = F.log_softmax(ref, -1), F.log_softmax(out, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().clamp(min=0.0)
    top1 = (ref.argmax(-1) == out.argmax(-1)).double().mean() * 100
    return {"sqnr_db": sqnr(ref, out), "kl": float(kl), "top1_pct": float(top1)}
