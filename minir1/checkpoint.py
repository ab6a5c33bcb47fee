"""Checkpoint directories: the one place that turns a directory into a ready model + tokenizer, saves one,
and keeps what resuming a run needs.

A directory in Hugging Face's layout holds config.json, model.safetensors (or shards + index),
tokenizer.json and tokenizer_config.json; a training stage's output adds metrics.jsonl and
train_config.json, and its periodic checkpoints live in `checkpoints/step-N/` with the optimizer and RNG
states beside the weights (`optimizer.safetensors`, `trainer_state.json`).

    model, tokenizer = minir1.load("runs/speedrun/final")
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from minir1 import files
from minir1.devices import resolve_device
from minir1.errors import CheckpointError, TrainingError
from minir1.models import hf
from minir1.models.base import CausalLM
from minir1.models.hf.weights import WEIGHT_FILE_PATTERNS
from minir1.tokenizer import CHAT_TEMPLATE_FILE, Tokenizer

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")

__all__ = ["CheckpointError", "build_model", "checkpoints", "latest_checkpoint", "load", "load_model", "read_config",
           "read_training_state", "save", "write_training_state"]


# --------------------------------------------------------------------------------------------------
# Model + tokenizer
# --------------------------------------------------------------------------------------------------

def read_config(directory: str | Path) -> Any:
    """The model config of a checkpoint directory (any supported family), without loading weights."""
    return hf.read_config(directory)


def build_model(config: Any) -> CausalLM:
    """A new model of `config`'s family (under `torch.device("meta")`: shapes only, for any size)."""
    return hf.build_model(config)


def load_model(directory: str | Path, *, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu") -> CausalLM:
    """The model alone (e.g. to train it), in train mode on `device`."""
    return hf.load_model(directory, dtype=dtype, device=device)


def load(directory: str | Path, dtype: torch.dtype | None = None,
         device: str | torch.device | None = None) -> tuple[CausalLM, Tokenizer]:
    """(model, tokenizer) from a checkpoint directory, the model in eval mode on `device` (default: cuda if
    available, else cpu); the family is chosen by config.json's model_type."""
    device = resolve_device(device)
    tokenizer = Tokenizer.from_pretrained(directory)
    model = hf.load_model(directory, dtype=dtype, device=device).eval()
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                              f"vocab_size is {model.config.vocab_size}")
    return model, tokenizer


def save(directory: str | Path, model: CausalLM, tokenizer: Tokenizer, *, state: dict[str, Tensor] | None = None,
         texts: dict[str, str] | None = None, copies: dict[str, Path] | None = None) -> None:
    """Write model, tokenizer and the given extra files (`texts`: name -> content, `copies`: name -> file to
    copy) into `directory`, all together or none: a crash or a full disk leaves what was there before."""
    # A chat_template.jinja left from another tokenizer would override the new one's template on load.
    with files.replacing(Path(directory), stale=(*WEIGHT_FILE_PATTERNS, CHAT_TEMPLATE_FILE)) as staging:
        model.save_pretrained(staging, state=state)
        tokenizer.save_pretrained(staging)
        for name, text in (texts or {}).items():
            (staging / name).write_text(text)
        for name, source in (copies or {}).items():
            if source.is_file():
                shutil.copyfile(source, staging / name)


# --------------------------------------------------------------------------------------------------
# Training checkpoints: `<out>/checkpoints/step-N`
# --------------------------------------------------------------------------------------------------

def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints in `<out>/checkpoints`, as (step, path), ordered by step number."""
    found = []
    for p in (Path(out) / CHECKPOINTS).glob("step-*"):
        m = _STEP_DIR.match(p.name)
        if m and (p / TRAINER_STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    done = checkpoints(out)
    return done[-1][1] if done else None


def write_training_state(out: Path, step: int, model: CausalLM, state: dict[str, Tensor], tokenizer: Tokenizer,
                         opt_state: dict[str, Any], keep_last: int, world_size: int = 1,
                         settings: dict[str, Any] | None = None) -> Path:
    """Write `<out>/checkpoints/step-N` atomically (a temporary directory renamed into place), then remove
    all but the last `keep_last` by step number. `state` and `opt_state` are full (gathered) states. A full
    disk raises DiskFullError and leaves the earlier checkpoints as they were."""
    opt_tensors, opt_meta = _optimizer_tensors(opt_state)
    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with files.disk_full_means(f"could not write checkpoint {final}; the earlier checkpoints are intact"):
            tmp.mkdir()
            model.save_pretrained(tmp, state=state)
            tokenizer.save_pretrained(tmp)
            rng_tensors, rng_meta = _rng_state()
            save_file({**opt_tensors, **rng_tensors}, tmp / OPTIMIZER_STATE)
            (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, "world_size": world_size,
                                                         "settings": settings, **opt_meta, **rng_meta}))
            for f in tmp.iterdir():  # durable before it becomes visible
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # the same step again (a resumed run): set the old one aside, never delete it first
        aside = root / f".step-{step:08d}.old"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
    files.fsync_dir(root)
    for _, old in checkpoints(out)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_training_state(ckpt: Path, model: CausalLM,
                        settings: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """Restore the (unwrapped) model's weights and the RNG states from a checkpoint directory; returns its
    step and the full optimizer state, for after the model is wrapped and the optimizer built. With
    `settings` (those of the run resuming), a checkpoint made with other settings is refused."""
    meta = files.read_json(ckpt / TRAINER_STATE, TrainingError)
    saved = meta.get("settings") if isinstance(meta, dict) else None
    if settings is not None and saved is not None:
        diffs = _differences(saved, settings)
        if diffs:
            more = f" (and {len(diffs) - 8} more)" if len(diffs) > 8 else ""
            raise TrainingError(f"--resume: {ckpt} was made with other settings than this run's: "
                                f"{'; '.join(diffs[:8])}{more}. Run with the checkpoint's settings, or start afresh "
                                "with --overwrite")
    loaded = hf.load_model(ckpt, device=next(model.parameters()).device)
    with torch.no_grad():
        for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
            if p.shape != q.shape:
                raise TrainingError(f"{ckpt}: tensor {name} has shape {list(q.shape)}, the model {list(p.shape)}")
            p.copy_(q)
    tensors = load_file(ckpt / OPTIMIZER_STATE)
    _set_rng_state(tensors, meta)
    return int(meta["step"]), _optimizer_from_tensors(tensors, meta)


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} in the checkpoint, {new!r} now"]


def _optimizer_tensors(opt_state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A full optimizer state keyed by parameter name -> safetensors tensors + JSON metadata."""
    tensors = {f"state.{name}.{k}": v.detach().cpu().contiguous() for name, st in opt_state["state"].items()
               for k, v in st.items() if isinstance(v, Tensor)}
    return tensors, {"param_groups": opt_state["param_groups"]}


def _optimizer_from_tensors(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("state."):
            name, k = key[len("state."):].rsplit(".", 1)
            state.setdefault(name, {})[k] = t
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    return tensors, {"python_random": [version, list(internal), gauss]}


def _set_rng_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))
