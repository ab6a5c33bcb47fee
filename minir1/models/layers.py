"""Building blocks shared by the model families."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _RMSNormFP32(torch.autograd.Function):
    """y = x·rsqrt(mean(x²) + eps)·w with a hand-derived backward: a third fewer elementwise passes
    than autograd's trace of the same formula, which matters on a memory-bound CPU."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        rstd = torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)
        x_hat = x * rstd
        ctx.save_for_backward(x_hat, rstd, weight)
        return x_hat * weight

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x_hat, rstd, weight = ctx.saved_tensors
        grad_weight = (grad * x_hat).flatten(0, -2).sum(0)
        g = grad * weight
        grad_x = rstd * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
        return grad_x, grad_weight, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
                return _RMSNormFP32.apply(x, self.weight, self.eps)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Statistics in fp32 whatever the activation dtype (as DeepSeek's reference does).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def document_mask(doc_ids: Tensor) -> Tensor:
    """doc_ids [B, T] (the documents packed in each row) -> attention mask [B, 1, T, T]: causal within each
    document, nothing across them."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]


def at_positions(x: Tensor, logits_at: Tensor | None) -> Tensor:
    """x [B, T, D] at each row's positions `logits_at` ([B] -> [B, 1, D], [B, K] -> [B, K, D]); all of x if None:
    the output head and its gradient then skip every other position."""
    if logits_at is None:
        return x
    at = logits_at[:, None] if logits_at.dim() == 1 else logits_at
    return x[torch.arange(x.shape[0], device=x.device)[:, None], at]
