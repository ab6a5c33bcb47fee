"""Choosing the device a command runs on, with an error that says what is wrong and what exists."""

from __future__ import annotations

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
