"""DeepSeek-R1's rule-based rewards (R1 §2.2.2): a format reward and an accuracy reward.

The completion is the assistant's whole response, including its opening `<think>` whether the model
or the chat template wrote it. A valid response is exactly

    <think> ... </think> <answer> ... </answer>

with white space allowed around the parts and nothing after: one pair of each tag, none nested,
none repeated (several answer tags are the known reward hack). Only the content of that single answer
tag is checked for accuracy. Every reward returns a float in [0, 1], never raises on model output, and
runs in time linear in the completion's length (no backtracking regular expressions, no `eval`).

Numbers compare by value ("42.0" matches "42", "1/2" matches "0.5"), written with ASCII digits;
other digit systems compare as text. LaTeX answers are checked with math-verify when it is installed.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from minir1.tokenizer import ANSWER, END_ANSWER, END_THINK, THINK

log = logging.getLogger(__name__)

TAGS = (THINK, END_THINK, ANSWER, END_ANSWER)
MAX_NUMBER_CHARS = 400          # longer "numbers" compare as text: parsing them is not worth the risk
MAX_EXPONENT = 400
MAX_LATEX_CHARS = 1000
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_FRACTION = re.compile(r"([+-]?\d+)\s*/\s*(\d+)", re.ASCII)


def parse_response(completion: str) -> tuple[str, str] | None:
    """(thinking, answer) if the completion has R1's exact format, else None."""
    if not isinstance(completion, str):
        return None
    counts = [completion.count(t) for t in TAGS]
    if counts != [1, 1, 1, 1]:
        return None
    body = completion.strip()
    if not body.startswith(THINK) or not body.endswith(END_ANSWER):
        return None
    i_end_think, i_answer = body.index(END_THINK), body.index(ANSWER)
    if not i_end_think < i_answer:
        return None
    if body[i_end_think + len(END_THINK):i_answer].strip():
        return None  # nothing but white space between the thinking and the answer
    thinking = body[len(THINK):i_end_think]
    answer = body[i_answer + len(ANSWER):-len(END_ANSWER)]
    return thinking, answer.strip()


def format_reward(completion: str) -> float:
    """1.0 for exactly one <think>…</think> then exactly one <answer>…</answer>, else 0.0."""
    try:
        return 1.0 if parse_response(completion) is not None else 0.0
    except Exception:  # never raise on model output
        log.warning("format_reward failed on a completion", exc_info=True)
        return 0.0


def extract_answer(completion: str) -> str | None:
    """The content of the single answer tag that follows the thinking, or None (none, or several)."""
    if not isinstance(completion, str) or completion.count(ANSWER) != 1 or completion.count(END_ANSWER) != 1:
        return None
    end_think = completion.rfind(END_THINK)
    start = completion.find(ANSWER)
    end = completion.find(END_ANSWER)
    if end_think < 0 or not end_think < start < end:
        return None  # no thinking before it, or the tag sits inside the thinking
    return completion[start + len(ANSWER):end].strip()


def parse_number(text: str) -> Fraction | None:
    """An exact value for a plain number ("42", "-3.50", "1e3", "1,234", "3/4"), else None."""
    s = text.strip().rstrip(".").replace(",", "").replace("$", "").strip()
    if not s or len(s) > MAX_NUMBER_CHARS or not s.isascii():
        return None
    m = _FRACTION.fullmatch(s)
    if m:
        den = int(m.group(2))
        return Fraction(int(m.group(1)), den) if den else None
    if not _NUMBER.fullmatch(s):
        return None
    mantissa, _, exponent = s.lower().partition("e")
    if exponent and abs(int(exponent)) > MAX_EXPONENT:
        return None  # 1e999 and friends: too large to be a meant answer, too costly to expand
    return Fraction(s)


class TimeBudget:
    """Seconds that a whole batch's LaTeX checks may take together. math-verify stops one slow comparison
    after its own limit (2-3 s); a GRPO batch full of them would still take minutes. Past the budget, what
    is left scores as wrong, at once, and is counted in `timeouts`."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.spent, self.timeouts = seconds, 0.0, 0

    def remaining(self) -> float:
        return self.seconds - self.spent


_budget: contextvars.ContextVar[TimeBudget | None] = contextvars.ContextVar("minir1_reward_budget", default=None)


@contextlib.contextmanager
def time_budget(budget: TimeBudget | float) -> Iterator[TimeBudget]:
    """`with time_budget(10) as b:` bounds the LaTeX checking of every reward computed inside (a TimeBudget
    may be passed to share one budget across several blocks)."""
    budget = budget if isinstance(budget, TimeBudget) else TimeBudget(budget)
    token = _budget.set(budget)
    try:
        yield budget
    finally:
        _budget.reset(token)


def _latex_equal(response: str, answer: str, timeout_s: int = 2) -> bool:
    """math-verify's verdict under its own time limit, and under the batch's TimeBudget when one is set.
    The limit uses SIGALRM, so it only works in the main thread; elsewhere LaTeX answers are not compared
    (a worker thread could not be stopped, and a pathological expression would keep burning CPU long after
    the reward returned)."""
    if len(response) > MAX_LATEX_CHARS or len(answer) > MAX_LATEX_CHARS:
        return False
    if threading.current_thread() is not threading.main_thread():
        return False
    budget = _budget.get()
    if budget is not None:
        left = budget.remaining()
        if left < 1:  # math-verify's limits are whole seconds
            budget.timeouts += 1
            return False
        timeout_s = max(1, min(timeout_s, int(left)))
        start = time.monotonic()
        try:
            return _math_verify_equal(response, answer, timeout_s)
        finally:
            budget.spent += time.monotonic() - start
    return _math_verify_equal(response, answer, timeout_s)


def warm_up_verifier() -> None:
    """Import math-verify (and the sympy it parses with) and compare once, so that the first LaTeX answer of a
    run does not stall its step: the first comparison of each kind (LaTeX, a plain power, a symbol) costs
    0.1-0.5 s, later ones 1-40 ms. (Only in the main thread, the one `_latex_equal` compares in.)"""
    if threading.current_thread() is not threading.main_thread():
        return
    for expression in ("\\frac{1}{2}", "1^2", "x^2 + 1"):
        _math_verify_equal(expression, "0.5", 2)


@functools.lru_cache(maxsize=4096)
def _math_verify_equal(response: str, answer: str, timeout_s: int) -> bool:
    """(Cached: a group of samples often repeats an answer, and each parse takes milliseconds.)"""
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    try:
        gold = parse(f"${answer}$", parsing_timeout=timeout_s)
        pred = parse(f"${response}$", parsing_timeout=timeout_s)
        return bool(gold and pred and verify(gold, pred, timeout_seconds=timeout_s))
    except Exception:  # math-verify's own time-out, or anything the parser throws
        return False


def normalise_text(s: str) -> str:
    return " ".join(s.strip().strip(".").split()).lower()


def answers_match(response: str, answer: str) -> bool:
    """Numbers by value; otherwise normalised text; otherwise (LaTeX) math-verify."""
    a, b = parse_number(response), parse_number(answer)
    if a is not None and b is not None:
        return a == b
    if normalise_text(response) == normalise_text(answer):
        return True
    if any(ch in text for text in (response, answer) for ch in "\\{^"):  # LaTeX on either side
        return _latex_equal(response, answer)
    return False


def accuracy_reward(completion: str, answer: str, task: Any = None) -> float:
    """1.0 if the single answer tag after the thinking holds a correct answer, else 0.0. With a task,
    its own checker decides (e.g. countdown evaluates the equation)."""
    try:
        response = extract_answer(completion)
        if response is None:
            return 0.0
        ok = task.check(response, answer) if task is not None else answers_match(response, answer)
        return 1.0 if ok else 0.0
    except Exception:
        log.warning("accuracy_reward failed on a completion", exc_info=True)
        return 0.0


@dataclass
class RewardWeights:
    format: float = 0.1
    accuracy: float = 1.0


def combined_reward(completion: str, answer: str, task: Any = None,
                    weights: RewardWeights | None = None) -> float:
    """Weighted mean of format and accuracy, where a correct answer only counts with a valid format."""
    weights = weights or RewardWeights()
    fmt = format_reward(completion)
    acc = accuracy_reward(completion, answer, task) if fmt == 1.0 else 0.0
    total = weights.format + weights.accuracy
    return (weights.format * fmt + weights.accuracy * acc) / total if total > 0 else 0.0


def safe_reward(fn: Callable[..., float], *args: Any, **kwargs: Any) -> float:
    """Call a reward function; an exception or a non-finite value gives 0 with a logged warning."""
    try:
        value = float(fn(*args, **kwargs))
    except Exception as e:
        log.warning("reward %s raised %s: %s; scoring 0", getattr(fn, "__name__", fn), type(e).__name__, e)
        return 0.0
    if not math.isfinite(value):
        log.warning("reward %s returned %s; scoring 0", getattr(fn, "__name__", fn), value)
        return 0.0
    return min(max(value, 0.0), 1.0)
