"""The DeepSeek-R1 recipe end to end (`minir1 speedrun`): from nothing to a reasoning model you can chat with.

    tokenizer -> pretrain (MLA + MoE + MTP) -> cold-start SFT (R1 §2.3.1) -> GRPO (§2.2, §2.3.2)
      -> rejection sampling + SFT on the verified samples (§2.3.3) -> final
    student (a dense Qwen2 model, about 7x smaller): pretrain -> SFT on the teacher's verified traces
                                         (distillation, §2.4: R1's students are dense Qwen2/Llama models)
                   against the same student's GRPO from its base with the teacher's RL budget (RL alone:
                   §4.1's comparison), and its cold-start SFT + GRPO (a stronger baseline, reported too)

Every stage is one of minir1's stage functions (the ones the CLI's commands call), given its typed config;
each stage is evaluated on held-out problems as soon as it finishes. `<out>/speedrun_state.json` records finished
stages, so a run that is interrupted and started again continues from the last finished stage (and a
training stage from its last checkpoint). The report (`report.md`, `report.json`, plots) is written last.

On a CPU the stages run in two lanes at once, one process each: the teacher's chain (base -> sft -> grpo ->
rs_sft -> distillation), and beside it the student's own chain (student_base -> student_zero, student_sft ->
student_grpo) and R1-Zero (which needs only the base). These models are small enough that a training step
barely uses a second core (a teacher pretraining step took 0.13 s on 2 threads, 0.16 s on 1), so each lane
gets half the cores, and all of them while the other waits or is done. `--no-parallel` runs them one after
the other.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import multiprocessing
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from minir1 import files
from minir1.devices import apply_thread_budget, set_thread_budget
from minir1.errors import TrainingError
from minir1.evaluate import EvalConfig, EvaluateConfig, evaluate_checkpoint
from minir1.files import DiskFullError
from minir1.train.distill import DistillConfig
from minir1.train.grpo import GRPOConfig, GRPOStageConfig, grpo
from minir1.train.loop import TrainConfig
from minir1.train.pretrain import PretrainConfig, pretrain
from minir1.train.sample import SampleConfig, sample
from minir1.train.sft import SFTConfig, sft

STATE = "speedrun_state.json"
SIDE_LOG = "side_lane.log"  # what the second lane's process prints
HELDOUT = "heldout.jsonl"  # the exact held-out problems every stage was evaluated on


@dataclass
class SpeedrunConfig:
    out: str = "runs/speedrun"
    task: str = "arithmetic:digits=4,min_digits=2,mul_digits=1"  # 2-4 digit + and −, × by one digit: 150M problems
    vocab_size: int = 384
    model_preset: str = "tiny"       # the teacher; the student halves every width (about 7x fewer parameters)
    student_family: str = "qwen2"    # dense, as R1's distilled students; or deepseek_v3, or llama / qwen3
    r1_zero: bool = True             # also run R1-Zero: GRPO from the base model, no cold start (R1 §2.2)
    hidden_size: int = 128
    num_hidden_layers: int = 4       # the teacher's depth and rotary width (the tiny preset has 3 layers and 8):
    qk_rope_head_dim: int = 16       # finding a digit by its place needs both (docs/training.md, the speedrun)
    qk_nope_head_dim: int = 8
    batch_size: int = 8
    seq_len: int = 128
    pretrain_steps: int = 3000       # 2,000 sat at the edge of the digit lookup's emergence (docs/training.md)
    pretrain_lr: float = 3e-3
    student_pretrain_steps: int = 3000  # in the second lane, beside the teacher's pretraining: free on 2+ cores
    sft_steps: int = 300             # cold start: a short SFT that teaches the format
    # ... on worked solutions mixed with answers without working (an empty <think></think>, as R1 §2.3.3's simple
    # queries): a policy that can answer either way, for GRPO to choose by reward alone (docs/training.md)
    cold_start_no_think: float = 0.3
    worked_reference: bool = True    # and, as a reference, the same cold start on worked solutions only (sft_worked)
    grpo_steps: int = 60
    prompts_per_step: int = 8
    group_size: int = 8
    grpo_lr: float = 1e-4
    max_new_tokens: int = 128
    rs_problems: int = 400           # training problems sampled for rejection sampling ...
    rs_samples: int = 4              # ... this many times each
    rs_sft_steps: int = 60
    rs_sft_lr: float = 1e-4
    distill_problems: int = 2000     # training problems the teacher solves (rs_samples times each) for the student
    distill_steps: int = 300
    eval_n: int = 500                # distinct held-out problems per evaluation
    eval_samples: int = 2            # pass@1 is their mean at temperature 0.6 (R1's), maj@k their vote
    save_every: int = 250
    seed: int = 0
    progress: bool = True
    parallel: bool = True            # on a CPU with 2+ cores, the student's chain and R1-Zero run in a second process

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SpeedrunConfig:
        """`cpu`: about 15 minutes on 2 cores. `gpu`: a larger model and longer schedule (about an hour on
        one GPU). `minimal`: seconds per stage, for tests."""
        presets: dict[str, dict[str, Any]] = {
            "cpu": {},
            "gpu": dict(model_preset="small", hidden_size=256, num_hidden_layers=6, qk_rope_head_dim=16,
                        qk_nope_head_dim=32, vocab_size=512,
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
        from minir1.models.dense import FAMILIES
        from minir1.tasks import get_task
        get_task(self.task)
        if self.student_family not in ("deepseek_v3", *FAMILIES):
            raise ValueError(f"student_family {self.student_family!r}: choose deepseek_v3 or one of "
                             f"{', '.join(FAMILIES)}")
        from minir1.models.deepseek_v3 import ModelConfig
        ModelConfig.from_preset(self.model_preset, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                                num_hidden_layers=self.num_hidden_layers, qk_rope_head_dim=self.qk_rope_head_dim,
                                qk_nope_head_dim=self.qk_nope_head_dim)  # the teacher's: a bad width fails here
        GRPOConfig(prompts_per_step=self.prompts_per_step, group_size=self.group_size,
                   max_new_tokens=self.max_new_tokens).validate()
        counts = {k: getattr(self, k) for k in ("pretrain_steps", "student_pretrain_steps", "sft_steps", "grpo_steps",
                                                "rs_problems", "rs_samples", "rs_sft_steps", "distill_problems",
                                                "distill_steps", "eval_n", "eval_samples", "batch_size")}
        bad = [f"{k} ({v})" for k, v in counts.items() if v < 1]
        if bad:
            raise ValueError(f"speedrun settings must be >= 1: {', '.join(bad)}")
        if not 0.0 <= self.cold_start_no_think <= 1.0:
            raise ValueError(f"cold_start_no_think ({self.cold_start_no_think}) must be between 0 and 1")

    def student_overrides(self) -> dict[str, Any]:
        """The student's model settings: the teacher's preset at half the width."""
        from minir1.models.deepseek_v3 import ModelConfig
        t = ModelConfig.from_preset(self.model_preset, hidden_size=self.hidden_size, vocab_size=self.vocab_size)
        if self.student_family != "deepseek_v3":  # dense: only the widths a dense model has
            return {"hidden_size": t.hidden_size // 2, "num_attention_heads": max(1, t.num_attention_heads // 2),
                    "intermediate_size": t.intermediate_size // 2}
        half = {"hidden_size": t.hidden_size // 2, "num_attention_heads": max(1, t.num_attention_heads // 2),
                "intermediate_size": t.intermediate_size // 2, "moe_intermediate_size": t.moe_intermediate_size // 2,
                "kv_lora_rank": max(8, t.kv_lora_rank // 2)}
        if t.q_lora_rank:
            half["q_lora_rank"] = max(8, t.q_lora_rank // 2)
        return half


class Recipe:
    """What each stage of the speedrun runs: the stage functions' configs, built from a SpeedrunConfig. A
    setting added to a stage's config reaches `minir1 <stage>` as a flag and the speedrun as its default."""

    def __init__(self, cfg: SpeedrunConfig) -> None:
        self.cfg, self.out = cfg, Path(cfg.out)

    def path(self, name: str) -> str:
        return str(self.out / name)

    def train(self, base: TrainConfig, out: str, steps: int, lr: float | None = None,
              batch: bool = True) -> TrainConfig:
        """A stage's TrainConfig: its defaults, with the recipe's output, length, seed and batch."""
        c = self.cfg
        changes: dict[str, Any] = dict(out=self.path(out), steps=steps, seed=c.seed, resume=True, progress=c.progress)
        if batch:  # GRPO's batch is prompts_per_step x group_size
            changes.update(batch_size=c.batch_size, seq_len=c.seq_len)
        if c.save_every:
            changes["save_every"] = c.save_every
        if lr is not None:
            changes["lr"] = lr
        return replace(base, **changes)

    def pretrain(self, out: str, student: bool = False) -> PretrainConfig:
        c = self.cfg
        model = {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size, **(c.student_overrides() if student else {
            "num_hidden_layers": c.num_hidden_layers, "qk_rope_head_dim": c.qk_rope_head_dim,
            "qk_nope_head_dim": c.qk_nope_head_dim})}
        base = PretrainConfig(task=c.task, preset=c.model_preset, model=model, tokenizer=self.path("tokenizer"),
                              family=c.student_family if student else "deepseek_v3")
        steps = c.student_pretrain_steps if student else c.pretrain_steps
        return replace(base, train=self.train(base.train, out, steps, c.pretrain_lr))

    def cold_start(self, init: str, out: str, no_think: float | None = None) -> SFTConfig:
        no_think = self.cfg.cold_start_no_think if no_think is None else no_think
        base = SFTConfig(init=self.path(init), task=self.cfg.task, no_think_fraction=no_think)
        return replace(base, train=self.train(base.train, out, self.cfg.sft_steps))

    def grpo(self, init: str, out: str, template: str = "chat") -> GRPOStageConfig:
        c = self.cfg
        base = GRPOStageConfig(init=self.path(init), task=c.task)
        return replace(base, grpo=replace(base.grpo, prompts_per_step=c.prompts_per_step, group_size=c.group_size,
                                          max_new_tokens=c.max_new_tokens, eval_every=max(1, c.grpo_steps // 4),
                                          eval_n=min(c.eval_n, 100), eval_samples=c.eval_samples,
                                          template=template),
                       train=self.train(base.train, out, c.grpo_steps, c.grpo_lr, batch=False))

    def student_zero(self) -> GRPOStageConfig:
        """R1 §4.1's RL-only student (their DeepSeek-R1-Zero-Qwen-32B): GRPO straight from the student's base on
        R1-Zero's template, with the teacher's RL budget; what distillation is measured against."""
        return self.grpo("student_base", "student_zero", template="r1-zero")

    def r1_zero(self) -> GRPOStageConfig:
        """R1 §2.2: GRPO straight from the pretrained base, no cold start, on R1-Zero's plain-text template
        (which asks for the <think>/<answer> format in words); the cold-start run's budget."""
        return self.grpo("base", "r1_zero", template="r1-zero")

    def rejection_sampling(self) -> SampleConfig:
        c = self.cfg
        return SampleConfig(ckpt=self.path("grpo"), task=c.task, out=self.path("rs_data.jsonl"), n=c.rs_problems,
                            samples=c.rs_samples, max_new_tokens=c.max_new_tokens, seed=c.seed)

    def rs_sft(self) -> SFTConfig:
        base = SFTConfig(init=self.path("grpo"), data=self.rejection_sampling().out)
        return replace(base, train=self.train(base.train, "rs_sft", self.cfg.rs_sft_steps, self.cfg.rs_sft_lr))

    def distill(self) -> DistillConfig:
        """R1 §2.4: the final teacher's verified traces, then the student's SFT on them."""
        c = self.cfg
        base = DistillConfig(teacher=self.path("final"), init=self.path("student_base"), task=c.task,
                             data=self.path("distill_data.jsonl"), problems=c.distill_problems, samples=c.rs_samples,
                             max_new_tokens=c.max_new_tokens)
        return replace(base, train=self.train(base.train, "student_distill", c.distill_steps))

    def evaluation(self, ckpt: str, template: str = "chat") -> EvaluateConfig:
        c = self.cfg
        return EvaluateConfig(ckpt=self.path(ckpt), task=c.task, save=False, eval=EvalConfig(
            n=c.eval_n, samples=c.eval_samples, max_new_tokens=c.max_new_tokens, seed=c.seed, at_most=True,
            template=template))


class Speedrun:
    """Runs the recipe's stages in order, each once: finished stages are recorded in speedrun_state.json."""

    def __init__(self, cfg: SpeedrunConfig) -> None:
        cfg.validate()
        self.cfg, self.recipe = cfg, Recipe(cfg)
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.state: dict[str, Any] = self._read()
        self.state["config"] = asdict(cfg)

    # -- bookkeeping (two lanes share one state file: every write is a locked read-modify-write) ------------
    def _read(self) -> dict[str, Any]:
        path = self.out / STATE
        return json.loads(path.read_text()) if path.is_file() else {"stages": {}}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The state as on disk, to change and write back while holding the run's lock."""
        with open(self.out / (STATE + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self._read()
            state["config"] = self.state["config"]
            yield state
            files.write_json(self.out / STATE, state)
            self.state = state

    def _save(self) -> None:
        with self._locked() as state:
            state.update({k: v for k, v in self.state.items() if k != "stages"})

    def done(self, name: str) -> bool:
        self.state["stages"] = self._read().get("stages", {})
        return bool(self.state["stages"].get(name, {}).get("done"))

    def stage(self, name: str, fn: Callable[[], dict[str, Any] | None]) -> None:
        """Run a stage unless a previous run finished it; record its time and results."""
        if self.done(name):
            print(f"[speedrun] {name}: done in an earlier run ({self.state['stages'][name]['seconds']:.0f} s), "
                  "skipped", flush=True)
            return
        print(f"[speedrun] {name} ...", flush=True)
        apply_thread_budget()
        t = time.perf_counter()
        try:
            extra = fn() or {}
        except (ValueError, TrainingError, DiskFullError) as e:
            raise TrainingError(f"stage {name}: {e} (start the speedrun again to continue from the last finished "
                                "stage)") from e
        record = {"done": True, "seconds": time.perf_counter() - t, **extra}
        with self._locked() as state:
            state["stages"][name] = record
        summary = ""
        if "eval" in record:
            e = record["eval"]
            summary = f": pass@1 {e['pass@1']:.3f}, format {e['format_rate']:.2f}"
        print(f"[speedrun] {name} finished in {record['seconds']:.0f} s{summary}", flush=True)

    def wait_for(self, name: str, me: str, other_stopped: Callable[[], str | None]) -> None:
        """Block until the other lane has finished stage `name`, marking lane `me` as waiting meanwhile (so the
        other may take every core); `other_stopped()` says why the other lane can no longer finish it (None
        while it can), and then this raises instead of waiting forever."""
        if self.done(name):
            return
        self.lane_status(me, "waiting")
        while not self.done(name):
            why = other_stopped()
            if why is not None and not self.done(name):
                raise TrainingError(f"stage {name}: {why}. Start the speedrun again to continue from the last "
                                    "finished stage")
            time.sleep(0.5)
        self.lane_status(me, "running")

    def side_lane_stopped(self, lane: multiprocessing.process.BaseProcess | None) -> Callable[[], str | None]:
        """For the teacher's wait_for: why the second lane's process can no longer finish a stage, or None."""
        def why() -> str | None:
            if lane is None or lane.is_alive():
                return None
            return (f"the second lane stopped (exit code {lane.exitcode}) before finishing it; its output is in "
                    f"{self.out / SIDE_LOG}")
        return why

    def lane_status(self, lane: str, status: str) -> None:
        """running | waiting | done, in the state file: a lane that is not running leaves its cores to the other."""
        with self._locked() as state:
            state.setdefault("lanes", {})[lane] = status

    def share_cores(self, me: str, other: str, other_alive: Callable[[], bool]) -> None:
        """This process's thread budget while the lanes run: half the cores, or all of them while the other
        lane waits or is done (read from the state file at most every second)."""
        total = max(2, os.cpu_count() or 2)
        half = total // 2 if me == "teacher" else total - total // 2
        seen = {"at": 0.0, "free": False}

        def budget() -> int:
            now = time.monotonic()
            if now - seen["at"] > 1.0:
                status = self._read().get("lanes", {}).get(other)
                seen.update(at=now, free=status in ("waiting", "done") or not other_alive())
            return total if seen["free"] else half
        set_thread_budget(budget)

    # -- pieces -------------------------------------------------------------------------------------------
    def evaluate(self, ckpt: str, template: str = "chat") -> dict[str, Any]:
        """Held-out evaluation; every stage is evaluated on the same problems, written to heldout.jsonl."""
        res = evaluate_checkpoint(self.recipe.evaluation(ckpt, template))
        heldout = "".join(json.dumps({"question": x["question"], "answer": x["answer"]}, ensure_ascii=False) + "\n"
                          for x in res["per_problem"])
        path = self.out / HELDOUT
        with self._locked():  # both lanes evaluate; the file is written whole, under the lock
            if path.is_file() and path.read_text() != heldout:
                raise TrainingError(f"{path}: stage {ckpt} was evaluated on other problems than the earlier stages")
            files.write_text(path, heldout)
        return {k: v for k, v in res.items() if k != "examples"} | {"example": res["examples"][0]}

    def trained(self, fn: Callable[[Any], Any], cfg: Any, evaluate: bool = True) -> dict[str, Any]:
        fn(cfg)
        template = cfg.grpo.template if hasattr(cfg, "grpo") else "chat"
        return {"eval": self.evaluate(Path(cfg.train.out).name, template)} if evaluate else {}

    def sampled(self, cfg: SampleConfig) -> dict[str, Any]:
        r = sample(cfg)
        return {"kept": r.kept, "sampled": r.sampled}

    def sft_on_samples(self, cfg: SFTConfig) -> dict[str, Any]:
        """SFT on verified samples; with none to learn from (a model too weak to solve anything), the
        stage passes its input model on unchanged and says so."""
        data, init, out = Path(cfg.data), Path(cfg.init), Path(cfg.train.out)
        if data.stat().st_size == 0:
            print(f"[speedrun] {data.name} holds no verified samples: {out.name} is {init.name} unchanged", flush=True)
            if out.exists():
                shutil.rmtree(out)
            shutil.copytree(init, out, ignore=shutil.ignore_patterns("checkpoints"))
            return {"skipped": f"no verified samples in {data.name}", "eval": self.evaluate(out.name)}
        return self.trained(sft, cfg)

    def tokenizer(self) -> dict[str, Any]:
        from minir1.tasks import get_task
        from minir1.train.pretrain import train_tokenizer
        c = self.cfg
        tok = train_tokenizer(get_task(c.task), c.vocab_size, c.seed, show_progress=False)
        tok.save_pretrained(self.out / "tokenizer")
        return {"vocab_size": tok.vocab_size}

    def final(self) -> dict[str, Any]:
        if (self.out / "final").exists():
            shutil.rmtree(self.out / "final")
        shutil.copytree(self.out / "rs_sft", self.out / "final", ignore=shutil.ignore_patterns("checkpoints",
                                                                                             "tensorboard"))
        return {"from": "rs_sft"}

    def speculative(self, ckpt: str) -> dict[str, Any]:
        from minir1.checkpoint import load
        from minir1.prompting import build_prompt
        from minir1.tasks import get_task
        model, tokenizer = load(self.out / ckpt)
        if not model.num_mtp_modules:
            return {"skipped": "the model has no MTP module"}
        problems = get_task(self.cfg.task).take(12, "test", self.cfg.seed)
        prompts = [build_prompt(tokenizer, p.question)[0] for p in problems]
        return speculative_speed(model, tokenizer, prompts, self.cfg.max_new_tokens)

    # -- the recipe ---------------------------------------------------------------------------------------
    def teacher_lane(self, side: Callable[[], None] | None,
                     lane: multiprocessing.process.BaseProcess | None) -> None:
        """base -> sft -> grpo -> rejection sampling -> rs_sft (final) -> distillation into the student. `side`:
        the other lane, run in here before the student needs its base (when the lanes are not parallel)."""
        r = self.recipe
        self.stage("base", lambda: self.trained(pretrain, r.pretrain("base")))
        self.stage("sft", lambda: self.trained(sft, r.cold_start("base", "sft")))
        self.stage("grpo", lambda: self.trained(grpo, r.grpo("sft", "grpo")))
        self.stage("rejection_sampling", lambda: self.sampled(r.rejection_sampling()))
        self.stage("rs_sft", lambda: self.sft_on_samples(r.rs_sft()))
        self.stage("final", self.final)
        # Distillation's two halves are two resumable stages, with the student's pretraining (the other lane's)
        # between them.
        self.stage("distill_data", lambda: self.sampled(r.distill().sample_config()))
        if side is not None:
            side()
        self.wait_for("student_base", "teacher", self.side_lane_stopped(lane))
        self.stage("student_distill", lambda: self.sft_on_samples(r.distill().sft_config()))

    def side_lane(self, parent: int | None = None) -> None:
        """The student's own chain: its base, GRPO from it alone (student_zero, R1 §4.1's RL-only student) and the
        stronger baseline of the teacher's cold start + GRPO (student_sft -> student_grpo); then, once the teacher's
        base exists, the worked-solutions-only cold start (sft_worked) and R1-Zero from it (R1 §2.2). `parent`: the
        teacher lane's process id, when this runs beside it (if that process dies, this one stops instead of waiting
        for its base forever)."""
        r = self.recipe
        self.stage("student_base", lambda: self.trained(pretrain, r.pretrain("student_base", student=True), False))
        self.stage("student_zero", lambda: self.trained(grpo, r.student_zero()))
        self.stage("student_sft", lambda: self.trained(sft, r.cold_start("student_base", "student_sft"), False))
        self.stage("student_grpo", lambda: self.trained(grpo, r.grpo("student_sft", "student_grpo")))
        if self.cfg.r1_zero or self.worked_reference():
            self.wait_for("base", "side", lambda: None if parent is None or os.getppid() == parent else
                          "the teacher's lane stopped before its base model was trained")
        if self.worked_reference():
            self.stage("sft_worked", lambda: self.trained(sft, r.cold_start("base", "sft_worked", no_think=0.0)))
        if self.cfg.r1_zero:
            self.stage("r1_zero", lambda: self.trained(grpo, r.r1_zero()))
        self.lane_status("side", "done")

    def worked_reference(self) -> bool:
        """The cold start on worked solutions only, beside the mixed one: what GRPO's lift is measured against
        besides its own starting point (a different model only when the cold start mixes)."""
        return self.cfg.worked_reference and self.cfg.cold_start_no_think > 0

    def parallel(self) -> bool:
        side = (["student_base", "student_zero", "student_sft", "student_grpo"] + ["r1_zero"] * self.cfg.r1_zero
                + ["sft_worked"] * self.worked_reference())
        return (self.cfg.parallel and not torch.cuda.is_available() and (os.cpu_count() or 1) >= 2
                and not all(self.done(name) for name in side))

    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.stage("tokenizer", self.tokenizer)
        if self.parallel():
            threads = torch.get_num_threads()
            ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked OpenMP or autograd state
            lane = ctx.Process(target=_side_lane_main, args=(asdict(self.cfg), os.getpid()),
                               name="minir1-speedrun-side-lane")
            print(f"[speedrun] the student's chain and R1-Zero run beside this one, in a second process (each "
                  f"lane with half the cores, all of them while the other waits; the second lane's output: "
                  f"{self.out / SIDE_LOG})", flush=True)
            for name in ("teacher", "side"):
                self.lane_status(name, "running")
            lane.start()
            try:
                self.share_cores("teacher", "side", lane.is_alive)
                self.teacher_lane(None, lane)
                self.lane_status("teacher", "done")
                lane.join()
            finally:
                if lane.is_alive():
                    lane.terminate()
                    lane.join()
                set_thread_budget(None)
                torch.set_num_threads(threads)
                log = self.out / SIDE_LOG
                if log.is_file():
                    print("".join(f"[side lane] {line}" for line in log.read_text().splitlines(keepends=True)),
                          end="", flush=True)
            if lane.exitcode != 0:
                raise TrainingError(f"the second lane failed (exit code {lane.exitcode}); its output is above and "
                                    f"in {self.out / SIDE_LOG}. Start the speedrun again to continue from the last "
                                    "finished stage")
        else:
            self.teacher_lane(self.side_lane, None)
        self.stage("speculative", lambda: self.speculative("final"))
        self.state["wall_seconds_this_run"] = time.perf_counter() - t0
        self.state["wall_seconds"] = self.state.get("wall_seconds", 0.0) + self.state["wall_seconds_this_run"]
        self._save()
        from minir1.report import write_report
        report = write_report(self.out, self.state)
        print(f"[speedrun] done: {self.out / 'report.md'}; chat with the result: "
              f"minir1 chat --ckpt {self.out / 'final'}")
        return report


def _side_lane_main(cfg: dict[str, Any], parent: int) -> None:
    """The second lane's process: its output goes to <out>/side_lane.log (the teacher's lane prints it when
    both are done), and any failure to that log and the exit code."""
    out = Path(cfg["out"])
    with open(out / SIDE_LOG, "w", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        try:
            torch.manual_seed(cfg["seed"])
            run = Speedrun(SpeedrunConfig(**{**cfg, "progress": False}))  # one progress bar: the teacher's
            run.state["config"] = cfg
            run.share_cores("side", "teacher", lambda: os.getppid() == parent)
            run.side_lane(parent)
        except BaseException:
            traceback.print_exc()
            log.flush()
            os._exit(1)


def speculative_speed(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int) -> dict[str, Any]:
    """MTP self-speculative decoding against plain greedy decoding on the prompts, batch 1 (medians)."""
    from minir1.engine import Engine, SamplingParams
    engine = Engine(model, tokenizer)
    rows: dict[str, list[float]] = {"plain": [], "speculative": [], "acceptance": []}
    for _ in range(2):  # the second round is the one that counts (warm caches and allocator)
        rows = {"plain": [], "speculative": [], "acceptance": []}
        for ids in prompts:
            for spec in (False, True):
                engine.generate([ids], SamplingParams(max_new_tokens=max_new_tokens, temperature=0, speculative=spec))
                rows["speculative" if spec else "plain"].append(engine.last_stats["tokens_per_s"])
                if spec:
                    rows["acceptance"].append(engine.last_stats["acceptance_rate"])
    med = {k: sorted(v)[len(v) // 2] for k, v in rows.items()}
    return {"acceptance_rate": med["acceptance"], "plain_tokens_per_s": med["plain"],
            "speculative_tokens_per_s": med["speculative"], "speedup": med["speculative"] / med["plain"],
            "prompts": len(prompts), "batch": 1, "temperature": 0.0}


def run_speedrun(cfg: SpeedrunConfig) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    return Speedrun(cfg).run()
