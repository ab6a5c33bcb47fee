"""GRPO's rollouts with this checkout's native decode kernel against a baseline commit's, in one process:
the repack after a weight update (`PackedWeights.pack`: MLA's absorption and the panel packing), then whole
rollouts (repack, prefill and the decode to the end), interleaved, on the same prompts and seeds. Both must
give the same tokens (asserted), since neither the step's arithmetic nor the absorption's rounding changed.

The baseline's decode_step.cpp and common.h come from `git show BASELINE:...` and are compiled with the
flags of minir1/engine/native/build.py; its absorption is `absorb_reference` (the float64 PyTorch ops the
baseline ran). The shape is the CLI benchmark's (benchmarks/grpo_cli_vs_trl.py): 2 prompts x 8 samples, at
most 64 new tokens, temperature 1, on its SFT-trained checkpoint (made here unless --ckpt names one).

    python benchmarks/rollout_kernel_ab.py [--baseline c713d1a] [--ckpt DIR --questions QA.jsonl] [--pairs 40]
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from grpo_cli_vs_trl import trained_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def baseline_kernel(commit: str, where: Path) -> ctypes.CDLL:
    from minir1.engine.native import build
    for name in ("decode_step.cpp", "common.h"):
        source = subprocess.run(["git", "show", f"{commit}:minir1/engine/native/{name}"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
        (where / name).write_text(source)
    lib_dir = build._torch_lib()
    link = [f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}"] if (lib_dir / "libgomp.so.1").exists() else []
    subprocess.run(["g++", *build.FLAGS, str(where / "decode_step.cpp"), *link, "-o", str(where / "base.so")],
                   check=True)
    return ctypes.CDLL(str(where / "base.so"))


def run(ckpt: Path, questions: Path, baseline: str, pairs: int) -> None:
    import torch

    import minir1.engine.native.fused as fused
    from minir1.checkpoint import load_model
    from minir1.engine import Engine, SamplingParams
    from minir1.engine.native import build
    from minir1.prompting import build_prompt
    from minir1.tasks import get_task
    from minir1.tokenizer import Tokenizer

    tokenizer, model = Tokenizer.from_pretrained(ckpt), load_model(ckpt)
    prompts = [build_prompt(tokenizer, p.question, "chat")[0] for p in get_task(f"jsonl:{questions}").take(80, "train")]
    engine = Engine(model, tokenizer)
    engine.generate(prompts[:2], SamplingParams(max_new_tokens=8, n=8))
    params = list(model.parameters())
    with tempfile.TemporaryDirectory() as d:
        libs = {"this": build.load("decode_step"), "baseline": baseline_kernel(baseline, Path(d))}
        decoders = {"this": engine.fused, "baseline": fused.FusedDecoder(model, libs["baseline"])}
        absorbs = {"this": fused.absorb, "baseline": fused.absorb_reference}

        def use(name: str) -> None:
            build._loaded["decode_step"] = libs[name]
            fused.absorb, engine.fused = absorbs[name], decoders[name]

        def updated() -> None:  # what an optimizer step does to the weights, as the engine sees it
            with torch.no_grad():
                for p in params:
                    p.mul_(1.0)
            torch.autograd.graph.increment_version(params)

        packs: dict[str, list[float]] = {"this": [], "baseline": []}
        rollouts: dict[str, list[float]] = {"this": [], "baseline": []}
        tokens = {"this": hashlib.sha256(), "baseline": hashlib.sha256()}
        try:
            for i in range(pairs):
                for name in (("baseline", "this") if i % 2 else ("this", "baseline")):
                    use(name)
                    updated()
                    t = time.perf_counter()
                    decoders[name].weights.pack()
                    packs[name].append(time.perf_counter() - t)
                    updated()
                    t = time.perf_counter()
                    outs = engine.generate(prompts[2 * (i % 40):2 * (i % 40) + 2],
                                           SamplingParams(max_new_tokens=64, temperature=1.0, n=8, seed=i))
                    rollouts[name].append(time.perf_counter() - t)
                    for o in outs:
                        tokens[name].update(str(o.token_ids).encode())
        finally:
            use("this")
    assert tokens["this"].digest() == tokens["baseline"].digest(), "the two kernels must give the same tokens"
    for what, times in (("repack after an update", packs), ("16 rollouts, repack included", rollouts)):
        skip = 4  # warm-up pairs
        ratio = statistics.median(b / a for a, b in zip(times["this"][skip:], times["baseline"][skip:]))
        print(f"{what}: this {statistics.median(times['this'][skip:]) * 1e3:.2f} ms, {baseline} "
              f"{statistics.median(times['baseline'][skip:]) * 1e3:.2f} ms (medians of {pairs - skip} pairs); "
              f"median ratio x{ratio:.2f}")
    print("same tokens on both: yes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="c713d1a", help="the commit whose kernel to compare against")
    ap.add_argument("--ckpt", type=Path)
    ap.add_argument("--questions", type=Path)
    ap.add_argument("--pairs", type=int, default=40)
    args = ap.parse_args()
    with trained_checkpoint(ap, args.ckpt, args.questions) as (ckpt, questions):
        run(ckpt, questions, args.baseline, args.pairs)


if __name__ == "__main__":
    main()
