"""Post-training a dense (Qwen2-family) checkpoint with the same stages as DeepSeek-V3 models: SFT's loss drops,
GRPO runs and resumes after SIGKILL bitwise equal to an uninterrupted run, and a DeepSeek-V3 teacher's traces
distil into a Qwen2 student that shares its tokenizer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minir1 import ModelConfig, Transformer
from minir1.tasks import get_task
from minir1.train.pretrain import train_tokenizer

TASK = "arithmetic:digits=1,mul_digits=0"


@pytest.fixture(scope="module")
def task_tokenizer():
    return train_tokenizer(get_task(TASK), 384, 0, show_progress=False)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory, task_tokenizer) -> Path:
    """A tiny random Qwen2ForCausalLM saved by transformers, with the task's tokenizer (R1's template)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    tok = task_tokenizer
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                         bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, tie_word_embeddings=True))
    path = tmp_path_factory.mktemp("qwen2")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_sft_on_a_qwen2_model_lowers_its_loss_and_grpo_runs_on_it(qwen2_dir, tmp_path):
    from minir1.train.grpo import GRPOStageConfig, grpo
    from minir1.train.loop import TrainConfig
    from minir1.train.sft import SFTConfig, sft
    sft(SFTConfig(init=str(qwen2_dir), task=TASK, train=TrainConfig(out=str(tmp_path / "sft"), steps=30, lr=3e-3,
                                                                    warmup_steps=3, batch_size=8, seq_len=96,
                                                                    progress=False)))
    rows = metrics(tmp_path / "sft")
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert json.loads((tmp_path / "sft" / "config.json").read_text())["model_type"] == "qwen2"
    cfg = GRPOStageConfig(init=str(tmp_path / "sft"), task=TASK)
    cfg.grpo.prompts_per_step, cfg.grpo.group_size, cfg.grpo.max_new_tokens = 2, 4, 24
    cfg.train.out, cfg.train.steps, cfg.train.progress = str(tmp_path / "grpo"), 3, False
    grpo(cfg)
    rows = metrics(tmp_path / "grpo")
    assert len(rows) == 3 and all(r["completion_tokens"] > 0 for r in rows)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


@pytest.mark.parametrize("mu", [1, 2])
def test_grpo_on_a_qwen2_model_resumes_after_sigkill_bitwise_equal(qwen2_dir, tmp_path, mu):
    """μ = 2: two optimizer steps per rollout, the second with old log-probs from before the first. The kill
    comes after optimizer step 3, in the middle of the second rollout's two steps: the resumed run must
    regenerate that rollout and its old log-probs exactly."""
    save_every, kill_after = {1: (2, 4), 2: (3, 3)}[mu]
    common = ["grpo", "--init", str(qwen2_dir), "--task", TASK, "--steps", "6", "--prompts-per-step", "2",
              "--group-size", "4", "--max-new-tokens", "16", "--save-every", str(save_every), "--no-progress",
              "--lr", "1e-3", "--mu", str(mu)]
    env = {**os.environ, "MINIR1_NATIVE": "0"}
    full = subprocess.run([sys.executable, "-m", "minir1", *common, "--out", str(tmp_path / "a")],
                          capture_output=True, text=True, env=env)
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen([sys.executable, "-m", "minir1", *common, "--out", str(tmp_path / "b")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while not (tmp_path / "b" / "checkpoints" / f"step-{kill_after:08d}").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "model.safetensors").exists()
    resumed = subprocess.run([sys.executable, "-m", "minir1", *common, "--out", str(tmp_path / "b"), "--resume"],
                             capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in metrics(tmp_path / "b")] == [r["step"] for r in metrics(tmp_path / "a")] == \
        list(range(1, 6 * mu + 1))  # --steps counts rollouts; each gives mu optimizer steps


def test_a_deepseek_teacher_distils_into_a_qwen2_student(qwen2_dir, task_tokenizer, tmp_path, monkeypatch):
    """The teacher's sampling is replaced by one that keeps its worked solutions as verified traces (a random
    teacher solves nothing); what is tested is the cross-family path: DeepSeek-V3 teacher, Qwen2 student, one
    tokenizer, the student's loss going down."""
    from minir1.train import distill as distill_mod
    from minir1.train.distill import DistillConfig, distill
    from minir1.train.sample import SampleResult, write_jsonl
    teacher = tmp_path / "teacher"
    torch.manual_seed(0)
    tok = task_tokenizer
    Transformer(ModelConfig.from_preset("tiny", vocab_size=400, eos_token_id=tok.eos_id)).save_pretrained(teacher)
    tok.save_pretrained(teacher)

    def verified(cfg):
        assert Path(cfg.ckpt) == teacher
        rows = [{"messages": [{"role": "user", "content": p.question},
                              {"role": "assistant", "content": f"<think>\n{p.solution}\n</think>\n<answer>"
                                                               f"{p.answer}</answer>"}]}
                for p in get_task(TASK).take(cfg.n, "train", 0)]
        write_jsonl(rows, cfg.out)
        return SampleResult(Path(cfg.out), len(rows), cfg.n * cfg.samples)

    monkeypatch.setattr(distill_mod, "sample", verified)
    cfg = DistillConfig(teacher=str(teacher), init=str(qwen2_dir), task=TASK, problems=40, samples=1)
    cfg.train.out, cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len = str(tmp_path / "student"), 30, 8, 96
    cfg.train.lr, cfg.train.warmup_steps, cfg.train.progress = 3e-3, 3, False
    result = distill(cfg)
    rows = metrics(tmp_path / "student")
    assert sum(r["loss"] for r in rows[-5:]) < 0.6 * sum(r["loss"] for r in rows[:5])
    assert result.data.kept == 40
    assert json.loads((tmp_path / "student" / "config.json").read_text())["model_type"] == "qwen2"


def _jsonl(path: Path, answer: str, n: int = 80) -> Path:
    path.write_text("".join(json.dumps({"question": f"Simplify {k} / {2 * k}.", "answer": answer,
                                        "solution": "halve it"}) + "\n" for k in range(1, n + 1)))
    return path


def test_a_jsonl_task_checked_by_math_verify_runs_sft_eval_and_grpo_on_a_qwen2_model(qwen2_dir, tmp_path):
    """Users bring problems as {"question", "answer"} lines. SFT on a file whose answers read \\frac{1}{2}
    teaches the model to answer that; a second file writes the same answers as \\dfrac{2}{4}, which only
    math-verify knows to be equal — so held-out pass@1 and GRPO's reward there are above zero only if the
    whole path (prompt, generation, answer extraction, math-verify) works on a dense model."""
    from minir1.evaluate import EvalConfig, EvaluateConfig, evaluate_checkpoint
    from minir1.tasks.jsonl import JsonlTask
    from minir1.train.grpo import GRPOStageConfig, grpo
    from minir1.train.loop import TrainConfig
    from minir1.train.sft import SFTConfig, sft
    taught = _jsonl(tmp_path / "taught.jsonl", r"\frac{1}{2}")
    asked = _jsonl(tmp_path / "asked.jsonl", r"\dfrac{2}{4}")
    sft(SFTConfig(init=str(qwen2_dir), task=f"jsonl:{taught}",
                  train=TrainConfig(out=str(tmp_path / "sft"), steps=60, lr=3e-3, warmup_steps=3, batch_size=8,
                                    seq_len=96, progress=False)))
    n_test = len(JsonlTask(asked)._pool("test"))
    res = evaluate_checkpoint(EvaluateConfig(ckpt=str(tmp_path / "sft"), task=f"jsonl:{asked}", save=False,
                                             eval=EvalConfig(n=n_test, max_new_tokens=64)))
    assert res["problems_distinct"] == n_test > 0
    assert res["pass@1"] >= 0.5, res
    cfg = GRPOStageConfig(init=str(tmp_path / "sft"), task=f"jsonl:{asked}")
    cfg.grpo.prompts_per_step, cfg.grpo.group_size, cfg.grpo.max_new_tokens = 2, 4, 64
    cfg.grpo.temperature = 0.6
    cfg.train.out, cfg.train.steps, cfg.train.progress = str(tmp_path / "grpo"), 2, False
    grpo(cfg)
    rows = metrics(tmp_path / "grpo")
    assert len(rows) == 2 and max(r["accuracy"] for r in rows) >= 0.25, rows
