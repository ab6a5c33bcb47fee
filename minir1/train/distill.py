"""Distillation (R1 §2.4): a teacher's verified reasoning traces on a task's training problems become SFT data
for a (smaller) student. Two stages in a row: rejection sampling on the teacher (train/sample.py), then SFT
of the student on what it kept (train/sft.py); the speedrun runs the two halves as separate, resumable steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from minir1.train.loop import TrainConfig, TrainResult
from minir1.train.sample import SampleConfig, SampleResult, sample
from minir1.train.sft import SFTConfig, sft


def _distill_train() -> TrainConfig:
    return TrainConfig(out="runs/distill", lr=1e-3, warmup_steps=10)


@dataclass
class DistillConfig:
    teacher: str = field(metadata={"help": "the teacher's checkpoint directory"})
    init: str = field(metadata={"help": "the student's checkpoint to start from (e.g. a smaller pretrained model)"})
    task: str = field(metadata={"help": "arithmetic[:digits=N,operands=N], countdown, or jsonl:PATH"})
    data: str | None = field(default=None, metadata={"help": "where the teacher's verified traces go (default: "
                                                             "<out>/distill_data.jsonl)"})
    problems: int = field(default=800, metadata={"help": "training problems the teacher solves"})
    samples: int = field(default=4, metadata={"help": "the teacher's completions per problem"})
    max_new_tokens: int = 256
    temperature: float = field(default=0.7, metadata={"help": "the teacher's sampling temperature"})
    template: str = "chat"
    teacher_device: str | None = field(default=None, metadata={"help": "where the teacher samples (default: "
                                                                       "cuda if available)"})
    train: TrainConfig = field(default_factory=_distill_train)

    def data_path(self) -> Path:
        return Path(self.data) if self.data else Path(self.train.out) / "distill_data.jsonl"

    def sample_config(self) -> SampleConfig:
        """The first half: the teacher's rejection sampling."""
        return SampleConfig(ckpt=self.teacher, task=self.task, out=str(self.data_path()), n=self.problems,
                            samples=self.samples, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                            template=self.template, seed=self.train.seed, device=self.teacher_device)

    def sft_config(self) -> SFTConfig:
        """The second half: the student's SFT on the kept traces."""
        return SFTConfig(init=self.init, data=str(self.data_path()), train=self.train)


@dataclass
class DistillResult:
    data: SampleResult
    student: TrainResult


def distill(cfg: DistillConfig) -> DistillResult:
    data = sample(cfg.sample_config())
    if data.kept == 0:
        raise ValueError(f"the teacher {cfg.teacher} solved none of {data.sampled} samples on {cfg.task}: "
                         "there is nothing to distil (train the teacher further, or raise --samples)")
    return DistillResult(data, sft(cfg.sft_config()))
