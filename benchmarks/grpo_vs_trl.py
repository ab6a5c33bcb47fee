"""GRPO step speed: minir1 against TRL's GRPOTrainer (no vLLM) on the same checkpoint and the same work.

One random tiny checkpoint — `--family deepseek_v3` (default): the training-step benchmark's DeepseekV3
shape, written by minir1 (which `transformers` loads); `--family qwen2`: a dense Qwen2 model of about the same
size (hidden 256, 4 layers, 4 heads, 2 KV heads, intermediate 768, tied), written by `transformers` — the same prompts
(arithmetic questions in the chat template, which opens `<think>`); G = 8 completions for each of
2 prompts per step, at most 64 new tokens sampled at temperature 1; the same reward (R1's format +
accuracy); the same loss (`dapo`, TRL's default), beta = 0, mu = 1, AdamW at the same learning rate, fp32.
The two take turns in every repeat; each repeat times `--steps` steps after one warm-up step, and the
median over repeats is reported: seconds per step and completion tokens per second of whole-step wall
time (generation, scoring and the update).

    pip install -e '.[bench]'      # installs TRL
    python benchmarks/grpo_vs_trl.py [--family deepseek_v3|qwen2] [--repeats 5] [--steps 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from minir1 import Transformer
from minir1.checkpoint import load_model
from minir1.models.hf.deepseek_v3 import config_from_hf
from minir1.prompting import build_prompt
from minir1.rewards import accuracy_reward, format_reward, warm_up_verifier
from minir1.tasks import get_task
from minir1.tokenizer import Tokenizer
from minir1.train import TrainConfig, train
from minir1.train.grpo import GRPOConfig, GRPOStage
from minir1.train.pretrain import train_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from train_step import hf_config  # noqa: E402  (the foundation benchmark's model)

TASK = "arithmetic:digits=2,mul_digits=0"
P, G, MAX_NEW, LR = 2, 8, 64, 1e-5


def make_checkpoint(path: Path, family: str = "deepseek_v3") -> None:
    """A random model of `family` and a tokenizer trained on the task."""
    tokenizer = train_tokenizer(get_task(TASK), vocab_size=512, show_progress=False)
    torch.manual_seed(0)
    if family == "deepseek_v3":  # the foundation benchmark's shape, written by minir1
        cfg = hf_config()
        cfg.vocab_size = tokenizer.vocab_size
        Transformer(config_from_hf(cfg.to_dict())).save_pretrained(path)
    else:  # a dense Qwen2 model of about the same size, written by transformers
        from transformers import Qwen2Config, Qwen2ForCausalLM
        Qwen2ForCausalLM(Qwen2Config(
            vocab_size=tokenizer.vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)).save_pretrained(path)
    tokenizer.save_pretrained(path)


def reward(response: str, answer: str, task) -> float:
    """Format plus format-gated accuracy, as GRPOStage.score combines them with its default weights."""
    fmt = format_reward(response)
    return (0.1 * fmt + 1.0 * accuracy_reward(response, answer, task) * (fmt == 1.0)) / 1.1


def minir1_steps(ckpt: Path, steps: int, out: Path) -> tuple[list[float], list[float]]:
    """Seconds per GRPO step and completion tokens per step, from the run's own metrics."""
    task = get_task(TASK)
    tokenizer, model = Tokenizer.from_pretrained(ckpt), load_model(ckpt)
    gcfg = GRPOConfig(prompts_per_step=P, group_size=G, max_new_tokens=MAX_NEW, loss="dapo", template="chat")
    stage = GRPOStage(task, tokenizer, gcfg, micro_batch_size=P * G)
    cfg = TrainConfig(out=str(out), steps=steps + 1, batch_size=P * G, lr=LR, warmup_steps=0, schedule="constant",
                      weight_decay=0.0, route_bias_speed=0.0, progress=False)
    train(model, tokenizer, stage, cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return [r["step_s"] for r in rows], [r["completion_tokens"] for r in rows]


def trl_steps(ckpt: Path, steps: int, out: Path, loss: str = "dapo", task_spec: str = TASK,
              problems: list | None = None) -> tuple[list[float], list[float]]:
    """TRL's seconds per step and completion tokens per step, after a warm-up step, on `problems` (default:
    64 training problems of the task) in our chat template's rendering."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    task = get_task(task_spec)
    problems = problems if problems is not None else task.take(64, "train", seed=0)
    ours = Tokenizer.from_pretrained(ckpt)
    rows = [{"prompt": ours.decode(build_prompt(ours, p.question, "chat")[0]), "answer": p.answer}
            for p in problems]

    def reward_fn(completions, answer, **_) -> list[float]:
        return [reward(c, a, task) for c, a in zip(completions, answer)]

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.tokens: list[float] = []

        def on_step_begin(self, *_, **__):
            self.t = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                self.tokens.append(logs["completions/mean_length"] * P * G)

    cfg = TRLConfig(output_dir=str(out), per_device_train_batch_size=P * G, num_generations=G,
                    max_completion_length=MAX_NEW, loss_type=loss, beta=0.0, learning_rate=LR,
                    max_steps=steps + 1, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                    bf16=False, temperature=1.0, disable_tqdm=True, seed=0)
    clock = Clock()
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(ckpt), reward_funcs=reward_fn, args=cfg,
                          train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(ckpt),
                          callbacks=[clock])
    warm_up_verifier()  # as GRPOStage does before its first step: the same reward, the same one-off import
    trainer.train()
    return clock.times[1:], clock.tokens[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per repeat (after one warm-up step)")
    ap.add_argument("--family", choices=("deepseek_v3", "qwen2"), default="deepseek_v3")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results: dict = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "prompts_per_step": P, "group_size": G, "max_new_tokens": MAX_NEW,
                     "family": args.family, "repeats": []}
    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d) / "ckpt"
        make_checkpoint(ckpt, args.family)
        results["params"] = sum(p.numel() for p in load_model(ckpt).parameters())
        for r in range(args.repeats):
            row = {}
            for name, fn in (("minir1", minir1_steps), ("trl", trl_steps)):
                secs, toks = fn(ckpt, args.steps, Path(d) / f"{name}{r}")
                row[name] = {"step_s": statistics.median(secs), "completion_tokens_per_s": sum(toks) / sum(secs)}
            row["speedup"] = row["minir1"]["completion_tokens_per_s"] / row["trl"]["completion_tokens_per_s"]
            results["repeats"].append(row)
            print(f"repeat {r + 1}: minir1 {row['minir1']['step_s']:.3f} s/step "
                  f"({row['minir1']['completion_tokens_per_s']:,.0f} completion tok/s), TRL "
                  f"{row['trl']['step_s']:.3f} s/step ({row['trl']['completion_tokens_per_s']:,.0f} tok/s), "
                  f"x{row['speedup']:.2f}", flush=True)
    med = {k: {m: statistics.median(x[k][m] for x in results["repeats"]) for m in ("step_s", "completion_tokens_per_s")}
           for k in ("minir1", "trl")}
    results["median"] = med
    results["speedup_median"] = statistics.median(x["speedup"] for x in results["repeats"])
    print(f"median: minir1 {med['minir1']['step_s']:.3f} s/step, TRL {med['trl']['step_s']:.3f} s/step; completion "
          f"tokens/s x{results['speedup_median']:.2f} (model {results['params'] / 1e6:.1f}M parameters, "
          f"{results['threads']} threads)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
