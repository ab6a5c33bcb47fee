"""Generation on an open-checkpoint shape: minir1's Engine against transformers' `generate` on a Llama model
with SmolLM2-135M's shapes (hidden 576, 30 layers, 9 heads, 3 KV heads, vocab 49,152, tied embeddings;
random weights written by transformers' `save_pretrained` and loaded by `minir1.load_model`).

Both generate exactly `--new` tokens per row (no EOS) from the same `--prompt`-token random prompts, sampling
at temperature 1 with no truncation, KV cache on, in one process, interleaved, `--repeats` times; the median
tokens/s of each and the median of the per-repeat ratios are reported, per batch size and dtype.

Also: the batch-1 bandwidth limit, weight bytes streamed per token (every parameter once; the tied
embedding counts once, as the output head) divided by a measured read bandwidth (a 256 MiB reduction,
median of 5) and by a copy bandwidth (read + write); and each model's resident memory (parameters, plus
the engine's packed copy).

    python benchmarks/generate_dense.py [--batches 1,8,16] [--dtypes float32,bfloat16] [--repeats 3]
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
from generate import interleaved  # noqa: E402  (the same work, timed the same way)

from minir1.checkpoint import load_model  # noqa: E402
from minir1.engine import Engine  # noqa: E402

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                    rms_norm_eps=1e-5, max_position_embeddings=8192, hidden_act="silu")


def bandwidth_gb_s() -> dict[str, float]:
    a = torch.empty(64 * 2**20)  # 256 MiB of fp32
    a.fill_(1.0)
    b = torch.empty_like(a)
    read, copy = [], []
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        read.append(a.numel() * 4 / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        b.copy_(a)
        copy.append(2 * a.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return {"read": statistics.median(read), "copy": statistics.median(copy)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bf16-batches", default="1,8", help="batch sizes for bf16 (transformers' bf16 is slow "
                                                          "on a CPU without native bf16)")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()

    torch.manual_seed(0)
    hf_fp32 = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).eval()
    bw = bandwidth_gb_s()
    results: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__, "prompt": args.prompt,
                     "new": args.new, "repeats": args.repeats, "bandwidth_gb_s": bw, "dtypes": {}}
    print(f"threads {torch.get_num_threads()}; read bandwidth {bw['read']:.1f} GB/s, copy {bw['copy']:.1f} GB/s")
    with tempfile.TemporaryDirectory() as d:
        hf_fp32.save_pretrained(d, safe_serialization=True)
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            ours = load_model(d, dtype=dtype).eval()
            theirs = hf_fp32 if dtype == torch.float32 else LlamaForCausalLM.from_pretrained(d, dtype=dtype).eval()
            engine = Engine(ours)
            weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
            packed = engine.fused.weights if engine.fused is not None else None
            if packed is not None:
                packed.pack()
            packed_bytes = 0 if packed is None else sum(t.numel() * t.element_size() for t in packed._buffers.values())
            row: dict = {"native": engine.fused is not None, "weight_bytes": weight_bytes,
                         "packed_bytes": packed_bytes,
                         "bandwidth_limit_tokens_per_s": {k: v * 1e9 / weight_bytes for k, v in bw.items()},
                         "batches": {}}
            results["dtypes"][dtype_name] = row
            print(f"{dtype_name}: weights {weight_bytes / 2**20:,.0f} MiB (+ {packed_bytes / 2**20:,.0f} MiB packed "
                  f"for the native step); batch-1 bandwidth limit {row['bandwidth_limit_tokens_per_s']['read']:.0f} "
                  f"tok/s (read) / {row['bandwidth_limit_tokens_per_s']['copy']:.0f} (copy)", flush=True)
            batches = args.batches if dtype == torch.float32 else args.bf16_batches
            for b in map(int, batches.split(",")):
                prompts = torch.randint(0, SMOLLM2_135M["vocab_size"], (b, args.prompt))
                res = row["batches"][b] = interleaved(engine, theirs, prompts, args.new, args.repeats, warm=4)
                print(f"  batch {b:3d}: minir1 {res['minir1_tokens_per_s']:7,.1f} tok/s   transformers "
                      f"{res['transformers_tokens_per_s']:7,.1f} tok/s   x{res['speedup_median']:.2f}", flush=True)
            del ours, engine, theirs
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
