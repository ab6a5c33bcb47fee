"""Held-out evaluation: pass@1, pass@k, maj@k, format rate and lengths, generating with the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minir1.engine import Engine, SamplingParams
from minir1.models.base import CausalLM
from minir1.prompting import build_prompt
from minir1.rewards import accuracy_reward, extract_answer, format_reward, normalise_text, parse_number, parse_response
from minir1.stats import majority_correct, pass_at_k, wilson
from minir1.tasks import Task
from minir1.tokenizer import Tokenizer


@dataclass
class EvalConfig:
    n: int = field(default=100, metadata={"help": "held-out problems"})
    samples: int = field(default=1, metadata={"help": "K completions per problem (pass@K, maj@K)"})
    max_new_tokens: int = 256
    temperature: float | None = field(default=None, metadata={"help": "default: 0 (greedy) for one sample, 0.6 "
                                                                      "for several (R1's setting)"})
    top_p: float = 0.95
    template: str = field(default="chat", metadata={"help": "chat or r1-zero"})
    seed: int = 0
    at_most: bool = field(default=False, metadata={"help": "a split with fewer than n distinct problems: use "
                                                           "them all instead of failing"})


def _vote_key(answer: str) -> str:
    value = parse_number(answer)
    return f"num:{value}" if value is not None else f"text:{normalise_text(answer)}"


def evaluate(model: CausalLM, tokenizer: Tokenizer, task: Task, cfg: EvalConfig | None = None) -> dict[str, Any]:
    cfg = cfg or EvalConfig()
    # Distinct problems: a held-out figure over n problems means n different ones.
    problems = task.take(cfg.n, "test", cfg.seed, at_most=cfg.at_most)
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
            "thinks": bool(parsed[0].strip()) if parsed else None,
        })
    k = cfg.samples
    per_problem_pass1 = [sum(s["correct"] for s in ss) / k for ss in per_problem]
    pass1 = sum(per_problem_pass1) / len(problems)
    passk = sum(pass_at_k(k, sum(s["correct"] for s in ss), k) for ss in per_problem) / len(problems)
    maj = sum(majority_correct([(_vote_key(s["answer"]), s["correct"]) for s in ss if s["answer"] is not None])
              for ss in per_problem)
    samples = [s for ss in per_problem for s in ss]
    thinking = [s["thinking_tokens"] for s in samples if s["thinking_tokens"] is not None]
    # Answers with working and without it (an empty <think></think>), apart: what a mixed cold start's
    # policy chooses between, and how often each is right.
    worked = [s for s in samples if s["thinks"]]
    unworked = [s for s in samples if s["thinks"] is False]
    n = len(problems)
    return {
        "task": getattr(task, "spec", task.name), "problems": n,
        "problems_distinct": len({task.canonical(p.question) for p in problems}), "samples": k,
        "temperature": temperature, "pass@1": pass1, "pass@1_ci95": list(wilson(pass1 * n, n)),
        f"pass@{k}": passk, f"maj@{k}": maj / n, f"maj@{k}_ci95": list(wilson(maj, n)),
        "format_rate": sum(s["format"] for s in samples) / len(samples),
        "mean_completion_tokens": sum(s["length"] for s in samples) / len(samples),
        "mean_thinking_tokens": sum(thinking) / len(thinking) if thinking else 0.0,
        "thinking_rate": len(worked) / len(samples),
        "accuracy_thinking": sum(s["correct"] for s in worked) / len(worked) if worked else None,
        "accuracy_no_thinking": sum(s["correct"] for s in unworked) / len(unworked) if unworked else None,
        "per_problem": [{"question": p.question, "answer": p.answer, "pass@1": r}
                        for p, r in zip(problems, per_problem_pass1)],
        "examples": [{"question": p.question, "answer": p.answer, "response": opened[i] + completions[i * k].text}
                     for i, p in enumerate(problems[:3])],
    }


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------

@dataclass
class EvaluateConfig:
    ckpt: str = field(metadata={"help": "checkpoint directory (model + tokenizer, Hugging Face layout)"})
    task: str = field(metadata={"help": "arithmetic[:digits=N,operands=N], countdown, or jsonl:PATH"})
    eval: EvalConfig = field(default_factory=EvalConfig)
    out: str | None = field(default=None, metadata={"help": "write the results as JSON here (default: "
                                                            "<ckpt>/eval_<task>.json)"})
    save: bool = field(default=True, metadata={"help": "write the JSON file (--no-save: only return/print)"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ... (default: cuda if available)"})

    def validate(self) -> None:
        from minir1.prompting import TEMPLATES
        from minir1.train.sample import check_output_file
        e = self.eval
        if e.n < 1 or e.samples < 1:
            raise ValueError(f"--n ({e.n}) and --samples ({e.samples}) must be >= 1")
        if e.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens ({e.max_new_tokens}) must be >= 1")
        if e.temperature is not None and e.temperature < 0:
            raise ValueError(f"--temperature ({e.temperature}) must be >= 0")
        if e.template not in TEMPLATES:
            raise ValueError(f"--template ({e.template!r}) must be one of {', '.join(TEMPLATES)}")
        check_output_file(self.out)

    def out_path(self) -> Path:
        safe = "".join(ch if ch.isalnum() else "_" for ch in self.task.split(":")[0])
        return Path(self.out) if self.out else Path(self.ckpt) / f"eval_{safe}.json"


def evaluate_checkpoint(cfg: EvaluateConfig) -> dict[str, Any]:
    """Held-out evaluation of a checkpoint directory on a task; the results are also written as JSON."""
    from minir1.checkpoint import load
    from minir1.files import write_json
    from minir1.tasks import get_task
    cfg.validate()
    task = get_task(cfg.task)
    model, tokenizer = load(cfg.ckpt, device=cfg.device)
    res = evaluate(model, tokenizer, task, cfg.eval)
    if cfg.save:
        write_json(cfg.out_path(), res)
    return res
