"""Shared prefixes run once: the rollouts of a GRPO group as one prefix tree (a trie of their tokens).

The G completions of a prompt share the prompt, and a confident policy's completions often share long
stretches after it too (on the speedrun's task, the 8 completions of a group hold about half as many
distinct prefixes as tokens). A token's log-probability depends only on the tokens before it, so every
distinct prefix needs computing once: each group becomes one packed row holding its trie's nodes, where a
node sits at its depth (the position it has in every rollout through it) and attends to exactly its
ancestors. The logits at a shared node serve every rollout through it, and its gradient is the sum of
theirs: the same loss and gradient as the rollouts run one by one, up to rounding.

The tree is not always cheaper: attention over a packed row costs its size squared, where the rollouts
run apart cost the sum of their squares. So a prompt's rollouts may be cut into several tries where that
pays (`prefix_tries`), and GRPO compares the forest's cost with the rows' (per-token matrix work against
per-pair attention work, from the model's shapes: `pair_cost`) and takes the cheaper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from minir1.models.base import CausalLM

MASKED_PAIR_SLOWDOWN = 2.0  # measured on CPU: attention under a mask runs at about half the matmuls' FLOP/s


@dataclass
class PrefixForest:
    """Tries packed into the rows of one batch (padded to the largest), covering the rollouts `rows`."""

    rows: Tensor         # [n] the rollouts (rows of the GRPO batch) these tries hold
    ids: Tensor          # [B, T] the token of each node (padding: 0)
    positions: Tensor    # [B, T] each node's depth, its position in the rollouts through it
    attn_mask: Tensor    # [B, T, T] node i attends to node j iff j is i or one of its ancestors
    real: Tensor         # [B, T] nodes that are not padding
    logits_at: Tensor    # [B, K] the nodes whose next-token distribution some rollout needs
    pick: Tensor         # [n, C] for rollout rows[i]'s completion token c: its predicting node, as b * K + k
    targets: Tensor      # [n, C] that token (0 past the rollout's length)
    valid: Tensor        # [n, C] c < the rollout's completion length

    @property
    def nodes(self) -> int:
        return int(self.real.sum())


@dataclass
class PrefixTries:
    """Tries over the rows of a batch, each over rows with the same prompt, before packing (building them is
    cheap; it decides whether to pack)."""

    rows: list[list[int]]       # each row's real tokens: prompt, then completion
    prompt_lens: list[int]
    lengths: list[int]          # completion tokens per row
    members: list[list[int]] = field(default_factory=list)   # the rows of each trie
    tokens: list[list[int]] = field(default_factory=list)    # each trie's node tokens, parents before children
    parents: list[list[int]] = field(default_factory=list)   # each node's parent (-1: a root)
    depths: list[list[int]] = field(default_factory=list)
    paths: list[list[list[int]]] = field(default_factory=list)  # each member row's node at each of its positions

    @property
    def sizes(self) -> list[int]:
        return [len(t) for t in self.tokens]

    def add(self, group: Sequence[int]) -> None:
        """One more trie, over the rows `group`."""
        children: dict[tuple[int, int], int] = {}
        tokens: list[int] = []
        parents: list[int] = []
        depths: list[int] = []
        paths = []
        for r in group:
            node, path = -1, []
            for depth, tok in enumerate(self.rows[r]):
                nxt = children.get((node, tok))
                if nxt is None:
                    nxt = children[(node, tok)] = len(tokens)
                    tokens.append(tok)
                    parents.append(node)
                    depths.append(depth)
                node = nxt
                path.append(node)
            paths.append(path)
        self.members.append(list(group))
        self.tokens.append(tokens)
        self.parents.append(parents)
        self.depths.append(depths)
        self.paths.append(paths)

    def pack(self, which: Sequence[int] | None = None, device: torch.device | str = "cpu") -> PrefixForest:
        """Tries `which` (default: all) as one batch: one packed row per trie, right-padded to the largest."""
        which = list(range(len(self.tokens))) if which is None else list(which)
        order = [r for b in which for r in self.members[b]]
        local = {r: i for i, r in enumerate(order)}
        n, C = len(order), max(max(self.lengths, default=1), 1)
        B, T = len(which), max(len(self.tokens[b]) for b in which)
        tok = np.zeros((B, T), dtype=np.int64)
        pos = np.zeros((B, T), dtype=np.int64)
        mask = np.zeros((B, T, T), dtype=bool)
        real = np.zeros((B, T), dtype=bool)
        pick = np.zeros((n, C), dtype=np.int64)
        targets = np.zeros((n, C), dtype=np.int64)
        valid = np.zeros((n, C), dtype=bool)
        slots = []
        for i, b in enumerate(which):
            size = len(self.tokens[b])
            tok[i, :size], pos[i, :size], real[i, :size] = self.tokens[b], self.depths[b], True
            m = mask[i]
            for j, parent in enumerate(self.parents[b]):  # parents come first: a node sees what its parent sees
                if parent >= 0:
                    m[j] = m[parent]
                m[j, j] = True
            m[np.arange(size, T), np.arange(size, T)] = True  # padding sees only itself (no empty softmax)
            slot: dict[int, int] = {}
            for r, path in zip(self.members[b], self.paths[b]):
                p, x = self.prompt_lens[r], local[r]
                for c in range(self.lengths[r]):
                    pick[x, c] = slot.setdefault(path[p - 1 + c], len(slot))
                    targets[x, c] = self.rows[r][p + c]
                    valid[x, c] = True
            slots.append(list(slot))
        K = max(max(len(s) for s in slots), 1)
        at = np.zeros((B, K), dtype=np.int64)
        for i, (b, s) in enumerate(zip(which, slots)):
            at[i, :len(s)] = s
            pick[[local[r] for r in self.members[b]]] += i * K
        pick *= valid

        def t(a: np.ndarray) -> Tensor:
            return torch.from_numpy(a).to(device)
        return PrefixForest(torch.tensor(order, device=device), t(tok), t(pos), t(mask), t(real), t(at), t(pick),
                            t(targets), t(valid))


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prefix_tries(ids: Tensor, prompt_lens: Tensor, lengths: Tensor, pair_cost: float = 0.0) -> PrefixTries:
    """ids [N, L] (each row its prompt, then its completion, right-padded), prompt_lens [N], lengths [N]
    (completion tokens per row) -> tries over rows with the same prompt.

    With `pair_cost` (one attention pair's work in tokens' worth, `pair_cost(model)`) a prompt's rows may be
    cut into several tries: sorted, the trie of a run of rows has their total length less the prefixes
    that neighbours share, and a dynamic programme picks the runs that minimise nodes + pair_cost * nodes^2
    (a big trie's square attention can cost more than the prefixes it shares). 0: one trie per prompt."""
    p_list, l_list = prompt_lens.tolist(), lengths.tolist()
    rows = [ids[r, :p + n].tolist() for r, (p, n) in enumerate(zip(p_list, l_list))]
    groups: dict[tuple[int, ...], list[int]] = {}
    for r, (row, p) in enumerate(zip(rows, p_list)):
        groups.setdefault(tuple(row[:p]), []).append(r)
    out = PrefixTries(rows, p_list, l_list)
    for group in groups.values():
        if pair_cost <= 0 or len(group) == 1:
            out.add(group)
            continue
        group = sorted(group, key=lambda r: rows[r])
        shared = [0] + [_common(rows[a], rows[b]) for a, b in zip(group, group[1:])]
        best, cut = [0.0], [0]
        for j in range(1, len(group) + 1):
            options, size = [], 0
            for i in range(j - 1, -1, -1):  # the run group[i:j], grown to the left
                size += len(rows[group[i]]) - (shared[i + 1] if i + 1 < j else 0)
                options.append((best[i] + size + pair_cost * size * size, i))
            b, i = min(options)
            best.append(b)
            cut.append(i)
        runs, j = [], len(group)
        while j > 0:
            runs.append(group[cut[j]:j])
            j = cut[j]
        for run in reversed(runs):
            out.add(run)
    return out


def pair_cost(model: CausalLM) -> float:
    """One (query, key) pair of masked attention, fwd + bwd, in tokens' worth of matrix work: the per-pair
    products (QK^T and PV, summed over layers and heads) against the activated parameters, times the
    measured slowdown of attention under a mask."""
    model = getattr(model, "module", model)  # under DDP, the wrapped model
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    qk = (getattr(cfg, "qk_nope_head_dim", 0) + getattr(cfg, "qk_rope_head_dim", 0)) or head_dim
    v = getattr(cfg, "v_head_dim", None) or head_dim
    counts = getattr(model, "num_parameters", None)
    params = counts()["activated"] if callable(counts) else sum(p.numel() for p in model.parameters())
    return MASKED_PAIR_SLOWDOWN * cfg.num_hidden_layers * heads * (qk + v) / max(params, 1)


def forest_logprobs(model: CausalLM, forest: PrefixForest, comp_len: int,
                    temperature: float) -> tuple[Tensor, Tensor]:
    """Log-probs and entropies [n, comp_len] of the completion tokens of the forest's rollouts (0 past each
    one's length), as `completion_logprobs` computes them, from one forward over the forest."""
    picked = model(forest.ids, positions=forest.positions, attn_mask=forest.attn_mask,
                   logits_at=forest.logits_at, counted=forest.real).float()
    logp_all = (picked / (temperature if temperature > 0 else 1.0)).log_softmax(-1).flatten(0, 1)  # [B*K, V]
    logp = logp_all[forest.pick, forest.targets] * forest.valid
    with torch.no_grad():  # a metric: keep it out of the autograd graph
        entropy = -(logp_all.exp() * logp_all).sum(-1)[forest.pick] * forest.valid
    pad = comp_len - logp.shape[1]
    if pad > 0:
        logp, entropy = F.pad(logp, (0, pad)), F.pad(entropy, (0, pad))
    return logp[:, :comp_len], entropy[:, :comp_len]
