"""R1's rule-based rewards, including against adversarial completions."""

from __future__ import annotations

import math
import random
import time

import pytest

from minir1.rewards import (
    RewardWeights,
    accuracy_reward,
    answers_match,
    combined_reward,
    extract_answer,
    format_reward,
    parse_number,
    safe_reward,
)
from minir1.tasks import get_task

GOOD = "<think>\n12 + 30 = 42\n</think>\n<answer>42</answer>"


@pytest.mark.parametrize("completion, fmt", [
    (GOOD, 1.0),
    ("  <think>x</think>   <answer> 42 </answer>  \n", 1.0),
    ("<think>x</think><answer>42</answer>extra", 0.0),                       # something after
    ("<think>x</think>words<answer>42</answer>", 0.0),                      # text between the parts
    ("<answer>42</answer><think>x</think>", 0.0),                           # wrong order
    ("<think>x</think><answer>1</answer><answer>42</answer>", 0.0),         # several answers: the hack
    ("<think>a<think>b</think></think><answer>42</answer>", 0.0),           # nested thinking
    ("<think>x<answer>42</answer></think><answer>42</answer>", 0.0),       # answer inside the thinking
    ("<think>x</think><answer>4<answer>2</answer></answer>", 0.0),          # nested answer
    ("12 + 30 = 42", 0.0),
    ("", 0.0),
])
def test_format_reward(completion, fmt):
    assert format_reward(completion) == fmt


@pytest.mark.parametrize("response, answer, ok", [
    ("42", "42", True), ("42.0", "42", True), ("42.000", "42", True), ("+42", "42", True), ("1,234", "1234", True),
    ("0.5", "1/2", True), ("-7", "-7", True), ("43", "42", False), ("forty-two", "42", False),
    ("٤٢", "42", False),   # other digit systems compare as text, never by value
    ("４２", "42", False),
    ("1e999", "42", False), ("1e999", "1e999", True),
    ("\\frac{1}{2}", "0.5", True),
    ("Paris", "paris", True),
])
def test_answers_match(response, answer, ok):
    assert answers_match(response, answer) is ok


def test_accuracy_only_counts_the_single_answer_after_the_thinking():
    assert accuracy_reward(GOOD, "42") == 1.0
    assert accuracy_reward(GOOD.replace("42</answer>", "42.0</answer>"), "42") == 1.0
    assert accuracy_reward("<think>the answer is <answer>42</answer></think>", "42") == 0.0   # only inside think
    assert accuracy_reward("<think>x</think><answer>42</answer><answer>42</answer>", "42") == 0.0
    assert accuracy_reward("<answer>42</answer>", "42") == 0.0   # no thinking before it
    assert accuracy_reward("<think>x</think> 42", "42") == 0.0
    assert extract_answer("<think>x</think><answer> 42 </answer>") == "42"


def test_combined_reward_needs_format_for_accuracy():
    w = RewardWeights(format=1.0, accuracy=3.0)
    assert combined_reward(GOOD, "42", weights=w) == 1.0
    assert combined_reward(GOOD, "41", weights=w) == 0.25
    # a correct answer with a broken format earns nothing for accuracy
    assert combined_reward(GOOD + " trailing", "42", weights=w) == 0.0
    assert accuracy_reward(GOOD + " trailing", "42") == 1.0


ADVERSARIAL = {
    "many answer tags": "<think>x</think>" + "<answer>42</answer>" * 10_000,
    "1e999": "<think>x</think><answer>1e999</answer>",
    "1e999999999": "<think>x</think><answer>1e999999999</answer>",
    "10,000 digits": "<think>x</think><answer>" + "9" * 10_000 + "</answer>",
    "deep nesting": "<think>" * 50_000 + "x" + "</think>" * 50_000 + "<answer>42</answer>",
    "1 MB": "<think>" + "".join(random.Random(0).choices("abc 0123456789<>/", k=1_000_000))
            + "</think><answer>42</answer>",
    "unicode": "<think>½ ⁴² ٤٢ 𝟒𝟐</think><answer>𝟒𝟐</answer>",
    "nul bytes": "<think>\x00\x00</think><answer>\x0042</answer>",
    "latex bomb": "<think>x</think><answer>" + "\\frac{" * 400 + "1" + "}" * 400 + "</answer>",
}


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_adversarial_completions_are_scored_fast_and_never_raise(name):
    completion = ADVERSARIAL[name]
    for fn, args in [(format_reward, (completion,)), (accuracy_reward, (completion, "42")),
                     (combined_reward, (completion, "42")), (accuracy_reward, (completion, "\\frac{1}{2}")),
                     (accuracy_reward, (completion, "(1 + 2) * 3 = 9", get_task("countdown")))]:
        start = time.perf_counter()
        value = fn(*args)
        assert time.perf_counter() - start < 1.0, (name, fn.__name__)
        assert isinstance(value, float) and 0.0 <= value <= 1.0
    # The format needs exactly one pair of each tag; accuracy needs one answer tag after the thinking.
    expected_format = 1.0 if name in ("1 MB", "unicode", "nul bytes", "1e999", "1e999999999", "10,000 digits",
                                      "latex bomb") else 0.0
    expected_accuracy = 1.0 if name in ("1 MB", "deep nesting") else 0.0
    assert format_reward(completion) == expected_format
    assert accuracy_reward(completion, "42") == expected_accuracy
    assert combined_reward(completion, "42") == (1.0 if expected_format and expected_accuracy else
                                                 combined_reward(completion, "-1"))


def test_parse_number_bounds():
    assert parse_number("42") == 42 and parse_number("1e3") == 1000
    assert parse_number("1e999") is None and parse_number("9" * 10_000) is None and parse_number("٤٢") is None


def test_safe_reward_turns_failures_into_zero(caplog):
    def boom(completion: str, answer: str) -> float:
        raise RuntimeError("bad reward")

    def nan(completion: str, answer: str) -> float:
        return math.nan
    assert safe_reward(boom, GOOD, "42") == 0.0
    assert safe_reward(nan, GOOD, "42") == 0.0
    assert "bad reward" in caplog.text and "nan" in caplog.text


def test_countdown_checker_parses_and_never_evals():
    task = get_task("countdown")
    answer = "(20 + 65) + 62 = 147"
    assert task.check("62 + 65 + 20", answer)
    assert task.check("(62 + 20) + 65 = 147", answer)
    assert not task.check("62 + 65 + 20 + 0", answer)      # a number not in the set
    assert not task.check("62 + 85", answer)               # numbers not used exactly once
    assert not task.check("__import__('os').system('true')", answer)
    assert not task.check("62 * 65 / 0 + 20", answer)
    for p in task.take(20):
        assert task.check(p.answer, p.answer)


def test_latex_verdicts_are_cached_and_the_verifier_warms_up_before_a_run():
    from minir1 import rewards
    rewards.warm_up_verifier()  # imports math-verify and sympy: later comparisons take milliseconds
    before = rewards._math_verify_equal.cache_info().hits
    assert rewards.answers_match("\\frac{1}{4}", "0.25") and rewards.answers_match("\\frac{1}{4}", "0.25")
    assert not rewards.answers_match("\\frac{1}{3}", "0.25")
    assert rewards._math_verify_equal.cache_info().hits == before + 1  # the repeated answer was not parsed again
