"""THE training loop, shared by every stage (pretrain, SFT, GRPO, distillation).

A stage supplies only its data and its loss (the `Stage` protocol below). Everything else lives here:
AdamW, warmup + cosine / WSD schedule, gradient clipping and accumulation, bf16 autocast over fp32
master weights, optional torch.compile, DeepSeek-V3's auxiliary-loss-free balancing update after every
optimizer step, a progress bar, metrics.jsonl (and TensorBoard), atomic periodic checkpoints with the
last K kept, and exact resume: model, optimizer, schedule, RNG states and data position, so that a
run killed and resumed ends bitwise equal to one never interrupted (on the CPU).

Data position is a function of the step: a stage builds the batch of step s from an RNG seeded by
(seed, s, micro-batch), so restoring the step restores the data stream.
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
from safetensors.torch import load_file, save_file
from torch import Tensor

from minir1.model import Transformer
from minir1.tokenizer import Tokenizer

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
TRAIN_CONFIG = "train_config.json"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.safetensors"


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, a bad resume); the message says where."""


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
    route_bias_speed: float = 1e-3    # γ of the auxiliary-loss-free balancing; 0 = off
    tensorboard: bool = False
    progress: bool = True
    device: str = "auto"

    def validate(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(msg)
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
        if self.save_every < 0 or self.keep_last < 1:
            fail(f"save_every ({self.save_every}) must be >= 0 and keep_last ({self.keep_last}) >= 1")

    @property
    def accumulation(self) -> int:
        return self.batch_size // (self.micro_batch_size or self.batch_size)


class Stage(Protocol):
    """What a training stage provides: its data and its loss."""

    name: str

    def batch(self, step: int, micro: int, n_micro: int) -> Any:
        """Micro-batch `micro` of `n_micro` for optimizer step `step`, deterministic in (seed, step, micro)."""

    def loss(self, model: Transformer, batch: Any) -> tuple[Tensor, dict[str, float], int]:
        """-> (loss to minimise, metrics, tokens processed)."""

    def config(self) -> dict[str, Any]:
        """The stage's own settings, for train_config.json."""


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


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors = {f"state.{i}.{k}": v.detach().cpu().contiguous() for i, st in sd["state"].items()
               for k, v in st.items() if isinstance(v, Tensor)}
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for name, t in tensors.items():
        if name.startswith("state."):
            _, i, key = name.split(".", 2)
            state.setdefault(int(i), {})[key] = t
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    return tensors, {"python_random": [version, list(internal), gauss]}


def _set_rng_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(out: Path, step: int, model: Transformer, tokenizer: Tokenizer,
                    opt: torch.optim.Optimizer, keep_last: int) -> Path:
    """Write `<out>/checkpoints/step-N` atomically (a temporary directory renamed into place), then
    remove all but the last `keep_last`."""
    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    opt_tensors, opt_meta = _optimizer_tensors(opt)
    rng_tensors, rng_meta = _rng_state()
    save_file({**opt_tensors, **rng_tensors}, tmp / OPTIMIZER_STATE)
    (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, **opt_meta, **rng_meta}))
    for f in tmp.iterdir():  # durable before it becomes visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step-*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in (out / CHECKPOINTS).glob("step-*") if (p / TRAINER_STATE).is_file())
    return done[-1] if done else None


def resume_from(ckpt: Path, model: Transformer, opt: torch.optim.Optimizer) -> int:
    """Restore model, optimizer and RNG states from a checkpoint directory; returns its step."""
    from minir1.hf import load_pretrained
    loaded = load_pretrained(ckpt, device=next(model.parameters()).device)
    with torch.no_grad():
        for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
            if p.shape != q.shape:
                raise TrainingError(f"{ckpt}: tensor {name} has shape {list(q.shape)}, the model {list(p.shape)}")
            p.copy_(q)
    meta = json.loads((ckpt / TRAINER_STATE).read_text())
    tensors = load_file(ckpt / OPTIMIZER_STATE)
    _load_optimizer(opt, tensors, meta)
    _set_rng_state(tensors, meta)
    return int(meta["step"])


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    out: Path
    steps: int
    last_metrics: dict[str, Any] = field(default_factory=dict)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not norms, biases or routing biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None,
                             foreach=None if fused else True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


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
    path.write_text("".join(k + "\n" for k in keep))


def train(model: Transformer, tokenizer: Tokenizer, stage: Stage, cfg: TrainConfig) -> TrainResult:
    """Run `cfg.steps` optimizer steps of `stage` on `model`; the final checkpoint goes to `cfg.out`."""
    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    model.to(device).train()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    opt = build_optimizer(model, cfg)
    start = 0
    if cfg.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is not None:
            start = resume_from(ckpt, model, opt)
    if start == 0 and (out / METRICS).exists():
        (out / METRICS).unlink()
    _truncate_metrics(out / METRICS, start)
    _write_json(out / TRAIN_CONFIG, {"stage": stage.name, "model": model.config.to_dict(), "train": asdict(cfg),
                                     stage.name: stage.config()})
    if hasattr(stage, "bind"):  # stages that generate (GRPO) need the policy itself
        stage.bind(model)
    forward_model = torch.compile(model) if cfg.compile else model
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bf16" else nullcontext())
    writer = None
    if cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            print("TensorBoard is not installed (pip install tensorboard); logging to metrics.jsonl only")
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=stage.name, unit="step", dynamic_ncols=True)
    n_micro = cfg.accumulation
    last: dict[str, Any] = {}
    with open(out / METRICS, "a") as metrics_file:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            total_loss, tokens, stage_metrics = 0.0, 0, {}
            for micro in range(n_micro):
                batch = stage.batch(step, micro, n_micro)
                with autocast:
                    loss, m, n_tok = stage.loss(forward_model, batch)
                (loss / n_micro).backward()
                total_loss += float(loss.detach()) / n_micro
                tokens += n_tok
                for k, v in m.items():
                    stage_metrics[k] = stage_metrics.get(k, 0.0) + float(v) / n_micro
            params = [p for p in model.parameters() if p.grad is not None]
            if cfg.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            else:
                grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
            if not (math.isfinite(total_loss) and math.isfinite(grad_norm)):
                where = f"the last good checkpoint is {latest_checkpoint(out)}" if latest_checkpoint(out) \
                    else "no checkpoint was saved before it"
                raise TrainingError(f"step {step + 1}: non-finite loss ({total_loss}) or gradient norm "
                                    f"({grad_norm}); stopping. {where}. Try a lower --lr or --grad-clip.")
            opt.step()
            opt.zero_grad(set_to_none=True)
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
                os.fsync(metrics_file.fileno())
                save_checkpoint(out, step + 1, model, tokenizer, opt, cfg.keep_last)
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return TrainResult(out, cfg.steps, last)
