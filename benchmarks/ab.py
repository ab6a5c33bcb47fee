"""A/B: this checkout of minir1 against another (e.g. the commit before a refactor) on generation throughput,
the server's scheduler, and GRPO step time — the same work, in fresh processes, interleaved, several
repeats; the median of each and the median ratio (this / baseline) are reported.

    git worktree add /tmp/baseline <commit>
    python benchmarks/ab.py --baseline /tmp/baseline [--repeats 5]
    python benchmarks/ab.py --baseline /tmp/baseline --generate-only 16    # one batch size, 15 runs each

The measuring code below uses only names both layouts export (minir1.Transformer, minir1.engine.Engine,
minir1.train.grpo.GRPOStage, ...), so it runs unchanged on either side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

# The engine on the `tiny` preset and generation's rate: median tokens/s of `runs` timed runs after a warm-up.
GENERATION = r'''
import json, statistics, sys, tempfile, time, threading
from pathlib import Path
import torch
torch.manual_seed(0)
from minir1 import ModelConfig, Transformer
from minir1.engine import Engine, SamplingParams

engine = Engine(Transformer(ModelConfig.from_preset("tiny", vocab_size=512, num_nextn_predict_layers=0)).eval())

def rate(batch, runs):
    prompts = torch.randint(3, 512, (batch, 32)).tolist()
    params = SamplingParams(max_new_tokens=64, temperature=1.0, stop_token_ids=[], seed=0)
    engine.generate(prompts, params)
    rates = []
    for _ in range(runs):
        t = time.perf_counter()
        engine.generate(prompts, params)
        rates.append(batch * 64 / (time.perf_counter() - t))
    return statistics.median(rates)
'''

# One process measures one side: generation at batch 1, 16 and 64 (3 timed runs each), the continuous-batching
# scheduler on 16 seeded requests at once, and 6 GRPO steps (P=2, G=8, 64 new tokens; median seconds per step
# after the first).
MEASURE = GENERATION + r'''
gen = {batch: rate(batch, 3) for batch in (1, 16, 64)}

try:
    from minir1.serve.scheduler import Scheduler
except ImportError:
    from minir1.scheduler import Scheduler
sched = Scheduler(engine, max_batch=32)
prompts = torch.randint(3, 512, (16, 32)).tolist()
def one(i, out):
    out[i] = sum(1 for _ in sched.stream(prompts[i], SamplingParams(max_new_tokens=64, temperature=1.0,
                                                                      stop_token_ids=[], seed=i)))
rates = []
for _ in range(3):
    out = [0] * 16
    threads = [threading.Thread(target=one, args=(i, out)) for i in range(16)]
    t = time.perf_counter()
    for th in threads: th.start()
    for th in threads: th.join()
    rates.append(sum(out) / (time.perf_counter() - t))
sched.close()

from minir1.tasks import get_task
from minir1.tokenizer import Tokenizer
from minir1.train import TrainConfig, train
from minir1.train.grpo import GRPOConfig, GRPOStage
from minir1.train.pretrain import train_tokenizer
task = get_task("arithmetic:digits=2,mul_digits=0")
tok = train_tokenizer(task, vocab_size=512, show_progress=False)
torch.manual_seed(0)
m = Transformer(ModelConfig.from_preset("tiny", vocab_size=512, num_nextn_predict_layers=0,
                                        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id))
out = Path(tempfile.mkdtemp())
stage = GRPOStage(task, tok, GRPOConfig(prompts_per_step=2, group_size=8, max_new_tokens=64, loss="dapo"),
                  micro_batch_size=16)
train(m, tok, stage, TrainConfig(out=str(out), steps=6, batch_size=16, lr=1e-5, warmup_steps=0,
                                 schedule="constant", weight_decay=0.0, route_bias_speed=0.0, progress=False))
rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
print("RESULT", json.dumps({"generate_tokens_per_s": gen, "scheduler_tokens_per_s": statistics.median(rates),
                            "grpo_step_s": statistics.median(r["step_s"] for r in rows)}))
'''


# Generation alone at one batch size, 15 timed runs per process (a closer look at one row).
MEASURE_GENERATE = GENERATION + r'''
batch = int(sys.argv[1])
print("RESULT", json.dumps({"generate_tokens_per_s": {batch: rate(batch, 15)}}))
'''


def measure(root: Path, generate_only: int | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root)}
    code = [MEASURE] if generate_only is None else [MEASURE_GENERATE, str(generate_only)]
    res = subprocess.run([sys.executable, "-c", *code], capture_output=True, text=True, env=env,
                         cwd=tempfile.gettempdir())
    line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
    if res.returncode or line is None:
        raise RuntimeError(f"measuring {root} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return json.loads(line.removeprefix("RESULT "))


def flat(r: dict) -> dict[str, float]:
    out = {f"generate b={b} tok/s": v for b, v in r["generate_tokens_per_s"].items()}
    if "scheduler_tokens_per_s" in r:
        out["scheduler 16 streams tok/s"] = r["scheduler_tokens_per_s"]
        out["GRPO s/step"] = r["grpo_step_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="another minir1 checkout (e.g. a git worktree)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--generate-only", type=int, metavar="BATCH", help="only generation at this batch size")
    args = ap.parse_args()
    sides = {"this": HERE, "baseline": Path(args.baseline).resolve()}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in sides}
    for r in range(args.repeats):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]  # alternate who goes first
        for name in order:
            runs[name].append(flat(measure(sides[name], args.generate_only)))
        print(f"repeat {r + 1}: " + "; ".join(f"{k}: {v:,.1f} / {runs['baseline'][-1][k]:,.1f}"
                                              for k, v in runs["this"][-1].items()), flush=True)
    print(f"\nmedians over {args.repeats} repeats (this / baseline = ratio; for s/step lower is better):")
    for key in runs["this"][0]:
        a = statistics.median(x[key] for x in runs["this"])
        b = statistics.median(x[key] for x in runs["baseline"])
        ratios = statistics.median(x[key] / y[key] for x, y in zip(runs["this"], runs["baseline"]))
        print(f"  {key:28s} {a:10,.2f}  {b:10,.2f}  x{ratios:.2f}")


if __name__ == "__main__":
    main()
