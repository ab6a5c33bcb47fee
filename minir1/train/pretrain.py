"""Pretraining: packed task documents, next-token loss plus the MTP loss (DeepSeek-V3 §2.2.2, eq. 24-25).

The balancing update after every step, the schedule and everything else shared live in loop.py.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from minir1.models.base import CausalLM
from minir1.models.deepseek_v3 import ModelConfig
from minir1.models.dense import DenseConfig
from minir1.models.hf import build_model
from minir1.prompting import r1_response
from minir1.tasks import Problem, Task
from minir1.tokenizer import Tokenizer
from minir1.train.loop import StepRows, TrainConfig, TrainResult, latest_checkpoint, prepare, train


def document(p: Problem) -> str:
    """Pretraining text for one problem: the question and its worked solution, plainly."""
    return f"Question: {p.question}\nSolution:\n{p.solution}\nAnswer: {p.answer}"


def tokenizer_corpus(task: Task, n: int = 4000, seed: int = 0) -> Iterator[str]:
    """Texts to train the tokenizer on: documents and their R1-format renderings, from the train split."""
    for i, p in enumerate(task.problems("train", seed)):
        if i >= n:
            return
        yield document(p)
        yield r1_response(p.solution, p.answer)


def train_tokenizer(task: Task, vocab_size: int, seed: int = 0, show_progress: bool = True) -> Tokenizer:
    return Tokenizer.train(tokenizer_corpus(task, seed=seed), vocab_size=vocab_size, show_progress=show_progress)


@dataclass
class PretrainStage:
    task: Task
    tokenizer: Tokenizer
    seq_len: int
    micro_batch_size: int
    seed: int = 0
    mtp_weight: float = 0.3   # λ: the MTP loss weight
    name: str = "pretrain"

    def __post_init__(self) -> None:
        self._rows = StepRows(self._step_rows)
        self._documents = 0  # problems drawn for the current step (metrics.jsonl `documents`)

    def batch(self, step: int, micro: int, n_micro: int) -> Tensor:
        """[micro_batch_size, seq_len + 1] tokens: documents (BOS … EOS) packed end to end; rows of the
        step's batch, which is built whole (the same data however the step is split)."""
        return self._rows.micro(step, micro, n_micro, self.micro_batch_size)

    def _step_rows(self, step: int, rows: int) -> Tensor:
        rng = random.Random(f"pretrain:{self.seed}:{step}:0")
        need = rows * (self.seq_len + 1)
        ids: list[int] = []
        bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
        self._documents = 0
        while len(ids) < need:
            p = self.task.make(rng)
            if self.task.heldout(p):
                continue  # the held-out split is never trained on
            self._documents += 1
            ids += ([bos] if bos is not None else []) + self.tokenizer.encode(document(p)) + \
                ([eos] if eos is not None else [])
        return torch.tensor(ids[:need]).view(rows, self.seq_len + 1)

    def loss(self, model: CausalLM, batch: Tensor) -> tuple[Tensor, dict[str, float], int]:
        device = next(model.parameters()).device
        batch = batch.to(device)
        x, targets = batch[:, :-1], batch[:, 1:]
        use_mtp = self.mtp_weight > 0 and model.num_mtp_modules > 0
        out = model(x, mtp=use_mtp, return_dict=True)
        V = out.logits.shape[-1]
        ce = F.cross_entropy(out.logits.float().reshape(-1, V), targets.reshape(-1))
        loss, metrics = ce, {"ce_loss": float(ce.detach())}
        if use_mtp and out.mtp_logits:
            # Depth k at position i predicts token i+k+1: the targets shifted k more places.
            mtp = torch.stack([F.cross_entropy(lg.float().reshape(-1, V), batch[:, k + 1:].reshape(-1))
                               for k, lg in enumerate(out.mtp_logits, start=1)]).mean()
            loss = loss + self.mtp_weight * mtp
            metrics["mtp_loss"] = float(mtp.detach())
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
            metrics["balance_loss"] = float(out.aux_loss.detach())
        return loss, metrics, x.numel()

    def step_metrics(self) -> dict[str, float]:
        """`documents`: the problems this step trained on (whole or cut at a row's end): their sum over the run
        bounds the number of distinct problems pretraining saw."""
        return {"documents": float(self._documents)}

    def config(self) -> dict[str, Any]:
        return {"task": getattr(self.task, "spec", self.task.name), "mtp_weight": self.mtp_weight,
                "seq_len": self.seq_len}


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------

@dataclass
class PretrainConfig:
    task: str | None = field(default=None, metadata={"help": "arithmetic[:digits=N,operands=N], countdown, "
                                                             "or jsonl:PATH"})
    preset: str = field(default="tiny", metadata={"help": "model preset to start from (default: tiny)"})
    family: str = field(default="deepseek_v3", metadata={
        "help": "deepseek_v3 (MLA, MoE, MTP), or a dense family (llama, qwen2, qwen3) at the preset's widths"})
    model: dict[str, Any] = field(default_factory=dict, metadata={"fields_of": ModelConfig})  # preset overrides
    tokenizer: str | None = field(default=None, metadata={"help": "a tokenizer directory (default: train one "
                                                                  "on the task)"})
    mtp_weight: float = field(default=0.3, metadata={"help": "λ, the weight of the MTP loss"})
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out="runs/pretrain"))


def pretrain(cfg: PretrainConfig) -> TrainResult:
    """Pretrain a new model on the task's documents: DeepSeek-V3 (MLA, MoE, MTP), or with `family` a dense
    Llama/Qwen2/Qwen3 model at the preset's widths (as R1's distilled students are, §2.4). Its tokenizer is
    trained on the task unless one is given (a resumed run continues with its checkpoint's)."""
    from minir1.tasks import get_task
    if not cfg.task:
        raise ValueError("pretrain needs --task (arithmetic, countdown or jsonl:PATH)")
    task = get_task(cfg.task)
    tc = prepare(cfg.train)
    overrides = {k: v for k, v in cfg.model.items() if k != "model_type"}
    if cfg.family == "deepseek_v3":
        model_cfg: ModelConfig | DenseConfig = ModelConfig.from_preset(cfg.preset, **overrides)
    else:
        model_cfg = DenseConfig.from_preset(cfg.family, cfg.preset, **overrides)
    if cfg.tokenizer:
        tokenizer = Tokenizer.from_pretrained(cfg.tokenizer)
    else:
        # Nothing is written to `out` before the run completes (the loop publishes the tokenizer with the weights).
        ckpt = latest_checkpoint(Path(tc.out)) if tc.resume else None
        tokenizer = (Tokenizer.from_pretrained(ckpt) if ckpt is not None
                     else train_tokenizer(task, model_cfg.vocab_size, tc.seed, show_progress=tc.progress))
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but vocab_size is {model_cfg.vocab_size}")
    model_cfg = model_cfg.replace(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                                  pad_token_id=tokenizer.pad_id)
    torch.manual_seed(tc.seed)
    model = build_model(model_cfg)
    stage = PretrainStage(task, tokenizer, tc.seq_len, tc.micro_batch_size or tc.batch_size, tc.seed, cfg.mtp_weight)
    return train(model, tokenizer, stage, tc)
