"""`minir1 <command>`: one entry point; each command maps its flags onto the config dataclasses."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str):
    """Register `fn(args) -> exit code` as `minir1 NAME`, with `add_args(parser)` declaring its flags."""
    def wrap(add_args: Callable[[argparse.ArgumentParser], None]):
        def register(fn: Callable[[argparse.Namespace], int]):
            COMMANDS[name] = (help, add_args, fn)
            return fn
        return register
    return wrap


# --------------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------------

def _info_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="tiny", help="a model preset: tiny, small, deepseek-v2-lite, deepseek-v3")
    src.add_argument("--ckpt", help="a checkpoint directory (Hugging Face layout)")
    p.add_argument("--json", action="store_true", help="print JSON")


@command("info", "parameter counts and KV-cache size of a preset or checkpoint")(_info_args)
def info(args: argparse.Namespace) -> int:
    import torch

    from minir1.checkpoint import build_model, read_config
    from minir1.models.deepseek_v3 import ModelConfig

    config = read_config(args.ckpt) if args.ckpt else ModelConfig.from_preset(args.preset)
    with torch.device("meta"):  # shapes only: works for the 671B model too
        counts = build_model(config).num_parameters()
    cache = {"bf16": config.kv_cache_bytes_per_token(2), "fp32": config.kv_cache_bytes_per_token(4)}
    if args.json:
        print(json.dumps({"config": config.to_dict(), "parameters": counts, "kv_cache_bytes_per_token": cache}))
        return 0
    def fmt(n: int) -> str:
        return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
    print(f"parameters: {fmt(counts['total'])} total, {fmt(counts['activated'])} activated per token"
          + (f", + {fmt(counts['mtp'])} in {config.num_nextn_predict_layers} MTP module(s)" if counts["mtp"] else "")
          + f" ({config.model_type})")
    for dtype, c in cache.items():
        kind = next(k for k in c if k != "naive_mha")  # mla_latent (DeepSeek) or gqa (the dense families)
        print(f"KV cache per token ({dtype}): {c[kind]:,} bytes {'MLA latent' if kind == 'mla_latent' else 'GQA'} "
              f"vs {c['naive_mha']:,} bytes naive multi-head ({c['naive_mha'] / c[kind]:.1f}x)")
    return 0


# --------------------------------------------------------------------------------------------------
# generate / chat
# --------------------------------------------------------------------------------------------------

def _ckpt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint directory (model + tokenizer, Hugging Face layout)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")


def _sampling_args(p: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=number, default=0.6, help="0 = greedy (default 0.6, as R1 recommends)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=number, default=0.95)
    g.add_argument("--min-p", type=number, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    g.add_argument("--speculative", action="store_true", help="MTP self-speculative decoding")


def _sampling_params(args: argparse.Namespace, **extra):
    from minir1.engine import SamplingParams
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, seed=args.seed, stop=list(args.stop),
                          speculative=args.speculative, **extra)


def _generate_args(p: argparse.ArgumentParser) -> None:
    _ckpt_args(p)
    p.add_argument("--prompt", required=True, help="the user's message (or raw text with --raw)")
    p.add_argument("--raw", action="store_true", help="continue the text as is, without the chat template")
    p.add_argument("--n", type=int, default=1, help="completions to sample")
    p.add_argument("--stats", action="store_true", help="print tokens/s (and speculative acceptance)")
    _sampling_args(p)


@command("generate", "complete one prompt and print the result")(_generate_args)
def generate(args: argparse.Namespace) -> int:
    from minir1.checkpoint import load
    from minir1.engine import Engine
    from minir1.reasoning import opened_reasoning
    model, tokenizer = load(args.ckpt, device=args.device)
    if args.raw or tokenizer.chat_template is None:
        ids = tokenizer.encode_prompt(args.prompt)
        prefix = ""
    else:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
        prefix = opened_reasoning(tokenizer, ids)
    engine = Engine(model, tokenizer)
    outs = engine.generate([ids], _sampling_params(args, n=args.n))
    for out in outs:
        if len(outs) > 1:
            print(f"--- sample {out.sample_index + 1} ({out.finish_reason}) ---")
        print(prefix + out.text)
    if args.stats:
        st = engine.last_stats
        line = f"[{st['generated_tokens']} tokens in {st['seconds']:.2f}s, {st['tokens_per_s']:.1f} tokens/s"
        if "acceptance_rate" in st:
            line += f", MTP acceptance {st['acceptance_rate']:.0%}"
        line += ", fused native decode" if engine.fused is not None else ", PyTorch decode"
        print(line + "]", file=sys.stderr)
    return 0


def _chat_args(p: argparse.ArgumentParser) -> None:
    _ckpt_args(p)
    p.add_argument("--system", default=None, help="a system prompt")
    _sampling_args(p, max_new_tokens=1024)


@command("chat", "interactive chat in the terminal (/reset, /exit; Ctrl-C stops an answer)")(_chat_args)
def chat(args: argparse.Namespace) -> int:
    from minir1.chat import run_chat
    from minir1.checkpoint import load
    from minir1.engine import Engine
    model, tokenizer = load(args.ckpt, device=args.device)
    return run_chat(Engine(model, tokenizer), _sampling_params(args), system=args.system)


# --------------------------------------------------------------------------------------------------
# Stage commands: the flags are the fields of the stage's config dataclass (and of the configs nested in
# it), so a field added to a stage's config is a flag here and a setting for the speedrun at once.
# --------------------------------------------------------------------------------------------------

def integer(value: str) -> int | None:
    """argparse type for integer flags ("none" = unset); its name is what argparse's error shows."""
    return None if value.lower() == "none" else int(value)


def number(value: str) -> float:
    """argparse type for float flags; rejects nan and inf, which no setting means."""
    x = float(value)
    if x != x or x in (float("inf"), float("-inf")):
        raise ValueError(value)
    return x


number.__name__ = "finite number"


def add_dataclass_flags(p: argparse.ArgumentParser, cls: type, title: str, skip: Sequence[str] = (),
                        seen: set[str] | None = None) -> None:
    """`--field-name` for each field of a config dataclass, recursing into nested config dataclasses and into
    dict fields whose metadata names the dataclass of their keys (`fields_of`). A flag left out keeps the
    dataclass's default (None); a field without a default is a required flag."""
    import dataclasses
    from typing import get_type_hints
    hints = get_type_hints(cls)
    seen = set() if seen is None else seen
    group = p.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name.startswith("_"):
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            add_dataclass_flags(p, hint, f"{f.name} settings", seen=seen)
            continue
        if "fields_of" in f.metadata:
            add_dataclass_flags(p, f.metadata["fields_of"], f"{f.name} (override the preset)", skip=("model_type",),
                                seen=seen)
            continue
        if "dict" in str(hint):
            continue
        if f.name in seen:  # one flag namespace per command: a clash is a bug in the configs
            raise TypeError(f"{cls.__name__}.{f.name}: a flag --{f.name.replace('_', '-')} exists already")
        seen.add(f.name)
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        kw: dict[str, Any] = {"help": f.metadata.get("help"), "required": required, "default": None}
        hint = str(hint)
        if hint in ("<class 'bool'>", "bool"):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif "int" in hint and "float" not in hint:
            group.add_argument(flag, type=integer, metavar="N", **kw)
        elif "float" in hint:
            group.add_argument(flag, type=number, metavar="X", **kw)
        else:
            group.add_argument(flag, **kw)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """The config dataclass `cls` with the flags given on the command line (see add_dataclass_flags)."""
    import dataclasses
    from typing import get_type_hints
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            base = f.default_factory() if f.default_factory is not dataclasses.MISSING else hint()
            kwargs[f.name] = dataclasses.replace(base, **dataclass_overrides(args, hint))
        elif "fields_of" in f.metadata:
            kwargs[f.name] = {k: v for k, v in dataclass_overrides(args, f.metadata["fields_of"]).items()
                              if k != "model_type"}
        elif getattr(args, f.name, None) is not None:
            kwargs[f.name] = getattr(args, f.name)
    return cls(**kwargs)


def dataclass_overrides(args: argparse.Namespace, cls: type) -> dict:
    import dataclasses
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if getattr(args, f.name, None) is not None}


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise): only rank 0 prints results and writes shared files."""
    import os
    return int(os.environ.get("RANK", "0"))


def stage_command(name: str, help: str, config: str):
    """Register a stage as `minir1 NAME`: its flags are the fields of the config class `config`
    ("module:Class", imported when the command is used), and `fn(cfg)` runs it."""
    def config_class() -> type:
        import importlib
        module, cls = config.split(":")
        return getattr(importlib.import_module(module), cls)

    def register(fn: Callable[[Any], int]):
        def run(args: argparse.Namespace) -> int:
            return fn(config_from_args(config_class(), args))
        COMMANDS[name] = (help, lambda p: add_dataclass_flags(p, config_class(), name), run)
        return fn
    return register


def _trained(what: str, result: Any) -> None:
    if _rank() == 0:
        print(f"{what} {result.steps} steps; final loss {result.last_metrics.get('loss', float('nan')):.4f}; "
              f"checkpoint in {result.out}")


@stage_command("pretrain", "pretrain a DeepSeek-V3 model (MLA, MoE, MTP) on a task's documents",
               "minir1.train.pretrain:PretrainConfig")
def pretrain_cmd(cfg: Any) -> int:
    from minir1.train.pretrain import pretrain
    _trained("pretrained", pretrain(cfg))
    return 0


@stage_command("sft", "supervised fine-tuning on chat data or a task's worked solutions (<think> format)",
               "minir1.train.sft:SFTConfig")
def sft_cmd(cfg: Any) -> int:
    from minir1.train.sft import sft
    _trained("fine-tuned", sft(cfg))
    return 0


@stage_command("grpo", "GRPO with rule-based rewards (R1-Zero style RL)", "minir1.train.grpo:GRPOStageConfig")
def grpo_cmd(cfg: Any) -> int:
    from minir1.train.grpo import grpo
    result = grpo(cfg)
    m = result.last_metrics
    if _rank() == 0:
        print(f"GRPO {cfg.train.steps} steps; last reward {m.get('reward_mean', float('nan')):.3f}, accuracy "
              f"{m.get('accuracy', float('nan')):.3f}; checkpoint in {result.out}")
    return 0


@stage_command("sample", "rejection sampling: keep verified, well-formatted completions as SFT data",
               "minir1.train.sample:SampleConfig")
def sample_cmd(cfg: Any) -> int:
    from minir1.train.sample import sample
    r = sample(cfg)
    print(f"kept {r.kept} of {r.sampled} completions ({r.kept / r.sampled:.0%}); written to {r.out}")
    return 0


@stage_command("distill", "distillation: SFT a student on a teacher's verified traces (R1 §2.4)",
               "minir1.train.distill:DistillConfig")
def distill_cmd(cfg: Any) -> int:
    from minir1.train.distill import distill
    r = distill(cfg)
    if _rank() == 0:
        print(f"the teacher's verified traces: {r.data.kept} of {r.data.sampled} samples, in {r.data.out}")
    _trained("distilled: fine-tuned", r.student)
    return 0


@stage_command("eval", "held-out pass@1, pass@k, maj@k and format rate on a task", "minir1.evaluate:EvaluateConfig")
def evaluate_cmd(cfg: Any) -> int:
    from minir1.evaluate import evaluate_checkpoint
    res = evaluate_checkpoint(cfg)
    k = cfg.eval.samples
    at_k = f"pass@{k} {res[f'pass@{k}']:.3f}  maj@{k} {res[f'maj@{k}']:.3f}  " if k > 1 else ""
    lo, hi = res["pass@1_ci95"]
    print(f"{res['task']}: {res['problems_distinct']} distinct held-out problems x {k} sample(s): pass@1 "
          f"{res['pass@1']:.3f} (95% CI {lo:.3f}-{hi:.3f})  {at_k}format {res['format_rate']:.3f}  "
          f"thinking {res['thinking_rate']:.3f}  mean length {res['mean_completion_tokens']:.1f} tokens")
    if cfg.save:
        print(f"written to {cfg.out_path()}")
    return 0


def _speedrun_args(p: argparse.ArgumentParser) -> None:
    from minir1.speedrun import SpeedrunConfig
    p.add_argument("--preset", default=None, help="cpu (about 15 minutes on 2 cores), gpu (about an hour on one "
                                                   "GPU) or minimal (seconds, for tests); default: gpu if CUDA "
                                                   "is available, else cpu")
    add_dataclass_flags(p, SpeedrunConfig, "speedrun (override the preset)")


@command("speedrun", "the whole R1 recipe end to end, with a report (resumable)")(_speedrun_args)
def speedrun(args: argparse.Namespace) -> int:
    import torch

    from minir1.speedrun import SpeedrunConfig, run_speedrun
    preset = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    overrides = dataclass_overrides(args, SpeedrunConfig)
    report = run_speedrun(SpeedrunConfig.preset(preset, **overrides))
    for name, row in report["stages"].items():
        thinking = row.get("thinking_rate")  # absent from an evaluation made before it was measured
        print(f"  {name:16s} pass@1 {row['pass@1']:.3f}  format {row['format_rate']:.2f}"
              + (f"  thinking {thinking:.2f}" if thinking is not None else ""))
    print(f"total {report['wall_seconds'] / 60:.1f} min (wall time; the stages' own times add up to "
          f"{report['total_seconds'] / 60:.1f} min)")
    return 0


def _serve_args(p: argparse.ArgumentParser) -> None:
    _ckpt_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 "
                                                  "(default: $MINIR1_API_KEY if set, else no key)")
    p.add_argument("--max-batch", type=int, default=32, help="rows (requests x n) decoded together")
    p.add_argument("--served-model-name", default=None, help="the model name clients use (default: minir1)")
    p.add_argument("--max-request-bytes", type=int, default=None,
                   help="larger request bodies get 413 (default: room for a full context, at least 1 MiB)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="without --api-key only Host headers naming this machine (localhost, 127.0.0.1, [::1], "
                        "the bound address) are served, against DNS rebinding; add a name (repeatable)")
    p.add_argument("--allow-any-host", action="store_true", help="accept any Host header (e.g. behind a proxy)")


@command("serve", "an OpenAI/DeepSeek-compatible API with continuous batching, and a web chat at /")(_serve_args)
def serve_cmd(args: argparse.Namespace) -> int:
    import os

    from minir1.serve.app import serve
    if not 0 < args.port < 65536:
        raise ValueError(f"--port ({args.port}) must be between 1 and 65535")
    if args.max_batch < 1:
        raise ValueError(f"--max-batch ({args.max_batch}) must be >= 1")
    if args.max_request_bytes is not None and args.max_request_bytes < 1024:
        raise ValueError(f"--max-request-bytes ({args.max_request_bytes}) must be >= 1024")
    serve(args.ckpt, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("MINIR1_API_KEY"),
          max_batch=args.max_batch, served_model_name=args.served_model_name, device=args.device,
          max_request_bytes=args.max_request_bytes, allowed_hosts=None if args.allow_any_host else args.allowed_host)
    return 0


# --------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minir1", description="DeepSeek-R1's whole system, end to end.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help, description=help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from minir1.errors import TrainingError
    from minir1.files import DiskFullError
    try:
        return COMMANDS[args.command][2](args)
    except (FileNotFoundError, ValueError, TrainingError, DiskFullError) as e:  # config, checkpoint, data, disk
        print(f"minir1 {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"minir1 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
