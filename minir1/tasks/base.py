"""The Task protocol and what every task shares: the problem record and the held-out split."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar


class TaskError(ValueError):
    """A task spec, option or data file is wrong; the message names it (and the line)."""


@dataclass(frozen=True)
class Problem:
    question: str         # the user's message
    answer: str           # the reference answer, as the answer tag should hold it
    solution: str         # worked reasoning (the text inside <think>), for pretraining and cold-start SFT


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line; errors name the file and the line."""
    if not path.is_file():
        raise TaskError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from e


HELDOUT_PERCENT = 10


def is_heldout(question: str) -> bool:
    """A problem is held out iff a hash of its text says so: train and test can never overlap, whatever
    the seeds, and the split needs no bookkeeping."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT


class Task:
    """A source of problems and a checker. Subclasses implement `make(rng)` (one random problem) and
    `check(response_answer, problem_answer)`; finite tasks override `problems`."""

    name: ClassVar[str] = "task"

    @classmethod
    def from_options(cls, options: dict[str, str], spec: str) -> Task:
        known = {f.name: f.type for f in fields(cls)} if hasattr(cls, "__dataclass_fields__") else {}
        kwargs: dict[str, Any] = {}
        for key, value in options.items():
            if key not in known:
                raise TaskError(f"task {spec!r}: unknown option {key!r}; options are {', '.join(known)}")
            try:
                kwargs[key] = int(value)
            except ValueError as e:
                raise TaskError(f"task {spec!r}: option {key}={value!r} must be an integer") from e
        return cls(**kwargs)

    def make(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    def problems(self, split: str = "train", seed: int = 0) -> Iterator[Problem]:
        """An unbounded, seeded stream of distinct-enough problems from one split ("train" or "test")."""
        if split not in ("train", "test"):
            raise TaskError(f"split must be 'train' or 'test', got {split!r}")
        rng = random.Random(f"{self.name}:{split}:{seed}")
        want_heldout = split == "test"
        while True:
            p = self.make(rng)
            if is_heldout(p.question) == want_heldout:
                yield p

    def take(self, n: int, split: str = "train", seed: int = 0) -> list[Problem]:
        out = []
        for p in self.problems(split, seed):
            if len(out) >= n:
                break
            out.append(p)
        return out

    def check(self, response: str, answer: str) -> bool:
        """Is `response` (the content of the model's answer tag) a correct answer to `answer`?"""
        from minir1.rewards import answers_match
        return answers_match(response, answer)
