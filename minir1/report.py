"""The speedrun's report: `report.json` (every figure the run measured), `report.md` (the same, to read)
and PNG plots drawn from the stages' own `metrics.jsonl` files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

STAGE_ROWS = ("base", "sft", "grpo", "rs_sft", "student_distill", "student_grpo")
DESCRIPTIONS = {
    "base": "pretrained teacher, no fine-tuning",
    "sft": "cold-start SFT on <think> traces",
    "grpo": "GRPO from the SFT model",
    "rs_sft": "SFT on verified samples of the GRPO model (final)",
    "student_distill": "student: SFT on the teacher's verified traces",
    "student_grpo": "student: cold-start SFT + GRPO, no teacher",
}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def environment() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        here = Path(__file__).parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=here).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=here).stdout.strip()
        commit += "-dirty" if dirty and commit != "unknown" else ""
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version(), "git_commit": commit}


def parameter_counts(ckpt: Path) -> dict[str, int]:
    from minir1.checkpoint import build_model, read_config
    with torch.device("meta"):
        return build_model(read_config(ckpt)).num_parameters()


def plot(out: Path) -> list[str]:
    """The run's curves as PNGs; returns the file names written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    pt, sft = read_metrics(out / "base" / "metrics.jsonl"), read_metrics(out / "sft" / "metrics.jsonl")
    if pt or sft:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        if pt:
            axes[0].plot([r["step"] for r in pt], [r.get("ce_loss", r["loss"]) for r in pt], label="next token")
            if "mtp_loss" in pt[0]:
                axes[0].plot([r["step"] for r in pt], [r["mtp_loss"] for r in pt], label="MTP (token after next)")
            axes[0].set(title="pretraining loss", xlabel="step", ylabel="cross-entropy", yscale="log")
            axes[0].legend()
        if sft:
            axes[1].plot([r["step"] for r in sft], [r["loss"] for r in sft], color="C2")
            axes[1].set(title="cold-start SFT loss", xlabel="step", ylabel="cross-entropy")
        save(fig, "loss.png")
    grpo = read_metrics(out / "grpo" / "metrics.jsonl")
    if grpo:
        steps = [r["step"] for r in grpo]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        axes[0].plot(steps, [r["reward_mean"] for r in grpo])
        axes[0].set(title="GRPO reward (rollouts)", xlabel="step")
        axes[1].plot(steps, [r["accuracy"] for r in grpo], label="rollout accuracy")
        axes[1].plot(steps, [r["format_rate"] for r in grpo], label="rollout format rate", alpha=0.6)
        ev = [r for r in grpo if "eval_pass@1" in r]
        axes[1].plot([r["step"] for r in ev], [r["eval_pass@1"] for r in ev], "o-", label="held-out pass@1")
        axes[1].set(title="GRPO accuracy", xlabel="step", ylim=(0, 1))
        axes[1].legend(fontsize=8)
        axes[2].plot(steps, [r["completion_len_mean"] for r in grpo])
        axes[2].set(title="completion length (tokens)", xlabel="step")
        save(fig, "grpo.png")
    if pt and "load_imbalance" in pt[0]:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        layers = len(pt[0]["load_imbalance"])
        for i in range(layers):
            ax.plot([r["step"] for r in pt], [r["load_imbalance"][i] for r in pt], label=f"MoE layer {i + 1}")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set(title="expert load balance in pretraining", xlabel="step", ylabel="max / mean expert load")
        ax.legend(fontsize=8)
        save(fig, "expert_load.png")
    return written


def write_report(out: Path, state: dict[str, Any]) -> dict[str, Any]:
    out = Path(out)
    stages = state["stages"]
    cfg = state.get("config", {})
    k = cfg.get("eval_samples", 1)
    rows = {}
    for name in STAGE_ROWS:
        e = stages.get(name, {}).get("eval")
        if e:
            rows[name] = {"pass@1": e["pass@1"], f"maj@{k}": e.get(f"maj@{k}"), f"pass@{k}": e.get(f"pass@{k}"),
                          "format_rate": e["format_rate"], "mean_thinking_tokens": e["mean_thinking_tokens"],
                          "mean_completion_tokens": e["mean_completion_tokens"], "problems": e["problems"],
                          "samples": e["samples"], "temperature": e["temperature"]}
    params = {name: parameter_counts(out / d) for name, d in (("teacher", "base"), ("student", "student_base"))
              if (out / d / "config.json").is_file()}
    findings = {}
    if "grpo" in rows and "sft" in rows:
        findings["grpo_gain_points"] = 100 * (rows["grpo"]["pass@1"] - rows["sft"]["pass@1"])
    if "student_distill" in rows and "student_grpo" in rows:
        findings["distill_minus_grpo_student_points"] = 100 * (rows["student_distill"]["pass@1"]
                                                              - rows["student_grpo"]["pass@1"])
    report = {
        "environment": environment(),
        "config": cfg,
        "seconds": {name: s["seconds"] for name, s in stages.items()},
        "total_seconds": sum(s["seconds"] for s in stages.values()),
        "parameters": params,
        "stages": rows,
        "findings": findings,
        "speculative": stages.get("speculative", {}),
        "data": {name: {"kept": stages[name]["kept"], "sampled": stages[name]["sampled"]}
                 for name in ("rejection_sampling", "distill_data") if name in stages},
        "plots": plot(out),
        "chat": f"minir1 chat --ckpt {out / 'final'}",
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    return report


def render_markdown(r: dict[str, Any]) -> str:
    env, cfg = r["environment"], r["config"]
    k = cfg.get("eval_samples", 1)
    problems = next(iter(r["stages"].values()), {}).get("problems", "?")
    lines = ["# minir1 speedrun report", "",
             f"Task `{cfg.get('task')}`; held-out pass@1 is the mean over {k} samples per problem at temperature "
             f"0.6 (R1's definition), maj@{k} their majority vote; {problems} held-out problems per stage.", "",
             "## Environment", "",
             f"- {env['cpu']} ({env['cpu_count']} cores, {env['threads']} torch threads)"
             + (f", GPU {env['gpu']}" if env["gpu"] else ", no GPU"),
             f"- torch {env['torch']}, Python {env['python']}, minir1 commit `{env['git_commit']}`", "",
             "## Models", ""]
    for name, p in r["parameters"].items():
        lines.append(f"- {name}: {p['total'] / 1e6:.2f}M parameters, {p['activated'] / 1e6:.2f}M activated per "
                     f"token, + {p['mtp'] / 1e6:.2f}M in the MTP module")
    lines += ["", "## Held-out results by stage", "",
              f"| stage | what | pass@1 | maj@{k} | format rate | mean thinking tokens |", "|---|---|---|---|---|---|"]
    for name, row in r["stages"].items():
        maj = row.get(f"maj@{k}")
        lines.append(f"| `{name}` | {DESCRIPTIONS[name]} | {row['pass@1']:.3f} | "
                     f"{'' if maj is None else f'{maj:.3f}'} | {row['format_rate']:.3f} | "
                     f"{row['mean_thinking_tokens']:.1f} |")
    f = r["findings"]
    lines.append("")
    if "grpo_gain_points" in f:
        lines.append(f"- GRPO changed held-out pass@1 by **{f['grpo_gain_points']:+.1f} points** over its SFT start.")
    if "distill_minus_grpo_student_points" in f:
        lines.append(f"- The distilled student is **{f['distill_minus_grpo_student_points']:+.1f} points** against the "
                     "same-size student trained by GRPO without a teacher (R1 §4.1).")
    for name, d in r["data"].items():
        lines.append(f"- {name.replace('_', ' ')}: kept {d['kept']} of {d['sampled']} samples (verified answer, "
                     "valid format, no duplicates).")
    s = r["speculative"]
    if "acceptance_rate" in s:
        lines += ["", "## MTP speculative decoding (final model, greedy, batch 1)", "",
                  f"- acceptance rate {s['acceptance_rate']:.0%}; {s['speculative_tokens_per_s']:,.0f} vs "
                  f"{s['plain_tokens_per_s']:,.0f} tokens/s plain: **x{s['speedup']:.2f}** "
                  f"(median over {s['prompts']} held-out prompts)"]
    lines += ["", "## Time", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {sec:.0f} |" for name, sec in r["seconds"].items()]
    lines += [f"| **total** | **{r['total_seconds']:.0f}** ({r['total_seconds'] / 60:.1f} min) |", ""]
    if r["plots"]:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in r["plots"]] + [""]
    lines += ["## Talk to it", "", "```bash", r["chat"], "```", ""]
    return "\n".join(lines)
