"""GRPO as users run it: the `minir1 grpo` command against TRL's GRPOTrainer, on the same checkpoint and the
same questions (issue 18).

The checkpoint: a random DeepSeek-V3 model of the training-step benchmark's shape written by `transformers`
(`DeepseekV3ForCausalLM.save_pretrained`) with the task's 512-token tokenizer. The questions: a JSONL file of
two-digit additions. minir1 runs

    minir1 grpo --init CKPT --task jsonl:qa.jsonl --steps 10 --prompts-per-step 2 --group-size 8 \\
        --max-new-tokens 64 --loss LOSS --beta 0

in a fresh process, and its whole-step times come from its own metrics.jsonl; TRL runs the same work
(2 prompts x 8 completions x at most 64 tokens, the same loss, beta 0, one update per rollout, fp32) in a
fresh process too. Both skip their first step (warm-up). Reported per loss: the median over repeats of the
ratio of completion tokens per second of whole-step time, and minir1's per-phase split (generate, score,
train). Two checkpoints: the untrained one scores 0 on every completion, so every advantage is zero; the
"trained" one is it after 150 SFT steps on the questions' worked solutions, so that some groups get
different rewards (how many varies with the CPU: 11-17% on an Intel Xeon, 67-72% on an AMD EPYC).

    python benchmarks/grpo_cli_vs_trl.py [--losses grpo,dapo] [--checkpoints untrained,trained] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from grpo_vs_trl import TASK, trl_steps  # noqa: E402
from train_step import hf_config  # noqa: E402

STEPS, P, G, MAX_NEW = 10, 2, 8, 64
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}


def make_checkpoint(path: Path) -> None:
    import torch
    from transformers import DeepseekV3ForCausalLM

    from minir1.tasks import get_task
    from minir1.train.pretrain import train_tokenizer
    tokenizer = train_tokenizer(get_task(TASK), vocab_size=512, show_progress=False)
    cfg = hf_config()
    cfg.vocab_size = tokenizer.vocab_size
    cfg.bos_token_id, cfg.eos_token_id = tokenizer.bos_id, tokenizer.eos_id
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)


def make_questions(path: Path, n: int = 400) -> None:
    """Two-digit additions, with the column working as the solution (for the trained checkpoint's SFT)."""
    from minir1.tasks.arithmetic import explain
    rng = random.Random(0)
    rows = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(n)]
    path.write_text("".join(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b),
                                        "solution": explain(a, "+", b)[1]}) + "\n" for a, b in rows))


def train_checkpoint(ckpt: Path, questions: Path, out: Path, steps: int = 150) -> None:
    """The untrained checkpoint after SFT on the questions' worked solutions: it writes the format, and some
    groups get different rewards (so some advantages are not zero)."""
    subprocess.run([sys.executable, "-m", "minir1", "sft", "--init", str(ckpt), "--task", f"jsonl:{questions}",
                    "--steps", str(steps), "--lr", "3e-3", "--warmup-steps", "10", "--batch-size", "16",
                    "--seq-len", "128", "--out", str(out), "--no-progress"],
                   check=True, capture_output=True, text=True, env=ENV)


@contextlib.contextmanager
def trained_checkpoint(ap: argparse.ArgumentParser, ckpt: Path | None,
                       questions: Path | None) -> Iterator[tuple[Path, Path]]:
    """(trained checkpoint, questions): the ones a benchmark was given (--ckpt, --questions), or this
    benchmark's, made in a temporary directory for the duration."""
    if ckpt:
        if not questions:
            ap.error("--ckpt needs --questions (the JSONL file its prompts come from)")
        yield ckpt, questions
        return
    with tempfile.TemporaryDirectory() as d:
        made, questions = Path(d) / "ckpt", Path(d) / "qa.jsonl"
        make_checkpoint(made)
        make_questions(questions)
        train_checkpoint(made, questions, Path(d) / "trained")
        yield Path(d) / "trained", questions


def minir1_cli(ckpt: Path, questions: Path, loss: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "minir1", "grpo", "--init", str(ckpt), "--task", f"jsonl:{questions}",
           "--steps", str(STEPS), "--prompts-per-step", str(P), "--group-size", str(G), "--max-new-tokens",
           str(MAX_NEW), "--loss", loss, "--beta", "0", "--out", str(out), "--no-progress"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, env=ENV)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return {"step_s": [r["step_s"] for r in rows], "tokens": [r["completion_tokens"] for r in rows],
            "phases": {k: statistics.median(r[k] for r in rows) for k in ("generate_s", "score_s", "train_s")},
            "zero_std_groups": statistics.mean(r["zero_std_groups"] for r in rows)}


def trl_child(ckpt: Path, questions: Path, loss: str, out: Path) -> dict:
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
            "from grpo_vs_trl import trl_steps; from minir1.tasks import get_task; "
            "task = get_task('jsonl:' + sys.argv[3]); "
            "t, k = trl_steps(Path(sys.argv[2]), int(sys.argv[5]) - 1, Path(sys.argv[6]), sys.argv[4], "
            "'jsonl:' + sys.argv[3], task.take(10**6, 'train', at_most=True)); "
            "print(json.dumps({'step_s': t, 'tokens': k}))")
    res = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(ckpt), str(questions), loss,
                          str(STEPS), str(out)], check=True, capture_output=True, text=True,
                         env=ENV)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--losses", default="grpo,dapo")
    ap.add_argument("--checkpoints", default="untrained,trained")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    kinds = args.checkpoints.split(",")
    if set(kinds) - {"untrained", "trained"}:
        ap.error(f"--checkpoints: choose from untrained, trained (got {args.checkpoints})")
    assert trl_steps  # imported for the child processes' sake, and to fail early without TRL
    results: dict = {"steps": STEPS, "prompts_per_step": P, "group_size": G, "max_new_tokens": MAX_NEW, "cases": {}}
    with tempfile.TemporaryDirectory() as d:
        ckpt, questions = Path(d) / "ckpt", Path(d) / "qa.jsonl"
        make_checkpoint(ckpt)
        make_questions(questions)
        if "trained" in kinds:
            train_checkpoint(ckpt, questions, Path(d) / "trained")
        cases = [(kind, loss) for kind in kinds for loss in args.losses.split(",")]
        for kind, loss in cases:
            init = ckpt if kind == "untrained" else Path(d) / kind
            name_of = f"{kind}/{loss}"
            runs = []
            for r in range(args.repeats):
                pair = {}
                order = (("minir1", minir1_cli), ("trl", trl_child))
                for name, fn in order if r % 2 == 0 else order[::-1]:
                    pair[name] = fn(init, questions, loss, Path(d) / f"{kind}-{loss}-{name}-{r}")
                for name in ("minir1", "trl"):
                    x = pair[name]
                    x["tokens_per_s"] = sum(x["tokens"]) / sum(x["step_s"])
                pair["ratio"] = pair["minir1"]["tokens_per_s"] / pair["trl"]["tokens_per_s"]
                runs.append(pair)
                m, t = pair["minir1"], pair["trl"]
                print(f"{name_of} repeat {r + 1}: minir1 {statistics.median(m['step_s']):.3f} s/step "
                      f"(generate {m['phases']['generate_s']:.3f}, score {m['phases']['score_s']:.4f}, train "
                      f"{m['phases']['train_s']:.3f}; flat groups {m['zero_std_groups']:.0%}), TRL "
                      f"{statistics.median(t['step_s']):.3f} s/step; completion tokens/s x{pair['ratio']:.2f}",
                      flush=True)
            med = statistics.median(p["ratio"] for p in runs)
            results["cases"][name_of] = {"runs": runs, "ratio_median": med}
            print(f"{name_of}: median ratio x{med:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
