"""Objectives that do not depend on batching (issue 17): one optimizer step's gradient is the same whether the
step runs as one micro-batch or many — SFT with examples of very different lengths, and every GRPO loss type
— through the loop's own accumulation (`backward_step`); GRPO's micro-batches never drop or repeat a
completion whatever micro_batch_size the stage was given; the balancing update counts real tokens only; and
the engine's per-token log-probs of a ragged batch of rollouts equal the training forward's."""

from __future__ import annotations

import pytest
import torch

from minir1 import ModelConfig, Transformer
from minir1.tasks import get_task
from minir1.train.grpo import GRPOConfig, GRPOStage, completion_logprobs, length_buckets
from minir1.train.loop import backward_step
from minir1.train.sft import IGNORE, SFTStage


def model_for(tokenizer, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, hidden_size=64,
                                               num_attention_heads=2, num_nextn_predict_layers=0))


def step_gradient(model, stage, n_micro: int) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    backward_step(stage, model, 0, list(range(n_micro)), n_micro)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_gradient(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    flat_a, flat_b = torch.cat([a[k].flatten() for k in a]), torch.cat([b[k].flatten() for k in a])
    rel = float((flat_a - flat_b).norm() / flat_a.norm())
    assert rel < 1e-6, rel


def ragged_conversations() -> list[list[dict[str, str]]]:
    """Answers from 1 to ~60 tokens: micro-batches of one row hold very different numbers of targets."""
    convs = []
    for i in range(12):
        work = " ".join(f"{i}+{k}={i + k}" for k in range(1 + 5 * (i % 4)))
        convs.append([{"role": "user", "content": f"What is {i} + {i}?"},
                      {"role": "assistant", "content": f"<think>\n{work}\n</think>\n<answer>{2 * i}</answer>"}])
    return convs


def test_sft_gradient_is_the_same_for_any_micro_batch_size(tiny_tokenizer):
    model = model_for(tiny_tokenizer)
    convs = ragged_conversations()
    whole = SFTStage(tiny_tokenizer, seq_len=48, micro_batch_size=8, conversations=convs)
    ones = SFTStage(tiny_tokenizer, seq_len=48, micro_batch_size=1, conversations=convs)
    rows = [ones.batch(0, j, 8) for j in range(8)]
    targets = [int((r["labels"] != IGNORE).sum()) for r in rows]
    assert max(targets) > 2 * min(targets), targets  # the micro-batches really differ
    reference = step_gradient(model, whole, 1)
    assert_same_gradient(reference, step_gradient(model, ones, 8))
    assert_same_gradient(reference, step_gradient(model, SFTStage(tiny_tokenizer, seq_len=48, micro_batch_size=2,
                                                                  conversations=convs), 4))


def test_a_micro_batch_without_targets_adds_nothing_and_is_never_nan(tiny_tokenizer):
    model = model_for(tiny_tokenizer)
    stage = SFTStage(tiny_tokenizer, seq_len=48, micro_batch_size=2, conversations=ragged_conversations())
    batch = stage.batch(0, 0, 1)
    batch["labels"][:] = IGNORE
    loss, _, _ = stage.loss(model, batch)
    loss.backward()
    assert float(loss.detach()) == 0.0 and all(torch.all(p.grad == 0) for p in model.parameters() if p.grad is not None)


class _Recording:
    """Engine.generate with per-token log-probs kept (GRPO's rollout does not ask for them)."""

    outs: list = []

    def __init__(self, engine_cls):
        self.engine_cls = engine_cls

    def __call__(self, *args, **kwargs):
        engine = self.engine_cls(*args, **kwargs)
        generate = engine.generate

        def with_logprobs(prompts, params):
            params.logprobs = True
            outs = generate(prompts, params)
            _Recording.outs = outs
            return outs
        engine.generate = with_logprobs
        return engine


def ragged_rollout_stage(tokenizer, model, loss: str, micro_batch_size: int, monkeypatch=None) -> GRPOStage:
    """3 prompts x 4 completions of one- to three-digit questions (prompts of different lengths), rewards
    that vary inside every group (so every advantage is non-zero), and EOS made likely, so that some
    completions end early."""
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_id] += 0.4 * torch.randn(model.config.hidden_size)
    if monkeypatch is not None:
        import minir1.train.grpo as grpo_mod
        monkeypatch.setattr(grpo_mod, "Engine", _Recording(grpo_mod.Engine))
    cfg = GRPOConfig(prompts_per_step=3, group_size=4, max_new_tokens=12, loss=loss, beta=0.0)
    gen = torch.Generator().manual_seed(0)
    stage = GRPOStage(get_task("arithmetic:digits=3"), tokenizer, cfg, micro_batch_size=micro_batch_size,
                      reward_fns={"format": lambda r, a, t: float(torch.rand(1, generator=gen))})
    stage.bind(model)
    return stage


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo"])
def test_grpo_gradient_is_the_same_for_any_micro_batching(tiny_tokenizer, loss):
    model = model_for(tiny_tokenizer, seed=1)
    stage = ragged_rollout_stage(tiny_tokenizer, model, loss, micro_batch_size=12)
    reference = step_gradient(model, stage, 1)  # generates the step's rollouts, then reuses them
    ro = stage._rollouts
    assert len(set(ro.prompt_lens.tolist())) > 1 and len(set(ro.lengths.tolist())) > 1
    assert bool((ro.advantages != 0).all())
    for n_micro in (2, 3, 5, 12):  # 5 does not divide 12: uneven slices, none dropped or repeated
        assert_same_gradient(reference, step_gradient(model, stage, n_micro))


def test_grpo_micro_slices_cover_every_completion_once_whatever_the_stage_was_told(tiny_tokenizer):
    """A stage built with micro_batch_size 4 but driven by a loop with 1 or 6 micro-batches (a Python caller
    that set them differently) still uses every completion exactly once."""
    model = model_for(tiny_tokenizer, seed=2)
    stage = ragged_rollout_stage(tiny_tokenizer, model, "dapo", micro_batch_size=4)
    reference = step_gradient(model, stage, 3)
    for n_micro in (1, 6, 7):
        seen = []
        for j in range(n_micro):
            _, s, _ = stage.batch(0, j, n_micro)
            seen += list(range(s.start, s.stop))
        assert seen == list(range(12)), (n_micro, seen)
        assert_same_gradient(reference, step_gradient(model, stage, n_micro))


def test_engine_logprobs_of_ragged_rollouts_equal_the_training_forward(tiny_tokenizer, monkeypatch):
    """μ = 1 makes the importance ratio exactly 1 only if the engine sampled from the distribution the
    update evaluates: per token, within 1e-4, for prompts of different lengths and completions that end early."""
    model = model_for(tiny_tokenizer, seed=3).eval()
    stage = ragged_rollout_stage(tiny_tokenizer, model, "grpo", micro_batch_size=12, monkeypatch=monkeypatch)
    ro = stage.rollout(model, 0)
    outs = _Recording.outs
    assert len(outs) == 12 and any(o.finish_reason == "stop" for o in outs) and any(
        o.finish_reason == "length" for o in outs)
    with torch.no_grad():
        logp, _ = completion_logprobs(model, ro.ids, ro.prompt_lens, ro.mask.shape[1], stage.cfg.temperature,
                                      ro.lengths)
    for row, out in enumerate(outs):
        n = len(out.token_ids)
        assert int(ro.lengths[row]) == n
        torch.testing.assert_close(logp[row, :n], torch.tensor(out.logprobs), atol=1e-4, rtol=0)


def test_length_buckets_cover_every_row_once_and_cut_only_where_it_pays():
    totals = [80, 40, 79, 41, 60, 61, 20, 81, 40, 80]
    groups = length_buckets(totals, overhead=64)
    assert sorted(i for g in groups for i in g) == list(range(len(totals)))
    assert len(groups) > 1
    for a, b in zip(groups, groups[1:]):  # sorted: every row of a group no longer than the next group's
        assert max(totals[i] for i in a) <= min(totals[i] for i in b)
    assert len(length_buckets([80] * 8 + [75] * 8, overhead=64)) == 1  # 40 padded tokens < one more forward
    assert len(length_buckets([80] * 8 + [20] * 8, overhead=64)) == 2
    cost = lambda gs: sum(len(g) * max(totals[i] for i in g) + 64 for g in gs)  # noqa: E731
    assert cost(groups) <= cost([list(range(len(totals)))])


def test_bucketed_logprobs_equal_the_padded_forward(tiny_tokenizer, monkeypatch):
    """Cutting the rows into length groups changes no log-prob (and no gradient) beyond rounding."""
    import minir1.train.grpo as grpo_mod
    monkeypatch.setattr(grpo_mod, "FORWARD_OVERHEAD_TOKENS", 4)  # tiny rows: cut them anyway
    model = model_for(tiny_tokenizer, seed=5).train()
    stage = ragged_rollout_stage(tiny_tokenizer, model, "dapo", micro_batch_size=12)
    ro = stage.rollout(model, 0)
    C = ro.mask.shape[1]
    lengths = torch.tensor([1, 2, 3, C, C, C, 2, 1, C, 3, 2, 1])[:ro.ids.shape[0]].clamp_max(ro.lengths)
    assert len(length_buckets((ro.prompt_lens + lengths).tolist())) > 1
    mask = (torch.arange(C)[None] < lengths[:, None]).float()

    def logp_and_grad(lens: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        logp, _ = completion_logprobs(model, ro.ids, ro.prompt_lens, C, 1.0, lens)
        (logp * mask).sum().backward()
        return (logp * mask).detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole, g_whole = logp_and_grad(None)
    cut, g_cut = logp_and_grad(lengths)
    torch.testing.assert_close(cut, whole, atol=1e-5, rtol=0)
    assert_same_gradient(g_whole, g_cut)


def test_the_balancing_update_counts_real_tokens_only(tiny_tokenizer):
    """Padding appended to a row changes no expert's count in the load that steers the bias."""
    model = model_for(tiny_tokenizer, seed=4).train()
    ids = torch.randint(0, tiny_tokenizer.vocab_size, (2, 10))
    real = torch.ones(2, 10, dtype=torch.bool)

    def counted_load(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for m in model.moe_layers():
            m.load_since_update.zero_()
        model(x, counted=mask)
        return torch.stack([m.load_since_update.clone() for m in model.moe_layers()])

    plain = counted_load(ids, real)
    assert plain.sum(-1).tolist() == [2 * 10 * model.config.num_experts_per_tok] * len(model.moe_layers())
    padded = torch.cat([ids, torch.full((2, 6), tiny_tokenizer.pad_id or 0)], dim=1)
    mask = torch.cat([real, torch.zeros(2, 6, dtype=torch.bool)], dim=1)
    assert torch.equal(counted_load(padded, mask), plain)  # causal attention: the real tokens route the same
    assert not torch.equal(counted_load(padded, torch.ones_like(mask)), plain)


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo"])
def test_leaving_out_the_rows_of_flat_groups_changes_no_gradient(tiny_tokenizer, monkeypatch, loss):
    """With β = 0 the completions of a group whose rewards are all equal (advantage 0) add nothing: leaving
    them out of the forward gives the full computation's gradient, for each loss type and micro-batching."""
    import minir1.train.grpo as grpo_mod
    model = model_for(tiny_tokenizer, seed=6)
    calls = {"n": 0}
    gen = torch.Generator().manual_seed(0)

    def reward(response, answer, task):  # group 1 of 3 (4 completions each) scores alike: flat
        i, calls["n"] = calls["n"], calls["n"] + 1
        return 0.5 if (i % 12) // 4 == 1 else float(torch.rand(1, generator=gen))

    stage = ragged_rollout_stage(tiny_tokenizer, model, loss, micro_batch_size=12)
    stage.reward_fns = {"format": reward}
    stage.counts_routing = False
    monkeypatch.setattr(grpo_mod, "SKIP_FLAT_UPDATES", False)
    full = step_gradient(model, stage, 1)
    ro = stage._rollouts
    assert int((ro.advantages == 0).sum()) == 4 and int((ro.advantages != 0).sum()) == 8
    monkeypatch.setattr(grpo_mod, "SKIP_FLAT_UPDATES", True)
    for n_micro in (1, 3):
        assert_same_gradient(full, step_gradient(model, stage, n_micro))


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo"])
def test_leaving_out_truncated_rows_changes_no_gradient(tiny_tokenizer, monkeypatch, loss):
    """Under overlong="mask" a truncated completion has no counted token: with β = 0 it adds nothing, though
    its advantage is not zero, and leaving it out of the forward gives the full computation's gradient."""
    import minir1.train.grpo as grpo_mod
    model = model_for(tiny_tokenizer, seed=7)
    stage = ragged_rollout_stage(tiny_tokenizer, model, loss, micro_batch_size=12)
    stage.counts_routing = False
    monkeypatch.setattr(grpo_mod, "SKIP_FLAT_UPDATES", False)
    step_gradient(model, stage, 1)  # the step's rollouts, kept for the calls below
    ro = stage._rollouts
    masked = [0, 5]  # as the rollout leaves a truncated row under overlong="mask"
    ro.mask[masked] = 0
    assert bool((ro.advantages[masked] != 0).all())
    full = step_gradient(model, stage, 1)
    ran = []
    real = grpo_mod.completion_logprobs
    monkeypatch.setattr(grpo_mod, "completion_logprobs",
                        lambda m, ids, *a, **k: ran.append(len(ids)) or real(m, ids, *a, **k))
    monkeypatch.setattr(grpo_mod, "SKIP_FLAT_UPDATES", True)
    for n_micro in (1, 3):
        ran.clear()
        assert_same_gradient(full, step_gradient(model, stage, n_micro))
        assert sum(ran) == int((ro.mask > 0).any(-1).sum()) <= len(ro.advantages) - len(masked)  # they did not run


def test_skipping_the_update_of_flat_groups_changes_no_weight(tiny_tokenizer, tmp_path, monkeypatch):
    """An untrained model scores 0 everywhere: every advantage is zero, and with β = 0 the update's forward
    and backward are skipped. The weights after 3 steps (AdamW with weight decay) equal those of the full
    computation."""
    import minir1.train.grpo as grpo_mod
    from minir1.train import TrainConfig, train

    def run(skip: bool, out: str) -> dict[str, torch.Tensor]:
        monkeypatch.setattr(grpo_mod, "SKIP_FLAT_UPDATES", skip)
        model = model_for(tiny_tokenizer, seed=5)
        cfg = GRPOConfig(prompts_per_step=2, group_size=4, max_new_tokens=8, beta=0.0)
        stage = GRPOStage(get_task("arithmetic:digits=1"), tiny_tokenizer, cfg, micro_batch_size=4,
                          reward_fns={"format": lambda r, a, t: 0.0})
        stage.counts_routing = False  # as `minir1 grpo` sets it: GRPO's default route_bias_speed is 0
        train(model, tiny_tokenizer, stage, TrainConfig(out=str(tmp_path / out), steps=3, batch_size=8,
                                                        micro_batch_size=4, lr=1e-3, weight_decay=0.1,
                                                        route_bias_speed=0.0, progress=False))
        return {k: v.clone() for k, v in model.state_dict().items()}

    full, skipped = run(False, "full"), run(True, "skipped")
    assert full.keys() == skipped.keys() and all(torch.equal(full[k], skipped[k]) for k in full)
    start = model_for(tiny_tokenizer, seed=5).state_dict()
    assert any(not torch.equal(start[k], full[k]) for k in full)  # weight decay moved them: a real step
