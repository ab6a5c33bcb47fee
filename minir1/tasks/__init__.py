"""Verifiable reasoning tasks: seeded, unbounded problem generators with a held-out split that never
overlaps training, worked solutions (for pretraining text and cold-start SFT), and checkers.

`get_task("arithmetic")`, `get_task("arithmetic:digits=3,operands=3")`, `get_task("countdown")`,
`get_task("jsonl:/path/to/file.jsonl")`.
"""

from __future__ import annotations

from minir1.tasks.base import Problem, Task, TaskError, is_heldout

__all__ = ["Problem", "Task", "TaskError", "get_task", "is_heldout", "TASKS"]


def _registry() -> dict[str, type[Task]]:
    from minir1.tasks.arithmetic import Arithmetic
    from minir1.tasks.countdown import Countdown
    from minir1.tasks.jsonl import JsonlTask
    return {"arithmetic": Arithmetic, "countdown": Countdown, "jsonl": JsonlTask}


TASKS = ("arithmetic", "countdown", "jsonl:PATH")


def get_task(spec: str) -> Task:
    """Build a task from `name` or `name:key=value,key=value` (`jsonl:PATH` takes a file path)."""
    name, _, rest = spec.partition(":")
    registry = _registry()
    if name not in registry:
        raise TaskError(f"unknown task {spec!r}; choose one of: {', '.join(TASKS)}")
    if name == "jsonl":
        if not rest:
            raise TaskError("the jsonl task needs a file: --task jsonl:PATH")
        task = registry[name](rest)
        task.spec = spec
        return task
    options: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise TaskError(f"task option {item!r} in {spec!r} must look like key=value")
        options[key.strip()] = value.strip()
    task = registry[name].from_options(options, spec)
    task.spec = spec
    return task
