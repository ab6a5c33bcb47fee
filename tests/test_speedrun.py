"""`minir1 speedrun` at a minimal size: every stage runs, every artefact is written, the report has every
stage, `transformers` loads the final checkpoint, and a second start skips finished stages."""

from __future__ import annotations

import json

import pytest
import torch

from minir1.report import STAGE_ROWS
from minir1.speedrun import SpeedrunConfig


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from minir1.cli import main
    out = tmp_path_factory.mktemp("speedrun")
    assert main(["speedrun", "--preset", "minimal", "--out", str(out)]) == 0
    return out


def test_every_stage_and_artefact(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["stages"]) == set(STAGE_ROWS)
    heldout = [json.loads(x) for x in (run_dir / "heldout.jsonl").read_text().splitlines()]
    for row in report["stages"].values():
        for key in ("pass@1", "maj@2", "format_rate", "mean_thinking_tokens"):
            assert 0 <= row[key] <= (1 if key != "mean_thinking_tokens" else 1e9), (key, row)
        lo, hi = row["pass@1_ci95"]
        assert 0 <= lo <= row["pass@1"] <= hi <= 1 and hi > lo
        assert row["problems_distinct"] == row["problems"] == len(heldout)
        assert 0 <= row["thinking_rate"] <= row["format_rate"]
        for key in ("accuracy_thinking", "accuracy_no_thinking"):
            assert row[key] is None or 0 <= row[key] <= 1
    assert len({h["question"] for h in heldout}) == len(heldout) and all(h["answer"] for h in heldout)
    assert set(report["findings"]) == {"grpo_minus_sft", "distilled_minus_rl_student", "cold_start_minus_r1_zero",
                                       "distilled_minus_cold_start_student", "grpo_minus_worked_sft"}
    # The cold start mixes in answers without working; its reference (sft_worked) has none.
    cold, worked = (json.loads((run_dir / d / "train_config.json").read_text())["sft"] for d in ("sft", "sft_worked"))
    assert cold["no_think_fraction"] == SpeedrunConfig().cold_start_no_think > 0 and "no_think_fraction" not in worked
    assert report["findings"]["distilled_minus_rl_student"]["stages"] == ["student_distill", "student_zero"]
    zero = [json.loads(x) for x in (run_dir / "r1_zero" / "metrics.jsonl").read_text().splitlines()]
    assert len(zero) == SpeedrunConfig.preset("minimal").grpo_steps and "eval_pass@1" in zero[0]
    assert json.loads((run_dir / "r1_zero" / "train_config.json").read_text())["grpo"]["template"] == "r1-zero"
    for f in report["findings"].values():
        lo, hi = f["ci95"]
        assert lo <= f["difference_points"] <= hi
        assert f["reproduced"] == (lo > 0 and f["difference_points"] >= f["min_points"])
    assert report["findings"]["grpo_minus_sft"]["min_points"] == 10
    assert set(report["parameters"]) == {"teacher", "student"}
    teacher, student = report["parameters"]["teacher"], report["parameters"]["student"]
    assert 3 <= teacher["total"] / student["total"] <= 7, "the student is about 5x smaller"
    for d in ("student_base", "student_distill", "student_zero", "student_grpo"):  # a dense student, as R1's (§2.4)
        assert json.loads((run_dir / d / "config.json").read_text())["model_type"] == "qwen2", d
    assert teacher["activated"] < teacher["total"]
    for key in ("cpu", "threads", "torch", "git_commit"):
        assert report["environment"][key]
    assert {"base", "sft", "grpo", "r1_zero", "rs_sft", "student_distill", "student_grpo"} <= set(report["seconds"])
    assert 0 <= report["speculative"]["acceptance_rate"] <= 1 and report["speculative"]["speedup"] > 0
    # What the run trained on, against the task's problem space: pretraining and SFT count what they drew.
    scale, cfg = report["scale"], report["config"]
    stage_metrics = [json.loads(x) for x in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert scale["per_stage"]["sft"] == sum(int(m["documents"]) for m in stage_metrics) >= cfg["sft_steps"] * \
        cfg["batch_size"]
    assert scale["per_stage"]["base"] > cfg["pretrain_steps"] and scale["per_stage"]["grpo"] == \
        cfg["grpo_steps"] * cfg["prompts_per_step"]
    assert scale["trained_problems_at_most"] == sum(scale["per_stage"].values())
    from minir1.tasks import get_task
    assert scale["problem_space"] == get_task(cfg["task"]).problem_space()
    for png in ("loss.png", "grpo.png", "expert_load.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (run_dir / "report.md").read_text()
    assert all(f"`{s}`" in md for s in STAGE_ROWS) and "minir1 chat --ckpt" in md
    for d in ("base", "sft", "sft_worked", "grpo", "rs_sft", "final", "student_base", "student_distill",
              "student_grpo"):
        assert (run_dir / d / "config.json").is_file() and (run_dir / d / "tokenizer.json").is_file(), d
    grpo_rows = [json.loads(x) for x in (run_dir / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(grpo_rows) == SpeedrunConfig.preset("minimal").grpo_steps


def test_transformers_loads_the_final_checkpoint_with_the_same_logits(run_dir):
    from transformers import AutoModelForCausalLM

    from minir1 import Transformer
    theirs = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()
    ours = Transformer.from_pretrained(run_dir / "final").eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)


def test_transformers_loads_the_dense_student_with_the_same_logits(run_dir):
    from transformers import AutoModelForCausalLM

    from minir1.checkpoint import load_model
    theirs = AutoModelForCausalLM.from_pretrained(run_dir / "student_distill").eval()
    ours = load_model(run_dir / "student_distill").eval()
    assert type(theirs).__name__ == "Qwen2ForCausalLM"
    ids = torch.randint(0, ours.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)


def test_a_second_start_continues_from_the_last_finished_stage(run_dir, capsys):
    from minir1.cli import main
    state = json.loads((run_dir / "speedrun_state.json").read_text())
    del state["stages"]["speculative"]  # as if the first run had been stopped during this stage
    (run_dir / "speedrun_state.json").write_text(json.dumps(state))
    before = (run_dir / "final" / "model.safetensors").stat().st_mtime_ns
    assert main(["speedrun", "--preset", "minimal", "--out", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "base: done in an earlier run" in out and "student_grpo: done in an earlier run" in out
    assert "[speedrun] speculative ..." in out
    assert (run_dir / "final" / "model.safetensors").stat().st_mtime_ns == before
    assert "speculative" in json.loads((run_dir / "speedrun_state.json").read_text())["stages"]


def test_a_claim_of_a_size_needs_the_difference_to_reach_it():
    from minir1.report import finding

    def stage(passes: list[float]) -> dict:
        return {"eval": {"pass@1": sum(passes) / len(passes), "format_rate": 1.0, "mean_completion_tokens": 9.0,
                         "per_problem": [{"question": f"q{i}", "pass@1": p} for i, p in enumerate(passes)]}}

    # 400 problems: b solves the first 200, a solves those and 24 more: +6 points, an interval well above zero.
    stages = {"a": stage([1.0] * 224 + [0.0] * 176), "b": stage([1.0] * 200 + [0.0] * 200)}
    f = finding(stages, "a", "b", "claim")
    assert f["difference_points"] == pytest.approx(6.0) and f["ci95"][0] > 0 and f["reproduced"]
    f = finding(stages, "a", "b", "claim", min_points=10.0)
    assert f["ci95"][0] > 0 and not f["reproduced"] and f["min_points"] == 10.0
    stages["a"] = stage([1.0] * 250 + [0.0] * 150)  # +12.5
    assert finding(stages, "a", "b", "claim", min_points=10.0)["reproduced"]
    assert not finding(stages, "b", "a", "claim")["reproduced"]  # a drop is never a reproduction


def test_unknown_preset_and_setting():
    with pytest.raises(ValueError, match="unknown speedrun preset"):
        SpeedrunConfig.preset("laptop")
    with pytest.raises(ValueError, match="unknown speedrun setting"):
        SpeedrunConfig.preset("cpu", nonsense=1)


def test_bad_settings_fail_before_the_first_stage(tmp_path, capsys):
    from minir1.cli import main
    assert main(["speedrun", "--preset", "minimal", "--group-size", "1", "--out", str(tmp_path)]) == 1
    assert "group_size (1) must be >= 2" in capsys.readouterr().err
    assert not (tmp_path / "tokenizer").exists()
    assert main(["speedrun", "--preset", "minimal", "--grpo-steps", "0", "--out", str(tmp_path)]) == 1
    assert "grpo_steps (0)" in capsys.readouterr().err
    assert main(["speedrun", "--preset", "minimal", "--qk-rope-head-dim", "7", "--out", str(tmp_path)]) == 1
    assert "qk_rope_head_dim (7) must be even" in capsys.readouterr().err
    assert not (tmp_path / "tokenizer").exists()  # the teacher's widths are checked before anything runs


def test_chat_works_on_the_final_checkpoint(run_dir):
    import io

    from minir1 import load
    from minir1.chat import run_chat
    from minir1.engine import Engine, SamplingParams
    model, tok = load(run_dir / "final", device="cpu")
    lines = iter(["What is 3 + 4?", "/exit"])
    out = io.StringIO()
    assert run_chat(Engine(model, tok), SamplingParams(max_new_tokens=8, temperature=0), read=lambda _: next(lines),
                    out=out) == 0
    assert out.getvalue().count("\n") >= 2  # the help line, then the streamed reply


def test_the_lanes_run_one_after_another_with_no_parallel(tmp_path, capsys):
    """`--no-parallel` (and any machine without a second core) runs the second lane's stages in this process,
    before the student's distillation needs its base, and writes no side-lane log."""
    from minir1.cli import main
    assert main(["speedrun", "--preset", "minimal", "--no-parallel", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    order = [line.split()[1] for line in out.splitlines() if line.startswith("[speedrun] ") and line.endswith(" ...")]
    assert order.index("base") < order.index("sft_worked") < order.index("r1_zero") < order.index("student_distill")
    assert order.index("student_base") < order.index("student_distill") and "second process" not in out
    assert not (tmp_path / "side_lane.log").exists()
    state = json.loads((tmp_path / "speedrun_state.json").read_text())
    assert all(s["done"] for s in state["stages"].values()) and len(state["stages"]) == 16
    report = json.loads((tmp_path / "report.json").read_text())
    assert 0 < report["wall_seconds"] and report["total_seconds"] > 0


def test_the_teacher_lane_fails_clearly_when_the_second_lane_died(tmp_path):
    """Waiting for a stage of a lane whose process has exited without finishing it raises, naming the stage and
    the lane's log, instead of waiting forever."""
    import multiprocessing

    from minir1.errors import TrainingError
    from minir1.speedrun import Speedrun
    run = Speedrun(SpeedrunConfig.preset("minimal", out=str(tmp_path)))
    lane = multiprocessing.get_context("spawn").Process(target=int)  # exits at once, having done nothing
    lane.start()
    lane.join()
    with pytest.raises(TrainingError, match=r"stage student_base: the second lane stopped .*side_lane\.log"):
        run.wait_for("student_base", "teacher", run.side_lane_stopped(lane))
    with run._locked() as state:  # once the stage is recorded, waiting returns
        state["stages"]["student_base"] = {"done": True, "seconds": 1.0}
    run.wait_for("student_base", "teacher", run.side_lane_stopped(lane))


def test_the_parallel_run_recorded_every_stage_of_both_lanes(run_dir):
    """The module's run had two lanes (a second process on this 2+-core CPU): the second lane's stages are in the
    one state file, and its output in side_lane.log (and in the run's own output, printed when both were done)."""
    import os
    if (os.cpu_count() or 1) < 2 or torch.cuda.is_available():
        pytest.skip("one lane on this machine")
    state = json.loads((run_dir / "speedrun_state.json").read_text())
    log = (run_dir / "side_lane.log").read_text()
    for name in ("student_base", "student_zero", "student_sft", "student_grpo", "sft_worked", "r1_zero"):
        assert state["stages"][name]["done"] and f"[speedrun] {name} finished" in log
