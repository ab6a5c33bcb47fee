"""THE training loop, shared by every stage (pretrain, SFT, GRPO, distillation).

A stage supplies only its data and its loss (the `Stage` protocol below). Everything else lives here:
AdamW, warmup + cosine / WSD schedule, gradient clipping and accumulation, bf16 autocast over fp32
master weights, optional torch.compile, DeepSeek-V3's auxiliary-loss-free balancing update after every
optimizer step, a progress bar, metrics.jsonl (and TensorBoard), atomic periodic checkpoints with the
last K kept, and exact resume: model, optimizer, schedule, RNG states and data position, so that a
run killed and resumed ends bitwise equal to one never interrupted (on the CPU).

Data position is a function of the step: a stage builds the whole batch of step s from an RNG seeded by
(seed, s) and hands out its micro-batches (StepRows), so restoring the step restores the data stream,
and the micro-batch size and the number of processes change nothing but speed.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from minir1 import checkpoint, files
from minir1.checkpoint import CHECKPOINTS, checkpoints, latest_checkpoint
from minir1.devices import apply_thread_budget, resolve_device
from minir1.errors import TrainingError
from minir1.models.base import CausalLM
from minir1.tokenizer import Tokenizer
from minir1.train import distributed
from minir1.train.distributed import DistInfo

METRICS = "metrics.jsonl"
TRAIN_CONFIG = "train_config.json"


@dataclass
class TrainConfig:
    out: str = "runs/train"
    steps: int = 500
    batch_size: int = 16              # sequences (or completions) per optimizer step
    micro_batch_size: int = 0         # per forward/backward; 0 = batch_size (no accumulation)
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1         # the schedule decays to lr × this
    warmup_steps: int = 20
    schedule: str = "cosine"          # cosine | wsd | constant
    decay_fraction: float = 0.2       # wsd: the final fraction of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0            # 0 = off
    dtype: str = "fp32"               # fp32 | bf16 (autocast; master weights stay fp32)
    compile: bool = False
    seed: int = 0
    save_every: int = 0               # steps between checkpoints; 0 = only the final one
    keep_last: int = 2                # checkpoints kept
    resume: bool = False
    overwrite: bool = False           # a fresh run into a directory holding another run's checkpoints clears them
    route_bias_speed: float = 1e-3    # γ of the auxiliary-loss-free balancing; 0 = off
    tensorboard: bool = False
    progress: bool = True
    device: str = "auto"
    parallel: str = "ddp"             # under torchrun: ddp (a replica per process) | fsdp (FSDP2, sharded)

    def validate(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(msg)
        for name in ("lr", "min_lr_ratio", "decay_fraction", "weight_decay", "beta1", "beta2", "grad_clip",
                     "route_bias_speed"):
            if not math.isfinite(getattr(self, name)):
                fail(f"{name} ({getattr(self, name)}) must be a finite number")
        if self.steps < 1:
            fail(f"steps ({self.steps}) must be >= 1")
        if self.batch_size < 1:
            fail(f"batch_size ({self.batch_size}) must be >= 1")
        mb = self.micro_batch_size or self.batch_size
        if mb < 1 or self.batch_size % mb:
            fail(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({mb})")
        if self.seq_len < 2:
            fail(f"seq_len ({self.seq_len}) must be >= 2")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            fail(f"lr ({self.lr}) must be > 0 and min_lr_ratio ({self.min_lr_ratio}) in [0, 1]")
        if self.schedule not in ("cosine", "wsd", "constant"):
            fail(f"schedule ({self.schedule!r}) must be cosine, wsd or constant")
        if self.dtype not in ("fp32", "bf16"):
            fail(f"dtype ({self.dtype!r}) must be fp32 or bf16")
        if self.parallel not in distributed.PARALLEL:
            fail(f"parallel ({self.parallel!r}) must be one of {', '.join(distributed.PARALLEL)}")
        if self.save_every < 0 or self.keep_last < 1:
            fail(f"save_every ({self.save_every}) must be >= 0 and keep_last ({self.keep_last}) >= 1")
        if not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1:
            fail(f"beta1 ({self.beta1}) and beta2 ({self.beta2}) must be in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.route_bias_speed < 0 or self.warmup_steps < 0:
            fail("weight_decay, grad_clip, route_bias_speed and warmup_steps must be >= 0")
        if not 0 <= self.decay_fraction <= 1:
            fail(f"decay_fraction ({self.decay_fraction}) must be in [0, 1]")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            fail(f"--out {self.out} is an existing file, not a directory")
        if self.resume and self.overwrite:
            fail("--resume continues the run in --out and --overwrite discards it: choose one")
        resolve_device(self.device)

    @property
    def accumulation(self) -> int:
        return self.batch_size // (self.micro_batch_size or self.batch_size)


class Stage(Protocol):
    """What a training stage provides: its data and its loss."""

    name: str

    def batch(self, step: int, micro: int, n_micro: int) -> Any:
        """Micro-batch `micro` of `n_micro` for optimizer step `step`, deterministic in (seed, step)
        and the same rows however the step is split (StepRows)."""

    def loss(self, model: CausalLM, batch: Any) -> tuple[Tensor, dict[str, float], int]:
        """-> (loss to minimise, metrics, tokens processed). The loop minimises the mean of a step's
        micro-batch losses (over every process): a stage whose loss is a sum over tokens divided by a count
        (SFT's targets, GRPO's completions or tokens) divides by the whole step's count and multiplies by
        n_micro, so the gradient is the same however the step is split."""

    def config(self) -> dict[str, Any]:
        """The stage's own settings, for train_config.json."""


class StepRows:
    """A step's whole batch, built once from `build(step, rows)` (seeded by the step alone) and handed out
    micro-batch by micro-batch: the data of a step do not depend on how it is split into micro-batches or
    over processes, so a torchrun launch sees exactly the data one process sees."""

    def __init__(self, build: Any) -> None:
        self.build = build
        self._step: int | None = None
        self._rows: Any = None

    def micro(self, step: int, micro: int, n_micro: int, size: int) -> Any:
        if self._step != step:
            self._rows, self._step = self.build(step, size * n_micro), step
        part = slice(micro * size, (micro + 1) * size)
        if isinstance(self._rows, dict):
            return {k: v[part] for k, v in self._rows.items()}
        return self._rows[part]


# --------------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------------


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine, WSD or constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":  # warmup-stable-decay: flat, then a linear decay over the last fraction
        decay_start = int(cfg.steps * (1 - cfg.decay_fraction))
        if step < decay_start:
            return cfg.lr
        frac = (step - decay_start) / max(1, cfg.steps - decay_start)
        return cfg.lr - (cfg.lr - floor) * frac
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


# --------------------------------------------------------------------------------------------------
# Checkpoints (safetensors + JSON only: nothing is unpickled on resume)
# --------------------------------------------------------------------------------------------------


LIVE_METRICS = METRICS + ".partial"   # the running run's metrics; published as metrics.jsonl when it completes
# Settings that may change between a run and its resumption (the rest must match).
RESUMABLE = ("out", "steps", "resume", "overwrite", "save_every", "keep_last", "tensorboard", "progress", "device",
             "compile", "parallel", "micro_batch_size")


def run_settings(model: CausalLM, stage: Stage, cfg: TrainConfig) -> dict[str, Any]:
    """What defines a run, as JSON: a checkpoint stores it, and --resume checks it."""
    settings = {"stage": stage.name, "model": model.config.to_dict(),
                "train": {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE}, stage.name: stage.config()}
    return json.loads(json.dumps(settings, default=str))


def save_checkpoint(out: Path, step: int, model: torch.nn.Module, tokenizer: Tokenizer,
                    opt: torch.optim.Optimizer, keep_last: int, d: DistInfo | None = None,
                    settings: dict[str, Any] | None = None) -> Path | None:
    """A periodic checkpoint (minir1/checkpoint.py writes it): every process takes part in gathering the
    full states, the first process writes."""
    d = d or DistInfo()
    state = distributed.full_model_state(model)
    opt_state = distributed.full_optimizer_state(model, opt)
    final = None
    if d.is_main:  # the gathered states live on the first process only
        final = checkpoint.write_training_state(out, step, distributed.unwrap(model), state, tokenizer, opt_state,
                                                keep_last, d.world, settings)
    distributed.barrier(d)
    return final


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    out: Path
    steps: int
    last_metrics: dict[str, Any] = field(default_factory=dict)


def build_optimizer(model: CausalLM, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not norms, biases or routing biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    # The fused kernel (one pass per parameter) is 5x faster than foreach on the CPU too; FSDP's sharded
    # DTensor parameters keep the foreach path.
    params = decay + other
    fused = (bool(params) and params[0].device.type in ("cpu", "cuda")
             and not any(distributed.is_sharded(p) for p in params))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None,
                             foreach=None if fused else True)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop the metric lines of steps after the checkpoint (they will be redone)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            break  # a line cut short by the crash
    files.write_text(path, "".join(k + "\n" for k in keep))


def _losses(path: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                out[int(row["step"])] = float(row["loss"])
            except (ValueError, KeyError, TypeError):
                continue
    return out


def _where_to_go_back(out: Path, live: Path) -> str:
    """The truth about the checkpoints a diverged run leaves: which exist and what the loss was at each."""
    done = checkpoints(out)
    if not done:
        return "no checkpoint was saved before it; the output directory's earlier files are unchanged"
    losses = _losses(live)
    best = min(losses.items(), key=lambda kv: kv[1]) if losses else None

    def loss_at(step: int) -> str:
        return f"{losses[step]:.4g}" if step in losses else "unknown"
    listed = ", ".join(f"{p} (step {n}, loss {loss_at(n)})" for n, p in done)
    lowest = f"; the run's lowest loss was {best[1]:.4g} at step {best[0]}" if best else ""
    return (f"checkpoints on disk: {listed}{lowest}. Their weights are finite, but a run that diverges may have "
            "been getting worse before it: compare their losses before resuming from one")


def _first_non_finite(model: torch.nn.Module, d: DistInfo) -> str | None:
    """The name of a parameter holding a NaN or an infinity (checked on every process), or None. One fused
    L2 norm per parameter (about 3 ms for 14M parameters on 2 cores; an inf-norm or isfinite pass costs 20x
    more): a NaN or inf weight makes its norm non-finite, and so does one beyond 1e19, which is no weight."""
    named = [(n, p.to_local() if hasattr(p, "to_local") else p) for n, p in model.named_parameters()]
    named = [(n, t.detach()) for n, t in named if t.numel()]
    bad = None
    if named:
        norms = torch.stack(torch._foreach_norm([t for _, t in named], 2))
        if not bool(norms.isfinite().all()):
            bad = named[int((~norms.isfinite()).nonzero()[0])][0]
    if d.enabled and distributed.all_sum(float(bad is not None), d) > 0:
        return bad or "a parameter on another process"
    return bad


def prepare(cfg: TrainConfig) -> TrainConfig:
    """A stage's TrainConfig, ready to run: the micro-batch resolved for the processes, every field checked."""
    cfg = resolve_micro_batch(cfg)
    cfg.validate()
    return cfg


def resolve_micro_batch(cfg: TrainConfig, world: int | None = None) -> TrainConfig:
    """With no --micro-batch-size, split each step evenly over the processes of a torchrun launch (one
    micro-batch each): the same global batch, and the same data, as one process."""
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.micro_batch_size == 0 and world > 1:
        if cfg.batch_size % world:
            raise ValueError(f"batch_size ({cfg.batch_size}) cannot be split over {world} processes: choose a "
                             "multiple of the process count, or --micro-batch-size")
        cfg.micro_batch_size = cfg.batch_size // world
    return cfg


def backward_step(stage: Stage, model: torch.nn.Module, step: int, mine: list[int], n_micro: int,
                  autocast: Any = None, ddp: torch.nn.Module | None = None) -> tuple[float, int, dict[str, float]]:
    """Accumulate one optimizer step's gradient from this process's micro-batches `mine` (of `n_micro` in all):
    the mean of their losses, which the stages make the step's loss whatever the split (each normalises by the
    whole step's count); DDP then averages the processes'. -> (loss, tokens, the stage's metrics)."""
    total_loss, tokens, stage_metrics = 0.0, 0, {}
    for j, micro in enumerate(mine):
        batch = stage.batch(step, micro, n_micro)
        sync = nullcontext() if ddp is None or j == len(mine) - 1 else ddp.no_sync()
        with sync, autocast or nullcontext():
            loss, m, n_tok = stage.loss(model, batch)
            (loss / len(mine)).backward()
        total_loss += float(loss.detach()) / len(mine)
        tokens += n_tok
        for k, v in m.items():
            stage_metrics[k] = stage_metrics.get(k, 0.0) + float(v) / len(mine)
    return total_loss, tokens, stage_metrics


def train(model: CausalLM, tokenizer: Tokenizer, stage: Stage, cfg: TrainConfig) -> TrainResult:
    """Run `cfg.steps` optimizer steps of `stage` on `model`; the final checkpoint goes to `cfg.out`.

    Under torchrun each process runs its share of every step's micro-batches (see distributed.py);
    only the first process shows progress and writes metrics and checkpoints.

    What is on disk at every moment: `cfg.out`'s final files (weights, tokenizer, metrics.jsonl,
    train_config.json) are replaced only when the run completes, all together; a failed run leaves them
    byte-identical. While it runs, its metrics go to metrics.jsonl.partial and its periodic checkpoints
    to checkpoints/step-N, which --resume continues from."""
    resolve_micro_batch(cfg)
    cfg.validate()
    d, device = distributed.setup(resolve_device(cfg.device))
    n_micro = cfg.accumulation                       # micro-batches per step, all processes together
    if n_micro % d.world:
        raise ValueError(f"batch_size / micro_batch_size = {n_micro} micro-batches per step cannot be shared "
                         f"by {d.world} processes; choose a micro_batch_size that makes it a multiple")
    mine = list(range(d.rank, n_micro, d.world))     # this process's micro-batches
    out = Path(cfg.out)
    settings = run_settings(model, stage, cfg)
    earlier = checkpoints(out)
    if earlier and not cfg.resume:
        if not cfg.overwrite:
            raise TrainingError(f"{out} holds checkpoints of an earlier run ({', '.join(p.name for _, p in earlier)}); "
                                "pass --resume to continue that run, or --overwrite to discard its checkpoints")
        if d.is_main:
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        distributed.barrier(d)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    live = out / LIVE_METRICS
    model.to(device).train()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    start, opt_state = 0, None
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        start, opt_state = checkpoint.read_training_state(ckpt, model, settings)
    snapshot = None
    if hasattr(stage, "bind"):  # stages that generate (GRPO) need a full copy of the policy to sample from
        snapshot = _policy_snapshot(model, cfg, d)
        ref = getattr(stage, "ref_model", None)
        if ref is not None and d.enabled and cfg.parallel == "fsdp":
            ref.to(device)
            distributed.wrap(ref, "fsdp", d)         # the reference is sharded as the policy is
    wrapped = distributed.wrap(model, cfg.parallel, d)
    opt = build_optimizer(wrapped, cfg)
    if opt_state is not None:
        distributed.load_optimizer_state(wrapped, opt, opt_state)
    if d.is_main:
        if start == 0:
            live.unlink(missing_ok=True)
        elif not live.is_file() and (out / METRICS).is_file():  # resuming a run that had completed
            shutil.copyfile(out / METRICS, live)
        _truncate_metrics(live, start)
    if snapshot is not None:
        stage.bind(wrapped, snapshot)
    try:
        last = _steps(model, wrapped, tokenizer, stage, cfg, d, device, opt, mine, n_micro, start, out, live, settings)
        state = distributed.full_model_state(wrapped)
        if d.is_main:
            _publish(out, model, state, tokenizer, live, {
                "stage": stage.name, "model": model.config.to_dict(), "train": asdict(cfg), "world_size": d.world,
                stage.name: stage.config()})
    except BaseException:
        # Nothing to resume from: an existing directory is left as it was; a new one keeps the partial metrics,
        # which say how the run failed.
        if d.is_main and not checkpoints(out) and not created:
            live.unlink(missing_ok=True)
        raise
    distributed.barrier(d)
    return TrainResult(out, cfg.steps, last)


def _publish(out: Path, model: CausalLM, state: dict[str, Tensor], tokenizer: Tokenizer, live: Path,
             train_config: dict[str, Any]) -> None:
    """The run's final files, all together or none: weights, tokenizer, train_config.json, metrics.jsonl."""
    checkpoint.save(out, model, tokenizer, state=state,
                    texts={TRAIN_CONFIG: json.dumps(train_config, indent=2, default=str) + "\n"},
                    copies={METRICS: live})
    live.unlink(missing_ok=True)


def _steps(model: CausalLM, wrapped: torch.nn.Module, tokenizer: Tokenizer, stage: Stage, cfg: TrainConfig,
           d: DistInfo, device: torch.device, opt: torch.optim.Optimizer, mine: list[int], n_micro: int, start: int,
           out: Path, live: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The optimizer steps from `start` to cfg.steps, with logging and periodic checkpoints."""
    forward_model = torch.compile(wrapped) if cfg.compile else wrapped
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bf16" else nullcontext())
    writer = bar = None
    if d.is_main and cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            print("TensorBoard is not installed (pip install tensorboard); logging to metrics.jsonl only")
    if d.is_main and cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=stage.name, unit="step", dynamic_ncols=True)
    ddp = isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
    last: dict[str, Any] = {}
    metrics_file = open(live, "a") if d.is_main else None
    try:
        for step in range(start, cfg.steps):
            apply_thread_budget()  # a shared CPU (the speedrun's lanes): take the cores that are free now
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            total_loss, tokens, stage_metrics = backward_step(stage, forward_model, step, mine, n_micro, autocast,
                                                              wrapped if ddp else None)
            params = [p for p in wrapped.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            if d.enabled:
                total_loss = distributed.all_mean({"loss": total_loss}, d)["loss"]
                stage_metrics = distributed.all_mean(stage_metrics, d)
                tokens = int(distributed.all_sum(tokens, d))
            if not (math.isfinite(total_loss) and math.isfinite(grad_norm)):
                if metrics_file is not None:
                    metrics_file.flush()
                raise TrainingError(f"step {step + 1}: non-finite loss ({total_loss}) or gradient norm "
                                    f"({grad_norm}); stopping before the optimizer step. "
                                    f"{_where_to_go_back(out, live)}. Try a lower --lr or --grad-clip.")
            opt.step()
            # The fused AdamW kernel writes the weights without bumping their version counters: bump them, so
            # that what caches on them (the engine's packed weights, kept across GRPO's rollouts) sees the change.
            torch.autograd.graph.increment_version([p for g in opt.param_groups for p in g["params"]])
            opt.zero_grad(set_to_none=True)
            bad = _first_non_finite(wrapped, d)  # a finite gradient can still overflow a weight
            if bad is not None:
                raise TrainingError(f"step {step + 1}: the optimizer step made parameter '{bad}' non-finite "
                                    f"(learning rate {lr:.3g}); stopping, nothing of this step is saved. "
                                    f"{_where_to_go_back(out, live)}. Try a lower --lr.")
            imbalance = model.update_route_bias(cfg.route_bias_speed) if cfg.route_bias_speed > 0 else None
            if imbalance is None:
                loads = model.router_load()
                if loads is not None:
                    imbalance = loads.max(-1).values / loads.mean(-1).clamp_min(1e-9)
            dt = time.perf_counter() - t0
            last = {"step": step + 1, "loss": total_loss, "lr": lr, "grad_norm": grad_norm, "step_time_s": dt,
                    "tokens_per_s": tokens / dt, **stage_metrics}
            if hasattr(stage, "step_metrics"):  # per-step figures of stages that generate (rewards, times)
                last.update(stage.step_metrics())
            if imbalance is not None:
                last["load_imbalance"] = [round(float(x), 4) for x in imbalance]
                last["load_imbalance_max"] = float(imbalance.max())
            if metrics_file is not None:
                metrics_file.write(json.dumps(last) + "\n")
                metrics_file.flush()
            if writer is not None:
                for k, v in last.items():
                    if isinstance(v, (int, float)):
                        writer.add_scalar(f"{stage.name}/{k}", v, step + 1)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total_loss:.4f}", tok_s=f"{tokens / dt:,.0f}")
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                if metrics_file is not None:
                    os.fsync(metrics_file.fileno())
                save_checkpoint(out, step + 1, wrapped, tokenizer, opt, cfg.keep_last, d, settings)
    finally:
        if metrics_file is not None:
            metrics_file.close()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    return last


def _policy_snapshot(model: CausalLM, cfg: TrainConfig, d: DistInfo):
    """A callable giving a plain module with the policy's current weights, for generation: the model
    itself unless FSDP shards it; then a replica refreshed from the gathered state (a collective: every
    process calls it at the same point)."""
    if not (d.enabled and cfg.parallel == "fsdp"):
        return lambda: model
    import copy
    replica = copy.deepcopy(model)

    def refresh() -> CausalLM:
        replica.load_state_dict(distributed.full_model_state(model, everywhere=True))
        return replica
    return refresh
