"""Shared prefixes run once: the rollouts of a GRPO group as one prefix tree (a trie of their tokens).

The G completions of a prompt share the prompt, and a confident policy's completions often share long
stretches after it too (on the speedrun's task, the 8 completions of a group hold about half as many
distinct prefixes as tokens). A token's log-probability depends only on the tokens before it, so every
distinct prefix needs computing once: the tries' nodes (each at its depth, the position it has in every
rollout through it) run as one row [1, N] through the model's position-wise work (projections, MLPs,
experts: nearly all of it), and attention reads them back into the rollouts' own rows (`RowGather`:
causal attention over each rollout, the fused kernel, no mask). The logits at a shared node serve every
rollout through it, and its gradient is the sum of theirs: the same loss and gradient as the rollouts run
one by one, up to rounding.

A rollout's attention still costs its own square, and the rows are padded to the longest for it; GRPO
compares the estimated cost with the rows' (per-token matrix work against per-pair attention work, from
the model's shapes: `pair_cost`) and takes the cheaper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from minir1.models.base import CausalLM
from minir1.models.layers import RowGather


@dataclass
class PrefixForest:
    """The tries' nodes as one row [1, N], covering the rollouts `rows`, with what reads the log-probs back."""

    rows: Tensor         # [n] the rollouts (rows of the GRPO batch) these tries hold
    ids: Tensor          # [1, N] the token of each node
    positions: Tensor    # [1, N] each node's depth, its position in the rollouts through it
    gather: RowGather    # attention over the rollouts' rows of nodes
    logits_at: Tensor    # [1, K] the nodes whose next-token distribution some rollout needs
    pick: Tensor         # [n, C] for rollout rows[i]'s completion token c: its predicting node's slot k
    targets: Tensor      # [n, C] that token (0 past the rollout's length)
    valid: Tensor        # [n, C] c < the rollout's completion length

    @property
    def nodes(self) -> int:
        return self.ids.shape[1]


@dataclass
class PrefixTries:
    """Tries over the rows of a batch, each over rows with the same prompt, before packing (building them is
    cheap; it decides whether to pack)."""

    rows: list[list[int]]       # each row's real tokens: prompt, then completion
    prompt_lens: list[int]
    lengths: list[int]          # completion tokens per row
    members: list[list[int]] = field(default_factory=list)   # the rows of each trie
    tokens: list[list[int]] = field(default_factory=list)    # each trie's node tokens, parents before children
    depths: list[list[int]] = field(default_factory=list)
    paths: list[list[list[int]]] = field(default_factory=list)  # each member row's node at each of its positions

    @property
    def sizes(self) -> list[int]:
        return [len(t) for t in self.tokens]

    def add(self, group: Sequence[int]) -> None:
        """One more trie, over the rows `group`."""
        children: dict[tuple[int, int], int] = {}
        tokens: list[int] = []
        depths: list[int] = []
        paths = []
        for r in group:
            node, path = -1, []
            for depth, tok in enumerate(self.rows[r]):
                nxt = children.get((node, tok))
                if nxt is None:
                    nxt = children[(node, tok)] = len(tokens)
                    tokens.append(tok)
                    depths.append(depth)
                node = nxt
                path.append(node)
            paths.append(path)
        self.members.append(list(group))
        self.tokens.append(tokens)
        self.depths.append(depths)
        self.paths.append(paths)

    def pack(self, device: torch.device | str = "cpu") -> PrefixForest:
        """Every trie's nodes, stored once, as one row; the rollouts' rows of nodes for attention."""
        order = [r for m in self.members for r in m]
        local = {r: i for i, r in enumerate(order)}
        n, C = len(order), max(max(self.lengths, default=1), 1)
        L = max(len(self.rows[r]) for r in order)
        offsets = np.cumsum([0] + self.sizes)
        N = int(offsets[-1])
        tok = np.concatenate([np.asarray(t, dtype=np.int64) for t in self.tokens])
        pos = np.concatenate([np.asarray(d, dtype=np.int64) for d in self.depths])
        index = np.zeros((n, L), dtype=np.int64)
        source = np.full(N, -1, dtype=np.int64)
        pick = np.zeros((n, C), dtype=np.int64)
        targets = np.zeros((n, C), dtype=np.int64)
        valid = np.zeros((n, C), dtype=bool)
        predicting = np.zeros((n, C), dtype=np.int64)  # the node before each completion token
        for b, (members, paths) in enumerate(zip(self.members, self.paths)):
            for r, path in zip(members, paths):
                x = local[r]
                nodes = offsets[b] + np.asarray(path, dtype=np.int64)
                index[x, :len(nodes)] = nodes
                index[x, len(nodes):] = nodes[-1]  # padding: read by no real position (causal)
                unset = source[nodes] < 0
                source[nodes[unset]] = x * L + np.flatnonzero(unset)
                p, m = self.prompt_lens[r], self.lengths[r]
                predicting[x, :m] = nodes[p - 1:p - 1 + m]
                targets[x, :m] = self.rows[r][p:p + m]
                valid[x, :m] = True
        # the head runs once per distinct predicting node (a shared node serves every rollout through it)
        at, slots = np.unique(predicting[valid], return_inverse=True)
        pick[valid] = slots
        if not len(at):
            at = np.zeros(1, dtype=np.int64)

        def t(a: np.ndarray) -> Tensor:
            return torch.from_numpy(a).to(device)
        return PrefixForest(torch.tensor(order, device=device), t(tok)[None], t(pos)[None],
                            RowGather(t(index), t(source)), t(at)[None], t(pick), t(targets), t(valid))


def prefix_tries(ids: Tensor, prompt_lens: Tensor, lengths: Tensor) -> PrefixTries:
    """ids [N, L] (each row its prompt, then its completion, right-padded), prompt_lens [N], lengths [N]
    (completion tokens per row) -> one trie over the rows of each prompt."""
    p_list, l_list = prompt_lens.tolist(), lengths.tolist()
    rows = [ids[r, :p + n].tolist() for r, (p, n) in enumerate(zip(p_list, l_list))]
    groups: dict[tuple[int, ...], list[int]] = {}
    for r, (row, p) in enumerate(zip(rows, p_list)):
        groups.setdefault(tuple(row[:p]), []).append(r)
    out = PrefixTries(rows, p_list, l_list)
    for group in groups.values():
        out.add(group)
    return out


def pair_cost(model: CausalLM) -> float:
    """One (query, key) pair of attention, in tokens' worth of matrix work: the per-pair products (QK^T and
    PV, summed over layers and heads) against the activated parameters (a token's products)."""
    model = getattr(model, "module", model)  # under DDP, the wrapped model
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    qk = (getattr(cfg, "qk_nope_head_dim", 0) + getattr(cfg, "qk_rope_head_dim", 0)) or head_dim
    v = getattr(cfg, "v_head_dim", None) or head_dim
    counts = getattr(model, "num_parameters", None)
    params = counts()["activated"] if callable(counts) else sum(p.numel() for p in model.parameters())
    return cfg.num_hidden_layers * heads * (qk + v) / max(params, 1)


def forest_logprobs(model: CausalLM, forest: PrefixForest, comp_len: int,
                    temperature: float) -> tuple[Tensor, Tensor]:
    """Log-probs and entropies [n, comp_len] of the completion tokens of the forest's rollouts (0 past each
    one's length), as `completion_logprobs` computes them, from one forward over the forest."""
    picked = model(forest.ids, positions=forest.positions, gather=forest.gather, logits_at=forest.logits_at).float()
    logp_all = (picked / (temperature if temperature > 0 else 1.0)).log_softmax(-1)[0]  # [K, V]
    logp = logp_all[forest.pick, forest.targets] * forest.valid
    with torch.no_grad():  # a metric: keep it out of the autograd graph
        entropy = -(logp_all.exp() * logp_all).sum(-1)[forest.pick] * forest.valid
    pad = comp_len - logp.shape[1]
    if pad > 0:
        logp, entropy = F.pad(logp, (0, pad)), F.pad(entropy, (0, pad))
    return logp[:, :comp_len], entropy[:, :comp_len]
