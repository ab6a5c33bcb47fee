"""`minir1 <command>`: one entry point; each command maps its flags onto the config dataclasses."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

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

    from minir1.hf import read_config
    from minir1.model import ModelConfig, Transformer

    if args.ckpt:
        from pathlib import Path
        config = read_config(Path(args.ckpt) / "config.json")
    else:
        config = ModelConfig.from_preset(args.preset)
    with torch.device("meta"):  # shapes only: works for the 671B model too
        counts = Transformer(config).num_parameters()
    cache = {"bf16": config.kv_cache_bytes_per_token(2), "fp32": config.kv_cache_bytes_per_token(4)}
    if args.json:
        print(json.dumps({"config": config.to_dict(), "parameters": counts, "kv_cache_bytes_per_token": cache}))
        return 0
    def fmt(n: int) -> str:
        return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
    print(f"parameters: {fmt(counts['total'])} total, {fmt(counts['activated'])} activated per token"
          + (f", + {fmt(counts['mtp'])} in {config.num_nextn_predict_layers} MTP module(s)" if counts["mtp"] else ""))
    for dtype, c in cache.items():
        print(f"KV cache per token ({dtype}): {c['mla_latent']:,} bytes MLA latent vs {c['naive_mha']:,} bytes "
              f"naive multi-head ({c['naive_mha'] / c['mla_latent']:.1f}x)")
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


def load_for_inference(ckpt: str, device: str | None = None):
    """(model, tokenizer) from a checkpoint directory, on `device`, in eval mode."""
    from minir1.devices import resolve_device
    from minir1.model import Transformer
    from minir1.tokenizer import Tokenizer
    device = resolve_device(device)
    tokenizer = Tokenizer.from_pretrained(ckpt)
    model = Transformer.from_pretrained(ckpt, device=device).eval()
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{ckpt}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    return model, tokenizer


def _generate_args(p: argparse.ArgumentParser) -> None:
    _ckpt_args(p)
    p.add_argument("--prompt", required=True, help="the user's message (or raw text with --raw)")
    p.add_argument("--raw", action="store_true", help="continue the text as is, without the chat template")
    p.add_argument("--n", type=int, default=1, help="completions to sample")
    p.add_argument("--stats", action="store_true", help="print tokens/s (and speculative acceptance)")
    _sampling_args(p)


@command("generate", "complete one prompt and print the result")(_generate_args)
def generate(args: argparse.Namespace) -> int:
    from minir1.engine import Engine
    model, tokenizer = load_for_inference(args.ckpt, args.device)
    if args.raw or tokenizer.chat_template is None:
        ids = tokenizer.encode(args.prompt, add_bos=True)
        prefix = ""
    else:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
        prefix = "<think>\n" if tokenizer.decode(ids).endswith("<think>\n") else ""
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
    from minir1.engine import Engine
    model, tokenizer = load_for_inference(args.ckpt, args.device)
    return run_chat(Engine(model, tokenizer), _sampling_params(args), system=args.system)


# --------------------------------------------------------------------------------------------------
# training stages: every field of ModelConfig / TrainConfig is a flag
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
                        defaults: dict | None = None) -> None:
    """`--field-name` for each field of a config dataclass (None default = keep the dataclass's)."""
    import dataclasses
    from typing import get_type_hints
    hints = get_type_hints(cls)
    group = p.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name.startswith("_"):
            continue
        hint = str(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = (defaults or {}).get(f.name)
        if "dict" in hint:
            continue
        if hint == "<class 'bool'>" or hint == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif "int" in hint and "float" not in hint:
            group.add_argument(flag, type=integer, default=default, metavar="N")
        elif "float" in hint:
            group.add_argument(flag, type=number, default=default, metavar="X")
        else:
            group.add_argument(flag, default=default)


def dataclass_overrides(args: argparse.Namespace, cls: type) -> dict:
    import dataclasses
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if getattr(args, f.name, None) is not None}


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise): only rank 0 prints results and writes shared files."""
    import os
    return int(os.environ.get("RANK", "0"))


def _train_config(args: argparse.Namespace, **defaults):
    from minir1.train import TrainConfig
    from minir1.train.loop import resolve_micro_batch
    cfg = resolve_micro_batch(TrainConfig(**{**defaults, **dataclass_overrides(args, TrainConfig)}))
    cfg.validate()
    return cfg


def _stage_args(p: argparse.ArgumentParser, model_flags: bool) -> None:
    from minir1.model import ModelConfig
    from minir1.train import TrainConfig
    p.add_argument("--task", help="arithmetic[:digits=N,operands=N], countdown, or jsonl:PATH")
    add_dataclass_flags(p, TrainConfig, "training")
    if model_flags:
        add_dataclass_flags(p, ModelConfig, "model (override the preset)", skip=("model_type",))


def _pretrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="model preset to start from (default: tiny)")
    p.add_argument("--tokenizer", help="a tokenizer directory (default: train one on the task)")
    p.add_argument("--mtp-weight", type=number, default=0.3, help="λ, the weight of the MTP loss")
    _stage_args(p, model_flags=True)


@command("pretrain", "pretrain a DeepSeek-V3 model (MLA, MoE, MTP) on a task's documents")(_pretrain_args)
def pretrain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from minir1.model import ModelConfig, Transformer
    from minir1.tasks import get_task
    from minir1.tokenizer import Tokenizer
    from minir1.train import train
    from minir1.train.pretrain import PretrainStage, train_tokenizer
    if not args.task:
        raise ValueError("pretrain needs --task (arithmetic, countdown or jsonl:PATH)")
    task = get_task(args.task)
    cfg = _train_config(args, out="runs/pretrain")
    overrides = {k: v for k, v in dataclass_overrides(args, ModelConfig).items() if k != "model_type"}
    model_cfg = ModelConfig.from_preset(args.preset, **overrides)
    if args.tokenizer:
        tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    else:
        # A resumed run continues with its checkpoint's tokenizer; nothing is written to --out before the run
        # completes (the loop publishes the tokenizer with the weights).
        from minir1.train.loop import latest_checkpoint
        ckpt = latest_checkpoint(Path(cfg.out)) if cfg.resume else None
        tokenizer = (Tokenizer.from_pretrained(ckpt) if ckpt is not None
                     else train_tokenizer(task, model_cfg.vocab_size, cfg.seed, show_progress=cfg.progress))
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but vocab_size is {model_cfg.vocab_size}")
    model_cfg = model_cfg.replace(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                                  pad_token_id=tokenizer.pad_id)
    import torch
    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg)
    stage = PretrainStage(task, tokenizer, cfg.seq_len, cfg.micro_batch_size or cfg.batch_size, cfg.seed,
                          args.mtp_weight)
    result = train(model, tokenizer, stage, cfg)
    if _rank() == 0:
        print(f"pretrained {result.steps} steps; final loss {result.last_metrics.get('loss', float('nan')):.4f}; "
              f"checkpoint in {result.out}")
    return 0


def _sft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", required=True, help="checkpoint to start from")
    p.add_argument("--data", help="chat data: a .jsonl file of {\"messages\": [...]} lines")
    _stage_args(p, model_flags=False)


@command("sft", "supervised fine-tuning on chat data or a task's worked solutions (<think> format)")(_sft_args)
def sft(args: argparse.Namespace) -> int:
    from minir1.model import Transformer
    from minir1.tasks import get_task
    from minir1.tokenizer import Tokenizer
    from minir1.train import train
    from minir1.train.sft import SFTStage, load_chat_file
    if bool(args.task) == bool(args.data):
        raise ValueError("sft needs exactly one of --task NAME or --data FILE.jsonl")
    cfg = _train_config(args, out="runs/sft", lr=1e-3, warmup_steps=10)
    tokenizer = Tokenizer.from_pretrained(args.init)
    model = Transformer.from_pretrained(args.init)
    mb = cfg.micro_batch_size or cfg.batch_size
    if args.task:
        stage = SFTStage(tokenizer, cfg.seq_len, mb, task=get_task(args.task), seed=cfg.seed, data_source=args.task)
    else:
        stage = SFTStage(tokenizer, cfg.seq_len, mb, conversations=load_chat_file(args.data), seed=cfg.seed,
                         data_source=str(args.data))
    result = train(model, tokenizer, stage, cfg)
    if _rank() == 0:
        print(f"fine-tuned {result.steps} steps; final loss {result.last_metrics.get('loss', float('nan')):.4f}; "
              f"checkpoint in {result.out}")
    return 0


def _task_sampling_args(p: argparse.ArgumentParser, n_help: str, samples: int, samples_help: str,
                        temperature: float | None, temperature_help: str) -> None:
    """Flags shared by the commands that sample a checkpoint on a task's problems (eval, sample)."""
    _ckpt_args(p)
    p.add_argument("--task", required=True)
    p.add_argument("--n", type=int, default=100, help=n_help)
    p.add_argument("--samples", type=int, default=samples, help=samples_help)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=number, default=temperature, help=temperature_help)
    p.add_argument("--template", default="chat", choices=["chat", "r1-zero"])
    p.add_argument("--seed", type=int, default=0)


def _output_file(path: str | None, flag: str = "--out") -> None:
    """An output file's path is checked before the work that fills it."""
    from pathlib import Path
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {path} is a directory; name a file")
    if p.parent.exists() and not p.parent.is_dir():
        raise ValueError(f"{flag} {path}: {p.parent} is not a directory")


def _task_and_checkpoint(args: argparse.Namespace):
    """(task, model, tokenizer) for the commands declared with _task_sampling_args, flags checked first."""
    from minir1.tasks import get_task
    if args.n < 1 or args.samples < 1:
        raise ValueError(f"--n ({args.n}) and --samples ({args.samples}) must be >= 1")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens ({args.max_new_tokens}) must be >= 1")
    if args.temperature is not None and args.temperature < 0:
        raise ValueError(f"--temperature ({args.temperature}) must be >= 0")
    _output_file(args.out)
    task = get_task(args.task)
    model, tokenizer = load_for_inference(args.ckpt, args.device)
    return task, model, tokenizer


def _eval_args(p: argparse.ArgumentParser) -> None:
    _task_sampling_args(p, "held-out problems", 1, "K completions per problem (pass@K, maj@K)", None,
                        "default: 0 for one sample, 0.6 for several")
    p.add_argument("--out", help="write the results as JSON here (default: <ckpt>/eval_<task>.json)")


@command("eval", "held-out pass@1, pass@k, maj@k and format rate on a task")(_eval_args)
def evaluate_cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from minir1.evaluate import EvalConfig, evaluate
    task, model, tokenizer = _task_and_checkpoint(args)
    res = evaluate(model, tokenizer, task, EvalConfig(n=args.n, samples=args.samples, seed=args.seed,
                                                       max_new_tokens=args.max_new_tokens,
                                                       temperature=args.temperature, template=args.template))
    k = args.samples
    at_k = f"pass@{k} {res[f'pass@{k}']:.3f}  maj@{k} {res[f'maj@{k}']:.3f}  " if k > 1 else ""
    print(f"{res['task']}: {res['problems']} held-out problems x {k} sample(s): pass@1 {res['pass@1']:.3f}  "
          f"{at_k}format {res['format_rate']:.3f}  mean length {res['mean_completion_tokens']:.1f} tokens")
    safe = "".join(ch if ch.isalnum() else "_" for ch in args.task.split(":")[0])
    out = Path(args.out) if args.out else Path(args.ckpt) / f"eval_{safe}.json"
    from minir1.files import write_json
    write_json(out, res)
    print(f"written to {out}")
    return 0


def _grpo_args(p: argparse.ArgumentParser) -> None:
    from minir1.train.grpo import GRPOConfig
    p.add_argument("--init", required=True, help="checkpoint to start from (an SFT model, or a base model "
                                                 "with --template r1-zero)")
    _stage_args(p, model_flags=False)
    add_dataclass_flags(p, GRPOConfig, "GRPO")


@command("grpo", "GRPO with rule-based rewards (R1-Zero style RL)")(_grpo_args)
def grpo(args: argparse.Namespace) -> int:
    from minir1.model import Transformer
    from minir1.tasks import get_task
    from minir1.tokenizer import Tokenizer
    from minir1.train import train
    from minir1.train.grpo import GRPOConfig, GRPOStage, make_reference
    if not args.task:
        raise ValueError("grpo needs --task")
    gcfg = GRPOConfig(**dataclass_overrides(args, GRPOConfig))
    gcfg.validate()
    completions = gcfg.prompts_per_step * gcfg.group_size
    steps = args.steps if args.steps is not None else 50
    micro = min(args.micro_batch_size, completions) if args.micro_batch_size else 0  # 0: chosen for the processes
    if args.batch_size not in (None, completions):
        raise ValueError(f"GRPO's batch is prompts_per_step x group_size ({completions} completions); "
                         f"drop --batch-size ({args.batch_size}) or change those two")
    cfg = _train_config(args, out="runs/grpo", lr=1e-4, warmup_steps=0, schedule="constant",
                        batch_size=completions, micro_batch_size=micro, weight_decay=0.0,
                        route_bias_speed=0.0)
    cfg.steps = steps * gcfg.mu
    cfg.batch_size = completions
    if completions % (cfg.micro_batch_size or completions):
        raise ValueError(f"micro_batch_size ({cfg.micro_batch_size}) must divide prompts_per_step x group_size "
                         f"({completions})")
    task = get_task(args.task)
    tokenizer = Tokenizer.from_pretrained(args.init)
    model = Transformer.from_pretrained(args.init)
    ref = make_reference(model) if gcfg.beta > 0 else None
    stage = GRPOStage(task, tokenizer, gcfg, cfg.micro_batch_size or completions, cfg.seed, ref_model=ref)
    result = train(model, tokenizer, stage, cfg)
    m = result.last_metrics
    if _rank() == 0:
        print(f"GRPO {steps} steps; last reward {m.get('reward_mean', float('nan')):.3f}, accuracy "
              f"{m.get('accuracy', float('nan')):.3f}; checkpoint in {result.out}")
    return 0


def _sample_args(p: argparse.ArgumentParser) -> None:
    _task_sampling_args(p, "training problems to sample", 4, "completions per problem", 0.7, "sampling temperature")
    p.add_argument("--out", required=True, help="a .jsonl file of verified chat examples, for `minir1 sft --data`")


@command("sample", "rejection sampling: keep verified, well-formatted completions as SFT data")(_sample_args)
def sample_cmd(args: argparse.Namespace) -> int:
    from minir1.train.grpo import rejection_sample, write_jsonl
    task, model, tokenizer = _task_and_checkpoint(args)
    rows = rejection_sample(model, tokenizer, task, args.n, args.samples, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, template=args.template, seed=args.seed)
    write_jsonl(rows, args.out)
    print(f"kept {len(rows)} of {args.n * args.samples} completions ({len(rows) / (args.n * args.samples):.0%}); "
          f"written to {args.out}")
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
        print(f"  {name:16s} pass@1 {row['pass@1']:.3f}  format {row['format_rate']:.2f}")
    print(f"total {report['total_seconds'] / 60:.1f} min")
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

    from minir1.server import serve
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
    from minir1.files import DiskFullError
    from minir1.train.loop import TrainingError
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
