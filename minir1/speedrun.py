"""The DeepSeek-R1 recipe end to end (`minir1 speedrun`): from nothing to a reasoning model you can chat with.

    tokenizer -> pretrain (MLA + MoE + MTP) -> cold-start SFT (R1 §2.3.1) -> GRPO (§2.2, §2.3.2)
      -> rejection sampling + SFT on the verified samples (§2.3.3) -> final
    student (about 4x smaller): pretrain -> SFT on the teacher's verified traces (distillation, §2.4)
                                         -> cold-start SFT + GRPO with the teacher's budget (§4.1's comparison)

Every stage is one of minir1's own commands, run in-process with the flags a user would type; each stage
is evaluated on held-out problems as soon as it finishes. `<out>/speedrun_state.json` records finished
stages, so a run that is interrupted and started again continues from the last finished stage (and a
training stage from its last checkpoint). The report (`report.md`, `report.json`, plots) is written last.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from minir1.train.loop import TrainingError

STATE = "speedrun_state.json"
EVALUATED = ("base", "sft", "grpo", "rs_sft", "student_distill", "student_grpo")


@dataclass
class SpeedrunConfig:
    out: str = "runs/speedrun"
    task: str = "arithmetic:digits=1,mul_digits=0"   # one-digit + and −, worked by counting
    vocab_size: int = 384
    model_preset: str = "tiny"       # the teacher; the student halves every width (about 4x fewer parameters)
    hidden_size: int = 128
    batch_size: int = 8
    seq_len: int = 128
    pretrain_steps: int = 2000
    pretrain_lr: float = 3e-3
    student_pretrain_steps: int = 2000
    sft_steps: int = 60              # cold start: a short SFT that teaches the format
    grpo_steps: int = 60
    prompts_per_step: int = 16
    group_size: int = 8
    grpo_lr: float = 1e-4
    max_new_tokens: int = 64
    rs_problems: int = 400           # training problems sampled for rejection sampling ...
    rs_samples: int = 4              # ... this many times each
    rs_sft_steps: int = 60
    rs_sft_lr: float = 1e-4
    distill_problems: int = 800      # the teacher's traces for the student
    distill_steps: int = 300
    eval_n: int = 200                # held-out problems per evaluation
    eval_samples: int = 4            # pass@1 is their mean at temperature 0.6 (R1's), maj@k their vote
    save_every: int = 250
    seed: int = 0
    progress: bool = True

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SpeedrunConfig:
        """`cpu`: about 15 minutes on 2 cores. `gpu`: a larger model and longer schedule (about an hour on
        one GPU). `minimal`: seconds per stage, for tests."""
        presets: dict[str, dict[str, Any]] = {
            "cpu": {},
            "gpu": dict(model_preset="small", hidden_size=256, vocab_size=512, task="arithmetic:digits=2,mul_digits=1",
                        batch_size=32, seq_len=256, pretrain_steps=20000, pretrain_lr=1e-3,
                        student_pretrain_steps=20000, sft_steps=200, grpo_steps=300, prompts_per_step=32,
                        group_size=16, max_new_tokens=256, rs_problems=4000, rs_sft_steps=300,
                        distill_problems=8000, distill_steps=2000, eval_n=500, save_every=1000),
            "minimal": dict(pretrain_steps=20, student_pretrain_steps=10, sft_steps=4, grpo_steps=2,
                            prompts_per_step=2, group_size=4, max_new_tokens=24, rs_problems=12, rs_samples=2,
                            rs_sft_steps=2, distill_problems=12, distill_steps=2, eval_n=8, eval_samples=2,
                            save_every=0, seq_len=64, progress=False),
        }
        if name not in presets:
            raise ValueError(f"unknown speedrun preset {name!r}; choose one of {', '.join(presets)}")
        known = {f.name for f in fields(cls)}
        bad = set(overrides) - known
        if bad:
            raise ValueError(f"unknown speedrun setting(s): {', '.join(sorted(bad))}")
        return cls(**{**presets[name], **overrides})

    def validate(self) -> None:
        """Check the settings before the first stage runs, not half-way through the recipe."""
        from minir1.tasks import get_task
        from minir1.train.grpo import GRPOConfig
        get_task(self.task)
        GRPOConfig(prompts_per_step=self.prompts_per_step, group_size=self.group_size,
                   max_new_tokens=self.max_new_tokens).validate()
        counts = {k: getattr(self, k) for k in ("pretrain_steps", "student_pretrain_steps", "sft_steps", "grpo_steps",
                                                "rs_problems", "rs_samples", "rs_sft_steps", "distill_problems",
                                                "distill_steps", "eval_n", "eval_samples", "batch_size")}
        bad = [f"{k} ({v})" for k, v in counts.items() if v < 1]
        if bad:
            raise ValueError(f"speedrun settings must be >= 1: {', '.join(bad)}")

    def student_overrides(self) -> dict[str, Any]:
        """Model flags for the student: the teacher's preset at half the width."""
        from minir1.model import ModelConfig
        t = ModelConfig.from_preset(self.model_preset, hidden_size=self.hidden_size, vocab_size=self.vocab_size)
        half = {"hidden_size": t.hidden_size // 2, "num_attention_heads": max(1, t.num_attention_heads // 2),
                "intermediate_size": t.intermediate_size // 2, "moe_intermediate_size": t.moe_intermediate_size // 2,
                "kv_lora_rank": max(8, t.kv_lora_rank // 2)}
        if t.q_lora_rank:
            half["q_lora_rank"] = max(8, t.q_lora_rank // 2)
        return half


def _flags(d: dict[str, Any]) -> list[str]:
    out = []
    for k, v in d.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


class Speedrun:
    def __init__(self, cfg: SpeedrunConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / STATE
        self.state: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"stages": {}}
        self.state["config"] = asdict(cfg)

    # -- bookkeeping ----------------------------------------------------------------------------------
    def _save(self) -> None:
        tmp = self.out / (STATE + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        tmp.replace(self.out / STATE)

    def _cli(self, *argv: str) -> None:
        from minir1.cli import main
        if main(list(argv)) != 0:
            raise TrainingError(f"stage command `minir1 {' '.join(argv)}` failed (its error is above); "
                                f"start the speedrun again to continue from the last finished stage")

    def stage(self, name: str, fn: Callable[[], dict[str, Any] | None]) -> None:
        """Run a stage unless a previous run finished it; record its time and results."""
        done = self.state["stages"].get(name)
        if done and done.get("done"):
            print(f"[speedrun] {name}: done in an earlier run ({done['seconds']:.0f} s), skipped", flush=True)
            return
        print(f"[speedrun] {name} ...", flush=True)
        t = time.perf_counter()
        extra = fn() or {}
        record = {"done": True, "seconds": time.perf_counter() - t, **extra}
        self.state["stages"][name] = record
        self._save()
        summary = ""
        if "eval" in record:
            e = record["eval"]
            summary = f": pass@1 {e['pass@1']:.3f}, format {e['format_rate']:.2f}"
        print(f"[speedrun] {name} finished in {record['seconds']:.0f} s{summary}", flush=True)

    # -- pieces -------------------------------------------------------------------------------------------
    def _train_flags(self, out: str, steps: int, lr: float | None = None, batch: bool = True) -> list[str]:
        c = self.cfg
        flags = ["--out", str(self.out / out), "--steps", str(steps), "--seed", str(c.seed), "--resume",
                 "--progress" if c.progress else "--no-progress"]
        if batch:  # GRPO's batch is prompts_per_step x group_size
            flags += ["--batch-size", str(c.batch_size), "--seq-len", str(c.seq_len)]
        if c.save_every:
            flags += ["--save-every", str(c.save_every)]
        if lr is not None:
            flags += ["--lr", str(lr)]
        return flags

    def evaluate(self, ckpt: str) -> dict[str, Any]:
        from minir1.cli import load_for_inference
        from minir1.evaluate import EvalConfig, evaluate
        from minir1.tasks import get_task
        c = self.cfg
        model, tokenizer = load_for_inference(str(self.out / ckpt))
        res = evaluate(model, tokenizer, get_task(c.task), EvalConfig(
            n=c.eval_n, samples=c.eval_samples, max_new_tokens=c.max_new_tokens, seed=c.seed, at_most=True))
        return {k: v for k, v in res.items() if k != "examples"} | {"example": res["examples"][0]}

    def _sample(self, ckpt: str, out: str, n: int) -> dict[str, Any]:
        c = self.cfg
        self._cli("sample", "--ckpt", str(self.out / ckpt), "--task", c.task, "--n", str(n), "--samples",
                  str(c.rs_samples), "--max-new-tokens", str(c.max_new_tokens), "--seed", str(c.seed),
                  "--out", str(self.out / out))
        kept = sum(1 for _ in (self.out / out).open())
        return {"kept": kept, "sampled": n * c.rs_samples}

    def _sft_on_samples(self, init: str, data: str, out: str, steps: int, lr: float | None = None) -> dict[str, Any]:
        """SFT on verified samples; with none to learn from (a model too weak to solve anything), the
        stage passes its input model on unchanged and says so."""
        if (self.out / data).stat().st_size == 0:
            print(f"[speedrun] {data} holds no verified samples: {out} is {init} unchanged", flush=True)
            if (self.out / out).exists():
                shutil.rmtree(self.out / out)
            shutil.copytree(self.out / init, self.out / out, ignore=shutil.ignore_patterns("checkpoints"))
            return {"skipped": f"no verified samples in {data}", "eval": self.evaluate(out)}
        self._cli("sft", "--init", str(self.out / init), "--data", str(self.out / data),
                  *self._train_flags(out, steps, lr))
        return {"eval": self.evaluate(out)}

    def _grpo(self, init: str, out: str) -> dict[str, Any]:
        c = self.cfg
        self._cli("grpo", "--init", str(self.out / init), "--task", c.task, "--prompts-per-step",
                  str(c.prompts_per_step), "--group-size", str(c.group_size), "--max-new-tokens",
                  str(c.max_new_tokens), "--eval-every", str(max(1, c.grpo_steps // 4)), "--eval-n",
                  str(min(c.eval_n, 100)), "--eval-samples", str(c.eval_samples),
                  *self._train_flags(out, c.grpo_steps, c.grpo_lr, batch=False))
        return {"eval": self.evaluate(out)}

    def speculative(self, ckpt: str) -> dict[str, Any]:
        """MTP self-speculative decoding against plain greedy decoding on held-out prompts, batch 1."""
        from minir1.cli import load_for_inference
        from minir1.engine import Engine, SamplingParams
        from minir1.prompting import build_prompt
        from minir1.tasks import get_task
        model, tokenizer = load_for_inference(str(self.out / ckpt))
        if not model.config.num_nextn_predict_layers:
            return {"skipped": "the model has no MTP module"}
        problems = get_task(self.cfg.task).take(12, "test", self.cfg.seed)
        prompts = [build_prompt(tokenizer, p.question)[0] for p in problems]
        engine = Engine(model, tokenizer)
        rows: dict[str, list[float]] = {"plain": [], "speculative": [], "acceptance": []}
        for _ in range(2):  # the second round is the one that counts (warm caches and allocator)
            rows = {"plain": [], "speculative": [], "acceptance": []}
            for ids in prompts:
                for spec in (False, True):
                    engine.generate([ids], SamplingParams(max_new_tokens=self.cfg.max_new_tokens, temperature=0,
                                                          speculative=spec))
                    rows["speculative" if spec else "plain"].append(engine.last_stats["tokens_per_s"])
                    if spec:
                        rows["acceptance"].append(engine.last_stats["acceptance_rate"])
        med = {k: sorted(v)[len(v) // 2] for k, v in rows.items()}
        return {"acceptance_rate": med["acceptance"], "plain_tokens_per_s": med["plain"],
                "speculative_tokens_per_s": med["speculative"], "speedup": med["speculative"] / med["plain"],
                "prompts": len(prompts), "batch": 1, "temperature": 0.0}

    # -- the recipe ---------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        c = self.cfg
        t0 = time.perf_counter()
        teacher_model = ["--preset", c.model_preset, "--vocab-size", str(c.vocab_size), "--hidden-size",
                         str(c.hidden_size)]

        def tokenizer() -> dict[str, Any]:
            from minir1.tasks import get_task
            from minir1.train.pretrain import train_tokenizer
            tok = train_tokenizer(get_task(c.task), c.vocab_size, c.seed, show_progress=False)
            tok.save_pretrained(self.out / "tokenizer")
            return {"vocab_size": tok.vocab_size}

        def pretrain() -> dict[str, Any]:
            self._cli("pretrain", "--task", c.task, "--tokenizer", str(self.out / "tokenizer"), *teacher_model,
                      *self._train_flags("base", c.pretrain_steps, c.pretrain_lr))
            return {"eval": self.evaluate("base")}

        def sft() -> dict[str, Any]:
            self._cli("sft", "--init", str(self.out / "base"), "--task", c.task,
                      *self._train_flags("sft", c.sft_steps))
            return {"eval": self.evaluate("sft")}

        def rs_sft() -> dict[str, Any]:
            return self._sft_on_samples("grpo", "rs_data.jsonl", "rs_sft", c.rs_sft_steps, c.rs_sft_lr)

        def final() -> dict[str, Any]:
            if (self.out / "final").exists():
                shutil.rmtree(self.out / "final")
            shutil.copytree(self.out / "rs_sft", self.out / "final",
                            ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
            return {"from": "rs_sft"}

        student = _flags(c.student_overrides())

        def student_pretrain() -> dict[str, Any]:
            self._cli("pretrain", "--task", c.task, "--tokenizer", str(self.out / "tokenizer"), *teacher_model,
                      *student, *self._train_flags("student_base", c.student_pretrain_steps, c.pretrain_lr))
            return {}

        def student_distill() -> dict[str, Any]:
            return self._sft_on_samples("student_base", "distill_data.jsonl", "student_distill", c.distill_steps)

        def student_sft() -> dict[str, Any]:
            self._cli("sft", "--init", str(self.out / "student_base"), "--task", c.task,
                      *self._train_flags("student_sft", c.sft_steps))
            return {}

        self.stage("tokenizer", tokenizer)
        self.stage("base", pretrain)
        self.stage("sft", sft)
        self.stage("grpo", lambda: self._grpo("sft", "grpo"))
        self.stage("rejection_sampling", lambda: self._sample("grpo", "rs_data.jsonl", c.rs_problems))
        self.stage("rs_sft", rs_sft)
        self.stage("final", final)
        self.stage("distill_data", lambda: self._sample("final", "distill_data.jsonl", c.distill_problems))
        self.stage("student_base", student_pretrain)
        self.stage("student_distill", student_distill)
        self.stage("student_sft", student_sft)
        self.stage("student_grpo", lambda: self._grpo("student_sft", "student_grpo"))
        self.stage("speculative", lambda: self.speculative("final"))
        self.state["wall_seconds_this_run"] = time.perf_counter() - t0
        self._save()
        from minir1.report import write_report
        report = write_report(self.out, self.state)
        print(f"[speedrun] done: {self.out / 'report.md'}; chat with the result: "
              f"minir1 chat --ckpt {self.out / 'final'}")
        return report


def run_speedrun(cfg: SpeedrunConfig) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    return Speedrun(cfg).run()
