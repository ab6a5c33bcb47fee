"""The public pieces of the layout: `minir1.load`, the stage functions and their typed configs (one set of
flags for the CLI and the speedrun), `minir1 distill`, and the engine's DecodeBatch driven directly."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import get_type_hints

import pytest
import torch

import minir1
from minir1 import CheckpointError, DecodeBatch, Engine, ModelConfig, SamplingParams, Transformer
from minir1.cli import build_parser, config_from_args, main


def tiny(tokenizer, **kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, hidden_size=64,
                                               num_attention_heads=2, num_nextn_predict_layers=0,
                                               eos_token_id=tokenizer.eos_id, **kw))


def saved(tmp_path: Path, tokenizer, name: str = "ckpt", **kw) -> Path:
    path = tmp_path / name
    tiny(tokenizer, **kw).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---- minir1.load ----------------------------------------------------------------------------------------

def test_load_gives_an_eval_model_and_the_checkpoints_tokenizer(tmp_path, tiny_tokenizer):
    path = saved(tmp_path, tiny_tokenizer)
    model, tok = minir1.load(path, device="cpu")
    assert not model.training and model.device.type == "cpu"
    assert tok.encode("1 + 2") == tiny_tokenizer.encode("1 + 2")
    ids = torch.tensor([tok.encode("1 + 2")])
    torch.testing.assert_close(model(ids), Transformer.from_pretrained(path)(ids), atol=0, rtol=0)
    model16, _ = minir1.load(path, dtype=torch.bfloat16, device="cpu")
    assert model16.dtype == torch.bfloat16


def test_load_refuses_a_tokenizer_larger_than_the_model(tmp_path, tiny_tokenizer):
    path = tmp_path / "small_vocab"
    torch.manual_seed(0)
    Transformer(ModelConfig.from_preset("tiny", vocab_size=64, num_nextn_predict_layers=0)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    with pytest.raises(CheckpointError, match=f"{path}: the tokenizer has {tiny_tokenizer.vocab_size} tokens"):
        minir1.load(path, device="cpu")


# ---- stage configs: one set of flags for the CLI and the speedrun ------------------------------------------

STAGES = {"pretrain": "minir1.train.pretrain:PretrainConfig", "sft": "minir1.train.sft:SFTConfig",
          "grpo": "minir1.train.grpo:GRPOStageConfig", "sample": "minir1.train.sample:SampleConfig",
          "distill": "minir1.train.distill:DistillConfig", "eval": "minir1.evaluate:EvaluateConfig"}


def config_class(spec: str) -> type:
    import importlib
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def leaf_fields(cls: type) -> set[str]:
    hints, out = get_type_hints(cls), set()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out |= leaf_fields(hints[f.name])
        elif "fields_of" in f.metadata:
            out |= leaf_fields(f.metadata["fields_of"]) - {"model_type"}
        elif "dict" not in str(hints[f.name]):  # a nested mapping (rope_scaling) is no flag
            out.add(f.name)
    return out


@pytest.mark.parametrize("command", STAGES)
def test_every_field_of_a_stage_config_is_a_flag_of_its_command(command):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    flags = {o.lstrip("-").replace("-", "_") for a in sub._actions for o in a.option_strings if o.startswith("--")}
    assert leaf_fields(config_class(STAGES[command])) <= flags


def test_flags_map_onto_the_same_config_the_speedrun_builds():
    from minir1.train.grpo import GRPOStageConfig
    from minir1.train.sft import SFTConfig
    args = build_parser().parse_args(["sft", "--init", "a", "--task", "arithmetic", "--lr", "0.01", "--steps", "7"])
    base = SFTConfig(init="a", task="arithmetic")
    assert config_from_args(SFTConfig, args) == dataclasses.replace(
        base, train=dataclasses.replace(base.train, lr=0.01, steps=7))
    assert base.train.lr == 1e-3 and base.train.warmup_steps == 10  # the stage's own defaults, not the loop's
    args = build_parser().parse_args(["grpo", "--init", "a", "--task", "countdown", "--group-size", "4"])
    cfg = config_from_args(GRPOStageConfig, args)
    assert cfg.grpo.group_size == 4 and cfg.train.lr == 1e-4 and cfg.train.steps == 50


# ---- minir1 distill -------------------------------------------------------------------------------------

def test_distill_fine_tunes_the_student_on_the_teachers_verified_traces(tmp_path, tiny_tokenizer, monkeypatch):
    """The composition: the teacher's rejection sampling writes the data, the student is fine-tuned on it
    (the sampler is replaced by one that 'verifies' worked solutions: a random teacher solves nothing)."""
    from minir1.tasks import get_task
    from minir1.train import distill as distill_mod
    from minir1.train.sample import SampleResult, write_jsonl
    teacher, student = saved(tmp_path, tiny_tokenizer, "teacher"), saved(tmp_path, tiny_tokenizer, "student")
    seen = {}

    def fake_sample(cfg):
        seen.update(ckpt=cfg.ckpt, n=cfg.n, samples=cfg.samples)
        rows = [{"messages": [{"role": "user", "content": p.question},
                              {"role": "assistant", "content": f"<think>\n{p.solution}\n</think>\n<answer>"
                                                               f"{p.answer}</answer>"}]}
                for p in get_task("arithmetic:digits=1,mul_digits=0").take(6, "train", 0)]
        write_jsonl(rows, cfg.out)
        return SampleResult(Path(cfg.out), len(rows), cfg.n * cfg.samples)

    monkeypatch.setattr(distill_mod, "sample", fake_sample)
    out = tmp_path / "distilled"
    assert main(["distill", "--teacher", str(teacher), "--init", str(student), "--task",
                 "arithmetic:digits=1,mul_digits=0", "--problems", "6", "--samples", "2", "--steps", "4",
                 "--batch-size", "2", "--seq-len", "96", "--out", str(out), "--no-progress"]) == 0
    assert seen == {"ckpt": str(teacher), "n": 6, "samples": 2}
    assert len((out / "distill_data.jsonl").read_text().splitlines()) == 6
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4 and json.loads((out / "train_config.json").read_text())["stage"] == "sft"
    before, after = Transformer.from_pretrained(student), Transformer.from_pretrained(out)
    assert not torch.equal(before.lm_head.weight, after.lm_head.weight)


def test_distill_says_so_when_the_teacher_solves_nothing(tmp_path, tiny_tokenizer, capsys):
    teacher, student = saved(tmp_path, tiny_tokenizer, "teacher"), saved(tmp_path, tiny_tokenizer, "student")
    code = main(["distill", "--teacher", str(teacher), "--init", str(student), "--task", "arithmetic",
                 "--problems", "2", "--samples", "1", "--max-new-tokens", "4", "--out", str(tmp_path / "d")])
    assert code == 1
    assert "solved none of 2 samples" in capsys.readouterr().err


# ---- DecodeBatch, driven directly ---------------------------------------------------------------------

def test_rows_that_join_a_running_batch_get_the_tokens_they_get_alone(tiny_tokenizer):
    model = tiny(tiny_tokenizer).eval()
    engine = Engine(model, tiny_tokenizer)
    a, b = tiny_tokenizer.encode("1 + 2 ="), tiny_tokenizer.encode("40 + 5 = 4")
    pa = SamplingParams(max_new_tokens=12, temperature=1.0, seed=1, stop_token_ids=[], n=2)
    pb = SamplingParams(max_new_tokens=7, temperature=0.7, top_p=0.9, seed=2, stop_token_ids=[])
    alone = {"a": [c.token_ids for c in engine.generate([a], pa)], "b": [c.token_ids for c in engine.generate([b], pb)]}

    batch = DecodeBatch(model, tiny_tokenizer, fused=engine.fused)
    rows_a = [row for row, _ in batch.add([a], pa)]
    for _ in range(3):
        batch.step()
    rows_b = [row for row, _ in batch.add([b], pb)]
    assert len(batch) == 3
    while batch.rows:
        batch.step()
        batch.retire()
    assert [r.tokens for r in rows_a] == alone["a"] and [r.tokens for r in rows_b] == alone["b"]
    assert [batch.completion(r).finish_reason for r in rows_a + rows_b] == ["length"] * 3


def test_a_cancelled_row_leaves_at_the_next_retire_and_the_others_are_unchanged(tiny_tokenizer):
    model = tiny(tiny_tokenizer).eval()
    p = SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[])
    prompts = [tiny_tokenizer.encode("3 + 4 ="), tiny_tokenizer.encode("5 + 6 =")]
    expected = [c.token_ids for c in Engine(model, tiny_tokenizer).generate(prompts, p)]
    batch = DecodeBatch(model, tiny_tokenizer)
    first, second = (row for row, _ in batch.add(prompts, p))
    batch.step()
    first.cancel()
    assert batch.retire() == [first] and batch.rows == [second]
    while batch.rows:
        batch.step()
        batch.retire()
    assert len(first.tokens) == 2 and second.tokens == expected[1]


def test_decode_batch_refuses_bad_prompts_without_a_traceback_from_inside(tiny_tokenizer):
    batch = DecodeBatch(tiny(tiny_tokenizer).eval(), tiny_tokenizer)
    p = SamplingParams(max_new_tokens=2)
    assert batch.add([], p) == []
    with pytest.raises(ValueError, match="prompt 1: empty"):
        batch.add([[5], []], p)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        batch.add([[10**6]], p)
    with pytest.raises(ValueError, match="2 prompts but 1 SamplingParams"):
        batch.add([[5], [6]], [p])
    assert len(batch) == 0
