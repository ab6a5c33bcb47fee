"""Generation throughput: minir1's Engine against transformers' `generate`, same weights, same work.

Both generate exactly `--new` tokens per row (no EOS) from the same `--prompt`-token random prompts
with the same sampling settings (temperature 1, no top-k/top-p), cache on, in one process,
interleaved, several repeats; the median tokens/s of each and the median ratio are reported. Also:
KV-cache bytes per token, and speculative (MTP) against plain decoding on a model whose MTP head was
trained, if `--mtp-ckpt DIR` is given.

    python benchmarks/generate.py [--batches 1,16,64] [--repeats 5] [--mtp-ckpt DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_step import hf_config  # noqa: E402  (the foundation benchmark's 3.8M-parameter model)

from minir1 import Transformer  # noqa: E402
from minir1.engine import Engine, SamplingParams  # noqa: E402


def run_ours(engine: Engine, prompts: torch.Tensor, new: int, seed: int, speculative: bool = False) -> float:
    params = SamplingParams(max_new_tokens=new, temperature=1.0, stop_token_ids=[], seed=seed,
                            speculative=speculative)
    t = time.perf_counter()
    outs = engine.generate(prompts.tolist(), params)
    dt = time.perf_counter() - t
    assert sum(len(o.token_ids) for o in outs) == prompts.shape[0] * new
    return prompts.shape[0] * new / dt


def run_theirs(model, prompts: torch.Tensor, new: int, seed: int) -> float:
    torch.manual_seed(seed)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new, use_cache=True,
                             pad_token_id=0, eos_token_id=None)
    dt = time.perf_counter() - t
    assert out.shape[1] == prompts.shape[1] + new
    return prompts.shape[0] * new / dt


def interleaved(engine: Engine, model, prompts: torch.Tensor, new: int, repeats: int, warm: int) -> dict:
    """Both generators on the same prompts, a warm-up each, then `repeats` alternating runs: medians, the median
    of the per-repeat ratios, and every run."""
    run_ours(engine, prompts, warm, 0)
    run_theirs(model, prompts, warm, 0)
    mine, hf = [], []
    for r in range(repeats):
        mine.append(run_ours(engine, prompts, new, r))
        hf.append(run_theirs(model, prompts, new, r))
    return {"minir1_tokens_per_s": statistics.median(mine), "transformers_tokens_per_s": statistics.median(hf),
            "speedup_median": statistics.median(a / h for a, h in zip(mine, hf)), "minir1_runs": mine,
            "transformers_runs": hf}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mtp-ckpt", help="a checkpoint with a trained MTP head, for speculative decoding")
    ap.add_argument("--mtp-task", default="arithmetic", help="the task that checkpoint was pretrained on")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()

    torch.manual_seed(0)
    theirs = DeepseekV3ForCausalLM(hf_config()).eval()
    with tempfile.TemporaryDirectory() as d:
        theirs.save_pretrained(d)
        ours = Transformer.from_pretrained(d).eval()
    engine = Engine(ours)
    cfg = ours.config
    results: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__, "prompt": args.prompt,
                     "new": args.new, "kv_cache_bytes_per_token_fp32": cfg.kv_cache_bytes_per_token(4),
                     "batches": {}}
    print(f"KV cache per token (fp32): {cfg.kv_cache_bytes_per_token(4)}")
    for b in map(int, args.batches.split(",")):
        prompts = torch.randint(0, cfg.vocab_size, (b, args.prompt))
        res = interleaved(engine, theirs, prompts, args.new, args.repeats, warm=8)
        results["batches"][b] = {k: res[k] for k in ("minir1_tokens_per_s", "transformers_tokens_per_s",
                                                     "speedup_median")}
        print(f"batch {b:3d}: minir1 {res['minir1_tokens_per_s']:8,.0f} tok/s   transformers "
              f"{res['transformers_tokens_per_s']:8,.0f} tok/s   x{res['speedup_median']:.2f}", flush=True)
    if args.mtp_ckpt:
        from minir1 import Tokenizer
        from minir1.tasks import get_task
        model = Transformer.from_pretrained(args.mtp_ckpt).eval()
        tok = Tokenizer.from_pretrained(args.mtp_ckpt)
        eng = Engine(model, tok)
        questions = get_task(args.mtp_task).take(16, "test")
        results["speculative"] = {}
        for batch, temperature in [(1, 0.0), (16, 0.0), (16, 1.0)]:
            prompts = [tok.encode_prompt(f"Question: {q.question}\nSolution:\n") for q in questions[:batch]]
            plain, spec, acc = [], [], []
            for r in range(args.repeats):
                for flag, sink in ((False, plain), (True, spec)):
                    params = SamplingParams(max_new_tokens=args.new, temperature=temperature, seed=r,
                                            stop_token_ids=[], speculative=flag)
                    t = time.perf_counter()
                    outs = eng.generate(prompts, params)
                    sink.append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t))
                acc.append(eng.last_stats["acceptance_rate"])
            row = {"plain_tokens_per_s": statistics.median(plain), "speculative_tokens_per_s": statistics.median(spec),
                   "speedup_median": statistics.median(s / p for s, p in zip(spec, plain)),
                   "acceptance_rate": statistics.median(acc)}
            results["speculative"][f"batch{batch}_T{temperature:g}"] = row
            print(f"speculative, batch {batch}, temperature {temperature:g}: acceptance {row['acceptance_rate']:.0%}, "
                  f"{row['plain_tokens_per_s']:,.0f} -> {row['speculative_tokens_per_s']:,.0f} tok/s "
                  f"(x{row['speedup_median']:.2f})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
