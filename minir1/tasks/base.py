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
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TaskError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                f"{e.start + 1})") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise TaskError(f"{path}:{lineno}: JSON nested too deeply to read") from None


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

    def canonical(self, question: str) -> str:
        """The form that equivalent questions share (for arithmetic: the operands of + and × in a fixed
        order, so `3 + 5` and `5 + 3` are one problem). Distinctness and the train/test split are decided on
        it: no held-out problem has a twin in training."""
        return " ".join(question.split())

    def problem_space(self) -> int | None:
        """How many distinct problems (canonical forms) the generator can make, or None when unknown: a claim
        that a run generalises needs it to be far larger than the number of problems the run trained on."""
        return None

    def heldout(self, p: Problem) -> bool:
        return is_heldout(self.canonical(p.question))

    def problems(self, split: str = "train", seed: int = 0) -> Iterator[Problem]:
        """An unbounded, seeded stream of problems from one split ("train" or "test"); it may repeat."""
        if split not in ("train", "test"):
            raise TaskError(f"split must be 'train' or 'test', got {split!r}")
        rng = random.Random(f"{self.name}:{split}:{seed}")
        want_heldout = split == "test"
        while True:
            p = self.make(rng)
            if self.heldout(p) == want_heldout:
                yield p

    def take(self, n: int, split: str = "train", seed: int = 0, at_most: bool = False) -> list[Problem]:
        """n distinct problems of the split (distinct in canonical form), seeded; a TaskError when the split
        has fewer (`at_most`: all there are instead). Bounded whatever the task: a split that stops yielding
        new problems is detected, never looped on."""
        if split not in ("train", "test"):
            raise TaskError(f"split must be 'train' or 'test', got {split!r}")
        rng = random.Random(f"{self.name}:{split}:{seed}")
        want_heldout = split == "test"
        out: list[Problem] = []
        seen: set[str] = set()
        misses = 0  # draws in a row that gave nothing new; a coupon collector's bound says when to stop
        while len(out) < n:
            p = self.make(rng)
            key = self.canonical(p.question)
            if is_heldout(key) != want_heldout or key in seen:
                misses += 1
                if misses > max(10_000, 20 * len(seen)):
                    break
                continue
            misses = 0
            seen.add(key)
            out.append(p)
        spec = getattr(self, "spec", self.name)
        if not out and n > 0:
            raise TaskError(f"task {spec!r}: its {split} split is empty")
        if len(out) < n and not at_most:
            raise TaskError(f"task {spec!r}: the {split} split has only {len(out)} distinct problems; asked for {n} "
                            "(use a smaller --n, or a larger task)")
        return out

    def check(self, response: str, answer: str) -> bool:
        """Is `response` (the content of the model's answer tag) a correct answer to `answer`?"""
        from minir1.rewards import answers_match
        return answers_match(response, answer)
