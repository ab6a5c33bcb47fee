"""Issue 18's check that the speed work left GRPO's results alone: the weights after 3 GRPO steps at this commit
against those of a baseline commit (default `74c74a6`, the last one before issue 18), same seed, fp32.

The run is the CLI benchmark's (benchmarks/grpo_cli_vs_trl.py) on its "trained" checkpoint, whose groups have
reward variance, so the update really runs:

    minir1 grpo --init TRAINED --task jsonl:qa.jsonl --steps 3 --prompts-per-step 2 --group-size 8 \\
        --max-new-tokens 64 --loss LOSS --beta 0 --seed 0

once with the baseline's code (a `git worktree` of it on PYTHONPATH) and once with this checkout's, with and
without prefix trees. Prints, per loss and path, the largest absolute difference of any weight, its tensor,
and the norm-relative difference of all weights together.

    python benchmarks/grpo_weights_check.py [--baseline 74c74a6] [--losses grpo,dapo]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from grpo_cli_vs_trl import ENV, make_checkpoint, make_questions, train_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def grpo_run(code: Path, init: Path, questions: Path, loss: str, out: Path, *extra: str) -> Path:
    cmd = [sys.executable, "-m", "minir1", "grpo", "--init", str(init), "--task", f"jsonl:{questions}", "--steps", "3",
           "--prompts-per-step", "2", "--group-size", "8", "--max-new-tokens", "64", "--loss", loss, "--beta", "0",
           "--seed", "0", "--out", str(out), "--no-progress", *extra]
    env = {**ENV, "PYTHONPATH": str(code) + os.pathsep + ENV.get("PYTHONPATH", "")}
    where = subprocess.run([sys.executable, "-c", "import minir1; print(minir1.__file__)"], check=True, text=True,
                           capture_output=True, cwd=out.parent, env=env).stdout.strip()
    assert Path(where).resolve().is_relative_to(code.resolve()), f"{where} is not {code}'s minir1"
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=out.parent, env=env)
    return out / "model.safetensors"


def compare(a: Path, b: Path) -> tuple[float, str, float]:
    from safetensors.torch import load_file
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys(), "the two runs saved different tensors"
    worst, where, num, den = 0.0, "", 0.0, 0.0
    for k in x:
        d = (x[k].double() - y[k].double())
        if d.abs().max() > worst:
            worst, where = float(d.abs().max()), k
        num += float(d.pow(2).sum())
        den += float(y[k].double().pow(2).sum())
    return worst, where, (num / max(den, 1e-30)) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="74c74a6", help="the commit to compare against")
    ap.add_argument("--losses", default="grpo,dapo")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        old = d / "baseline"
        made = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.baseline],
                              capture_output=True, text=True)
        if made.returncode:
            sys.exit(f"--baseline {args.baseline}: git could not check it out: {made.stderr.strip()}")
        try:
            ckpt, questions = d / "ckpt", d / "qa.jsonl"
            make_checkpoint(ckpt)
            make_questions(questions)
            train_checkpoint(ckpt, questions, d / "trained")
            for loss in args.losses.split(","):
                ref = grpo_run(old, d / "trained", questions, loss, d / f"old-{loss}")
                for name, extra in (("prefix trees (default)", ()), ("--no-share-prefixes", ("--no-share-prefixes",))):
                    new = grpo_run(ROOT, d / "trained", questions, loss, d / f"new-{loss}-{len(extra)}", *extra)
                    worst, where, rel = compare(new, ref)
                    verdict = "within 1e-6" if worst <= 1e-6 else "ABOVE 1e-6"
                    print(f"{loss:5s} {name:23s}: max |diff| {worst:.2e} ({where}), norm-relative {rel:.1e}: "
                          f"{verdict}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)


if __name__ == "__main__":
    main()
