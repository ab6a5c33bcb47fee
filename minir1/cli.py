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
    g.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default 0.6, as R1 recommends)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--min-p", type=float, default=0.0)
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
    import torch

    from minir1.model import Transformer
    from minir1.tokenizer import Tokenizer
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
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
    from minir1.hf import CheckpointError
    from minir1.model import ConfigError
    from minir1.tokenizer import TokenizerError
    try:
        return COMMANDS[args.command][2](args)
    except (FileNotFoundError, ValueError, ConfigError, CheckpointError, TokenizerError) as e:
        print(f"minir1 {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
