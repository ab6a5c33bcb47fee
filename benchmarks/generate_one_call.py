"""GRPO's rollouts through `Engine.generate`: every row decoded to its end in one native call
(`DecodeBatch.finish`, `generate_rows` in minir1/engine/native/common.h) against the step loop it replaces
(one Python round trip per token), interleaved, on the same prompts and seeds, which give the same tokens.

The shape is the CLI benchmark's (benchmarks/grpo_cli_vs_trl.py): 2 prompts x 8 samples, at most 64 new
tokens, temperature 1, on its SFT-trained checkpoint (made here unless --ckpt names one) and its questions.

    python benchmarks/generate_one_call.py [--ckpt DIR --questions QA.jsonl] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from grpo_cli_vs_trl import trained_checkpoint  # noqa: E402


def run(ckpt: Path, questions: Path, repeats: int, batches: int = 12) -> None:
    from minir1.checkpoint import load_model
    from minir1.engine import Engine, SamplingParams
    from minir1.engine.batch import DecodeBatch
    from minir1.prompting import build_prompt
    from minir1.tasks import get_task
    from minir1.tokenizer import Tokenizer

    tokenizer, model = Tokenizer.from_pretrained(ckpt), load_model(ckpt)
    prompts = [build_prompt(tokenizer, p.question, "chat")[0]
               for p in get_task(f"jsonl:{questions}").take(2 * batches, "train")]
    engine, finish = Engine(model, tokenizer), DecodeBatch.finish

    def rollouts(one_call: bool) -> tuple[float, list]:
        DecodeBatch.finish = finish if one_call else (lambda self: False)
        t, outs = time.perf_counter(), []
        for i in range(batches):
            outs += engine.generate(prompts[2 * i:2 * i + 2], SamplingParams(max_new_tokens=64, n=8, seed=i))
        return (time.perf_counter() - t) / batches, [(o.token_ids, o.logprobs) for o in outs]

    rollouts(True)
    ratios = []
    for r in range(repeats):
        (fast, a), (slow, b) = rollouts(True), rollouts(False)
        assert a == b, "the one-call generation must give the step loop's tokens"
        ratios.append(slow / fast)
        steps = engine.last_stats["steps"]
        print(f"repeat {r + 1}: one call {fast * 1e3:.1f} ms, step loop {slow * 1e3:.1f} ms per 16 rollouts "
              f"(last batch {steps:.0f} decode steps): x{slow / fast:.2f}", flush=True)
    print(f"median x{statistics.median(ratios):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path)
    ap.add_argument("--questions", type=Path)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with trained_checkpoint(ap, args.ckpt, args.questions) as (ckpt, questions):
        run(ckpt, questions, args.repeats)


if __name__ == "__main__":
    main()
