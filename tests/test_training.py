"""The shared training loop and the pretrain / SFT stages."""

from __future__ import annotations

import json
import math
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
from minir1.train import TrainConfig, TrainingError, train
from minir1.train.loop import lr_at
from minir1.train.pretrain import PretrainStage
from minir1.train.sft import IGNORE, SFTStage, encode_conversation

TASK = "arithmetic:digits=1,mul_digits=0"


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minir1", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("tok")
    tiny_tokenizer.save_pretrained(d)
    return d


def small_model(tokenizer) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, hidden_size=64,
                                               num_attention_heads=2, intermediate_size=128, moe_intermediate_size=32))


# ---- schedule ------------------------------------------------------------------------------------------------

def test_schedules():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    lrs = [lr_at(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    wsd = TrainConfig(steps=100, lr=1.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_at(50, wsd) == 1.0 and lr_at(79, wsd) == 1.0 and lr_at(99, wsd) < 0.1


def test_config_validation():
    with pytest.raises(ValueError, match="must be a multiple of micro_batch_size"):
        TrainConfig(batch_size=10, micro_batch_size=4).validate()
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear").validate()


# ---- pretraining ----------------------------------------------------------------------------------------------

def test_pretraining_loss_and_mtp_loss_drop(tiny_tokenizer, tmp_path):
    model = small_model(tiny_tokenizer)
    stage = PretrainStage(get_task(TASK), tiny_tokenizer, seq_len=64, micro_batch_size=8)
    cfg = TrainConfig(out=str(tmp_path), steps=60, batch_size=8, seq_len=64, lr=5e-3, warmup_steps=5,
                      progress=False)
    result = train(model, tiny_tokenizer, stage, cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 61))
    for key in ("step", "loss", "lr", "grad_norm", "step_time_s", "tokens_per_s", "ce_loss", "mtp_loss",
                "load_imbalance"):
        assert key in rows[0]
    first, last = rows[0], sum_last(rows, 5)
    assert last["ce_loss"] < 0.4 * first["ce_loss"] and last["mtp_loss"] < 0.5 * first["mtp_loss"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "metrics.jsonl",
                 "train_config.json"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "train_config.json").read_text())
    assert saved["train"]["steps"] == 60 and saved["stage"] == "pretrain" and saved["model"]["hidden_size"] == 64
    assert result.last_metrics["step"] == 60
    Transformer.from_pretrained(tmp_path)  # a complete checkpoint


def sum_last(rows: list[dict], n: int) -> dict:
    return {k: sum(r[k] for r in rows[-n:]) / n for k in ("ce_loss", "mtp_loss", "load_imbalance_max")}


def test_balancing_lowers_expert_load_imbalance(tiny_tokenizer, tmp_path):
    results = {}
    for gamma in (0.0, 0.02):
        model = small_model(tiny_tokenizer)
        stage = PretrainStage(get_task(TASK), tiny_tokenizer, seq_len=64, micro_batch_size=8)
        cfg = TrainConfig(out=str(tmp_path / str(gamma)), steps=60, batch_size=8, seq_len=64, lr=5e-3,
                          route_bias_speed=gamma, progress=False)
        train(model, tiny_tokenizer, stage, cfg)
        rows = [json.loads(x) for x in (tmp_path / str(gamma) / "metrics.jsonl").read_text().splitlines()]
        results[gamma] = sum_last(rows, 20)["load_imbalance_max"]
    assert results[0.02] < results[0.0], results


class NaNAtStep3(PretrainStage):
    def loss(self, model, batch):
        loss, m, n = super().loss(model, batch)
        if batch.sum() < 0 or self._step == 3:
            loss = loss * float("nan")
        return loss, m, n

    def batch(self, step, micro, n_micro):
        self._step = step + 1
        return super().batch(step, micro, n_micro)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_tokenizer, tmp_path):
    model = small_model(tiny_tokenizer)
    stage = NaNAtStep3(get_task(TASK), tiny_tokenizer, seq_len=32, micro_batch_size=2)
    cfg = TrainConfig(out=str(tmp_path), steps=10, batch_size=2, seq_len=32, save_every=2, progress=False)
    with pytest.raises(TrainingError, match=r"step 3: non-finite loss .* before the optimizer step.*"
                       r"step-00000002 \(step 2, loss \d"):
        train(model, tiny_tokenizer, stage, cfg)
    assert (tmp_path / "checkpoints" / "step-00000002" / "model.safetensors").is_file()


def test_resume_after_sigkill_is_bitwise_equal(tokenizer_dir, tmp_path):
    common = ["pretrain", "--task", TASK, "--tokenizer", str(tokenizer_dir), "--steps", "40", "--batch-size", "4",
              "--micro-batch-size", "2", "--seq-len", "48", "--hidden-size", "64", "--num-attention-heads", "2",
              "--save-every", "5", "--no-progress", "--vocab-size", "400"]
    full = run_cli(*common, "--out", str(tmp_path / "a"))
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen([sys.executable, "-m", "minir1", *common, "--out", str(tmp_path / "b")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "b" / "checkpoints" / "step-00000015").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "model.safetensors").exists()  # it really died mid-run
    resumed = run_cli(*common, "--out", str(tmp_path / "b"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))
    assert len(list((tmp_path / "b" / "checkpoints").glob("step-*"))) == 2  # keep_last


# ---- SFT ----------------------------------------------------------------------------------------------------

def sft_stage(tokenizer, **kw) -> SFTStage:
    convs = [[{"role": "user", "content": f"What is {i} + {i}?"},
              {"role": "assistant", "content": f"<think>\n{i}+{i}={2 * i}\n</think>\n<answer>{2 * i}</answer>"}]
             for i in range(10)]
    return SFTStage(tokenizer, seq_len=kw.pop("seq_len", 96), micro_batch_size=2, conversations=convs, **kw)


def test_sft_masks_everything_but_assistant_tokens(tiny_tokenizer):
    stage = sft_stage(tiny_tokenizer)
    batch = stage.batch(0, 0, 1)
    model = small_model(tiny_tokenizer)
    logits = model(batch["ids"], positions=batch["positions"], doc_ids=batch["doc_ids"])
    logits.retain_grad()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                                             ignore_index=IGNORE)
    loss.backward()
    masked = batch["labels"] == IGNORE
    assert masked.any() and (~masked).any()
    assert torch.all(logits.grad[masked] == 0)           # exactly zero, not just small
    assert torch.all(logits.grad[~masked].abs().sum(-1) > 0)
    # the targets are exactly the assistant's tokens (after the template's "<think>\n") plus EOS
    [(prompt, completion)] = encode_conversation(tiny_tokenizer, stage.conversations[0])
    assert tiny_tokenizer.decode(completion).startswith("0+0=0\n</think>")
    assert completion[-1] == tiny_tokenizer.eos_id


def test_packed_examples_do_not_see_each_other(tiny_tokenizer):
    stage = sft_stage(tiny_tokenizer, seq_len=120)
    batch = stage.batch(3, 0, 1)
    model = small_model(tiny_tokenizer).eval()
    row = 0
    docs = batch["doc_ids"][row]
    assert docs.max() >= 1, "the row should pack at least two examples"
    with torch.no_grad():
        packed = model(batch["ids"][row:row + 1], positions=batch["positions"][row:row + 1],
                       doc_ids=batch["doc_ids"][row:row + 1])
        sel = docs == 1
        alone = model(batch["ids"][row:row + 1, sel])
    torch.testing.assert_close(packed[0, sel], alone[0], atol=1e-5, rtol=0)


def cold_start_examples(tokenizer, n: int, **kw) -> list[str]:
    import random
    stage = SFTStage(tokenizer, seq_len=128, micro_batch_size=8, task=get_task("arithmetic:digits=3"), **kw)
    examples = stage._examples(random.Random(0))
    return [tokenizer.decode(prompt + completion) for prompt, completion in (next(examples) for _ in range(n))]


def test_a_cold_start_can_mix_answers_without_working(tiny_tokenizer):
    plain = cold_start_examples(tiny_tokenizer, 400)
    assert all("\n\n</think>" not in x for x in plain)
    # A fraction of 0 is the plain cold start, example for example (its draw never touches the problems' stream).
    assert cold_start_examples(tiny_tokenizer, 400, no_think_fraction=0.0) == plain
    mixed = cold_start_examples(tiny_tokenizer, 400, no_think_fraction=0.3)
    empty = [x for x in mixed if "<think>\n\n</think>\n<answer>" in x]
    assert 0.22 < len(empty) / len(mixed) < 0.38, len(empty)  # binomial(400, 0.3): sd 0.023
    from minir1.rewards import accuracy_reward, format_reward
    for x in empty:  # a valid response, whose answer is right
        question, response = x.split("?", 1)
        a, op, b = question.split()[-3:]
        response = response[response.index("<think>"):response.index("</answer>") + len("</answer>")]
        assert format_reward(response) == 1.0
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "×": int(a) * int(b)}[op]
        assert accuracy_reward(response, str(value)) == 1.0
    worked = [x for x in mixed if x not in empty]
    assert all("</think>" in x and ", so " in x for x in worked)
    assert all("<think>\n\n</think>" in x for x in cold_start_examples(tiny_tokenizer, 50, no_think_fraction=1.0))
    with pytest.raises(ValueError, match="no_think_fraction \\(1.5\\) must be between 0 and 1"):
        cold_start_examples(tiny_tokenizer, 1, no_think_fraction=1.5)
    with pytest.raises(ValueError, match="not to chat data"):
        sft_stage(tiny_tokenizer, no_think_fraction=0.5)


def init_checkpoint(tokenizer_dir: Path, tmp_path: Path):
    from minir1 import Tokenizer
    ckpt = tmp_path / "init"
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    small_model(tok).save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    return ckpt, tok


def test_sft_on_a_chat_file_through_the_cli(tokenizer_dir, tmp_path):
    ckpt, tok = init_checkpoint(tokenizer_dir, tmp_path)
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": c}) for c in sft_stage(tok).conversations) + "\n")
    res = run_cli("sft", "--init", str(ckpt), "--data", str(data), "--steps", "5", "--batch-size", "2",
                  "--seq-len", "64", "--out", str(tmp_path / "out"), "--no-progress")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "out" / "train_config.json").read_text())["stage"] == "sft"


# ---- bad input to every command ----------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["pretrain", "--task", "algebra", "--steps", "1"], "unknown task 'algebra'"),
    (["pretrain", "--steps", "1"], "pretrain needs --task"),
    (["pretrain", "--task", "arithmetic", "--num-experts-per-tok", "99"],
     "num_experts_per_tok (99) must be <= n_routed_experts (8)"),
    (["pretrain", "--task", "arithmetic", "--batch-size", "10", "--micro-batch-size", "3"],
     "batch_size (10) must be a multiple of micro_batch_size (3)"),
    (["pretrain", "--task", "jsonl:/nonexistent.jsonl"], "/nonexistent.jsonl: no such file"),
    (["sft", "--init", "/nonexistent", "--task", "arithmetic"], "/nonexistent does not exist"),
    (["sft", "--init", "/nonexistent"], "exactly one of --task NAME or --data FILE.jsonl"),
    (["sft", "--init", "/nonexistent", "--data", "x.jsonl", "--no-think-fraction", "0.5"], "not to chat data (--data)"),
    (["sft", "--init", "/nonexistent", "--task", "arithmetic", "--no-think-fraction", "-1"], "between 0 and 1"),
    (["eval", "--ckpt", "/nonexistent", "--task", "arithmetic"], "/nonexistent does not exist"),
    (["eval", "--ckpt", "/nonexistent", "--task", "arithmetic", "--n", "0"], "--n (0)"),
    (["grpo", "--init", "/nonexistent", "--task", "arithmetic", "--loss", "ppo"], "loss ('ppo') must be one of"),
    (["grpo", "--init", "/nonexistent", "--task", "arithmetic"], "/nonexistent does not exist"),
    (["sample", "--ckpt", "/nonexistent", "--task", "nope", "--out", "x.jsonl"], "unknown task 'nope'"),
])
def test_bad_input_to_commands(args, message):
    res = run_cli(*args)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_malformed_sft_data_names_file_and_line(tmp_path, tokenizer_dir):
    ckpt, tok = init_checkpoint(tokenizer_dir, tmp_path)
    data = tmp_path / "chat.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n'
                    '{"messages": [{"role": "wizard", "content": "hi"}]}\n')
    res = run_cli("sft", "--init", str(ckpt), "--data", str(data), "--steps", "1")
    assert res.returncode == 1 and "chat.jsonl:2: messages[0] needs a role" in res.stderr
    assert "Traceback" not in res.stderr


# ---- end to end: pretrain, then a short SFT, then held-out accuracy -----------------------------------------

def test_pretrain_sft_grpo_and_rejection_sampling_end_to_end(tmp_path, capsys):
    """The tiny preset on one-digit +/−: a few hundred CPU steps of pretraining drop the loss and the MTP
    loss far below their start; a short cold-start SFT then writes the format and solves some held-out
    problems — none of which, nor their commuted twins, it trained on (measured 2 of 24 greedy; before the
    split was decided on the canonical form, twins in training made it look like 0.1-0.3)."""
    from minir1.cli import main
    task = "arithmetic:digits=1,mul_digits=0"
    common = ["--batch-size", "8", "--seq-len", "128", "--no-progress"]
    assert main(["pretrain", "--preset", "tiny", "--task", task, "--steps", "450", "--lr", "3e-3",
                 "--vocab-size", "384", "--out", str(tmp_path / "pt"), *common]) == 0
    rows = [json.loads(x) for x in (tmp_path / "pt" / "metrics.jsonl").read_text().splitlines()]
    assert sum_last(rows, 20)["ce_loss"] < 0.1 * rows[0]["ce_loss"]
    assert sum_last(rows, 20)["mtp_loss"] < 0.2 * rows[0]["mtp_loss"]
    assert main(["sft", "--init", str(tmp_path / "pt"), "--task", task, "--steps", "60",
                 "--out", str(tmp_path / "sft"), *common]) == 0
    # The held-out split of one-digit + and − has 24 distinct problems (commuted twins count once, and none
    # is in training): asking for more is a clear error.
    assert main(["eval", "--ckpt", str(tmp_path / "sft"), "--task", task, "--n", "60", "--max-new-tokens", "8"]) == 1
    assert main(["eval", "--ckpt", str(tmp_path / "sft"), "--task", task, "--n", "24", "--max-new-tokens", "64",
                 "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["problems"] == result["problems_distinct"] == 24 and result["format_rate"] > 0.3
    assert result["pass@1"] >= 2 / 24 and result["format_rate"] > 0.9, result
    # GRPO's fast smoke (the slow test in test_grpo.py shows held-out accuracy rising): 30 steps raise the
    # held-out format rate, and every per-step metric the issue lists is written. The format rate is that of
    # 4 samples per problem at temperature 0.6 (240 completions): greedy decoding can start near its ceiling,
    # and a dozen steps were not enough from every SFT start (+0.33 and +0.45 from two starts in 30 steps).
    assert main(["grpo", "--init", str(tmp_path / "sft"), "--task", task, "--steps", "31", "--prompts-per-step", "8",
                 "--group-size", "8", "--max-new-tokens", "64", "--lr", "2e-4", "--eval-every", "30", "--eval-n", "60",
                 "--eval-samples", "4", "--out", str(tmp_path / "grpo"), "--no-progress"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_pass@1" in r]
    assert [r["step"] for r in evals] == [1, 31]
    # The held-out set is the split's 24 distinct problems x 4 samples: measured +0.125 from one start (Intel
    # Xeon), 0.927 -> 0.990 from another (AMD EPYC, whose rounding sends SFT elsewhere): so either 10 points
    # more, or at least half of what was missing.
    before, after = evals[0]["eval_format_rate"], evals[1]["eval_format_rate"]
    assert after >= before + 0.1 or 1 - after <= 0.5 * (1 - before), evals
    for key in ("reward_mean", "reward_std", "reward_format", "reward_accuracy", "accuracy", "format_rate",
                "zero_std_groups", "completion_len_mean", "completion_len_max", "truncated_frac", "entropy", "kl",
                "clip_low", "clip_high", "grad_norm", "generate_s", "score_s", "train_s", "step_s",
                "completion_tokens_per_s"):
        assert all(key in r for r in rows), key
    # Rejection sampling from that model gives SFT data that `minir1 sft --data` trains on as it is.
    assert main(["sample", "--ckpt", str(tmp_path / "sft"), "--task", task, "--n", "40", "--samples", "4",
                 "--max-new-tokens", "64", "--out", str(tmp_path / "samples.jsonl")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert rows and all(r["messages"][1]["content"].startswith("<think>") for r in rows)
    assert main(["sft", "--init", str(tmp_path / "sft"), "--data", str(tmp_path / "samples.jsonl"), "--steps", "3",
                 "--out", str(tmp_path / "rs_sft"), *common]) == 0


def test_bf16_autocast_keeps_fp32_master_weights(tiny_tokenizer, tmp_path):
    model = small_model(tiny_tokenizer)
    stage = PretrainStage(get_task(TASK), tiny_tokenizer, seq_len=32, micro_batch_size=2)
    cfg = TrainConfig(out=str(tmp_path), steps=3, batch_size=2, seq_len=32, dtype="bf16", progress=False)
    result = train(model, tiny_tokenizer, stage, cfg)
    assert math.isfinite(result.last_metrics["loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())
