"""Loading a real-sized checkpoint: wall time and peak resident memory of `minir1.load_model` against
transformers' `from_pretrained`, on a random Qwen2 model with Qwen2.5-0.5B's shapes (hidden 896, 24 layers,
14 heads, 2 KV heads, intermediate 4864, vocab 151,936, tied; 494M parameters), stored in bf16 and sharded
(`--shard-mb`, default 200 MB, so several shards and an index).

Each load runs in a fresh process; the peak RSS of that process (VmHWM) minus its RSS after the imports
is divided by the loaded model's bytes (target: <= 1.3). transformers memory-maps the files and reads nothing
at load time, so the peak through the first forward (8 tokens) is reported too: that is when its weights
come into memory. Repeats alternate minir1 and transformers; medians.

    python benchmarks/load.py [--repeats 3] [--shard-mb 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6)

CHILD = r"""
import json, sys, time
import torch
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
rss = lambda: status("VmRSS")
which, path = sys.argv[1], sys.argv[2]
if which == "minir1":
    from minir1.checkpoint import load_model
    load = lambda: load_model(path)
else:
    from transformers import AutoModelForCausalLM
    load = lambda: AutoModelForCausalLM.from_pretrained(path, dtype="auto")
base = rss()
t = time.perf_counter()
model = load()
dt = time.perf_counter() - t
peak = status("VmHWM")  # not ru_maxrss: Linux carries that over from the parent through fork and exec
size = sum(p.numel() * p.element_size() for p in model.parameters())
dtypes = sorted({str(p.dtype) for p in model.parameters()})
after_load = rss() - base
with torch.no_grad():  # transformers maps the files and reads nothing at load: the first forward faults pages in
    model(torch.arange(8)[None])
peak_forward = status("VmHWM") - base
print(json.dumps({"seconds": dt, "peak_over_base": peak - base, "model_bytes": size, "dtypes": dtypes,
                  "after_load_over_base": after_load, "peak_through_first_forward": peak_forward}))
"""


def run(which: str, path: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, which, path], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shard-mb", type=int, default=200)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B)).to(torch.bfloat16)
        model.save_pretrained(d, max_shard_size=f"{args.shard_mb}MB")
        shards = len(list(Path(d).glob("*.safetensors")))
        del model
        results: dict = {"shards": shards, "runs": {"minir1": [], "transformers": []}}
        for r in range(args.repeats):
            for which in (("minir1", "transformers") if r % 2 == 0 else ("transformers", "minir1")):
                results["runs"][which].append(run(which, d))
        for which, runs in results["runs"].items():
            size = runs[0]["model_bytes"]
            ratio = statistics.median(x["peak_over_base"] / size for x in runs)
            secs = statistics.median(x["seconds"] for x in runs)
            fwd = statistics.median(x["peak_through_first_forward"] / size for x in runs)
            results[which] = {"seconds": secs, "peak_rss_over_model": ratio, "model_bytes": size,
                              "peak_rss_through_first_forward_over_model": fwd, "dtypes": runs[0]["dtypes"]}
            print(f"{which:12s}: {secs:5.2f} s, peak RSS {ratio:.2f}x the model's {size / 2**20:,.0f} MiB "
                  f"({', '.join(runs[0]['dtypes'])}), {fwd:.2f}x through the first forward; {shards} shards",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
