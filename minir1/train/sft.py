"""Supervised fine-tuning: chat data or cold-start examples in R1's <think>/<answer> format (R1 §2.3.1),
loss on assistant tokens only, examples packed into rows whose attention never crosses examples."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from minir1.models.base import CausalLM
from minir1.prompting import r1_response
from minir1.reasoning import opened_reasoning
from minir1.tasks import Task, TaskError
from minir1.tasks.base import read_jsonl
from minir1.tokenizer import Tokenizer
from minir1.train.loop import StepRows, TrainConfig, TrainResult, prepare, train

IGNORE = -100


def load_chat_file(path: str | Path) -> list[list[dict[str, str]]]:
    """{"messages": [{"role": …, "content": …}, …]} a line; errors name the file and the line."""
    path = Path(path)
    conversations = []
    for lineno, obj in read_jsonl(path):
        msgs = obj.get("messages") if isinstance(obj, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise TaskError(f"{path}:{lineno}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}]}}")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise TaskError(f"{path}:{lineno}: messages[{j}] needs a role (system, user or assistant) "
                                "and a string content")
        if not any(m["role"] == "assistant" for m in msgs):
            raise TaskError(f"{path}:{lineno}: no assistant message to learn from")
        conversations.append(msgs)
    if not conversations:
        raise TaskError(f"{path}: no conversations in the file")
    return conversations


def encode_conversation(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> list[tuple[list[int], list[int]]]:
    """One (prompt ids, completion ids) pair per assistant turn: the prompt is the chat template's
    rendering of the history (as it will look at inference), the completion the assistant's text (less
    the "<think>\\n" the template already wrote) plus EOS."""
    pairs = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        content = m["content"]
        opened = opened_reasoning(tokenizer, prompt)
        if opened and content.startswith(opened):
            content = content[len(opened):]
        completion = tokenizer.encode(content) + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        pairs.append((prompt, completion))
    return pairs


def check_no_think_fraction(fraction: float, with_task: bool) -> None:
    if not 0.0 <= fraction <= 1.0:  # NaN fails this too
        raise ValueError(f"no_think_fraction ({fraction}) must be between 0 and 1")
    if fraction and not with_task:
        raise ValueError("no_think_fraction applies to a task's worked solutions (--task), not to chat data (--data)")


@dataclass
class SFTStage:
    tokenizer: Tokenizer
    seq_len: int
    micro_batch_size: int
    task: Task | None = None                 # cold-start examples from the task's worked solutions
    conversations: list[list[dict[str, str]]] | None = None   # or chat data from a file
    seed: int = 0
    data_source: str = ""
    name: str = "sft"
    # Task examples answered with an empty <think></think>, as data mixing reasoning and non-reasoning answers
    # holds (R1 §2.3.3 gives simple queries no chain of thought; Qwen3's thinking/non-thinking SFT): a cold
    # start whose policy can answer with or without working, for RL to choose between by reward alone.
    no_think_fraction: float = 0.0
    _pairs: list[tuple[list[int], list[int]]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if (self.task is None) == (self.conversations is None):
            raise ValueError("SFT needs exactly one of a task or conversations")
        check_no_think_fraction(self.no_think_fraction, with_task=self.task is not None)
        if self.conversations is not None:
            self._pairs = [p for c in self.conversations for p in encode_conversation(self.tokenizer, c)]
        self._rows = StepRows(self._step_rows)
        self._documents = 0

    def _examples(self, rng: random.Random):
        if self.task is not None:
            # Its own stream, drawn only when used, so that a fraction of 0 leaves the examples as they were.
            mode = random.Random(rng.random()) if self.no_think_fraction else None
            while True:
                p = self.task.make(rng)
                if self.task.heldout(p):
                    continue
                working = p.solution
                if mode is not None and mode.random() < self.no_think_fraction:
                    working = ""
                msgs = [{"role": "user", "content": p.question},
                        {"role": "assistant", "content": r1_response(working, p.answer)}]
                yield from encode_conversation(self.tokenizer, msgs)
        else:  # sampled with replacement from the file's examples, seeded by (seed, step)
            while True:
                yield self._pairs[rng.randrange(len(self._pairs))]

    def batch(self, step: int, micro: int, n_micro: int) -> dict[str, Tensor]:
        """Rows of packed examples: ids, labels (IGNORE outside completions), positions restarting at
        each example, and doc ids so attention stays inside each example; rows of the step's batch, which
        is built whole (the same data however the step is split)."""
        return self._rows.micro(step, micro, n_micro, self.micro_batch_size)

    def _step_rows(self, step: int, rows: int) -> dict[str, Tensor]:
        rng = random.Random(f"sft:{self.seed}:{step}:0")
        T, pad = self.seq_len, self.tokenizer.pad_id or 0
        ids = torch.full((rows, T), pad, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE)
        positions = torch.zeros_like(ids)
        docs = torch.full_like(ids, -1)
        real = torch.zeros_like(ids, dtype=torch.bool)
        examples = self._examples(rng)
        self._documents = 0  # examples drawn for this step
        for row in range(rows):
            used, doc = 0, 0
            while used < T:
                prompt, completion = next(examples)
                self._documents += 1
                seq = (prompt + completion)[:T + 1]
                if len(seq) - 1 > T - used:
                    if used:  # does not fit: leave the rest of the row as padding
                        break
                n = len(seq) - 1
                # Inputs seq[:-1] predict seq[1:]; only completion tokens are targets.
                target = torch.tensor(seq[1:n + 1])
                mask = torch.arange(1, n + 1) >= len(prompt)
                ids[row, used:used + n] = torch.tensor(seq[:n])
                labels[row, used:used + n] = torch.where(mask, target, IGNORE)
                positions[row, used:used + n] = torch.arange(n)
                docs[row, used:used + n] = doc
                used += n
                doc += 1
            # Padding gets its own document id so that it never joins an example's attention.
            docs[row, used:] = doc
            real[row, :used] = True
        # The loss is the step's token sum over the step's target tokens, whatever the micro-batching: each
        # micro-batch carries the step's count (and how many micro-batches share it), one value per row.
        targets = int((labels != IGNORE).sum())
        n_micro = max(1, rows // self.micro_batch_size)
        return {"ids": ids, "labels": labels, "positions": positions, "doc_ids": docs, "real": real,
                "step_targets": torch.full((rows,), targets), "step_micro": torch.full((rows,), n_micro)}

    def loss(self, model: CausalLM, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float], int]:
        device = next(model.parameters()).device
        b = {k: v.to(device) for k, v in batch.items()}
        logits = model(b["ids"], positions=b["positions"], doc_ids=b["doc_ids"], counted=b.get("real"))
        n_targets = int((b["labels"] != IGNORE).sum())
        total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), b["labels"].reshape(-1),
                                ignore_index=IGNORE, reduction="sum")
        if "step_targets" in b:
            # The loop averages its micro-batches' losses (and DDP the processes'): scaled by the step's
            # micro-batch count, this micro-batch's token sum over the step's targets adds up to the step loss.
            step_targets, n_micro = int(b["step_targets"][0]), int(b["step_micro"][0])
        else:
            step_targets, n_micro = n_targets, 1
        loss = total * (n_micro / max(step_targets, 1))  # no targets anywhere: 0, never NaN
        return loss, {"target_tokens": n_targets}, b["ids"].numel()

    def step_metrics(self) -> dict[str, float]:
        """`documents`: the examples this step drew (a row packs several short ones): their sum over the run
        bounds the number of distinct problems SFT saw."""
        return {"documents": float(self._documents)}

    def config(self) -> dict[str, Any]:
        mix = {"no_think_fraction": self.no_think_fraction} if self.no_think_fraction else {}
        return {"data": self.data_source, "seq_len": self.seq_len, "examples": len(self._pairs) or None, **mix}


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------

def _sft_train() -> TrainConfig:
    return TrainConfig(out="runs/sft", lr=1e-3, warmup_steps=10)


@dataclass
class SFTConfig:
    init: str = field(metadata={"help": "checkpoint to start from"})
    task: str | None = field(default=None, metadata={"help": "cold-start examples from a task's worked "
                                                             "solutions: arithmetic, countdown or jsonl:PATH"})
    data: str | None = field(default=None, metadata={"help": "or chat data: a .jsonl file of "
                                                             "{\"messages\": [...]} lines"})
    no_think_fraction: float = field(default=0.0, metadata={"help": "with --task: this fraction of the examples "
                                                                    "answer with an empty <think></think> (a "
                                                                    "cold start mixing answers with and without "
                                                                    "working)"})
    train: TrainConfig = field(default_factory=_sft_train)


def sft(cfg: SFTConfig) -> TrainResult:
    """Fine-tune `init` on a task's worked solutions (R1's cold start) or on a chat file (e.g. verified
    samples from rejection sampling or a teacher)."""
    from minir1.checkpoint import load_model
    from minir1.tasks import get_task
    if bool(cfg.task) == bool(cfg.data):
        raise ValueError("sft needs exactly one of --task NAME or --data FILE.jsonl")
    check_no_think_fraction(cfg.no_think_fraction, with_task=bool(cfg.task))  # before the model is loaded
    tc = prepare(cfg.train)
    tokenizer = Tokenizer.from_pretrained(cfg.init)
    model = load_model(cfg.init)
    mb = tc.micro_batch_size or tc.batch_size
    if cfg.task:
        stage = SFTStage(tokenizer, tc.seq_len, mb, task=get_task(cfg.task), seed=tc.seed, data_source=cfg.task,
                         no_think_fraction=cfg.no_think_fraction)
    else:
        stage = SFTStage(tokenizer, tc.seq_len, mb, conversations=load_chat_file(cfg.data), seed=tc.seed,
                         data_source=str(cfg.data))
    return train(model, tokenizer, stage, tc)
