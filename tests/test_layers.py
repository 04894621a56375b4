# The package's layers point one way (config/registry/atomic -> data -> model -> quant/engine -> checkpoint -> apps ->
# command line), with no import cycle, imports at the top of the file except where the command line defers heavy
# ones, and a command line that starts without torch. Read from the source with ast, so a new violation fails here.
from __future__ import annotations

import ast
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tinygptv"
BASE, DATA, MODEL, KERNELS, CHECKPOINT, APPS, COMMAND_LINE = range(7)
LAYER_OF_PACKAGE = {"config": BASE, "registry": BASE, "atomic": BASE, "data": DATA, "model": MODEL, "quant": KERNELS,
                    "engine": KERNELS, "checkpoint": CHECKPOINT, "train": APPS, "eval": APPS, "serve": APPS,
                    "bench": APPS, "info": APPS}
# Modules that may import inside a function, and why. Command-line modules defer heavy imports so that `tinygptv
# --help` answers at once; the bench worker imports only what its job measures, so each job's peak memory is its own.
DEFERRING = {"tinygptv.bench.worker": "each bench job imports only what it measures"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_command_line(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return name in ("tinygptv.cli", "tinygptv.cli_options") or leaf == "cli" or leaf.endswith("_cli")


def layer(name: str) -> int:
    if is_command_line(name):
        return COMMAND_LINE
    if name == "tinygptv":
        return BASE
    return LAYER_OF_PACKAGE[name.split(".")[1]]


def app_of(name: str) -> str | None:
    return name.split(".")[1] if layer(name) == APPS else None


def imports_of(name: str) -> list[tuple[str, bool]]:
    """(imported tinygptv module, imported inside a function or class?) for every import statement of the module."""
    tree = ast.parse(modules()[name].read_text(), filename=str(modules()[name]))
    found = []

    def visit(node, nested: bool):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, nested) for a in child.names if a.name.startswith("tinygptv"))
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("tinygptv"):
                for alias in child.names:  # `from tinygptv.x import y` imports module tinygptv.x.y when it is one
                    sub = f"{child.module}.{alias.name}"
                    found.append((sub if sub in modules() else child.module, nested))
            visit(child, inner)

    visit(tree, False)
    return [(target, nested) for target, nested in found if target in modules()]


def test_every_module_has_a_layer():
    for name in modules():
        assert isinstance(layer(name), int), name


def test_imports_point_down_and_apps_stay_apart():
    wrong = []
    for name in modules():
        for target, _ in imports_of(name):
            if layer(target) > layer(name):
                wrong.append(f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})")
            elif app_of(name) and app_of(target) and app_of(name) != app_of(target):
                wrong.append(f"app {name} imports another app's module {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    graph = {name: {t for t, _ in imports_of(name) if t != name} for name in modules()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                walk(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name)


def test_imports_are_at_the_top_except_where_the_command_line_defers_them():
    deferred = [f"{name} imports {target} inside a function" for name in modules() for target, nested in
                imports_of(name) if nested and not is_command_line(name) and name not in DEFERRING]
    assert not deferred, "\n".join(deferred)


def topological_order() -> list[str]:
    graph = {name: {t for t, _ in imports_of(name) if t != name} for name in modules()}
    order, done = [], set()

    def visit(node):
        if node in done:
            return
        done.add(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        order.append(node)

    for name in sorted(graph):
        visit(name)
    return order


@pytest.mark.slow
def test_every_module_imports_in_a_fresh_interpreter_in_dependency_order():
    """One fresh interpreter imports each module after the ones it depends on; the first that fails is named."""
    script = ("import importlib, sys\n"
              "for name in sys.argv[1:]:\n"
              "    try:\n"
              "        importlib.import_module(name)\n"
              "    except Exception as e:\n"
              "        sys.exit(f'{name}: {type(e).__name__}: {e}')\n")
    done = subprocess.run([sys.executable, "-c", script, *topological_order()], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_command_line_starts_without_torch():
    """`tinygptv --help` must answer at once: building every parser imports neither torch nor transformers."""
    script = ("import sys\n"
              "from tinygptv.cli import build_parser\n"
              "build_parser()\n"
              "heavy = sorted(m for m in ('torch', 'transformers', 'gradio', 'fastapi', 'peft') if m in sys.modules)\n"
              "print(', '.join(heavy))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "", f"building the parser imported: {done.stdout.strip()}"
