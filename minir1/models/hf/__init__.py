"""Hugging Face checkpoints: one adapter per family (config.json <-> config, parameter names), chosen by
config.json's `model_type`. An adapter imports its model; no model imports an adapter (the split of
torchtitan's model.py / state_dict_adapter.py), so the adapters are found here by module name.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

from minir1 import files
from minir1.errors import ConfigError

CONFIG_FILE = "config.json"
# model_type -> the module of its adapter; each offers MODEL (the family's class), config_from_hf, load_pretrained
# and save_pretrained.
FAMILIES = {"deepseek_v3": "minir1.models.hf.deepseek_v3", "llama": "minir1.models.hf.dense",
            "qwen2": "minir1.models.hf.dense", "qwen3": "minir1.models.hf.dense"}


def adapter(model_type: Any, source: str = CONFIG_FILE) -> ModuleType:
    if model_type not in FAMILIES:
        raise ConfigError(f"{source}: field 'model_type' is {model_type!r}; minir1 reads "
                          f"{', '.join(repr(k) for k in FAMILIES)} checkpoints")
    return importlib.import_module(FAMILIES[model_type])


def config_json(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a checkpoint directory needs a {CONFIG_FILE})")
    d = files.read_json(path, ConfigError)
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def read_config(directory: str | Path) -> Any:
    """The model config of a checkpoint directory, for its family."""
    d = config_json(directory)
    source = str(Path(directory) / CONFIG_FILE)
    return adapter(d.get("model_type"), source).config_from_hf(d, source=source)


def load_model(directory: str | Path, *, dtype: Any = None, device: Any = "cpu") -> Any:
    """Build the model of a Hugging Face-layout directory, every tensor checked against its config."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    d = config_json(directory)
    return adapter(d.get("model_type"), str(Path(directory) / CONFIG_FILE)).load_pretrained(
        directory, dtype=dtype, device=device)


def build_model(config: Any) -> Any:
    """A freshly initialised model of `config`'s family (on the current default device: meta for shapes)."""
    return adapter(config.model_type).MODEL(config)


def save_model(model: Any, directory: str | Path, **kwargs: Any) -> None:
    adapter(model.config.model_type).save_pretrained(model, directory, **kwargs)
