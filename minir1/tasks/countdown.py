"""TinyZero's Countdown: reach a target with 3-4 numbers and + − × ÷, each number used exactly once.

The checker parses the equation itself (a small recursive-descent parser over exact fractions); the
model's text is never passed to `eval`.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

from minir1.tasks.base import Problem, Task, TaskError

MAX_EQUATION_CHARS = 200


class _Parser:
    """expr := term (('+'|'-') term)* ; term := factor (('*'|'/') factor)* ; factor := NUMBER | '(' expr ')'"""

    TOKEN = re.compile(r"\s*(?:(\d{1,6})|(.))")

    def __init__(self, text: str) -> None:
        self.tokens: list[str] = []
        for number, other in self.TOKEN.findall(text):
            tok = number or other
            if tok.strip():
                self.tokens.append(tok)
        self.i = 0
        self.numbers: list[int] = []
        self.depth = 0

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise ValueError("unexpected end")
        self.i += 1
        return tok

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in ("*", "/", "×", "÷"):
            op = self.take()
            rhs = self.factor()
            if op in ("*", "×"):
                value *= rhs
            else:
                if rhs == 0:
                    raise ValueError("division by zero")
                value /= rhs
        return value

    def factor(self) -> Fraction:
        tok = self.take()
        if tok == "(":
            self.depth += 1
            if self.depth > 20:
                raise ValueError("too deeply nested")
            value = self.expr()
            if self.take() != ")":
                raise ValueError("expected )")
            self.depth -= 1
            return value
        if tok.isascii() and tok.isdigit():
            self.numbers.append(int(tok))
            return Fraction(int(tok))
        raise ValueError(f"unexpected {tok!r}")


def evaluate_equation(text: str) -> tuple[Fraction, list[int]] | None:
    """Value and numbers used of an arithmetic expression (an optional '= N' tail is ignored), or None."""
    text = text.strip()
    if not text or len(text) > MAX_EQUATION_CHARS:
        return None
    text = text.split("=")[0]
    try:
        parser = _Parser(text)
        value = parser.expr()
        if parser.peek() is not None:
            return None
        return value, parser.numbers
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


@dataclass
class Countdown(Task):
    min_numbers: int = 3
    max_numbers: int = 4
    max_value: int = 99     # the numbers are 1..max_value
    max_target: int = 999
    name = "countdown"

    def __post_init__(self) -> None:
        if not 2 <= self.min_numbers <= self.max_numbers <= 6:
            raise TaskError("countdown: need 2 <= min_numbers <= max_numbers <= 6")

    def make(self, rng: random.Random) -> Problem:
        while True:
            nums = [rng.randint(1, self.max_value) for _ in range(rng.randint(self.min_numbers, self.max_numbers))]
            # Combine the numbers in a random order with random operators, keeping every step a
            # positive integer, so that a solution provably exists.
            order = nums[:]
            rng.shuffle(order)
            value, expr, steps = order[0], str(order[0]), []
            ok = True
            for n in order[1:]:
                choices = ["+", "*"] + (["-"] if value > n else []) + (["/"] if n and value % n == 0 and n > 1 else [])
                op = rng.choice(choices)
                new = {"+": value + n, "-": value - n, "*": value * n, "/": value // n}[op]
                steps.append(f"{value} {op} {n} = {new}")
                expr = f"({expr} {op} {n})"
                value = new
                if value > self.max_target or value <= 0:
                    ok = False
                    break
            if ok:
                expr = expr[1:-1] if expr.startswith("(") else expr
                question = (f"Using the numbers {nums}, create an equation that equals {value}. "
                            "You can use + - * / and each number exactly once.")
                return Problem(question=question, answer=f"{expr} = {value}", solution="\n".join(steps))

    def check(self, response: str, answer: str) -> bool:
        target_text = answer.rsplit("=", 1)[-1].strip()
        ref = evaluate_equation(answer)
        got = evaluate_equation(response)
        if ref is None or got is None:
            return False
        value, used = got
        return value == Fraction(int(target_text)) and Counter(used) == Counter(ref[1])
