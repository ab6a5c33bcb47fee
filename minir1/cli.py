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
    except (FileNotFoundError, ConfigError, CheckpointError, TokenizerError) as e:
        print(f"minir1 {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
