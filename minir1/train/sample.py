"""Rejection sampling (R1 §2.3.3): sample a checkpoint on a task's training problems and keep the completions
whose format is valid and whose answer verifies, as SFT chat data (`minir1 sft --data`). Distillation
(R1 §2.4) is the same sampling on a teacher, then SFT of a student on what it kept (train/distill.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minir1 import files
from minir1.engine import Engine, SamplingParams
from minir1.models.base import CausalLM
from minir1.prompting import TEMPLATES, build_prompt
from minir1.rewards import accuracy_reward, format_reward
from minir1.tasks import Problem, Task
from minir1.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def take_problems(task: Task, n: int, seed: int) -> list[Problem]:
    """n distinct training problems, or all of a smaller split (with a warning)."""
    problems = task.take(n, "train", seed, at_most=True)
    if len(problems) < n:
        log.warning("the train split of %s has %d distinct problems; sampling all of them (asked for %d)",
                    getattr(task, "spec", task.name), len(problems), n)
    return problems


def rejection_sample(model: CausalLM, tokenizer: Tokenizer, task: Task, n: int, samples: int, *,
                     max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.95,
                     template: str = "chat", seed: int = 0,
                     problems: Sequence[Problem] | None = None) -> list[dict[str, Any]]:
    """Sample `samples` responses to each of `n` distinct training problems (all of them when the split has
    fewer, with a warning); keep those whose format is valid and whose answer verifies, without duplicates,
    as SFT chat examples ({"messages": [...]}). `problems`: the ones `take_problems` chose, when known."""
    problems = list(problems) if problems is not None else take_problems(task, n, seed)
    prompts = [build_prompt(tokenizer, p.question, template) for p in problems]
    outs = Engine(model, tokenizer).generate([ids for ids, _ in prompts], SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, n=samples, seed=seed))
    kept, seen = [], set()
    for c in outs:
        p = problems[c.prompt_index]
        response = prompts[c.prompt_index][1] + c.text
        if format_reward(response) != 1.0 or accuracy_reward(response, p.answer, task) != 1.0:
            continue
        key = (c.prompt_index, response.strip())
        if key in seen:
            continue
        seen.add(key)
        kept.append({"messages": [{"role": "user", "content": p.question},
                                  {"role": "assistant", "content": response.strip()}]})
    return kept


def write_jsonl(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """One JSON object a line, written atomically (nothing half-written or stray is left on failure)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; name a .jsonl file")
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def check_output_file(path: str | None, flag: str = "--out") -> None:
    """An output file's path is checked before the work that fills it."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {path} is a directory; name a file")
    if p.parent.exists() and not p.parent.is_dir():
        raise ValueError(f"{flag} {path}: {p.parent} is not a directory")


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------

@dataclass
class SampleConfig:
    ckpt: str = field(metadata={"help": "checkpoint directory (model + tokenizer, Hugging Face layout)"})
    task: str = field(metadata={"help": "arithmetic[:digits=N,operands=N], countdown, or jsonl:PATH"})
    out: str = field(metadata={"help": "a .jsonl file of verified chat examples, for `minir1 sft --data`"})
    n: int = field(default=100, metadata={"help": "training problems to sample"})
    samples: int = field(default=4, metadata={"help": "completions per problem"})
    max_new_tokens: int = 256
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature"})
    top_p: float = 0.95
    template: str = field(default="chat", metadata={"help": "chat or r1-zero"})
    seed: int = 0
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ... (default: cuda if available)"})

    def validate(self) -> None:
        if self.n < 1 or self.samples < 1:
            raise ValueError(f"--n ({self.n}) and --samples ({self.samples}) must be >= 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens ({self.max_new_tokens}) must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"--temperature ({self.temperature}) must be >= 0")
        if self.template not in TEMPLATES:
            raise ValueError(f"--template ({self.template!r}) must be one of {', '.join(TEMPLATES)}")
        check_output_file(self.out)


@dataclass
class SampleResult:
    out: Path
    kept: int
    sampled: int


def sample(cfg: SampleConfig) -> SampleResult:
    """Rejection-sample `cfg.ckpt` on the task: the verified completions are written to `cfg.out`."""
    from minir1.checkpoint import load
    from minir1.tasks import get_task
    cfg.validate()
    task = get_task(cfg.task)
    model, tokenizer = load(cfg.ckpt, device=cfg.device)
    problems = take_problems(task, cfg.n, cfg.seed)
    rows = rejection_sample(model, tokenizer, task, cfg.n, cfg.samples, max_new_tokens=cfg.max_new_tokens,
                            temperature=cfg.temperature, top_p=cfg.top_p, template=cfg.template, seed=cfg.seed,
                            problems=problems)
    write_jsonl(rows, cfg.out)
    return SampleResult(Path(cfg.out), len(rows), len(problems) * cfg.samples)
