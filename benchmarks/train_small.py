"""Training throughput of the `small` preset: MoE against a dense model of about equal activated
parameters, fp32 against bf16 autocast, with model FLOP utilisation against a matmul peak measured in
the same run. Forward + backward + AdamW on random tokens; no MTP module (so both models do exactly the
work their parameter counts say).

    python benchmarks/train_small.py [--repeats 5] [--steps 3] [--batch 16] [--seq 256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_step import cpu_has_native_bf16, interleaved_times, matmul_peak, step_fn, train_flops_per_token  # noqa: E402

from minir1 import ModelConfig, Transformer  # noqa: E402


def models() -> dict[str, Transformer]:
    moe_cfg = ModelConfig.from_preset("small", num_nextn_predict_layers=0)
    # Dense: every layer a SwiGLU whose width equals the MoE layer's activated width
    # ((top-k + shared) × moe_intermediate_size).
    width = (moe_cfg.num_experts_per_tok + moe_cfg.n_shared_experts) * moe_cfg.moe_intermediate_size
    dense_cfg = moe_cfg.replace(first_k_dense_replace=moe_cfg.num_hidden_layers, intermediate_size=width)
    torch.manual_seed(0)
    moe = Transformer(moe_cfg)
    # the MoE model's first (dense) layer keeps its wider MLP; the dense model's are all `width`
    return {"moe": moe, "dense": Transformer(dense_cfg)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--bf16-batch", type=int, default=2, help="bf16 is emulated on CPUs without native bf16: "
                                                             "a smaller batch keeps the run short")
    ap.add_argument("--json")
    args = ap.parse_args()
    ms = models()
    results: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__,
                     "native_bf16": cpu_has_native_bf16(), "params": {k: m.num_parameters() for k, m in ms.items()},
                     "runs": {}}
    print(f"{torch.get_num_threads()} threads, native bf16: {results['native_bf16']}")
    for name, m in ms.items():
        n = m.num_parameters()
        print(f"{name}: {n['total'] / 1e6:.2f}M total, {n['activated'] / 1e6:.2f}M activated")
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        peak = matmul_peak(dtype)
        batch_size = args.batch if dtype_name == "fp32" else args.bf16_batch
        steps = args.steps if dtype_name == "fp32" else 1
        repeats = args.repeats if dtype_name == "fp32" else 3
        batch = torch.randint(0, 4096, (batch_size, args.seq + 1))
        fns = {k: step_fn(m.train(), m, batch, dtype) for k, m in ms.items()}
        times = interleaved_times(fns, repeats, steps, warmup=1)
        tokens = batch_size * args.seq
        for k in fns:
            tps = tokens / statistics.median(times[k])
            mfu = tps * train_flops_per_token(ms[k], args.seq) / peak
            results["runs"][f"{k}_{dtype_name}"] = {"tokens_per_s": tps, "mfu": mfu, "peak_gflops": peak / 1e9}
            print(f"{k:5s} {dtype_name}: {tps:9,.0f} tokens/s  MFU {mfu:5.1%}  (matmul peak {peak / 1e9:,.1f} GFLOP/s, "
                  f"batch {batch_size}x{args.seq})", flush=True)
        ratio = statistics.median(d / m for m, d in zip(times["moe"], times["dense"]))
        results["runs"][f"moe_vs_dense_{dtype_name}"] = ratio
        print(f"  MoE / dense speed ({dtype_name}): x{ratio:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
