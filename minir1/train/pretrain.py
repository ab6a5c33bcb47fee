"""Pretraining: packed task documents, next-token loss plus the MTP loss (DeepSeek-V3 §2.2.2, eq. 24-25).

The balancing update after every step, the schedule and everything else shared live in loop.py.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from minir1.model import Transformer
from minir1.prompting import r1_response
from minir1.tasks import Problem, Task, is_heldout
from minir1.tokenizer import Tokenizer
from minir1.train.loop import StepRows


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

    def batch(self, step: int, micro: int, n_micro: int) -> Tensor:
        """[micro_batch_size, seq_len + 1] tokens: documents (BOS … EOS) packed end to end; rows of the
        step's batch, which is built whole (the same data however the step is split)."""
        return self._rows.micro(step, micro, n_micro, self.micro_batch_size)

    def _step_rows(self, step: int, rows: int) -> Tensor:
        rng = random.Random(f"pretrain:{self.seed}:{step}:0")
        need = rows * (self.seq_len + 1)
        ids: list[int] = []
        bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
        while len(ids) < need:
            p = self.task.make(rng)
            if is_heldout(p.question):
                continue  # the held-out split is never trained on
            ids += ([bos] if bos is not None else []) + self.tokenizer.encode(document(p)) + \
                ([eos] if eos is not None else [])
        return torch.tensor(ids[:need]).view(rows, self.seq_len + 1)

    def loss(self, model: Transformer, batch: Tensor) -> tuple[Tensor, dict[str, float], int]:
        device = next(model.parameters()).device
        batch = batch.to(device)
        x, targets = batch[:, :-1], batch[:, 1:]
        use_mtp = self.mtp_weight > 0 and len(model.mtp) > 0
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

    def config(self) -> dict[str, Any]:
        return {"task": getattr(self.task, "spec", self.task.name), "mtp_weight": self.mtp_weight,
                "seq_len": self.seq_len}
