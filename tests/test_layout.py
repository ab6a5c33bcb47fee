"""The package's shape: every module imports on its own in a fresh interpreter (an import cycle fails here
first), the import graph has no cycle, and its arrows run one way — cli/speedrun -> stages -> training loop
and engine -> models -> tensors; nothing imports the CLI but __main__."""

from __future__ import annotations

import ast
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "minir1"  # read, not imported: a cycle must fail the tests, not this file
MODULES = sorted(["minir1"] + [m.name for m in pkgutil.walk_packages([str(ROOT)], prefix="minir1.")])

# Layers, lowest first: a module may import its own layer and those below it, never one above.
LAYERS = [
    ("base", ["minir1.errors", "minir1.files", "minir1.devices", "minir1.stats"]),
    ("models", ["minir1.models"]),
    ("data", ["minir1.tokenizer", "minir1.tasks", "minir1.rewards", "minir1.reasoning", "minir1.prompting"]),
    ("engine", ["minir1.engine"]),
    ("checkpoint", ["minir1.checkpoint"]),
    ("loop", ["minir1.train.loop", "minir1.train.distributed", "minir1.train"]),
    ("stages", ["minir1.train.pretrain", "minir1.train.sft", "minir1.train.grpo", "minir1.train.sample",
                "minir1.train.distill", "minir1.evaluate"]),
    ("apps", ["minir1.serve", "minir1.chat", "minir1.report", "minir1.speedrun"]),
    ("cli", ["minir1.cli", "minir1.__main__", "minir1"]),
]


def layer_of(module: str) -> int:
    best, rank = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank >= 0, f"{module} is in no layer of tests/test_layout.py: add it"
    return rank


def path_of(module: str) -> Path:
    rel = Path(*module.split(".")[1:])
    pkg = ROOT / rel / "__init__.py"
    return pkg if pkg.is_file() else ROOT / rel.with_suffix(".py")


def imports_of(module: str) -> set[str]:
    """Every minir1 module `module` imports, at the top or inside a function (TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path_of(module).read_text())
    is_pkg = path_of(module).name == "__init__.py"
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and ast.unparse(node.test) == "TYPE_CHECKING" for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("minir1")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(parts + ([node.module] if node.module else []))
            if not base.startswith("minir1"):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in MODULES else base)
    return found - {module}


GRAPH = {m: imports_of(m) for m in MODULES}


# Each module is imported in a process of its own in which no minir1 module was loaded before: forked from
# one interpreter that has imported only the third-party libraries, so that ~50 imports of torch do not cost
# minutes. Importing a module alone is what an import cycle breaks first.
_IMPORT_EACH = """
import importlib, os, sys, traceback
import torch, safetensors, tokenizers, jinja2, fastapi, pydantic, numpy  # noqa: F401 (the slow part, once)
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print("FAILED", *failed)
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_alone_in_a_fresh_interpreter():
    modules = [m for m in MODULES if m != "minir1.__main__"]  # importing __main__ runs the CLI
    env = {**os.environ, "MINIR1_NATIVE": "0"}
    res = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *modules], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == "FAILED"


def test_the_import_graph_has_no_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH.get(m, ())):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m)


def test_imports_run_one_way_down_the_layers():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {n} ({LAYERS[layer_of(n)][0]})"
              for m, deps in GRAPH.items() for n in deps
              if layer_of(n) > layer_of(m) and not (m.startswith(n + ".") and n.count(".") >= 1)]
    assert not upward, upward
    assert [m for m, deps in GRAPH.items() if "minir1.cli" in deps] == ["minir1.__main__"]


def test_the_graph_sees_the_cycles_it_must_catch():
    """The checks above would fail on the two cycles of the old layout (model <-> its HF adapter; the CLI
    <-> the server and the speedrun): this graph has the edges that made them, had they been written."""
    assert "minir1.models.deepseek_v3" in GRAPH["minir1.models.hf.deepseek_v3"]
    assert not {"minir1.models.hf.deepseek_v3", "minir1.checkpoint"} & GRAPH["minir1.models.deepseek_v3"]
    assert "minir1.train.pretrain" in GRAPH["minir1.speedrun"] and "minir1.checkpoint" in GRAPH["minir1.serve.app"]
