"""`jsonl:PATH`: a local file with one {"question": ..., "answer": ...} object a line (GSM8K and MATH
converted to this shape work; an optional "solution" is used for SFT). Answers are checked by value,
or with math-verify for LaTeX."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from minir1.tasks.base import Problem, Task, TaskError, read_jsonl


class JsonlTask(Task):
    name = "jsonl"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.items: list[Problem] = []
        for lineno, obj in read_jsonl(self.path):
            if not isinstance(obj, dict):
                raise TaskError(f"{self.path}:{lineno}: expected an object with 'question' and 'answer'")
            for key in ("question", "answer"):
                if key not in obj:
                    raise TaskError(f"{self.path}:{lineno}: missing field '{key}'")
                if not isinstance(obj[key], (str, int, float)) or isinstance(obj[key], bool):
                    raise TaskError(f"{self.path}:{lineno}: field '{key}' must be a string or a number")
            solution = obj.get("solution", "")
            if not isinstance(solution, str):
                raise TaskError(f"{self.path}:{lineno}: field 'solution' must be a string")
            self.items.append(Problem(str(obj["question"]), str(obj["answer"]).strip(), solution))
        if not self.items:
            raise TaskError(f"{self.path}: no problems in the file")
        self._pools = {name: [p for p in self.items if self.heldout(p) == (name == "test")]
                       for name in ("train", "test")}

    def make(self, rng: random.Random) -> Problem:
        """One training problem, drawn uniformly (pretraining and SFT draw their documents this way)."""
        pool = self._pool("train")
        return pool[rng.randrange(len(pool))]

    def _pool(self, split: str) -> list[Problem]:
        if not self._pools[split]:
            raise TaskError(f"{self.path}: the {split} split is empty ({len(self.items)} problems in all; "
                            f"about 10% are held out for testing)")
        return self._pools[split]

    def problems(self, split: str = "train", seed: int = 0) -> Iterator[Problem]:
        if split not in ("train", "test"):
            raise TaskError(f"split must be 'train' or 'test', got {split!r}")
        pool = self._pool(split)
        rng = random.Random(f"jsonl:{split}:{seed}")
        while True:  # epochs, each in a fresh seeded order
            order = pool[:]
            rng.shuffle(order)
            yield from order

    def take(self, n: int, split: str = "train", seed: int = 0, at_most: bool = False) -> list[Problem]:
        """n distinct problems of the split (a question repeated in the file counts once), in a seeded order;
        a split with fewer is a TaskError unless `at_most`."""
        pool = self._pool(split)
        rng = random.Random(f"jsonl:{split}:{seed}")
        order = pool[:]
        rng.shuffle(order)
        out, seen = [], set()
        for p in order:
            key = self.canonical(p.question)
            if key not in seen and len(out) < n:
                seen.add(key)
                out.append(p)
        if len(out) < n and not at_most:
            raise TaskError(f"{self.path}: the {split} split has {len(out)} distinct problems; asked for {n} "
                            "(use a smaller --n)")
        return out
