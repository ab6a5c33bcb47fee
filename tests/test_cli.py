"""The command line: help, info, and errors that speak to the user."""

from __future__ import annotations

import json
import subprocess
import sys

from minir1 import ModelConfig, Transformer
from minir1.cli import main


def test_info_preset(capsys):
    assert main(["info", "--preset", "deepseek-v3"]) == 0
    out = capsys.readouterr().out
    assert "671.03B total, 37.55B activated" in out and "70,272 bytes MLA latent" in out


def test_info_checkpoint_json(tmp_path, capsys):
    Transformer(ModelConfig.from_preset("tiny")).save_pretrained(tmp_path)
    assert main(["info", "--ckpt", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["hidden_size"] == 128 and data["parameters"]["total"] > 1e6


def test_info_bad_checkpoint_is_a_clean_error(tmp_path, capsys):
    assert main(["info", "--ckpt", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minir1 info: error:") and "config.json" in err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "minir1", "--help"], capture_output=True, text=True, check=True)
    assert "info" in out.stdout
