"""Training throughput: minir1's Transformer against transformers' DeepseekV3ForCausalLM.

Same config, same weights (ours loaded from theirs), same batch; forward + backward + AdamW step.
Both run in one process, interleaved, several repeats; the median tokens/s and the ratio are reported,
along with model FLOP utilisation against a matmul peak measured in the same run.

    python benchmarks/train_step.py [--repeats 5] [--steps 5] [--dtypes fp32,bf16]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from minir1 import Transformer


def hf_config():
    from transformers import DeepseekV3Config
    return DeepseekV3Config(
        vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=1, n_group=1, topk_group=1, max_position_embeddings=512, num_nextn_predict_layers=0,
        attn_implementation="sdpa")


def matmul_peak(dtype: torch.dtype, n: int = 1024, reps: int = 20) -> float:
    """FLOP/s of a large square F.linear (the kernel the models use): this machine's practical peak."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        F.linear(a, b)
    t = time.perf_counter()
    for _ in range(reps):
        F.linear(a, b)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def train_flops_per_token(model: Transformer, seq: int) -> float:
    """6 x activated matmul parameters + 3 x the causal attention matmuls (QK^T and PV) of a forward."""
    cfg = model.config
    lookup = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size  # a gather, not a matmul
    matmul_params = model.num_parameters()["activated"] - lookup
    attn_fwd = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq / 2
    return 6 * matmul_params + 3 * attn_fwd


def cpu_has_native_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def step_fn(model, forward, batch, dtype):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()

    def step():
        with ctx:
            logits = forward(batch[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def time_steps(step, steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def interleaved_times(fns: dict, repeats: int, steps: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per step of each function, the functions taking turns in every repeat (so that machine
    noise hits all of them alike)."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            times[k].append(time_steps(f, steps))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--bf16-steps", type=int, default=1, help="steps per repeat under bf16 autocast")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    theirs = DeepseekV3ForCausalLM(hf_config()).train()
    with tempfile.TemporaryDirectory() as d:
        theirs.save_pretrained(d)
        ours = Transformer.from_pretrained(d).train()
    batch = torch.randint(0, 512, (args.batch, args.seq + 1))
    tokens = args.batch * args.seq
    flops = train_flops_per_token(ours, args.seq)
    results = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "batch": args.batch, "seq": args.seq,
               "params": ours.num_parameters(), "native_bf16": cpu_has_native_bf16(), "runs": {}}
    print(f"{results['machine']}, {results['threads']} threads, torch {torch.__version__}, "
          f"native bf16: {results['native_bf16']}", flush=True)
    for name in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        peak = matmul_peak(dtype)
        steps = {"minir1": step_fn(ours, ours, batch, dtype),
                 "transformers": step_fn(theirs, lambda x: theirs(x).logits, batch, dtype)}
        times = interleaved_times(steps, args.repeats, args.steps if name == "fp32" else args.bf16_steps)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratios = [b / a for a, b in zip(times["minir1"], times["transformers"])]
        row = {k: {"tokens_per_s": tokens / med[k], "mfu": tokens / med[k] * flops / peak} for k in med}
        row["speedup_median"] = statistics.median(ratios)
        row["matmul_peak_gflops"] = peak / 1e9
        results["runs"][name] = row
        print(f"{name}: minir1 {row['minir1']['tokens_per_s']:,.0f} tok/s (MFU {row['minir1']['mfu']:.0%}), "
              f"transformers {row['transformers']['tokens_per_s']:,.0f} tok/s "
              f"(MFU {row['transformers']['mfu']:.0%}), speed-up x{row['speedup_median']:.2f} "
              f"[matmul peak {peak / 1e9:.0f} GFLOP/s]", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
