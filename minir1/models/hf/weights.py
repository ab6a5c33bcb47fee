"""safetensors weights in Hugging Face's layout, for every family: one `model.safetensors` or shards with
an index, written through a staging folder (a kill or a full disk leaves the previous files as they were),
read with every tensor's name, shape and finiteness checked. Only safetensors are read or written: loading
an untrusted checkpoint executes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from minir1 import files
from minir1.errors import CheckpointError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
WEIGHT_FILE_PATTERNS = (WEIGHTS_FILE, INDEX_FILE, "model-*-of-*.safetensors")  # a save replaces all of these
_FINITE_CHUNK = 1 << 22  # elements per slice of the finiteness check


# --------------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------------

def shards(tensors: dict[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    out: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if out[-1] and size + n > max_bytes:
            out.append({})
            size = 0
        out[-1][name] = t
        size += n
    return out


def check_finite(name: str, t: Tensor, where: str, hint: str = "") -> None:
    """Raise CheckpointError if a floating tensor holds a NaN or an infinity, naming it."""
    if not t.is_floating_point():
        return
    # In slices: a whole-tensor mask (and the int64 sum of it) would be a temporary larger than a bf16
    # embedding matrix itself, and loading must stay within ~1x the model's size.
    flat = t.reshape(-1)
    if all(bool(torch.isfinite(flat[i:i + _FINITE_CHUNK]).all()) for i in range(0, flat.numel(), _FINITE_CHUNK)):
        return
    bad = sum(int((~torch.isfinite(flat[i:i + _FINITE_CHUNK])).sum()) for i in range(0, flat.numel(), _FINITE_CHUNK))
    if bad:
        raise CheckpointError(f"{where}: tensor '{name}' has {bad} non-finite value(s) (NaN or infinity){hint}")


def save(path: str | Path, tensors: dict[str, Tensor], config: dict[str, Any], max_shard_bytes: int) -> None:
    """Write HF-named `tensors` and `config` (config.json) into `path`, replacing its weight files together."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share memory (fused weights, tied heads): copy all but the first.
    seen: set[int] = set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        tensors[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    for name, t in tensors.items():  # a diverged model is never written over a good one
        check_finite(name, t, f"{path}: refusing to save")
    # Everything is written to a staging folder first, then renamed into place (minir1/files.py).
    with files.replacing(path, stale=WEIGHT_FILE_PATTERNS) as staging:
        write_weights(staging, shards(tensors, max_shard_bytes), config)


def write_weights(directory: Path, parts: list[dict[str, Tensor]], config: dict[str, Any]) -> None:
    if len(parts) == 1:
        save_file(parts[0], directory / WEIGHTS_FILE, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(parts, start=1):
            fname = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
            save_file(shard, directory / fname, metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for shard in parts for t in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------------

def weight_files(path: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it."""
    index = path / INDEX_FILE
    if index.is_file():
        data = files.read_json(index, CheckpointError)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: not a valid safetensors index (expected a 'weight_map' object of "
                                  "tensor name -> file name)")
        by_name = {name: path / fname for name, fname in weight_map.items()}
        for f in set(by_name.values()):
            if f.parent != path or not f.is_file():
                raise CheckpointError(f"{index}: names shard {f.name}, which does not exist in {path}")
        return by_name
    single = path / WEIGHTS_FILE
    if not single.is_file():
        found = sorted(p.name for p in path.iterdir())
        hint = " (pickled .bin/.pt weights are never loaded: convert them to safetensors)" if any(
            n.endswith((".bin", ".pt", ".pth")) for n in found) else ""
        raise CheckpointError(f"{path}: no {WEIGHTS_FILE} or {INDEX_FILE}{hint}")
    try:
        with safe_open(single, "pt") as f:
            return {name: single for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{single}: cannot read safetensors header ({e})") from e


def iter_shapes(by_name: dict[str, Path]) -> Iterator[tuple[str, list[int], Path]]:
    """(name, shape, file) of every tensor, read from the headers only."""
    by_file: dict[Path, list[str]] = {}
    for name, f in by_name.items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        try:
            with safe_open(f, "pt") as h:
                present = set(h.keys())
                for name in names:
                    if name not in present:
                        raise CheckpointError(f"{f}: index says it holds tensor '{name}', but it does not")
                    yield name, list(h.get_slice(name).get_shape()), f
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from e


def check_names(path: Path, by_name: dict[str, Path], expected: dict[str, list[int]], optional: set[str],
                family: str) -> dict[str, Path]:
    """Every tensor on disk must be expected with its shape, and every expected one (bar `optional`) present;
    -> name -> file of those to read."""
    found: dict[str, Path] = {}
    for name, shape, f in iter_shapes(by_name):
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name not in expected:
            raise CheckpointError(f"{f}: unexpected tensor '{name}' (not part of a {family} model with this "
                                  f"{CONFIG_FILE})")
        if shape != expected[name]:
            raise CheckpointError(f"{f}: tensor '{name}' has shape {shape}, but {CONFIG_FILE} implies "
                                  f"{expected[name]}")
        found[name] = f
    missing = [n for n in expected if n not in found and n not in optional]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        first = sorted({by_name.get(n, next(iter(by_name.values()))) for n in found} or {path})[0]
        raise CheckpointError(f"{first}: missing tensor(s) {', '.join(repr(m) for m in missing[:5])}{more}")
    return found


def read_tensors(found: dict[str, Path], skip: set[str], dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The tensors named in `found` (but not in `skip`), each checked to be finite and, with `dtype`, converted
    as it is read (one tensor at a time: never a second copy of the whole model). A progress bar for large
    checkpoints."""
    by_file: dict[Path, list[str]] = {}
    for name, f in found.items():
        if name not in skip:
            by_file.setdefault(f, []).append(name)
    total = sum(f.stat().st_size for f in by_file)
    tensors: dict[str, Tensor] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=total < 2**30, leave=False) as bar:
        for f, names in by_file.items():
            with safe_open(f, "pt") as h:
                for name in names:
                    t = h.get_tensor(name)
                    check_finite(name, t, str(f), ": the run that wrote it diverged; use an earlier checkpoint")
                    tensors[name] = t if dtype is None or not t.is_floating_point() else t.to(dtype)
                    bar.update(t.numel() * t.element_size())
    return tensors
