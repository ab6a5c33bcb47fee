"""Choosing the device a command runs on, with an error that says what is wrong and what exists; and the CPU
threads a process may use when it shares the machine with another (the speedrun's two lanes)."""

from __future__ import annotations

from collections.abc import Callable

import torch

KINDS = ("cpu", "cuda", "mps")


def resolve_device(name: str | None) -> torch.device:
    """`auto` or None: CUDA when available, else the CPU. Otherwise a device this machine really has,
    or a ValueError naming the flag's value."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in KINDS:
        raise ValueError(f"--device {name!r}: minir1 runs on {', '.join(KINDS)}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here (PyTorch {torch.__version__}"
                             f"{' is a CPU-only build' if torch.version.cuda is None else ' sees no GPU'}); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: Apple's MPS is not available here; use --device cpu")
    return device


# A function giving the CPU threads this process may use now, or None: the process keeps its own setting.
_thread_budget: Callable[[], int] | None = None


def set_thread_budget(fn: Callable[[], int] | None) -> None:
    """Install `fn` (threads this process may use now; None removes it), applied at once and then at every
    `apply_thread_budget()`: the training loop calls it each step, so a long stage takes a core back as soon as
    the process beside it stops using one. OpenMP's thread count is the calling thread's, so this has to happen
    in the thread that computes, not from a watcher."""
    global _thread_budget
    _thread_budget = fn
    apply_thread_budget()


def apply_thread_budget() -> None:
    if _thread_budget is not None:
        n = max(1, int(_thread_budget()))
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
