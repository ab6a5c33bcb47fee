"""The command line: help, info, and errors that speak to the user."""

from __future__ import annotations

import json
import subprocess
import sys

from minir1 import ModelConfig, Transformer
from minir1.cli import main
from minir1.engine.native.build import load as load_kernel


def test_info_preset(capsys):
    assert main(["info", "--preset", "deepseek-v3"]) == 0
    out = capsys.readouterr().out
    assert "671.03B total, 37.55B activated" in out and "70,272 bytes MLA latent" in out


def test_info_checkpoint_json(tmp_path, capsys):
    Transformer(ModelConfig.from_preset("tiny")).save_pretrained(tmp_path)
    assert main(["info", "--ckpt", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["hidden_size"] == 128 and data["parameters"]["total"] > 1e6


def test_info_bad_checkpoint_is_a_clean_error(tmp_path, capsys):
    assert main(["info", "--ckpt", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minir1 info: error:") and "config.json" in err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "minir1", "--help"], capture_output=True, text=True, check=True)
    assert "info" in out.stdout


def test_loading_a_checkpoint_does_not_import_dynamo(tmp_path):
    """Drawing an init on the meta device imports torch._dynamo (about 2 s): loading a checkpoint, of either
    family, must not, or every generate / chat / serve start-up pays for it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Transformer(ModelConfig.from_preset("tiny")).save_pretrained(tmp_path / "v3")
    Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "qwen2")
    code = ("import sys; from minir1.checkpoint import load_model; "
            "models = [load_model(p) for p in sys.argv[1:]]; "
            "print(all(m.embed_tokens.weight.abs().sum() > 0 for m in models), 'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "v3"), str(tmp_path / "qwen2")],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"], out.stdout + out.stderr


# ---- generate and chat ------------------------------------------------------------------------------------

import io  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from minir1.chat import DIM, RESET, ThinkingRenderer, run_chat  # noqa: E402
from minir1.engine import Engine, SamplingParams  # noqa: E402


@pytest.fixture
def chat_ckpt(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tiny_tokenizer.vocab_size))
    model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    return tmp_path


def test_generate_prints_a_completion(chat_ckpt, capsys):
    assert main(["generate", "--ckpt", str(chat_ckpt), "--prompt", "1 + 2?", "--max-new-tokens", "5",
                 "--temperature", "0", "--stats"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("<think>\n") and "tokens/s" in out.err
    assert ("fused native decode" if load_kernel("decode_step") is not None else "PyTorch decode") in out.err


def test_generate_n_and_speculative(chat_ckpt, capsys):
    assert main(["generate", "--ckpt", str(chat_ckpt), "--prompt", "hi", "--max-new-tokens", "4", "--n", "2",
                 "--seed", "1", "--speculative", "--stats"]) == 0
    out = capsys.readouterr()
    assert "--- sample 2" in out.out and "MTP acceptance" in out.err


def test_generate_bad_flags_are_clean_errors(chat_ckpt, capsys):
    assert main(["generate", "--ckpt", str(chat_ckpt), "--prompt", "x", "--max-new-tokens", "0"]) == 1
    assert "max_new_tokens must be a positive integer" in capsys.readouterr().err


def test_thinking_renderer_dims_thinking_and_drops_tags():
    out = io.StringIO()
    r = ThinkingRenderer(out, color=True, thinking=True)
    for piece in ["2 + 2", " is 4</th", "ink>\n<ans", "wer>4</answer>"]:
        r.feed(piece)
    r.close()
    assert out.getvalue() == f"{DIM}2 + 2 is 4{RESET}\n4{RESET}\n"


def test_chat_session_history_reset_and_interrupt(chat_ckpt, monkeypatch):
    from minir1 import load
    model, tok = load(chat_ckpt, device="cpu")
    engine = Engine(model, tok)
    prompts_seen = []
    real_stream = engine.stream

    def spy(prompts, params):
        prompts_seen.append(tok.decode(prompts[0]))
        yield from real_stream(prompts, params)
    monkeypatch.setattr(engine, "stream", spy)
    lines = iter(["hello", "again", "/reset", "fresh", "/exit"])
    out = io.StringIO()
    assert run_chat(engine, SamplingParams(max_new_tokens=6, temperature=0), read=lambda _: next(lines), out=out) == 0
    assert prompts_seen[0].endswith("<｜User｜>hello<｜Assistant｜><think>\n")
    assert "<｜User｜>hello<｜Assistant｜>" in prompts_seen[1]
    assert prompts_seen[1].endswith("again<｜Assistant｜><think>\n")
    assert "hello" not in prompts_seen[2]  # /reset cleared the history
    assert "(conversation cleared)" in out.getvalue()

    # Ctrl-C during an answer stops that answer; the chat goes on.
    def interrupted(prompts, params):
        yield from list(real_stream(prompts, params))[:2]
        raise KeyboardInterrupt
    monkeypatch.setattr(engine, "stream", interrupted)
    lines = iter(["question", "/exit"])
    out = io.StringIO()
    assert run_chat(engine, SamplingParams(max_new_tokens=6, temperature=0), read=lambda _: next(lines), out=out) == 0
    assert "[stopped]" in out.getvalue()
