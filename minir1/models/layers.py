"""Building blocks shared by the model families."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class RowGather:
    """Attention for tokens stored once but read by several sequences (the shared prefixes of GRPO's rollouts,
    minir1/train/prefix_tree.py): the model's position-wise work (projections, MLPs, experts) runs over the N
    distinct tokens, laid out as one row [1, N]; attention gathers each sequence's tokens into a row of its
    own, [R, L] right-padded, runs causal attention there (the fused kernel, no mask), and each token takes
    its output from one of the rows that hold it. A token's keys and values serve every row through it, so
    their gradients add up over those rows, as the rows run apart would give."""

    index: Tensor  # [R, L] the token at each row position (padding: any token; causality keeps it unread)
    source: Tensor  # [N] for each token, the flat position r * L + t of the row copy whose output it takes

    def attend(self, q: Tensor, k: Tensor, v: Tensor, scale: float, enable_gqa: bool = False) -> Tensor:
        """q [1, N, H, d], k [1, N, Hk, d], v [1, N, Hk, dv] -> attention output [1, N, H, dv]."""
        R, L = self.index.shape
        flat = self.index.flatten()

        def rows(x: Tensor) -> Tensor:
            return x[0].index_select(0, flat).view(R, L, *x.shape[2:]).transpose(1, 2)  # [R, heads, L, d]

        out = F.scaled_dot_product_attention(rows(q), rows(k), rows(v), is_causal=True, scale=scale,
                                             enable_gqa=enable_gqa)
        return out.transpose(1, 2).flatten(0, 1).index_select(0, self.source)[None]


def at_positions(x: Tensor, logits_at: Tensor | None) -> Tensor:
    """x [B, T, D] at each row's positions `logits_at` ([B] -> [B, 1, D], [B, K] -> [B, K, D]); all of x if None:
    the output head and its gradient then skip every other position."""
    if logits_at is None:
        return x
    at = logits_at[:, None] if logits_at.dim() == 1 else logits_at
    return x[torch.arange(x.shape[0], device=x.device)[:, None], at]
