"""Tasks: seeded generators, disjoint held-out split, worked solutions that reach the answer, jsonl files."""

from __future__ import annotations

import json
import re

import pytest

from minir1.tasks import TaskError, get_task, is_heldout


@pytest.mark.parametrize("spec", ["arithmetic", "arithmetic:digits=3,operands=3", "arithmetic:mul_digits=0",
                                  "countdown"])
def test_generators_are_seeded_and_splits_disjoint(spec):
    task = get_task(spec)
    a, b = task.take(50, "train", seed=1), task.take(50, "train", seed=1)
    assert a == b and a != task.take(50, "train", seed=2)
    test = task.take(50, "test")
    assert all(task.heldout(p) for p in test) and not any(task.heldout(p) for p in a)
    assert not {task.canonical(p.question) for p in a} & {task.canonical(p.question) for p in test}


@pytest.mark.parametrize("spec", ["arithmetic:digits=3,mul_digits=1", "arithmetic:digits=2,operands=3",
                                  "arithmetic:digits=1,mul_digits=0", "countdown"])
def test_take_returns_distinct_problems_and_no_test_problem_has_a_twin_in_training(spec):
    task = get_task(spec)
    n = 24 if spec == "arithmetic:digits=1,mul_digits=0" else 500  # one-digit +/-: 24 held-out problems in all
    test = task.take(n, "test")
    keys = [task.canonical(p.question) for p in test]
    assert len(test) == n and len(set(keys)) == n
    train = {task.canonical(p.question) for p in task.take(3000 if n == 500 else 100, "train", at_most=True)}
    assert not train & set(keys)
    stream = task.problems("train", seed=3)  # what training draws, over a large sample
    assert not any(task.canonical(next(stream).question) in set(keys) for _ in range(20_000))
    with pytest.raises(TaskError, match="distinct problems; asked for"):
        get_task("arithmetic:digits=1,mul_digits=0").take(25, "test")


def test_commuted_questions_are_one_problem():
    task = get_task("arithmetic:digits=2,operands=3")
    assert task.canonical("What is 3 + 5?") == task.canonical("What is 5 + 3?")
    assert task.canonical("What is 5 - 3?") != task.canonical("What is 3 - 5?")
    assert task.canonical("What is 2 × 7 + 4 - 1?") == task.canonical("What is 4 - 1 + 7 × 2?")
    assert task.canonical("What is 2 × 7 + 4?") != task.canonical("What is 2 + 7 × 4?")
    one = get_task("arithmetic:digits=1,mul_digits=0")
    questions = {p.question for p in one.take(200, "train", at_most=True) + one.take(50, "test", at_most=True)}
    assert sum(1 for q in questions if one.canonical(q) == one.canonical("What is 3 + 5?")) <= 2


def test_arithmetic_solutions_are_correct_and_think_before_answering():
    task = get_task("arithmetic:digits=3,operands=3")
    for p in task.take(200):
        expr = p.question.removeprefix("What is ").removesuffix("?").replace("×", "*")
        assert int(p.answer) == _evaluate(expr)
        last = p.solution.splitlines()[-1]
        assert last.endswith(f"= {p.answer}")
        # every step's working comes before its result
        assert all(", so " in line or re.fullmatch(r".* = -?\d+", line) for line in p.solution.splitlines())


def test_column_working_names_places_and_carries_the_result_so_far():
    """The last bracket of the working is the result (what a small model copies instead of reversing digits)."""
    from minir1.tasks.arithmetic import explain
    assert explain(74, "+", 46) == (120, "ones 4+6=10 (0), tens 7+4+1=12 (120), so 74 + 46 = 120")
    assert explain(826, "-", 141)[1] == "ones 6-1=5 (5), tens 12-4=8 borrow (85), hundreds 7-1=6 (685), " \
                                        "so 826 - 141 = 685"
    assert explain(89, "*", 5)[1] == "ones 9×5=45 (5), tens 8×5+4=44 (445), so 89 × 5 = 445"
    task = get_task("arithmetic:digits=4,min_digits=2,mul_digits=1")
    for p in task.take(300):
        brackets = re.findall(r"\((\d+)\)", p.solution)
        assert int(brackets[-1]) == abs(int(p.answer)), p.solution


@pytest.mark.parametrize("spec", ["arithmetic:digits=1,mul_digits=0", "arithmetic:digits=1",
                                  "arithmetic:digits=2,min_digits=2,mul_digits=1"])
def test_problem_space_counts_the_distinct_problems_exactly(spec):
    """Checked against exhaustive sampling of small spaces (every canonical form the generator reaches)."""
    import random
    task = get_task(spec)
    rng = random.Random(0)
    seen = {task.canonical(task.make(rng).question) for _ in range(40 * task.problem_space())}
    assert task.problem_space() == len(seen)


def test_the_default_speedrun_task_is_far_larger_than_what_a_run_trains_on():
    from minir1.speedrun import SpeedrunConfig
    c = SpeedrunConfig()
    docs_per_step = c.batch_size * c.seq_len / 40  # a document is over 40 tokens
    trained = c.pretrain_steps * docs_per_step * 2 + 10 * (c.distill_problems + c.rs_problems)
    assert get_task(c.task).problem_space() >= 100 * trained
    assert c.eval_n >= 500


def _evaluate(expr: str) -> int:
    tokens = expr.split()
    values, ops = [int(tokens[0])], []
    for op, n in zip(tokens[1::2], tokens[2::2]):
        if op == "*":
            values[-1] *= int(n)
        else:
            ops.append(op)
            values.append(int(n))
    total = values[0]
    for op, n in zip(ops, values[1:]):
        total = total + n if op == "+" else total - n
    return total


def test_task_spec_errors():
    with pytest.raises(TaskError, match="unknown task 'algebra'"):
        get_task("algebra")
    with pytest.raises(TaskError, match="unknown option 'dgits'"):
        get_task("arithmetic:dgits=3")
    with pytest.raises(TaskError, match="must be an integer"):
        get_task("arithmetic:digits=many")
    with pytest.raises(TaskError, match=r"digits \(99\) must be between 1 and 12"):
        get_task("arithmetic:digits=99")


def test_jsonl_task(tmp_path):
    path = tmp_path / "gsm.jsonl"
    rows = [{"question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(200)]
    rows.append({"question": "Half of one?", "answer": "\\frac{1}{2}"})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = get_task(f"jsonl:{path}")
    train, test = task.take(500, "train", at_most=True), task.take(500, "test", at_most=True)
    assert len(test) == sum(is_heldout(r["question"]) for r in rows)  # one pass, no repeats
    assert len(task.take(3, "test")) == 3
    with pytest.raises(TaskError, match=f"the test split has {len(test)} distinct problems; asked for 500"):
        task.take(500, "test")
    assert not {p.question for p in train} & {p.question for p in test}
    assert task.check("42.0", "42") and task.check("0.5", "\\frac{1}{2}") and not task.check("41", "42")


@pytest.mark.parametrize("content, message", [
    ('{"question": "q", "answer": "1"}\n{"question": "q2"\n', "bad.jsonl:2: invalid JSON"),
    ('{"question": "q", "answer": "1"}\n{"question": "q2"}\n', "bad.jsonl:2: missing field 'answer'"),
    ('[1, 2]\n', "bad.jsonl:1: expected an object"),
    ('{"question": "q", "answer": [1]}\n', "bad.jsonl:1: field 'answer' must be a string or a number"),
    ('\n\n', "bad.jsonl: no problems"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(TaskError, match=re.escape(message)):
        get_task(f"jsonl:{path}")


def test_missing_jsonl_file(tmp_path):
    with pytest.raises(TaskError, match="no such file"):
        get_task(f"jsonl:{tmp_path / 'none.jsonl'}")
