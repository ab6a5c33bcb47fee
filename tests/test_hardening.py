"""Hostile inputs and bad moments (issue 14): routing that stays total whatever the scores, a native kernel
that refuses what it cannot index, checkpoints that are never lost or mixed, and inputs that end in one
clear error instead of a traceback. Each test failed before its fix."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minir1 import ConfigError, Engine, ModelConfig, SamplingParams, Transformer
from minir1.engine.cache import LatentCache
from minir1.engine.native.build import load
from minir1.engine.native.fused import FusedDecoder
from minir1.errors import CheckpointError
from minir1.models.deepseek_v3 import Router
from minir1.tasks import TaskError, get_task
from minir1.train import TrainConfig, TrainingError, train
from minir1.train.pretrain import PretrainStage

TASK = "arithmetic:digits=1,mul_digits=0"
native = pytest.mark.skipif(load("decode_step") is None, reason="no C++ compiler: no native kernels here")


def cli(*args: str) -> tuple[int, str]:
    """Run `minir1 ARGS` in-process; -> (exit code, stderr + stdout)."""
    import contextlib
    import io

    from minir1.cli import main
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse
            code = e.code
    return code, err.getvalue() + out.getvalue()


def digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def tiny_model(tokenizer=None, **kw) -> Transformer:
    torch.manual_seed(0)
    vocab = tokenizer.vocab_size if tokenizer is not None else 128
    return Transformer(ModelConfig.from_preset("tiny", vocab_size=vocab, hidden_size=64, num_attention_heads=2,
                                               num_nextn_predict_layers=0, **kw))


# ---- 1. routing and the native kernel ------------------------------------------------------------------

@pytest.mark.parametrize("fill", [float("nan"), float("-inf"), float("inf"), 0.0])
def test_routing_picks_k_distinct_experts_whatever_the_scores(fill):
    cfg = ModelConfig.from_preset("tiny", n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.normal_()
        router.weight[::2] = fill  # NaN / infinite / tied affinities for half the experts
        router.e_score_correction_bias[3] = fill
    x = torch.randn(32, cfg.hidden_size)
    x[5] = float("nan")
    _, ids, _ = router(x)
    assert ids.shape == (32, 4)
    assert all(len(set(row)) == 4 for row in ids.tolist())


@native
def test_nan_router_scores_give_the_same_experts_in_the_kernel_and_pytorch():
    model = tiny_model().eval()
    with torch.no_grad():
        for m in model.moe_layers():
            m.gate.weight[:, :8] = float("nan")
    ids = torch.randint(0, 128, (6, 1))
    pos = torch.full((6, 1), 3)
    loads = []
    for fused in (False, True):
        cache = LatentCache(3, 6, 16, 32, 8, torch.float32, torch.device("cpu"))
        with torch.inference_mode():
            if fused:
                decoder = FusedDecoder.for_model(model)
                decoder.refresh()
                decoder.forward(cache.kv, ids, pos)
            else:
                cache.set_positions(pos)
                model(ids, positions=pos, cache=cache)
        loads.append(model.router_load().clone())
    assert torch.equal(loads[0], loads[1])
    assert (loads[1].sum(-1) == 6 * 2).all()  # exactly k = 2 experts per token


@native
def test_a_diverged_checkpoint_cannot_crash_generation(tmp_path, tiny_tokenizer):
    model = tiny_model(tiny_tokenizer).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    engine = Engine(model, tiny_tokenizer)  # in memory (a file with NaN weights is refused: below)
    out = engine.generate([[1, 2, 3]] * 4, SamplingParams(max_new_tokens=6, temperature=0.7, n=2, seed=0))
    assert all(0 <= t < model.config.vocab_size for c in out for t in c.token_ids)


@native
def test_speculative_decoding_after_a_one_token_prompt():
    """Found by the sanitizer run: the fused prefill of a one-token prompt returned no hidden states for MTP."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=128, hidden_size=64, num_attention_heads=2)).eval()
    params = SamplingParams(max_new_tokens=6, temperature=0, speculative=True)
    outs = [Engine(model, fused=fused).generate([[5]], params)[0].token_ids for fused in (True, False)]
    assert outs[0] == outs[1] and len(outs[0]) == 6


@native
def test_the_kernel_refuses_inputs_it_cannot_index():
    model = tiny_model().eval()
    fused = FusedDecoder.for_model(model)
    kv = torch.zeros(3, 4, 16, 40)
    ids, pos = torch.ones(4, 1, dtype=torch.long), torch.zeros(4, 1, dtype=torch.long)
    fused.forward(kv, ids, pos)  # fine
    bad = {
        "logit positions": lambda: fused._run(kv, ids.view(-1), pos.view(-1), None, torch.tensor([7])),
        "cache has 2 layers": lambda: fused.forward(kv[:2].contiguous(), ids, pos),
        "cache must be": lambda: fused.forward(kv.double(), ids, pos),
        "cache must be ": lambda: fused.forward(kv.transpose(1, 2), ids, pos),
        "one per cache row": lambda: fused.forward(kv[:, :2].contiguous(), ids, pos),
        "positions in": lambda: fused.forward(kv, ids, pos + 16),
        "no MTP module": lambda: fused.mtp(kv, torch.zeros(4, 1, 64), ids, pos),
    }
    for what, call in bad.items():
        with pytest.raises(ValueError, match=what.strip()):
            call()


@native
@pytest.mark.slow
def test_the_kernel_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    """The kernel compiled with -fsanitize=address,undefined, driven with non-finite weights and activations,
    tied and duplicate scores and boundary lengths: no sanitizer report."""
    libasan = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libasan):
        pytest.skip("g++ has no AddressSanitizer runtime")
    script = r'''
import torch
from minir1 import Engine, ModelConfig, SamplingParams, Transformer
from minir1.engine.cache import LatentCache
from minir1.engine.native.fused import FusedDecoder, native_sample
for overrides in (dict(), dict(q_lora_rank=None, n_group=1, topk_group=1),
                  dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4, first_k_dense_replace=0)):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=128, hidden_size=64, num_attention_heads=2,
                                                max_position_embeddings=64, **overrides)).eval()
    for fill in (float("nan"), float("inf"), 0.0, None):
        with torch.no_grad():
            for m in model.moe_layers():
                if fill is None:
                    m.gate.weight.zero_()       # every score tied
                    m.gate.e_score_correction_bias.zero_()
                else:
                    m.gate.weight[::2] = fill
            if fill is not None and fill != 0.0:
                model.layers[0].self_attn.kv_a_proj_with_mqa.weight[0, 0] = fill
        fused = FusedDecoder.for_model(model)
        assert fused is not None
        engine = Engine(model)
        for n in (1, 2, 7):
            engine.generate([[1] * 62], SamplingParams(max_new_tokens=1, temperature=1.0, n=n, seed=0))
            engine.generate([[1, 2, 3]] * n, SamplingParams(max_new_tokens=20, temperature=0.0, seed=0))
            engine.generate([[5]], SamplingParams(max_new_tokens=10, temperature=0.9, n=n, speculative=True, seed=1))
        kv = torch.zeros(4, 3, 64, 40)
        fused.forward(kv, torch.tensor([[1], [2], [127]]), torch.tensor([[0], [63], [5]]))
        for bad in (dict(ids=torch.tensor([[128]])), dict(pos=torch.tensor([[64]]))):
            try:
                one = kv[:, :1].contiguous()
                fused.forward(one, bad.get("ids", torch.tensor([[1]])), bad.get("pos", torch.tensor([[0]])))
            except ValueError:
                pass
            else:
                raise AssertionError("not refused")
logits = torch.tensor([[float("nan")] * 50, [float("-inf")] * 50, [0.0] * 50, [float("inf")] + [0.0] * 49])
native_sample(logits, torch.tensor([1.0, 0.5, 0.0, 1.0]), torch.tensor([0.5, 0.999999, 0.0, 1.0]))
print("clean")
'''
    env = {**os.environ, "MINIR1_SANITIZE": "1", "MINIR1_CACHE": str(tmp_path), "LD_PRELOAD": libasan,
           "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
    report = res.stdout + res.stderr
    assert list(tmp_path.glob("kernels/*.so")), report   # the sanitized build was really used
    assert res.returncode == 0 and "clean" in res.stdout, report
    assert "AddressSanitizer" not in report and "runtime error" not in report, report


def test_non_finite_weights_or_config_values_are_refused_on_load(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.1.mlp.gate.weight"][0, 0] = float("nan")
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.1.mlp.gate.weight' has 1 "
                                              r"non-finite"):
        Transformer.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": float("nan")}))
    with pytest.raises(ConfigError, match=r"config.json: rms_norm_eps \(nan\) must be a finite number"):
        Transformer.from_pretrained(tmp_path)


def test_a_model_with_non_finite_weights_is_never_saved(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    before = digest(tmp_path)
    with torch.no_grad():
        model.lm_head.weight[1, 2] = float("inf")
    with pytest.raises(CheckpointError, match="refusing to save: tensor 'lm_head.weight'"):
        model.save_pretrained(tmp_path)
    assert digest(tmp_path) == before


# ---- 2-5. training never saves garbage and never loses or mixes checkpoints ---------------------------

def test_non_finite_hyperparameters_are_refused(tmp_path):
    for flags, field in ((["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"), (["--grad-clip", "nan"], "--grad-clip")):
        code, text = cli("pretrain", "--task", TASK, "--steps", "1", "--out", str(tmp_path / "x"), *flags)
        assert code == 2 and f"argument {field}: invalid finite number value" in text, text
    with pytest.raises(ValueError, match=r"lr \(inf\) must be a finite number"):
        TrainConfig(lr=float("inf")).validate()
    from minir1.train.grpo import GRPOConfig
    with pytest.raises(ValueError, match=r"epsilon \(nan\) must be a finite number"):
        GRPOConfig(epsilon=float("nan")).validate()
    assert not (tmp_path / "x").exists()


def test_an_update_that_overflows_the_weights_stops_before_anything_is_saved(tiny_tokenizer, tmp_path):
    model = tiny_model(tiny_tokenizer)
    stage = PretrainStage(get_task(TASK), tiny_tokenizer, seq_len=32, micro_batch_size=2)
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=4, batch_size=2, seq_len=32, lr=1e39, warmup_steps=0,
                      grad_clip=0, progress=False)
    with pytest.raises(TrainingError, match=r"step 1: the optimizer step made parameter '.*' non-finite"):
        train(model, tiny_tokenizer, stage, cfg)
    assert not (tmp_path / "run" / "model.safetensors").exists()


class NaNFrom(PretrainStage):
    """Pretraining whose loss turns NaN from a given step on."""

    def __init__(self, *a, nan_from: int, **kw) -> None:
        super().__init__(*a, **kw)
        self.nan_from = nan_from

    def loss(self, model, batch):
        loss, m, n = super().loss(model, batch)
        return (loss * float("nan") if self._step >= self.nan_from else loss), m, n

    def batch(self, step, micro, n_micro):
        self._step = step + 1
        return super().batch(step, micro, n_micro)


def test_a_failed_run_leaves_an_existing_checkpoint_byte_identical(tiny_tokenizer, tmp_path):
    out = tmp_path / "ckpt"
    task = get_task(TASK)
    cfg = dict(out=str(out), steps=2, batch_size=2, seq_len=32, progress=False)
    train(tiny_model(tiny_tokenizer), tiny_tokenizer, PretrainStage(task, tiny_tokenizer, 32, 2), TrainConfig(**cfg))
    before = digest(out)
    assert {"model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl", "train_config.json"} <= set(before)
    with pytest.raises(TrainingError):
        train(tiny_model(tiny_tokenizer), tiny_tokenizer, NaNFrom(task, tiny_tokenizer, 32, 2, nan_from=3),
              TrainConfig(**{**cfg, "steps": 5, "lr": 1e-4}))
    assert digest(out) == before
    # The CLI writes nothing either (the tokenizer used to be written before training).
    code, text = cli("pretrain", "--task", TASK, "--vocab-size", "384", "--steps", "1", "--batch-size", "2",
                     "--seq-len", "32", "--out", str(out), "--no-progress", "--device", "bogus")
    assert code == 1 and "--device 'bogus' is not a device" in text
    assert digest(out) == before


def test_the_final_save_is_atomic_on_a_crash_or_a_full_disk(tiny_tokenizer, tmp_path, monkeypatch):
    import minir1.models.hf.weights
    out = tmp_path / "ckpt"
    task = get_task(TASK)
    cfg = TrainConfig(out=str(out), steps=1, batch_size=2, seq_len=32, progress=False)
    train(tiny_model(tiny_tokenizer), tiny_tokenizer, PretrainStage(task, tiny_tokenizer, 32, 2), cfg)
    before = digest(out)
    real = minir1.models.hf.weights.save_file

    def full_disk(tensors, path, metadata=None):
        real(dict(list(tensors.items())[:1]), path)  # part of the file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(minir1.models.hf.weights, "save_file", full_disk)
    from minir1.files import DiskFullError
    with pytest.raises(DiskFullError, match="the disk is full"):
        train(tiny_model(tiny_tokenizer), tiny_tokenizer, PretrainStage(task, tiny_tokenizer, 32, 2),
              TrainConfig(**{**cfg.__dict__, "steps": 2}))
    assert digest(out) == before
    code, text = cli("generate", "--ckpt", str(out), "--prompt", "hi", "--max-new-tokens", "2")
    assert code == 0, text  # the previous checkpoint still loads


def test_a_fresh_run_refuses_another_runs_checkpoints_and_resume_checks_settings(tiny_tokenizer, tmp_path):
    out = tmp_path / "run"
    task = get_task(TASK)

    def run(**kw):
        cfg = TrainConfig(**{**dict(out=str(out), steps=5, batch_size=2, seq_len=32, save_every=2, keep_last=2,
                                    progress=False), **kw})
        return train(tiny_model(tiny_tokenizer), tiny_tokenizer, PretrainStage(task, tiny_tokenizer, 32, 2), cfg)

    run()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    with pytest.raises(TrainingError, match=r"holds checkpoints of an earlier run .*--resume.*--overwrite"):
        run(steps=3)
    with pytest.raises(TrainingError, match=r"--resume: .* other settings .*train.lr: 0.003 in the checkpoint, "
                                            r"0.001 now"):
        run(steps=8, resume=True, lr=1e-3)
    run(steps=3, overwrite=True)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    # keep-last orders by step number, not by name
    (out / "checkpoints" / "step-10").mkdir()
    (out / "checkpoints" / "step-10" / "trainer_state.json").write_text("{}")
    from minir1.train.loop import checkpoints
    assert [n for n, _ in checkpoints(out)] == [2, 10]


# ---- 6-8. inputs that used to end in tracebacks ----------------------------------------------------------

def qa_file(path: Path, n: int = 60) -> Path:
    path.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": str(2 * i),
                                        "solution": f"{i}+{i}={2 * i}"}) + "\n" for i in range(n)))
    return path


def test_jsonl_tasks_work_for_pretraining_and_sft(tmp_path):
    task = f"jsonl:{qa_file(tmp_path / 'qa.jsonl')}"
    common = ["--steps", "2", "--batch-size", "2", "--seq-len", "48", "--no-progress"]
    code, text = cli("pretrain", "--task", task, "--vocab-size", "384", "--hidden-size", "64",
                     "--num-attention-heads", "2", "--out", str(tmp_path / "pt"), *common)
    assert code == 0, text
    code, text = cli("sft", "--init", str(tmp_path / "pt"), "--task", task, "--out", str(tmp_path / "sft"), *common)
    assert code == 0, text
    code, text = cli("eval", "--ckpt", str(tmp_path / "sft"), "--task", task, "--n", "1000", "--max-new-tokens", "4")
    assert code == 1 and "the test split has" in text and "asked for 1000" in text


def test_unreadable_files_name_the_file_and_line(tmp_path, tiny_tokenizer):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text()
    cases = {
        "config.json": ("[" * 100_000 + "]" * 100_000, ConfigError, r"config.json: JSON nested too deeply"),
        "config.json ": (config.replace('"hidden_size"', '"hidden_\xff"').encode("latin-1"), ConfigError,
                         r"config.json: line \d+: not valid UTF-8 \(byte 0xff"),
    }
    for name, (content, error, pattern) in cases.items():
        target = tmp_path / name.strip()
        target.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(error, match=pattern):
            Transformer.from_pretrained(tmp_path)
    for key, value in (("beta_fast", "x"), ("mscale", "big")):
        scaling = dict(type="yarn", factor=4.0, original_max_position_embeddings=128, **{key: value})
        (tmp_path / "config.json").write_text(json.dumps({**json.loads(config), "rope_scaling": scaling}))
        with pytest.raises(ConfigError, match=rf"config.json: rope_scaling.{key} \('{value}'\) must be"):
            Transformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(config)
    (tmp_path / "model.safetensors.index.json").write_bytes(b'{"weight_map": {"a": "\xfe"}}')
    with pytest.raises(CheckpointError, match=r"index.json: line 1: not valid UTF-8"):
        Transformer.from_pretrained(tmp_path)
    from minir1 import Tokenizer
    from minir1.tokenizer import TokenizerError
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer_config.json").write_bytes(b'{\n"bos_token": "\xc3"}')
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: line 2: not valid UTF-8"):
        Tokenizer.from_pretrained(tmp_path / "tok")
    lines = tmp_path / "qa.jsonl"
    lines.write_bytes(b'{"question": "1+1?", "answer": "2"}\n' + b'{"question": "\xff"}\n')
    with pytest.raises(TaskError, match=r"qa.jsonl:2: not valid UTF-8"):
        get_task(f"jsonl:{lines}")
    lines.write_text('{"question": "1+1?", "answer": "2"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(TaskError, match=r"qa.jsonl:2: JSON nested too deeply"):
        get_task(f"jsonl:{lines}")


def test_bad_flags_are_clear_errors(tmp_path, tiny_tokenizer):
    ckpt = tmp_path / "ckpt"
    tiny_model(tiny_tokenizer).save_pretrained(ckpt)
    tiny_tokenizer.save_pretrained(ckpt)
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    cases = [
        (["pretrain", "--task", TASK, "--out", str(tmp_path / "file")], 1, "is an existing file"),
        (["eval", "--ckpt", str(ckpt), "--task", TASK, "--n", "2", "--out", str(tmp_path / "dir")], 1,
         "is a directory"),
        (["sample", "--ckpt", str(ckpt), "--task", TASK, "--n", "2", "--out", str(tmp_path / "dir")], 1,
         "is a directory"),
        (["generate", "--ckpt", str(ckpt), "--prompt", "hi", "--device", "bogus"], 1, "is not a device"),
        (["generate", "--ckpt", str(ckpt), "--prompt", "hi", "--stop", ""], 1, "stop strings must be non-empty"),
        (["pretrain", "--task", TASK, "--steps", "abc"], 2, "invalid integer value: 'abc'"),
        (["grpo", "--init", str(ckpt), "--task", TASK, "--dynamic-sampling", "--max-sampling-rounds", "0"], 1,
         "max_sampling_rounds (0) must be >= 1"),
    ]
    if not torch.cuda.is_available():
        cases.append((["generate", "--ckpt", str(ckpt), "--prompt", "hi", "--device", "cuda"], 1,
                      "CUDA is not available"))
    for args, want_code, message in cases:
        code, text = cli(*args)
        assert code == want_code and message in text, (args, text)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "dir", "file"]  # no stray dir.tmp


def test_dynamic_sampling_on_tied_groups_is_a_clear_error(tiny_tokenizer):
    from minir1.train.grpo import GRPOConfig, GRPOStage
    cfg = GRPOConfig(prompts_per_step=2, group_size=2, max_new_tokens=4, dynamic_sampling=True,
                     max_sampling_rounds=1)
    stage = GRPOStage(get_task(TASK), tiny_tokenizer, cfg, micro_batch_size=4,
                      reward_fns={"format": lambda r, a, t: 0.0})
    with pytest.raises(TrainingError, match=r"dynamic sampling drew 2 groups in 1 round\(s\) and in every one all "
                                            r"2 rewards were equal"):
        stage.rollout(tiny_model(tiny_tokenizer), 0)


def test_take_is_bounded_on_a_small_or_empty_split():
    task = get_task(TASK)
    assert len({task.canonical(p.question) for p in task.take(24, "test")}) == 24
    with pytest.raises(TaskError, match=r"the test split has only 24 distinct problems; asked for 25"):
        task.take(25, "test")
    assert len(task.take(500, "test", at_most=True)) == 24


# ---- 13-15. defaults that work ------------------------------------------------------------------------------

def test_the_default_micro_batch_splits_the_step_over_the_processes():
    from minir1.train.loop import resolve_micro_batch
    assert resolve_micro_batch(TrainConfig(batch_size=8), world=2).micro_batch_size == 4
    assert resolve_micro_batch(TrainConfig(batch_size=8, micro_batch_size=2), world=2).micro_batch_size == 2
    with pytest.raises(ValueError, match="cannot be split over 4 processes"):
        resolve_micro_batch(TrainConfig(batch_size=6), world=4)


def test_make_speedrun_installs_no_browser(tmp_path):
    root = Path(__file__).resolve().parent.parent
    fresh = tmp_path / "venv"  # as on a fresh clone: nothing installed yet
    speedrun = subprocess.run(["make", "-n", "-C", str(root), "speedrun", f"VENV={fresh}"], capture_output=True,
                              text=True)
    test = subprocess.run(["make", "-n", "-C", str(root), "test", f"VENV={fresh}"], capture_output=True, text=True)
    assert speedrun.returncode == 0 and "pip install" in speedrun.stdout, speedrun.stderr
    assert "chromium" not in speedrun.stdout
    assert "chromium" in test.stdout


def test_the_reward_time_of_a_batch_is_bounded(monkeypatch):
    import math_verify

    from minir1.rewards import accuracy_reward, time_budget

    def slow(*args, **kwargs):  # what a pathological expression costs math-verify
        time.sleep(1.0)
        return False

    monkeypatch.setattr(math_verify, "verify", slow)
    completion = "<think>x</think><answer>\\frac{1}{2}^{x^{y}}</answer>"
    start = time.perf_counter()
    with time_budget(2.0) as budget:
        scores = [accuracy_reward(completion, "\\sqrt{2}") for _ in range(40)]
    elapsed = time.perf_counter() - start
    assert scores == [0.0] * 40
    assert elapsed < 8, elapsed  # 40 s without the budget
    assert budget.timeouts >= 30


def test_the_micro_batch_split_changes_nothing_but_speed(tiny_tokenizer, tmp_path):
    """What makes torchrun's default micro-batch (batch / processes) give one process's result."""
    task = get_task(TASK)
    whole = PretrainStage(task, tiny_tokenizer, 32, 4).batch(3, 0, 1)
    halves = torch.cat([PretrainStage(task, tiny_tokenizer, 32, 2).batch(3, j, 2) for j in range(2)])
    assert torch.equal(whole, halves)
    weights = []
    for micro in (4, 2, 1):
        model = tiny_model(tiny_tokenizer)
        cfg = TrainConfig(out=str(tmp_path / str(micro)), steps=2, batch_size=4, micro_batch_size=micro, seq_len=32,
                          progress=False)
        train(model, tiny_tokenizer, PretrainStage(task, tiny_tokenizer, 32, micro), cfg)
        weights.append(model.state_dict())
    for other in weights[1:]:
        for k, v in weights[0].items():
            torch.testing.assert_close(other[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_kill_9_in_the_middle_of_the_final_save_loses_nothing(tiny_tokenizer, tmp_path):
    """A real SIGKILL while the weights are half written: the earlier checkpoint in --out is untouched."""
    out = tmp_path / "ckpt"
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    script = f'''
import os, signal, sys
import minir1.models.hf.weights
from minir1.cli import main
if sys.argv[1] == "kill":
    real = minir1.models.hf.weights.save_file
    def dying(tensors, path, metadata=None):
        real(dict(list(tensors.items())[:1]), path)  # part of the weights on disk, then kill -9
        os.kill(os.getpid(), signal.SIGKILL)
    minir1.models.hf.weights.save_file = dying
sys.exit(main(["pretrain", "--task", "{TASK}", "--tokenizer", "{tmp_path / 'tok'}", "--hidden-size", "64",
               "--num-attention-heads", "2", "--vocab-size", "400", "--steps", sys.argv[2], "--batch-size", "2",
               "--seq-len", "32", "--no-progress", "--out", "{out}"]))
'''
    assert subprocess.run([sys.executable, "-c", script, "ok", "1"], capture_output=True).returncode == 0
    before = digest(out)
    killed = subprocess.run([sys.executable, "-c", script, "kill", "2"], capture_output=True)
    assert killed.returncode == -9
    after = digest(out)
    assert {k: after[k] for k in before} == before  # every earlier file byte-identical
    # What a killed run can leave: its unfinished staging folder (the next save removes it) and its metrics.
    assert all(k.startswith(".staging-") or k == "metrics.jsonl.partial" for k in set(after) - set(before)), after
    code, text = cli("generate", "--ckpt", str(out), "--prompt", "hi", "--max-new-tokens", "2")
    assert code == 0, text
