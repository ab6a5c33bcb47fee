"""`torchrun` on the CPU with gloo, 2 processes: the same weights as 1 process with the same global batch
(DDP and FSDP2, pretraining and SFT), GRPO across processes, and resuming a 2-process run in 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TASK = "arithmetic:digits=1,mul_digits=0"
MODEL = ["--preset", "tiny", "--hidden-size", "64", "--num-attention-heads", "2", "--intermediate-size", "128",
         "--moe-intermediate-size", "32", "--vocab-size", "384"]
COMMON = ["--batch-size", "4", "--micro-batch-size", "2", "--seq-len", "48", "--no-progress", "--seed", "3"]


def run(*args: str, procs: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if procs == 1:
        cmd = [sys.executable, "-m", "minir1", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               "-m", "minir1", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(d / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


def metrics(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    from minir1.tasks import get_task
    from minir1.train.pretrain import train_tokenizer
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(get_task(TASK), 384, show_progress=False).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tok) -> Path:
    """The reference: pretraining then SFT in one process, same global batch (2 micro-batches of 2)."""
    d = tmp_path_factory.mktemp("single")
    run("pretrain", "--task", TASK, "--tokenizer", str(tok), *MODEL, "--steps", "3", "--out", str(d / "pt"), *COMMON)
    run("sft", "--init", str(d / "pt"), "--task", TASK, "--steps", "3", "--out", str(d / "sft"), *COMMON)
    return d


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_train_the_same_weights_as_one(parallel, one_process, tok, tmp_path):
    run("pretrain", "--task", TASK, "--tokenizer", str(tok), *MODEL, "--steps", "3", "--out", str(tmp_path / "pt"),
        "--parallel", parallel, *COMMON, procs=2)
    assert_same_weights(tmp_path / "pt", one_process / "pt")
    rows, ref = metrics(tmp_path / "pt"), metrics(one_process / "pt")
    assert [r["step"] for r in rows] == [1, 2, 3], "only rank 0 writes metrics"
    assert abs(rows[-1]["loss"] - ref[-1]["loss"]) < 1e-4
    run("sft", "--init", str(tmp_path / "pt"), "--task", TASK, "--steps", "3", "--out", str(tmp_path / "sft"),
        "--parallel", parallel, *COMMON, procs=2)
    assert_same_weights(tmp_path / "sft", one_process / "sft")
    cfg = json.loads((tmp_path / "sft" / "train_config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["train"]["parallel"] == parallel


def test_sft_on_two_processes_with_other_micro_batches_equals_one_process(one_process, tmp_path):
    """SFT's loss is the step's token sum over the step's targets: 2 processes x 2 micro-batches of 1 row
    (rows with different numbers of targets) train the weights of 1 process x 2 micro-batches of 2."""
    common = [a if a != "2" or i == 0 or COMMON[i - 1] != "--micro-batch-size" else "1" for i, a in enumerate(COMMON)]
    assert common != COMMON
    run("sft", "--init", str(one_process / "pt"), "--task", TASK, "--steps", "3", "--out", str(tmp_path / "sft"),
        *common, procs=2)
    assert_same_weights(tmp_path / "sft", one_process / "sft")


def test_a_two_process_run_resumes_in_one_process(one_process, tok, tmp_path):
    # 2 processes stop after step 3 with a checkpoint at step 2; 1 process resumes and runs to step 4.
    run("pretrain", "--task", TASK, "--tokenizer", str(tok), *MODEL, "--steps", "3", "--save-every", "2",
        "--out", str(tmp_path / "run"), "--parallel", "fsdp", *COMMON, procs=2)
    assert (tmp_path / "run" / "checkpoints" / "step-00000002").is_dir()
    run("pretrain", "--task", TASK, "--tokenizer", str(tok), *MODEL, "--steps", "4", "--resume",
        "--out", str(tmp_path / "run"), *COMMON)
    run("pretrain", "--task", TASK, "--tokenizer", str(tok), *MODEL, "--steps", "4", "--out", str(tmp_path / "ref"),
        *COMMON)
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2, 3, 4]
    assert_same_weights(tmp_path / "run", tmp_path / "ref")


def test_grpo_on_two_processes(one_process, tmp_path):
    args = ["grpo", "--init", str(one_process / "sft"), "--task", TASK, "--steps", "2", "--prompts-per-step", "2",
            "--group-size", "4", "--micro-batch-size", "2", "--max-new-tokens", "12", "--no-progress",
            "--beta", "0.04", "--loss", "dapo"]
    run(*args, "--out", str(tmp_path / "two"), "--parallel", "fsdp", procs=2)
    run(*args, "--out", str(tmp_path / "one"))
    two, one = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert len(two) == 2 and set(two[0]) == set(one[0])
    # The 2-process checkpoint loads in one process and trains on.
    run(*args[:2], str(tmp_path / "two"), *args[3:], "--out", str(tmp_path / "after"))
    assert len(metrics(tmp_path / "after")) == 2


def test_a_batch_the_processes_cannot_share_is_a_clear_error(tok, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "minir1", "pretrain", "--task", TASK, "--tokenizer", str(tok), *MODEL, "--steps", "1",
                          "--batch-size", "2", "--micro-batch-size", "2", "--seq-len", "32", "--no-progress",
                          "--out", str(tmp_path / "x")], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode != 0 and "cannot be shared by 2 processes" in res.stdout + res.stderr


def test_the_default_micro_batch_under_torchrun_gives_one_process_result(tok, tmp_path):
    """No --micro-batch-size: each of 2 processes takes half of every step, and the run ends with the weights
    one process trains (issue 14: the default used to be the whole batch, which 2 processes cannot share)."""
    args = ["pretrain", "--task", TASK, "--tokenizer", str(tok), *MODEL, "--steps", "3", "--batch-size", "4",
            "--seq-len", "48", "--no-progress", "--seed", "3"]
    run(*args, "--out", str(tmp_path / "two"), procs=2)
    run(*args, "--out", str(tmp_path / "one"))
    assert_same_weights(tmp_path / "two", tmp_path / "one")
    assert json.loads((tmp_path / "two" / "train_config.json").read_text())["train"]["micro_batch_size"] == 2
