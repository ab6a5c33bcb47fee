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

from minir1.stats import excludes_zero, paired_bootstrap, wilson

STAGE_ROWS = ("base", "sft", "sft_worked", "grpo", "r1_zero", "rs_sft", "student_distill", "student_zero",
              "student_grpo")
DESCRIPTIONS = {
    "base": "pretrained teacher, no fine-tuning",
    "sft": "cold-start SFT on <think> traces (a fraction answered without working)",
    "sft_worked": "reference: the same cold start on worked solutions only (no GRPO follows it)",
    "grpo": "GRPO from the SFT model",
    "rs_sft": "SFT on verified samples of the GRPO model (final)",
    "student_distill": "student: SFT on the teacher's verified traces",
    "student_zero": "student: GRPO from its base model, no SFT (RL alone, R1 §4.1)",
    "student_grpo": "student: the teacher's cold start (the task's worked solutions, a fraction without working) + "
                    "GRPO, no teacher",
    "r1_zero": "R1-Zero: GRPO from the base model, no cold start (R1 §2.2)",
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
        runs = [("cold start + GRPO", grpo, "C0")]
        zero = read_metrics(out / "r1_zero" / "metrics.jsonl")
        if zero:
            runs.append(("R1-Zero (GRPO from base)", zero, "C3"))
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for label, rows, color in runs:
            steps = [r["step"] for r in rows]
            axes[0].plot(steps, [r["reward_mean"] for r in rows], color=color, label=label)
            axes[1].plot(steps, [r["accuracy"] for r in rows], color=color, alpha=0.5,
                         label=f"{label}: rollout accuracy")
            ev = [r for r in rows if "eval_pass@1" in r]
            axes[1].plot([r["step"] for r in ev], [r["eval_pass@1"] for r in ev], "o-", color=color,
                         label=f"{label}: held-out pass@1")
            axes[2].plot(steps, [r["completion_len_mean"] for r in rows], color=color, label=label)
        axes[0].set(title="GRPO reward (rollouts)", xlabel="step")
        axes[0].legend(fontsize=8)
        axes[1].set(title="GRPO accuracy", xlabel="step", ylim=(0, 1))
        axes[1].legend(fontsize=7)
        axes[2].set(title="mean response length (tokens)", xlabel="step")
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


# Each finding: (stage, the stage it is compared with, what R1 reports).
FINDINGS = {
    "grpo_minus_sft": ("grpo", "sft", "RL on the cold-start model lifts held-out pass@1 by 10 points or more "
                                      "(R1 §2.3)"),
    "distilled_minus_rl_student": ("student_distill", "student_zero", "the distilled student beats the same-size "
                                                                      "student trained by RL alone (R1 §4.1)"),
    "cold_start_minus_r1_zero": ("grpo", "r1_zero", "cold start + RL beats RL from the base model alone, in accuracy "
                                                    "and readability (R1 §2.3)"),
    # Not one of R1's claims: the student given the teacher's own cold start (the task's worked solutions, as good
    # as any teacher's traces here) before its RL. A stronger baseline than RL alone, reported either way.
    "distilled_minus_cold_start_student": ("student_distill", "student_grpo", "distillation also beats the "
                                                                              "student given the teacher's cold "
                                                                              "start before its RL (not R1's claim: "
                                                                              "a stronger baseline)"),
    # Not R1's claim either: RL from the mixed cold start against imitating the task's worked solutions for as
    # many steps. How much of the lift imitation alone would have given, reported either way.
    "grpo_minus_worked_sft": ("grpo", "sft_worked", "RL from the mixed cold start beats the same cold start on "
                                                    "worked solutions only, with no RL (not R1's claim: RL against "
                                                    "imitating the task's algorithm)"),
}


# A finding whose claim is a size: reproduced only when the difference reaches it (besides its interval
# excluding zero).
MIN_POINTS = {"grpo_minus_sft": 10.0}


def finding(stages: dict[str, Any], a: str, b: str, claim: str, min_points: float = 0.0) -> dict[str, Any] | None:
    """pass@1 of stage `a` minus stage `b`, in points, with a paired bootstrap 95% interval over the held-out
    problems both were evaluated on (the same problems, in the same order); reproduced when the interval
    excludes zero and the difference is positive and at least `min_points`."""
    ea, eb = stages.get(a, {}).get("eval"), stages.get(b, {}).get("eval")
    if not ea or not eb:
        return None
    pa, pb = ea.get("per_problem"), eb.get("per_problem")
    if not pa or not pb or [x["question"] for x in pa] != [x["question"] for x in pb]:
        return {"claim": claim, "difference_points": 100 * (ea["pass@1"] - eb["pass@1"]), "ci95": None,
                "reproduced": False, "note": "the two stages were not evaluated on the same problems"}
    diff, (lo, hi) = paired_bootstrap([x["pass@1"] for x in pa], [x["pass@1"] for x in pb])
    return {"claim": claim, "stages": [a, b], "problems_distinct": ea.get("problems_distinct", len(pa)),
            "difference_points": 100 * diff, "ci95": [100 * lo, 100 * hi], "reproduced": excludes_zero((lo, hi))
            and diff > 0 and 100 * diff >= min_points, "min_points": min_points,
            "format_rate": [ea["format_rate"], eb["format_rate"]],
            "thinking_rate": [ea.get("thinking_rate"), eb.get("thinking_rate")],
            "mean_completion_tokens": [ea["mean_completion_tokens"], eb["mean_completion_tokens"]]}


def training_scale(out: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """How many problems the run trained on (an upper bound on the distinct ones: every problem any stage
    drew from the training split, repeats counted) against the task's problem space. Pretraining and SFT
    (which pack several examples a row) count theirs in their metrics' `documents`; the other stages draw a
    fixed number per step."""
    from minir1.tasks import get_task
    per_stage: dict[str, int] = {}
    for name in ("base", "sft", "sft_worked", "student_base", "student_sft"):
        docs = [m.get("documents") for m in read_metrics(out / name / "metrics.jsonl")]
        if docs and None not in docs:
            per_stage[name] = int(sum(docs))
    g = cfg.get("grpo_steps", 0) * cfg.get("prompts_per_step", 0)
    # stage -> (problems drawn, the directory that shows it ran)
    fixed = {"grpo": (g, "grpo"), "r1_zero": (g, "r1_zero"),
             "rejection_sampling": (cfg.get("rs_problems", 0), "rs_sft"),
             "distill_data": (cfg.get("distill_problems", 0), "student_distill"), "student_grpo": (g, "student_grpo"),
             "student_zero": (g, "student_zero")}
    per_stage.update({k: n for k, (n, d) in fixed.items() if n and (out / d).exists()})
    space = get_task(cfg["task"]).problem_space() if cfg.get("task") else None
    total = sum(per_stage.values())
    return {"problem_space": space, "trained_problems_at_most": total, "per_stage": per_stage,
            "space_per_trained_problem": space / total if space and total else None}


def write_report(out: Path, state: dict[str, Any]) -> dict[str, Any]:
    out = Path(out)
    stages = state["stages"]
    cfg = state.get("config", {})
    k = cfg.get("eval_samples", 1)
    rows = {}
    for name in STAGE_ROWS:
        e = stages.get(name, {}).get("eval")
        if e:
            n = e["problems"]
            ci = e.get("pass@1_ci95") or list(wilson(e["pass@1"] * n, n))
            rows[name] = {"pass@1": e["pass@1"], "pass@1_ci95": ci,
                          f"maj@{k}": e.get(f"maj@{k}"), f"pass@{k}": e.get(f"pass@{k}"),
                          "format_rate": e["format_rate"], "mean_thinking_tokens": e["mean_thinking_tokens"],
                          "thinking_rate": e.get("thinking_rate"), "accuracy_thinking": e.get("accuracy_thinking"),
                          "accuracy_no_thinking": e.get("accuracy_no_thinking"),
                          "mean_completion_tokens": e["mean_completion_tokens"], "problems": n,
                          "problems_distinct": e.get("problems_distinct", n), "samples": e["samples"],
                          "temperature": e["temperature"]}
    params = {name: parameter_counts(out / d) for name, d in (("teacher", "base"), ("student", "student_base"))
              if (out / d / "config.json").is_file()}
    findings = {}
    for key, (a, b, claim) in FINDINGS.items():
        f = finding(stages, a, b, claim, MIN_POINTS.get(key, 0.0))
        if f is not None:
            findings[key] = f
    stage_seconds = sum(s["seconds"] for s in stages.values())
    report = {
        "environment": environment(),
        "config": cfg,
        "seconds": {name: s["seconds"] for name, s in stages.items()},
        "total_seconds": stage_seconds,  # the stages' own times, added up
        # from start to report, over every start of the run (the two lanes overlap, so this is less)
        "wall_seconds": state.get("wall_seconds", stage_seconds),
        "parameters": params,
        "scale": training_scale(out, cfg),
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


def scale_lines(sc: dict[str, Any]) -> list[str]:
    if not sc.get("trained_problems_at_most"):
        return []
    space, ratio = sc.get("problem_space"), sc.get("space_per_trained_problem")
    return [f"The run trained on at most {sc['trained_problems_at_most']:,} problems (every draw of every stage, "
            "repeats counted)" + (f"; the task has {space:,} distinct problems, {ratio:,.0f}x as many, so a held-out "
                                  "problem is almost never a near-copy of a trained one." if space else "."), ""]


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def render_markdown(r: dict[str, Any]) -> str:
    env, cfg = r["environment"], r["config"]
    k = cfg.get("eval_samples", 1)
    problems = next(iter(r["stages"].values()), {}).get("problems_distinct", "?")
    lines = ["# minir1 speedrun report", "",
             f"Task `{cfg.get('task')}`; held-out pass@1 is the mean over {k} samples per problem at temperature "
             f"0.6 (R1's definition), maj@{k} their majority vote; {problems} distinct held-out problems per stage "
             "(listed in `heldout.jsonl`), the same for every stage; intervals are 95% (Wilson for a pass@1, paired "
             "bootstrap for a difference).", "",
             *scale_lines(r.get("scale", {})),
             "## Environment", "",
             f"- {env['cpu']} ({env['cpu_count']} cores, {env['threads']} torch threads)"
             + (f", GPU {env['gpu']}" if env["gpu"] else ", no GPU"),
             f"- torch {env['torch']}, Python {env['python']}, minir1 commit `{env['git_commit']}`", "",
             "## Models", ""]
    for name, p in r["parameters"].items():
        lines.append(f"- {name}: {p['total'] / 1e6:.2f}M parameters, {p['activated'] / 1e6:.2f}M activated per "
                     f"token, + {p['mtp'] / 1e6:.2f}M in the MTP module")
    lines += ["", "## Held-out results by stage", "",
              f"| stage | what | pass@1 | 95% CI | maj@{k} | format rate | thinking rate | pass@1 thinking / "
              "not | mean thinking tokens |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, row in r["stages"].items():
        maj = row.get(f"maj@{k}")
        lo, hi = row["pass@1_ci95"]
        lines.append(f"| `{name}` | {DESCRIPTIONS[name]} | {row['pass@1']:.3f} | {lo:.3f}–{hi:.3f} | "
                     f"{_num(maj)} | {row['format_rate']:.3f} | {_num(row.get('thinking_rate'))} | "
                     f"{_num(row.get('accuracy_thinking'))} / {_num(row.get('accuracy_no_thinking'))} | "
                     f"{row['mean_thinking_tokens']:.1f} |")
    f = r["findings"]
    lines.append("")
    if f:
        lines += ["## Findings", "",
                  "Each is a difference of held-out pass@1 in points, with a 95% paired bootstrap interval over the "
                  "same held-out problems; it counts as reproduced only when the interval excludes zero (and a claim "
                  "of a size, such as 10 points, only when the difference reaches it).", ""]
    for key, x in f.items():
        ci = x.get("ci95")
        ci_text = f"95% CI [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "no interval: " + x.get("note", "")
        verdict = "reproduced" if x["reproduced"] else "**not** reproduced"
        fmt = x.get("format_rate")
        length = x.get("mean_completion_tokens") or [0, 0]
        thinking = x.get("thinking_rate") or [None, None]
        fmt_text = (f" Format rate {fmt[0]:.2f} against {fmt[1]:.2f}"
                    + (f"; thinking rate {thinking[0]:.2f} against {thinking[1]:.2f}" if None not in thinking else "")
                    + f"; mean response {length[0]:.0f} against {length[1]:.0f} tokens." if fmt else "")
        lines.append(f"- `{key}` ({' − '.join(x.get('stages', []))}): **{x['difference_points']:+.1f} points**, "
                     f"{ci_text} — {verdict}. Claim: {x['claim']}.{fmt_text}")
    lines.append("")
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
    lines += [f"| all stages, added up | {r['total_seconds']:.0f} ({r['total_seconds'] / 60:.1f} min) |",
              f"| **wall time** (two lanes at once on a CPU) | **{r['wall_seconds']:.0f}** "
              f"({r['wall_seconds'] / 60:.1f} min) |", ""]
    if r["plots"]:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in r["plots"]] + [""]
    lines += ["## Talk to it", "", "```bash", r["chat"], "```", ""]
    return "\n".join(lines)
