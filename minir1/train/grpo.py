"""GRPO: Group Relative Policy Optimization with rule-based rewards (DeepSeekMath §4.1; R1 §2.2, eq. 1-3),
plus the variants that later work found useful (Dr. GRPO, DAPO), and rejection sampling (R1 §2.3.3).

This file holds GRPO's data (rollouts from the engine, scored by the rewards) and its loss; the
optimizer, schedule, logging and checkpoints are the shared loop's. One GRPO step = one batch of
P prompts × G completions, then μ optimizer steps over it (`mu`), each accumulated over micro-batches.

The loss of one completion token t (importance ratio r = π_θ / π_old, advantage A of its completion):

    -min(r·A, clip(r, 1 - ε_low, 1 + ε_high)·A) + β·KL_k3(π_θ ‖ π_ref)

aggregated as `grpo` (mean over each completion's tokens, then over completions), `dr_grpo` (sum over
tokens / (G·P·max_new_tokens)) or `dapo` (sum over tokens / completion tokens in the batch).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from minir1.engine import Completion, Engine, SamplingParams
from minir1.models.base import CausalLM
from minir1.prompting import build_prompt
from minir1.rewards import TimeBudget, accuracy_reward, format_reward, safe_reward, time_budget, warm_up_verifier
from minir1.tasks import Problem, Task
from minir1.tokenizer import Tokenizer
from minir1.train import distributed
from minir1.train.loop import TrainConfig, TrainingError, TrainResult, prepare, train
from minir1.train.prefix_tree import PrefixForest, forest_logprobs, pair_cost, prefix_tries

log = logging.getLogger(__name__)
LOSSES = ("grpo", "dr_grpo", "dapo")
SKIP_FLAT_UPDATES = True  # completions that add nothing (advantage 0, or no counted token; β = 0) skip the update
FORWARD_OVERHEAD_TOKENS = 256  # what one more forward + backward costs, in tokens (length_buckets)
LOG_RATIO_CLAMP = 20.0  # keeps exp() of the KL term finite


@dataclass
class GRPOConfig:
    prompts_per_step: int = 8          # P
    group_size: int = 8                # G
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    loss: str = "grpo"                 # grpo | dr_grpo | dapo
    beta: float = 0.0                  # KL weight toward the frozen reference model
    mu: int = 1                        # optimisation passes over each batch
    epsilon: float = 0.2               # ε_low
    epsilon_high: float | None = None  # ε_high (DAPO's clip-higher); None = epsilon
    scale_rewards: bool = True         # divide advantages by the group's std (False: Dr. GRPO)
    dynamic_sampling: bool = False     # DAPO: drop groups whose rewards are all equal, draw more
    max_sampling_rounds: int = 4
    overlong: str = "mask"             # truncated completions: mask (out of the loss) | penalty (DAPO soft) | keep
    overlong_buffer: int = 32          # the soft penalty's ramp, in tokens before max_new_tokens
    format_weight: float = 0.1
    accuracy_weight: float = 1.0
    template: str = "chat"             # chat | r1-zero
    eval_every: int = 0                # GRPO steps between held-out evaluations (0 = none)
    eval_n: int = 50                   # held-out problems per evaluation
    eval_samples: int = 1              # completions per problem: 1 = greedy; more = R1's pass@1 at temperature 0.6
    reward_time_budget: float = 10.0   # seconds the LaTeX checks of one batch may take; later ones score 0
    share_prefixes: bool = True        # the update runs each distinct prefix of a group once (a prefix tree)

    def validate(self) -> None:
        for name in ("temperature", "top_p", "beta", "epsilon", "epsilon_high", "format_weight", "accuracy_weight"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"{name} ({v}) must be a finite number")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p ({self.top_p}) must be in (0, 1]")
        if self.format_weight < 0 or self.accuracy_weight < 0 or self.format_weight + self.accuracy_weight <= 0:
            raise ValueError("format_weight and accuracy_weight must be >= 0, and not both 0")
        if not math.isfinite(self.reward_time_budget) or self.reward_time_budget <= 0:
            raise ValueError(f"reward_time_budget ({self.reward_time_budget}) must be a positive number of seconds")
        if self.max_sampling_rounds < 1:
            raise ValueError(f"max_sampling_rounds ({self.max_sampling_rounds}) must be >= 1")
        if self.overlong_buffer < 1 or self.eval_every < 0 or self.eval_n < 1 or self.eval_samples < 1:
            raise ValueError("overlong_buffer, eval_n and eval_samples must be >= 1 and eval_every >= 0")
        if self.template not in ("chat", "r1-zero"):
            raise ValueError(f"template ({self.template!r}) must be chat or r1-zero")
        if self.loss not in LOSSES:
            raise ValueError(f"loss ({self.loss!r}) must be one of {', '.join(LOSSES)}")
        if self.group_size < 2:
            raise ValueError(f"group_size ({self.group_size}) must be >= 2: advantages compare within a group")
        if self.prompts_per_step < 1 or self.mu < 1 or self.max_new_tokens < 1:
            raise ValueError("prompts_per_step, mu and max_new_tokens must be >= 1")
        if self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise ValueError("epsilon and epsilon_high must be > 0")
        if self.overlong not in ("mask", "penalty", "keep"):
            raise ValueError(f"overlong ({self.overlong!r}) must be mask, penalty or keep")
        if self.beta < 0:
            raise ValueError(f"beta ({self.beta}) must be >= 0")
        if self.temperature <= 0:
            raise ValueError(f"temperature ({self.temperature}) must be > 0: a group of identical greedy "
                             "completions has no advantage to learn from")


# --------------------------------------------------------------------------------------------------
# Advantages and the loss (pure functions: tested against hand-computed values)
# --------------------------------------------------------------------------------------------------


def group_advantages(rewards: Tensor, group_ids: Tensor, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """(r - mean of its group) / (std of its group + eps), or without the division (Dr. GRPO)."""
    n_groups = int(group_ids.max()) + 1
    counts = torch.zeros(n_groups).index_add_(0, group_ids, torch.ones_like(rewards))
    means = torch.zeros(n_groups).index_add_(0, group_ids, rewards) / counts
    centred = rewards - means[group_ids]
    if not scale:
        return centred
    var = torch.zeros(n_groups).index_add_(0, group_ids, centred ** 2) / (counts - 1).clamp_min(1)
    return centred / (var.sqrt()[group_ids] + eps)


@dataclass
class LossParts:
    loss: Tensor
    kl: Tensor
    clip_low: Tensor
    clip_high: Tensor


def grpo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, loss_type: str = "grpo",
              epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
              ref_logp: Tensor | None = None, max_new_tokens: int | None = None,
              n_completions: int | None = None, n_tokens: int | float | None = None) -> LossParts:
    """logp, old_logp, ref_logp, mask: [N, T] per completion token; advantages: [N].

    For micro-batching, pass the whole batch's `n_completions` (grpo, dr_grpo) and `n_tokens` (dapo):
    the micro-batch losses then add up to the batch loss.
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None]
    unclipped, clipped = ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + eps_high) * a
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(per_token)
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        log_ratio = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl = torch.exp(log_ratio) - log_ratio - 1  # k3, an unbiased, non-negative estimator
        per_token = per_token + beta * kl
    n = n_completions if n_completions is not None else logp.shape[0]
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1)).sum() / n
    elif loss_type == "dr_grpo":
        if max_new_tokens is None:
            raise ValueError("dr_grpo needs max_new_tokens")
        loss = (per_token * mask).sum() / (n * max_new_tokens)
    elif loss_type == "dapo":
        total = n_tokens if n_tokens is not None else mask.sum()
        loss = (per_token * mask).sum() / max(float(total), 1.0)
    else:
        raise ValueError(f"unknown loss {loss_type!r}")
    tokens = mask.sum().clamp_min(1)
    low = ((ratio < 1 - epsilon) & (a < 0)).to(mask.dtype)
    high = ((ratio > 1 + eps_high) & (a > 0)).to(mask.dtype)
    return LossParts(loss, (kl * mask).sum() / tokens, (low * mask).sum() / tokens, (high * mask).sum() / tokens)


def length_buckets(totals: Sequence[int], overhead: int | None = None) -> list[list[int]]:
    """Rows (by their real length) grouped so that each group is padded only to its own longest row: the
    rows sorted by length and cut where the padding saved pays for one more forward, which costs about
    `overhead` tokens' worth of fixed work (default FORWARD_OVERHEAD_TOKENS; a dynamic programme over the
    distinct lengths)."""
    overhead = FORWARD_OVERHEAD_TOKENS if overhead is None else overhead
    order = sorted(range(len(totals)), key=lambda i: totals[i])
    widths = sorted(set(totals))
    count = [sum(1 for t in totals if t <= w) for w in widths]  # rows up to each width
    best, cut = [0.0], [0]
    for j, w in enumerate(widths, start=1):
        options = [(best[i] + (count[j - 1] - (count[i - 1] if i else 0)) * w + overhead, i) for i in range(j)]
        b, i = min(options)
        best.append(b)
        cut.append(i)
    groups, j = [], len(widths)
    while j > 0:
        i = cut[j]
        lo, hi = (count[i - 1] if i else 0), count[j - 1]
        groups.append(order[lo:hi])
        j = i
    return groups[::-1]


def completion_logprobs(model: CausalLM, ids: Tensor, prompt_lens: Tensor, comp_len: int,
                        temperature: float, lengths: Tensor | None = None,
                        share_prefixes: bool = False) -> tuple[Tensor, Tensor]:
    """Log-probabilities of the completion tokens under softmax(logits / temperature) — the same
    distribution as the engine's logprobs — and the per-token entropy. ids [N, L] hold each prompt then
    its completion, right-padded; returns [N, comp_len]. With `lengths` [N] (completion tokens per row) the
    padding costs nothing: rows of similar length run together, each group cut to its own longest row
    (`length_buckets`), and the padding stays out of the expert loads that steer the balancing bias. With
    `share_prefixes`, rows with the same prompt run as one prefix tree when that is cheaper: each distinct
    prefix once (minir1/train/prefix_tree.py)."""
    if lengths is None:
        return _logprobs(model, ids, prompt_lens, comp_len, temperature, None)
    totals = (prompt_lens + lengths.clamp_min(1)).tolist()
    groups = length_buckets(totals)
    if share_prefixes:
        forest = plan_forest(model, ids, prompt_lens, lengths, totals, groups)
        if forest is not None:
            logp, entropy = forest_logprobs(model, forest, comp_len, temperature)
            back = torch.empty_like(forest.rows)
            back[forest.rows] = torch.arange(len(back), device=back.device)
            return logp[back], entropy[back]
    if len(groups) == 1:  # one group: the rows as they are, no gather and scatter
        return _logprobs(model, ids[:, :max(totals)], prompt_lens, comp_len, temperature, lengths)
    parts, rows = [], []
    for group in groups:
        r = torch.tensor(group, device=ids.device)
        width, cp = max(totals[i] for i in group), max(int(lengths[r].max()), 1)
        logp, entropy = _logprobs(model, ids[r, :width], prompt_lens[r], cp, temperature, lengths[r])
        parts.append((F.pad(logp, (0, comp_len - cp)), F.pad(entropy, (0, comp_len - cp))))
        rows += group
    back = torch.empty(len(rows), dtype=torch.long, device=ids.device)
    back[torch.tensor(rows, device=ids.device)] = torch.arange(len(rows), device=ids.device)
    return torch.cat([p[0] for p in parts])[back], torch.cat([p[1] for p in parts])[back]


def plan_forest(model: CausalLM, ids: Tensor, prompt_lens: Tensor, lengths: Tensor, totals: list[int],
                groups: list[list[int]]) -> PrefixForest | None:
    """The rows' prefix tries, if they cost less than the rows run in their length groups; else None. Cost in
    tokens' worth: the tokens that run (the tries' distinct nodes; the groups' padded rows) plus pair_cost x
    the causal attention pairs (the tries' attention runs on the rows padded to the longest), plus the
    fixed cost of each forward."""
    c = pair_cost(model)
    tries = prefix_tries(ids, prompt_lens, lengths)
    tree = sum(tries.sizes) + c * len(totals) * max(totals) ** 2 / 2 + FORWARD_OVERHEAD_TOKENS
    rows = sum(len(g) * max(totals[i] for i in g) * (1 + c * max(totals[i] for i in g) / 2) for g in groups)
    if tree >= rows + FORWARD_OVERHEAD_TOKENS * len(groups):
        return None
    return tries.pack(ids.device)


def _logprobs(model: CausalLM, ids: Tensor, prompt_lens: Tensor, comp_len: int, temperature: float,
              lengths: Tensor | None) -> tuple[Tensor, Tensor]:
    index = prompt_lens[:, None] - 1 + torch.arange(comp_len, device=ids.device)[None]   # predicting positions
    index = index.clamp_max(ids.shape[1] - 2)
    counted = None
    if lengths is not None:
        counted = torch.arange(ids.shape[1] - 1, device=ids.device)[None] < (prompt_lens + lengths)[:, None]
    # the head only where completion tokens are predicted
    picked = model(ids[:, :-1], logits_at=index, counted=counted).float()
    logp_all = (picked / (temperature if temperature > 0 else 1.0)).log_softmax(-1)
    targets = ids.gather(1, (index + 1).clamp_max(ids.shape[1] - 1))
    with torch.no_grad():  # a metric: keep it out of the autograd graph
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(-1, targets[..., None]).squeeze(-1), entropy


# --------------------------------------------------------------------------------------------------
# Rollouts
# --------------------------------------------------------------------------------------------------

RewardFn = Callable[[str, str, Any], float]


@dataclass
class Rollouts:
    ids: Tensor                  # [N, L] prompt + completion, right-padded
    prompt_lens: Tensor          # [N]
    mask: Tensor                 # [N, C] completion tokens that count in the loss
    advantages: Tensor           # [N]
    old_logp: Tensor | None = None
    ref_logp: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    batch_tokens: float = 0.0    # completion tokens in the loss, all processes together (dapo's denominator)
    lengths: Tensor | None = None  # [N] completion tokens per row (the rest of the row is padding)


def soft_overlong_penalty(length: int, max_new_tokens: int, buffer: int) -> float:
    """DAPO's soft overlong punishment: 0 up to max - buffer, then down linearly to -1 at the maximum."""
    start = max_new_tokens - buffer
    return 0.0 if length <= start else max(-1.0, (start - length) / max(buffer, 1))


class GRPOStage:
    name = "grpo"

    def __init__(self, task: Task, tokenizer: Tokenizer, cfg: GRPOConfig, micro_batch_size: int, seed: int = 0,
                 reward_fns: dict[str, RewardFn] | None = None, ref_model: CausalLM | None = None) -> None:
        cfg.validate()
        self.task, self.tokenizer, self.cfg, self.seed = task, tokenizer, cfg, seed
        self.micro_batch_size = micro_batch_size
        # Does the loop's balancing update need this stage's expert loads (route_bias_speed > 0)? Then every
        # micro-batch runs its forward, even one with nothing to learn from.
        self.counts_routing = True
        self.reward_fns = reward_fns or {
            "format": lambda response, answer, task: format_reward(response),
            "accuracy": lambda response, answer, task: accuracy_reward(response, answer, task),
        }
        self.weights = {"format": cfg.format_weight, "accuracy": cfg.accuracy_weight}
        if reward_fns is None:
            warm_up_verifier()  # the first LaTeX answer would otherwise stall a step by 0.1-0.5 s
        self.ref_model = ref_model
        self._rollouts: Rollouts | None = None
        self._engine: Engine | None = None
        self._generation = -1
        self._step_start = 0.0
        self._eval: dict[str, float] = {}

    # -- scoring -------------------------------------------------------------------------------------------
    def score(self, responses: Sequence[str], problems: Sequence[Problem]) -> tuple[Tensor, dict[str, Tensor]]:
        """Combined reward per response: the weighted mean of the reward functions, where accuracy only
        counts with a valid format. A reward that raises or is not finite scores 0 (logged)."""
        parts = {name: torch.tensor([safe_reward(fn, r, p.answer, self.task) for r, p in zip(responses, problems)])
                 for name, fn in self.reward_fns.items()}
        total = sum(self.weights.get(k, 1.0) for k in parts) or 1.0
        combined = torch.zeros(len(responses))
        for name, values in parts.items():
            if name == "accuracy" and "format" in parts:
                values = values * (parts["format"] == 1.0)
            combined += self.weights.get(name, 1.0) * values
        return combined / total, parts

    # -- one batch of rollouts -----------------------------------------------------------------------------
    def rollout(self, model: CausalLM, generation: int) -> Rollouts:
        cfg, G = self.cfg, self.cfg.group_size
        if self._engine is None or self._engine.model is not model:
            # Kept from step to step: its native decoder repacks the changed weights into the same buffers.
            self._engine = Engine(model, self.tokenizer)
        engine = self._engine
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                n=G, seed=hash((self.seed, generation)) % 2**62)
        kept: list[tuple[Problem, list[int], str, list[Completion], Tensor, dict[str, Tensor]]] = []
        generate_s = score_s = 0.0
        groups_seen = zero_std = 0
        budget = TimeBudget(cfg.reward_time_budget)
        d = distributed.info()
        for round_ in range(cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
            need = cfg.prompts_per_step // d.world - len(kept)
            if need <= 0:
                break
            # Problems are a function of (seed, generation, round): a resumed run draws the same ones. Under
            # torchrun each process takes its share of the groups (a group never spans processes).
            problems = self.task.take(need * d.world, "train",
                                      seed=hash((self.seed, generation, round_)) % 2**31)[d.rank::d.world]
            prompts = [build_prompt(self.tokenizer, p.question, cfg.template) for p in problems]
            t = time.perf_counter()
            params.seed = (params.seed + round_) % 2**62
            outs = engine.generate([ids for ids, _ in prompts], params)
            generate_s += time.perf_counter() - t
            t = time.perf_counter()
            for i, p in enumerate(problems):
                group = outs[i * G:(i + 1) * G]
                responses = [prompts[i][1] + c.text for c in group]
                with time_budget(budget):  # one budget for the whole batch's reward checks
                    rewards, parts = self.score(responses, [p] * G)
                if cfg.overlong == "penalty":
                    rewards = rewards + torch.tensor([soft_overlong_penalty(len(c.token_ids), cfg.max_new_tokens,
                                                                            cfg.overlong_buffer) for c in group])
                groups_seen += 1
                flat = bool((rewards == rewards[0]).all())
                zero_std += flat
                if cfg.dynamic_sampling and flat:
                    continue
                kept.append((p, prompts[i][0], prompts[i][1], group, rewards, parts))
            score_s += time.perf_counter() - t
        if not kept:
            raise TrainingError(
                f"GRPO step {generation + 1}: dynamic sampling drew {groups_seen} groups in {cfg.max_sampling_rounds} "
                f"round(s) and in every one all {G} rewards were equal (reward {float(rewards[0]):.3g}), so there is "
                "nothing to learn from. Raise --max-sampling-rounds, raise --temperature, or check that the model "
                "can solve some of the task (an untrained model scores 0 everywhere).")
        completions = [c for k in kept for c in k[3]]
        rewards = torch.cat([k[4] for k in kept])
        group_ids = torch.arange(len(kept)).repeat_interleave(G)
        advantages = group_advantages(rewards, group_ids, cfg.scale_rewards)
        comp_len = max(max(len(c.token_ids) for c in completions), 1)
        prompt_lens = torch.tensor([len(k[1]) for k in kept]).repeat_interleave(G)
        L = int(prompt_lens.max()) + comp_len
        ids = torch.full((len(completions), L), self.tokenizer.pad_id or 0, dtype=torch.long)
        mask = torch.zeros(len(completions), comp_len)
        truncated = torch.tensor([c.finish_reason == "length" for c in completions])
        for row, c in enumerate(completions):
            prompt = kept[row // G][1]
            ids[row, :len(prompt)] = torch.tensor(prompt)
            ids[row, len(prompt):len(prompt) + len(c.token_ids)] = torch.tensor(c.token_ids, dtype=torch.long)
            if not (cfg.overlong == "mask" and truncated[row]):
                mask[row, :len(c.token_ids)] = 1
        lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float)
        counted = distributed.all_sum(float(mask.sum()), d)  # dapo's denominator: the whole batch's tokens
        parts = {k: torch.cat([kk[5][k] for kk in kept]) for k in kept[0][5]}
        metrics = {"reward_mean": float(rewards.mean()),
                   "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
                   **{f"reward_{k}": float(v.mean()) for k, v in parts.items()},
                   "accuracy": float(parts["accuracy"].mean()) if "accuracy" in parts else float("nan"),
                   "format_rate": float(parts["format"].mean()) if "format" in parts else float("nan"),
                   "zero_std_groups": zero_std / max(groups_seen, 1), "groups": len(kept),
                   "completion_len_mean": float(lengths.mean()), "completion_len_max": float(lengths.max()),
                   "truncated_frac": float(truncated.float().mean()),
                   "completion_tokens": float(lengths.sum()), "generate_s": generate_s, "score_s": score_s,
                   "reward_timeouts": budget.timeouts}
        return Rollouts(ids, prompt_lens, mask, advantages, metrics=metrics, batch_tokens=counted,
                        lengths=lengths.long())

    def _reference_logp(self, model: CausalLM, ro: Rollouts, comp_len: int) -> tuple[Tensor | None, Tensor | None]:
        """Old-policy log-probs (when μ > 1) and reference log-probs (when β > 0), micro-batch by micro-batch."""
        def logp_of(policy: CausalLM) -> Tensor:
            return torch.cat([completion_logprobs(policy, ro.ids[s].to(device), ro.prompt_lens[s].to(device),
                                                  comp_len, self.cfg.temperature,
                                                  None if ro.lengths is None else ro.lengths[s].to(device),
                                                  share_prefixes=self.cfg.share_prefixes)[0].cpu()
                              for s in self._slices(ro)])

        device = next(model.parameters()).device
        old = ref = None
        with torch.no_grad():
            if self.cfg.mu > 1:
                was_training = model.training
                model.eval()
                old = logp_of(model)
                model.train(was_training)
            if self.cfg.beta > 0 and self.ref_model is not None:
                ref = logp_of(self.ref_model.to(device))
        return old, ref

    def _share_prefixes(self, model: CausalLM) -> bool:
        # A prefix tree counts a shared token's expert load once, not once per rollout through it: when the
        # balancing update reads those loads, the rows run apart.
        return self.cfg.share_prefixes and not (self.counts_routing and getattr(model, "moe_layers", list)())

    def _slices(self, ro: Rollouts) -> list[slice]:
        n = ro.ids.shape[0]
        return [slice(i, min(i + self.micro_batch_size, n)) for i in range(0, n, self.micro_batch_size)]

    # -- the Stage protocol ------------------------------------------------------------------------------
    def batch(self, step: int, micro: int, n_micro: int) -> tuple[Rollouts, slice, int]:
        generation = step // self.cfg.mu
        d = distributed.info()
        if generation != self._generation:
            self._step_start = time.perf_counter()
            policy = self._snapshot()  # a plain module with the current weights (gathered under FSDP)
            self._rollouts = self.rollout(policy, generation)
            comp_len = self._rollouts.mask.shape[1]
            self._rollouts.old_logp, self._rollouts.ref_logp = self._reference_logp(self._model, self._rollouts,
                                                                                    comp_len)
            self._generation = generation
            self._eval = {}
            if self.cfg.eval_every and generation % self.cfg.eval_every == 0 and d.is_main:  # step 0: baseline
                from minir1.evaluate import EvalConfig, evaluate
                res = evaluate(policy, self.tokenizer, self.task,
                               EvalConfig(n=self.cfg.eval_n, samples=self.cfg.eval_samples,
                                          max_new_tokens=self.cfg.max_new_tokens, template=self.cfg.template,
                                          seed=self.seed, at_most=True))
                self._eval = {"eval_pass@1": res["pass@1"], "eval_pass@1_ci95": res["pass@1_ci95"],
                              "eval_format_rate": res["format_rate"], "eval_thinking_rate": res["thinking_rate"],
                              "eval_problems": res["problems"],
                              "eval_problems_distinct": res["problems_distinct"],
                              "eval_mean_completion_tokens": res["mean_completion_tokens"]}
        # The loop deals micro-batches out round-robin: this is our j-th of n_micro / world. The rows are cut
        # into exactly that many contiguous slices (some empty when dynamic sampling kept fewer rows), so no
        # completion is dropped or repeated, whatever micro_batch_size the caller gave the stage.
        local, parts = micro // d.world, max(1, n_micro // d.world)
        base, extra = divmod(self._rollouts.ids.shape[0], parts)
        start = local * base + min(local, extra)
        return self._rollouts, slice(start, start + base + (local < extra)), n_micro

    def bind(self, model: CausalLM, snapshot: Callable[[], CausalLM] | None = None) -> None:
        """The policy being trained (the loop's model, wrapped under torchrun) and a callable giving a plain
        module with its current weights, to generate from."""
        d = distributed.info()
        if d.enabled and self.cfg.dynamic_sampling:
            raise ValueError("dynamic sampling is not available under torchrun yet (processes would need "
                             "different numbers of micro-batches)")
        if self.cfg.prompts_per_step % d.world:
            raise ValueError(f"prompts_per_step ({self.cfg.prompts_per_step}) must be a multiple of the number "
                             f"of processes ({d.world}): a group never spans processes")
        self._model = model
        self._snapshot = snapshot or (lambda: model)

    def loss(self, model: CausalLM, batch: tuple[Rollouts, slice, int]) -> tuple[Tensor, dict[str, float], int]:
        ro, s, n_micro = batch
        device = next(model.parameters()).device
        if s.stop <= s.start:
            return torch.zeros((), device=device, requires_grad=True), {}, 0
        rows: slice | Tensor = s
        if SKIP_FLAT_UPDATES and self.cfg.beta == 0 and not distributed.info().enabled and \
                not (self.counts_routing and getattr(model, "moe_layers", list)()):
            # A completion whose advantage is zero, or none of whose tokens count (truncated, under
            # overlong="mask"), adds exactly nothing to the loss or its gradient when there is no KL term (the
            # normalisers are the whole step's), so only the others run the forward and backward: the rows of
            # groups whose rewards were all equal are left out. (Not when the balancing update is on: it counts
            # the expert loads of every row.)
            rows = s.start + torch.nonzero((ro.advantages[s] != 0) & (ro.mask[s] > 0).any(-1)).flatten()
            if rows.numel() == 0:
                # Nothing to learn from in this micro-batch (an untrained model's groups all score alike): every
                # parameter gets its zero gradient, so the optimizer step is the one the full computation takes.
                zero = sum((p * 0).sum() for p in model.parameters() if p.requires_grad)
                return zero, {"entropy": float("nan"), "kl": 0.0, "clip_low": 0.0, "clip_high": 0.0,
                              "skipped_updates": 1.0}, int(ro.ids[s].numel())
        comp_len = ro.mask.shape[1]
        logp, entropy = completion_logprobs(model, ro.ids[rows].to(device), ro.prompt_lens[rows].to(device),
                                            comp_len, self.cfg.temperature,
                                            None if ro.lengths is None else ro.lengths[rows].to(device),
                                            share_prefixes=self._share_prefixes(model))
        mask = ro.mask[rows].to(device)
        old = ro.old_logp[rows].to(device) if ro.old_logp is not None else logp.detach()  # μ = 1: ratio exactly 1
        ref = ro.ref_logp[rows].to(device) if ro.ref_logp is not None else None
        d = distributed.info()
        n = ro.ids.shape[0] * d.world  # the whole batch's completions, all processes together
        parts = grpo_loss(logp, old, ro.advantages[rows].to(device), mask, loss_type=self.cfg.loss,
                          epsilon=self.cfg.epsilon, epsilon_high=self.cfg.epsilon_high, beta=self.cfg.beta,
                          ref_logp=ref, max_new_tokens=self.cfg.max_new_tokens, n_completions=n,
                          n_tokens=ro.batch_tokens)
        # The loop averages micro-batch losses; these already add up to the batch loss, so undo the average.
        tokens = float(mask.sum().clamp_min(1))
        # (entropy, kl and the clip fractions are over the completions that ran: those with signal)
        metrics = {"entropy": float((entropy * mask).sum() / tokens), "kl": float(parts.kl.detach()),
                   "clip_low": float(parts.clip_low), "clip_high": float(parts.clip_high)}
        return parts.loss * n_micro, metrics, int(ro.ids[s].numel())

    def step_metrics(self) -> dict[str, float]:
        assert self._rollouts is not None
        m = dict(self._rollouts.metrics)
        m["step_s"] = time.perf_counter() - self._step_start
        m["train_s"] = m["step_s"] - m["generate_s"] - m["score_s"]
        m["completion_tokens_per_s"] = m["completion_tokens"] / max(m["step_s"], 1e-9)  # of whole-step wall time
        return {**m, **self._eval}

    def config(self) -> dict[str, Any]:
        return {"task": getattr(self.task, "spec", self.task.name), **asdict(self.cfg)}


def make_reference(model: CausalLM) -> CausalLM:
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------

def _grpo_train() -> TrainConfig:
    # steps: GRPO steps (each is `mu` optimizer steps); batch_size: 0 = prompts_per_step x group_size.
    return TrainConfig(out="runs/grpo", steps=50, batch_size=0, lr=1e-4, warmup_steps=0, schedule="constant",
                       weight_decay=0.0, route_bias_speed=0.0)


@dataclass
class GRPOStageConfig:
    init: str = field(metadata={"help": "checkpoint to start from (an SFT model, or a base model with "
                                        "--template r1-zero)"})
    task: str | None = field(default=None, metadata={"help": "arithmetic[:digits=N,operands=N], countdown, "
                                                             "or jsonl:PATH"})
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    train: TrainConfig = field(default_factory=_grpo_train)


def grpo(cfg: GRPOStageConfig) -> TrainResult:
    """GRPO from `init` on the task's training problems, with rule-based rewards (R1-Zero style RL)."""
    from minir1.checkpoint import load_model
    from minir1.tasks import get_task
    if not cfg.task:
        raise ValueError("grpo needs --task")
    g = cfg.grpo
    g.validate()
    completions = g.prompts_per_step * g.group_size
    if cfg.train.batch_size not in (0, completions):
        raise ValueError(f"GRPO's batch is prompts_per_step x group_size ({completions} completions); "
                         f"drop --batch-size ({cfg.train.batch_size}) or change those two")
    micro = min(cfg.train.micro_batch_size, completions) if cfg.train.micro_batch_size else 0  # 0: for the processes
    steps = cfg.train.steps
    tc = prepare(replace(cfg.train, batch_size=completions, micro_batch_size=micro))
    tc.steps = steps * g.mu
    if completions % (tc.micro_batch_size or completions):
        raise ValueError(f"micro_batch_size ({tc.micro_batch_size}) must divide prompts_per_step x group_size "
                         f"({completions})")
    task = get_task(cfg.task)
    tokenizer = Tokenizer.from_pretrained(cfg.init)
    model = load_model(cfg.init)
    ref = make_reference(model) if g.beta > 0 else None
    stage = GRPOStage(task, tokenizer, g, tc.micro_batch_size or completions, tc.seed, ref_model=ref)
    stage.counts_routing = tc.route_bias_speed > 0
    return train(model, tokenizer, stage, tc)
