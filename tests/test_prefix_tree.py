"""The prefix tree of a GRPO batch (minir1/train/prefix_tree.py): each distinct prefix once, with the same
log-probs and gradients as the rows run apart."""

from __future__ import annotations

import copy

import pytest
import torch

import minir1.train.grpo as grpo_mod
from minir1.models.dense import DenseConfig, DenseTransformer
from minir1.train.grpo import completion_logprobs, length_buckets, plan_forest
from minir1.train.prefix_tree import forest_logprobs, pair_cost, prefix_tries
from tests.test_invariance import (
    assert_same_gradient,
    model_for,
    ragged_rollout_stage,
    step_gradient,
)

PAD = 0


def batch(rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt, completion) pairs -> ids [N, L] right-padded, prompt_lens, lengths."""
    L = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), L), PAD)
    for r, (p, c) in enumerate(rows):
        ids[r, :len(p) + len(c)] = torch.tensor(p + c)
    return ids, torch.tensor([len(p) for p, _ in rows]), torch.tensor([len(c) for _, c in rows])


def test_the_tries_hold_each_distinct_prefix_once_and_each_rollout_reads_its_own_nodes():
    a, b = [5, 6, 7], [5, 6]
    ids, pl, lens = batch([(a, [1, 2, 3]), (b, [9]), (a, [1, 2, 4]), (a, [1, 2])])  # the last: a prefix of both
    tries = prefix_tries(ids, pl, lens)
    assert tries.members == [[0, 2, 3], [1]]
    assert tries.sizes == [3 + 3 + 1, 2 + 1]
    forest = tries.pack()
    assert forest.nodes == 10 and forest.ids.shape == forest.positions.shape == (1, 10)
    tok, pos = forest.ids[0], forest.positions[0]
    four, three = int((tok == 4).nonzero()), int((tok == 3).nonzero())
    assert int(pos[four]) == int(pos[three]) == 5  # both at the position they have in their rollout
    assert forest.rows.tolist() == [0, 2, 3, 1]
    index, source = forest.gather.index, forest.gather.source
    for i, r in enumerate(forest.rows.tolist()):
        p, n = int(pl[r]), int(lens[r])
        assert tok[index[i, :p + n]].tolist() == ids[r, :p + n].tolist()  # the rollout, token by token
        assert pos[index[i, :p + n]].tolist() == list(range(p + n))
        # every completion token's log-prob comes from the node before it, with the token as its target
        assert forest.targets[i, :n].tolist() == ids[r, p:p + n].tolist()
        assert forest.valid[i].sum() == n
        assert forest.logits_at[0, forest.pick[i, :n]].tolist() == index[i, p - 1:p + n - 1].tolist()
    # each node takes its attention output from a row position that holds it
    assert len(set(source.tolist())) == 10
    assert [int(index.flatten()[s]) for s in source.tolist()] == list(range(10))
    assert index[0, :5].tolist() == index[1, :5].tolist()  # rows 0 and 2 share the prompt and 1, 2: same nodes
    assert index.shape == (4, 6)


def dense_model(vocab: int) -> DenseTransformer:
    torch.manual_seed(0)
    return DenseTransformer(DenseConfig(model_type="qwen2", vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        qkv_bias=True))


def shared_rollouts(tiny_tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Ragged rollouts (prompts of different lengths, completions that end early) with whole completions
    shared (rows 1 and 5 twice) and one completion a prefix of its twin: ids, prompt_lens, lengths, C."""
    teacher = model_for(tiny_tokenizer, seed=7).eval()
    ro = ragged_rollout_stage(tiny_tokenizer, teacher, "grpo", micro_batch_size=12).rollout(teacher, 0)
    keep = [0, 1, 1, 2, 4, 5, 5, 8, 9, 10, 11]
    ids, pl, lens = ro.ids[keep], ro.prompt_lens[keep], ro.lengths[keep].clone()
    lens[2] = max(1, int(lens[2]) // 2)
    return ids, pl, lens, ro.mask.shape[1]


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2"])
def test_the_forest_gives_the_rows_log_probs_and_gradient(tiny_tokenizer, family):
    """Ragged rollouts (prompts of different lengths, completions that end early), with duplicates so that
    completions share prefixes: the forest's log-probs, entropies and gradient equal the rows run apart."""
    ids, pl, lens, C = shared_rollouts(tiny_tokenizer)
    model = model_for(tiny_tokenizer, seed=8) if family == "deepseek_v3" else dense_model(tiny_tokenizer.vocab_size)
    model.train()
    mask = (torch.arange(C)[None] < lens[:, None]).float()
    weight = torch.randn(len(ids), C, generator=torch.Generator().manual_seed(0))

    def run(tree: bool):
        model.zero_grad()
        if tree:
            forest = prefix_tries(ids, pl, lens).pack()
            logp, ent = forest_logprobs(model, forest, C, 0.7)
            back = torch.empty_like(forest.rows)
            back[forest.rows] = torch.arange(len(back))
            logp, ent = logp[back], ent[back]
        else:
            logp, ent = completion_logprobs(model, ids, pl, C, 0.7, lens)
        (logp * mask * weight).sum().backward()
        return (logp * mask).detach(), ent * mask, {n: p.grad.clone() for n, p in model.named_parameters()
                                                      if p.grad is not None}

    rows, tree = run(False), run(True)
    tries = prefix_tries(ids, pl, lens)
    assert sum(tries.sizes) < int((pl + lens).sum())  # something really is shared
    torch.testing.assert_close(tree[0], rows[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(tree[1], rows[1], atol=1e-5, rtol=0)
    a, b = rows[2], tree[2]
    flat_a, flat_b = torch.cat([a[k].flatten() for k in a]), torch.cat([b[k].flatten() for k in a])
    assert a.keys() == b.keys()
    assert float((flat_a - flat_b).norm() / flat_a.norm()) < 1e-5


def test_the_forests_fp32_gradient_is_as_accurate_as_the_rows(tiny_tokenizer, monkeypatch):
    """The forest sums a shared prefix's gradient once instead of once per rollout: a different rounding,
    not a less accurate one. Against the float64 gradient, its fp32 error is that of the rows'."""
    ids, pl, lens, C = shared_rollouts(tiny_tokenizer)
    model = model_for(tiny_tokenizer, seed=8).train()
    weight = torch.randn(len(ids), C, generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(C)[None] < lens[:, None])

    def grad(m, share: bool) -> torch.Tensor:
        m.zero_grad(set_to_none=True)
        logp, _ = completion_logprobs(m, ids, pl, C, 1.0, lens, share_prefixes=share)
        dtype = logp.dtype
        (logp * mask.to(dtype) * weight.to(dtype)).sum().backward()
        return torch.cat([p.grad.double().flatten() for p in m.parameters() if p.grad is not None])

    monkeypatch.setattr(grpo_mod, "pair_cost", lambda m: 1e-9)  # tiny rows: make the trees the cheaper plan
    assert plan_forest(model, ids, pl, lens, (pl + lens).tolist(), length_buckets((pl + lens).tolist()))
    exact = grad(copy.deepcopy(model).double(), False)
    rows, tree = grad(model, False), grad(model, True)
    err_rows, err_tree = float((rows - exact).norm() / exact.norm()), float((tree - exact).norm() / exact.norm())
    assert err_rows < 1e-5 and err_tree < 3 * err_rows, (err_rows, err_tree)


def test_the_tree_runs_only_where_it_is_cheaper(tiny_tokenizer):
    model = model_for(tiny_tokenizer)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 300, (16,), generator=gen).tolist()

    def plan(rows):
        ids, pl, lens = batch(rows)
        totals = (pl + lens).tolist()
        return plan_forest(model, ids, pl, lens, totals, length_buckets(totals))

    # 8 rollouts of one prompt, alike for their first 30 tokens: the shared tokens run once
    stem = torch.randint(3, 300, (30,), generator=gen).tolist()
    alike = [(prompt, stem + torch.randint(3, 300, (10,), generator=gen).tolist()) for _ in range(8)]
    forest = plan(alike)
    assert forest is not None and forest.nodes <= 16 + 30 + 8 * 10  # not 8 * (16 + 40)
    assert sorted(forest.rows.tolist()) == list(range(8))
    # nothing shared (a prompt each): nothing to save
    assert plan([(torch.randint(3, 300, (16,), generator=gen).tolist(), stem) for _ in range(8)]) is None
    # a short shared prompt and one rollout far longer than the others: padding every rollout to it for
    # attention would cost more than the prompt's tokens save
    ragged = [(prompt[:2], torch.randint(3, 300, (n,), generator=gen).tolist()) for n in [4000] + [3] * 7]
    assert plan(ragged) is None


def test_pair_cost_follows_the_models_shapes(tiny_tokenizer):
    small, dense = model_for(tiny_tokenizer), dense_model(tiny_tokenizer.vocab_size)
    for m in (small, dense):
        assert 0 < pair_cost(m) < 1
    # the same attention on a model with more matrix work per token: a pair is worth fewer tokens
    assert pair_cost(dense_model(tiny_tokenizer.vocab_size)) > pair_cost(
        DenseTransformer(DenseConfig(model_type="qwen2", vocab_size=tiny_tokenizer.vocab_size, hidden_size=32,
                                     intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2)))


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo"])
def test_sharing_prefixes_changes_no_grpo_gradient(tiny_tokenizer, loss, monkeypatch):
    """The GRPO step's gradient with the update's prefix trees equals that of every row run apart, for each
    loss type and micro-batching; and the trees really run."""
    model = model_for(tiny_tokenizer, seed=9)
    stage = ragged_rollout_stage(tiny_tokenizer, model, loss, micro_batch_size=12)
    stage.counts_routing = False
    stage.cfg.share_prefixes = False
    apart = step_gradient(model, stage, 1)
    stage.cfg.share_prefixes = True
    calls = []
    monkeypatch.setattr(grpo_mod, "pair_cost", lambda m: 1e-9)  # tiny rows: make the trees the cheaper plan
    real = grpo_mod.forest_logprobs
    monkeypatch.setattr(grpo_mod, "forest_logprobs", lambda *a: calls.append(1) or real(*a))
    for n_micro in (1, 3):
        assert_same_gradient(apart, step_gradient(model, stage, n_micro))
    assert calls


def test_a_shared_layout_refuses_mtp(tiny_tokenizer):
    """MTP reads each sequence's next tokens, which tokens stored once do not have: a clear error, not a
    silent wrong answer."""
    ids, pl, lens, _ = shared_rollouts(tiny_tokenizer)
    forest = prefix_tries(ids, pl, lens).pack()
    with pytest.raises(ValueError, match="MTP"):
        model_for(tiny_tokenizer)(forest.ids, positions=forest.positions, gather=forest.gather, mtp=True)
