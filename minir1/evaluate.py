"""Held-out evaluation: pass@1, pass@k, maj@k, format rate and lengths, generating with the engine."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from minir1.engine import Engine, SamplingParams
from minir1.model import Transformer
from minir1.prompting import build_prompt
from minir1.rewards import accuracy_reward, extract_answer, format_reward, normalise_text, parse_number, parse_response
from minir1.tasks import Task
from minir1.tokenizer import Tokenizer


@dataclass
class EvalConfig:
    n: int = 100                 # held-out problems
    samples: int = 1             # K completions per problem
    max_new_tokens: int = 256
    temperature: float | None = None   # default: 0 (greedy) for one sample, 0.6 for several (R1's setting)
    top_p: float = 0.95
    template: str = "chat"
    seed: int = 0
    at_most: bool = False        # a split with fewer than n distinct problems: use them all instead of failing


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def _vote_key(answer: str) -> str:
    value = parse_number(answer)
    return f"num:{value}" if value is not None else f"text:{normalise_text(answer)}"


def evaluate(model: Transformer, tokenizer: Tokenizer, task: Task, cfg: EvalConfig | None = None) -> dict[str, Any]:
    cfg = cfg or EvalConfig()
    # Distinct problems: a held-out figure over n problems means n different ones.
    problems = task.take(cfg.n, "test", cfg.seed, distinct=True, at_most=cfg.at_most)
    temperature = cfg.temperature if cfg.temperature is not None else (0.0 if cfg.samples == 1 else 0.6)
    prompts, opened = zip(*(build_prompt(tokenizer, p.question, cfg.template) for p in problems))
    engine = Engine(model, tokenizer)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=temperature,
                            top_p=cfg.top_p if temperature > 0 else 1.0, n=cfg.samples, seed=cfg.seed)
    completions = engine.generate(list(prompts), params)
    per_problem: list[list[dict[str, Any]]] = [[] for _ in problems]
    for c in completions:
        p = problems[c.prompt_index]
        response = opened[c.prompt_index] + c.text
        parsed = parse_response(response)
        per_problem[c.prompt_index].append({
            "correct": accuracy_reward(response, p.answer, task) == 1.0,
            "format": format_reward(response),
            "answer": extract_answer(response),
            "length": len(c.token_ids),
            "thinking_tokens": len(tokenizer.encode(parsed[0])) if parsed else None,
        })
    k = cfg.samples
    pass1 = sum(sum(s["correct"] for s in ss) / k for ss in per_problem) / len(problems)
    passk = sum(pass_at_k(k, sum(s["correct"] for s in ss), k) for ss in per_problem) / len(problems)
    maj = 0
    for ss in per_problem:
        votes = Counter(_vote_key(s["answer"]) for s in ss if s["answer"] is not None)
        if votes:
            top = votes.most_common(1)[0][0]
            winner = next(s for s in ss if s["answer"] is not None and _vote_key(s["answer"]) == top)
            maj += winner["correct"]
    samples = [s for ss in per_problem for s in ss]
    thinking = [s["thinking_tokens"] for s in samples if s["thinking_tokens"] is not None]
    return {
        "task": getattr(task, "spec", task.name), "problems": len(problems),
        "problems_distinct": len({p.question for p in problems}), "samples": k,
        "temperature": temperature, "pass@1": pass1, f"pass@{k}": passk, f"maj@{k}": maj / len(problems),
        "format_rate": sum(s["format"] for s in samples) / len(samples),
        "mean_completion_tokens": sum(s["length"] for s in samples) / len(samples),
        "mean_thinking_tokens": sum(thinking) / len(thinking) if thinking else 0.0,
        "examples": [{"question": p.question, "answer": p.answer, "response": opened[i] + completions[i * k].text}
                     for i, p in enumerate(problems[:3])],
    }
