"""The GRPO update on fixed rollouts: prefix trees (`--share-prefixes`, the default) against every row run
apart in its length group, the same rows, loss and model (issue 18).

Rollouts come from the checkpoint itself (the engine, temperature 1, G completions per training prompt);
then the update (GRPO's log-probs, the loss, backward) runs both ways, interleaved, `--repeats` times, and
the median time of each and the median of the per-repeat ratios are printed, with the tokens and the
distinct prefixes the rows hold. Without --ckpt it builds grpo_cli_vs_trl.py's SFT-trained checkpoint (the
CLI benchmark's) and its two-digit questions.

    python benchmarks/grpo_update.py [--ckpt DIR --task SPEC] [--prompts 2] [--group-size 8] \\
        [--max-new-tokens 64] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def rollouts(ckpt: str, task: str, prompts: int, group: int, max_new: int):
    from minir1.checkpoint import load_model
    from minir1.engine import Engine, SamplingParams
    from minir1.prompting import build_prompt
    from minir1.tasks import get_task
    from minir1.tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(ckpt)
    model = load_model(ckpt)
    heads = [build_prompt(tok, p.question, "chat")[0] for p in get_task(task).take(prompts, "train")]
    outs = Engine(model, tok).generate(heads, SamplingParams(max_new_tokens=max_new, temperature=1.0, n=group,
                                                             seed=1))
    n, comp = len(outs), max(len(o.token_ids) for o in outs)
    prompt_lens = torch.tensor([len(heads[i // group]) for i in range(n)])
    ids = torch.full((n, int(prompt_lens.max()) + comp), tok.pad_id or 0)
    for r, o in enumerate(outs):
        p = heads[r // group]
        ids[r, :len(p) + len(o.token_ids)] = torch.tensor(p + list(o.token_ids))
    lengths = torch.tensor([len(o.token_ids) for o in outs])
    return model.train(), ids, prompt_lens, lengths, comp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt")
    ap.add_argument("--task", help="with --ckpt: the task whose training prompts to roll out")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    if bool(args.ckpt) != bool(args.task):
        ap.error("--ckpt and --task go together")
    from minir1.train.grpo import completion_logprobs, plan_forest
    from minir1.train.prefix_tree import prefix_tries
    with tempfile.TemporaryDirectory() as d:
        ckpt, task = args.ckpt, args.task
        if not ckpt:
            from grpo_cli_vs_trl import make_checkpoint, make_questions, train_checkpoint
            make_checkpoint(Path(d) / "ckpt")
            make_questions(Path(d) / "qa.jsonl")
            train_checkpoint(Path(d) / "ckpt", Path(d) / "qa.jsonl", Path(d) / "trained")
            ckpt, task = str(Path(d) / "trained"), f"jsonl:{Path(d) / 'qa.jsonl'}"
        model, ids, prompt_lens, lengths, comp = rollouts(ckpt, task, args.prompts, args.group_size,
                                                          args.max_new_tokens)
    weight = torch.randn(ids.shape[0], 1, generator=torch.Generator().manual_seed(0))  # advantages
    mask = (torch.arange(comp)[None] < lengths[:, None]).float()

    def update(share: bool) -> float:
        t = time.perf_counter()
        model.zero_grad(set_to_none=True)
        logp, _ = completion_logprobs(model, ids, prompt_lens, comp, 1.0, lengths, share_prefixes=share)
        (logp * mask * weight).sum().backward()
        return time.perf_counter() - t

    for share in (False, True, False, True):  # warm-up
        update(share)
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.repeats):
        for share in ((False, True) if r % 2 == 0 else (True, False)):
            times[share].append(update(share))
    totals = (prompt_lens + lengths).tolist()
    from minir1.train.grpo import length_buckets
    forest = plan_forest(model, ids, prompt_lens, lengths, totals, length_buckets(totals))
    one = sum(prefix_tries(ids, prompt_lens, lengths).sizes)
    ratio = statistics.median(a / b for a, b in zip(times[False], times[True]))
    print(f"{ids.shape[0]} rows, {sum(totals)} tokens; {one} distinct prefixes; the plan: "
          + (f"{forest.nodes} nodes" if forest is not None else "rows apart"))
    print(f"update (log-probs + loss + backward), median of {args.repeats}: rows apart "
          f"{statistics.median(times[False]) * 1e3:.1f} ms, prefix trees {statistics.median(times[True]) * 1e3:.1f} ms;"
          f" median ratio x{ratio:.2f}")


if __name__ == "__main__":
    main()
