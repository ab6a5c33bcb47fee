"""MTP self-speculative decoding (DeepSeek-V3 §2.2, §5.4.3): the model's own MTP module drafts the token after
next; one forward of the main model over [current token, draft] verifies it.

Speculative rejection sampling (Leviathan et al., 2023): accept the draft d with probability min(1, p(d)/q(d)),
else resample from normalise(max(0, p - q)); on acceptance the main model's next distribution gives one more
token for free. With temperature 0 both p and q are one-hot, so this is exactly greedy decoding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from minir1.engine.sampling import SamplingParams, categorical, process_logits, sample, token_logprobs


@dataclass
class Step:
    tokens: Tensor                    # [B] each row's last token, the next step's input
    draft: Tensor                     # [B] the next draft, and the log-distribution it was drawn from
    draft_logp: Tensor
    pos: Tensor                       # [B] the position the next input goes to
    emitted: list[list[int]]          # per row: 1 token (draft rejected) or 2 (accepted + bonus)
    emitted_logprobs: list[list[float]]
    accepted: int


def step(forward: Callable[..., object], mtp: Callable[..., Tensor], tokens: Tensor, draft: Tensor,
         draft_logp: Tensor, pos: Tensor, params: SamplingParams, gen: torch.Generator) -> Step:
    """One verification of the drafts of every row. `forward(ids, positions)` is the main model on the cache,
    `mtp(hidden, next_ids, positions)` the MTP module on it."""
    B = tokens.shape[0]
    arange = torch.arange(B, device=tokens.device)
    ids = torch.stack((tokens, draft), dim=1)                                # [B, 2]
    positions = torch.stack((pos, pos + 1), dim=1)
    out = forward(ids, positions)
    target0 = process_logits(out.logits[:, 0], params)                       # log p for the draft's slot
    p_d, q_d = target0[arange, draft].exp(), draft_logp[arange, draft].exp()
    if params.temperature == 0:
        accept = p_d > 0
    else:
        accept = torch.rand(B, generator=gen, device=tokens.device) * q_d < p_d
    residual = (target0.exp() - draft_logp.exp()).clamp_min(0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, target0.exp())
    correction = target0.argmax(-1) if params.temperature == 0 else categorical(residual, gen)
    bonus, bonus_lp = sample(out.logits[:, 1], params, gen)
    first = torch.where(accept, draft, correction)
    first_lp = token_logprobs(out.logits[:, 0], first, params.temperature)
    # MTP over the two new positions: [h_p, t_{p+1}] always valid, [h_{p+1}, t_{p+2}] only if accepted
    # (otherwise it is overwritten next step). The next draft comes from the last valid one.
    next_ids = torch.stack((first, torch.where(accept, bonus, first)), dim=1)
    mtp_logits = mtp(out.hidden, next_ids, positions)
    a = accept.long()
    new_draft_logp = process_logits(mtp_logits[arange, a], params)
    new_draft = new_draft_logp.argmax(-1) if params.temperature == 0 else categorical(new_draft_logp.exp(), gen)
    acc, f, fl, b, bl = accept.tolist(), first.tolist(), first_lp.tolist(), bonus.tolist(), bonus_lp.tolist()
    emitted = [[f[i], b[i]] if acc[i] else [f[i]] for i in range(B)]
    emitted_lp = [[fl[i], bl[i]] if acc[i] else [fl[i]] for i in range(B)]
    return Step(torch.where(accept, bonus, first), new_draft, new_draft_logp, pos + 1 + a, emitted, emitted_lp,
                int(accept.sum()))
