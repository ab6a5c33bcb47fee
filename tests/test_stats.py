"""pass@k, majority voting and the 95% intervals against values computed by hand."""

from __future__ import annotations

import math
import random

import pytest

from minir1.stats import excludes_zero, majority_correct, paired_bootstrap, pass_at_k, wilson


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 0, 4) == 0.0          # c = 0
    assert pass_at_k(4, 4, 1) == 1.0 and pass_at_k(4, 4, 4) == 1.0          # c = n
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - (3 / 4) * (2 / 3))         # 1 - C(3,2)/C(4,2) = 0.5
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)                   # 1 - C(3,3)/C(5,3)
    assert pass_at_k(10, 3, 10) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_majority_vote_by_hand_with_ties():
    assert majority_correct([("7", True), ("7", True), ("8", False)]) == 1.0
    assert majority_correct([("8", False), ("8", False), ("7", True)]) == 0.0
    assert majority_correct([("7", True), ("8", False)]) == 0.5              # a two-way tie: half the time
    assert majority_correct([("7", True), ("7", True), ("8", False), ("8", False), ("9", False), ("9", False)]) \
        == pytest.approx(1 / 3)                                              # a three-way tie
    assert majority_correct([]) == 0.0                                       # no parseable answer


def test_wilson_by_hand():
    # p = 0.5, n = 100: centre 0.5, half-width z*sqrt(0.25/100 + z^2/40000) / (1 + z^2/100)
    z = 1.959963984540054
    half = z * math.sqrt(0.25 / 100 + z * z / 40000) / (1 + z * z / 100)
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.5 - half) and hi == pytest.approx(0.5 + half)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)
    lo, hi = wilson(0, 20)                                                   # never 0 wide at the edges
    assert lo == 0.0 and hi == pytest.approx(z * z / 20 / (1 + z * z / 20))
    lo, hi = wilson(20, 20)
    assert hi == 1.0 and lo == pytest.approx(1 - z * z / 20 / (1 + z * z / 20))
    assert wilson(0, 0) == (0.0, 1.0)


def test_paired_bootstrap_by_hand():
    same = [1.0, 0.0, 1.0, 0.5] * 25
    diff, (lo, hi) = paired_bootstrap(same, same)
    assert diff == 0 and lo == hi == 0 and not excludes_zero((lo, hi))
    a, b = [1.0] * 100, [0.0] * 100                                          # every pair differs by exactly 1
    assert paired_bootstrap(a, b) == (1.0, (1.0, 1.0))
    rng = random.Random(0)
    a = [float(rng.random() < 0.7) for _ in range(500)]
    b = [float(rng.random() < 0.5) for _ in range(500)]
    diff, (lo, hi) = paired_bootstrap(a, b, seed=1)
    se = math.sqrt(sum((x - y - diff) ** 2 for x, y in zip(a, b)) / 499 / 500)
    assert lo == pytest.approx(diff - 1.96 * se, abs=0.012) and hi == pytest.approx(diff + 1.96 * se, abs=0.012)
    assert excludes_zero((lo, hi)) and paired_bootstrap(a, b, seed=1) == (diff, (lo, hi))   # seeded
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_bootstrap([1.0], [1.0, 0.0])


def test_evaluation_counts_answers_with_and_without_working_by_hand(tiny_tokenizer, monkeypatch):
    """Four problems, two samples each, from a stand-in engine: the thinking rate and the accuracy of each kind
    of answer are counts anyone can redo."""
    import minir1.evaluate as evaluate_mod
    from minir1.engine.batch import Completion
    from minir1.evaluate import EvalConfig, evaluate
    from minir1.tasks import get_task

    task = get_task("arithmetic:digits=3")
    problems = task.take(4, "test", 0)

    def response(i: int, s: int) -> str:
        p = problems[i]
        answer = p.answer if (i, s) in {(0, 0), (0, 1), (1, 0), (2, 1)} else "-1"  # right on 4 of 8
        if (i, s) in {(2, 0), (2, 1), (3, 0)}:
            return f"\n</think>\n<answer>{answer}</answer>"            # no working (the prompt opened <think>)
        if (i, s) == (3, 1):
            return "no tags at all"                                  # invalid: neither kind
        return f"working\n</think>\n<answer>{answer}</answer>"

    class StandIn:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def generate(self, prompts, params):
            return [Completion(i, s, [1, 2, 3], response(i, s), None, "stop")
                    for i in range(len(prompts)) for s in range(params.n)]

    monkeypatch.setattr(evaluate_mod, "Engine", StandIn)
    r = evaluate(None, tiny_tokenizer, task, EvalConfig(n=4, samples=2))
    assert r["pass@1"] == pytest.approx(4 / 8)
    assert r["format_rate"] == pytest.approx(7 / 8)
    assert r["thinking_rate"] == pytest.approx(4 / 8)            # (0,0) (0,1) (1,0) (1,1)
    assert r["accuracy_thinking"] == pytest.approx(3 / 4)        # (0,0) (0,1) (1,0)
    assert r["accuracy_no_thinking"] == pytest.approx(1 / 3)     # (2,1) of (2,0) (2,1) (3,0)
