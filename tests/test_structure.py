"""The structure of ``bench/``: no import cycle among its modules, one data-file locator.

Only module-level imports count: statements run when a module is imported (top level, class bodies, top-level
``if``/``try``/``with`` blocks), not those under ``if TYPE_CHECKING:`` (never run). An import inside a function
is allowed: it is how a lower module defers to a higher one's registry at call time, after both are loaded.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "bench"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def bench_modules() -> dict[str, Path]:
    """Every module under ``bench/`` by its dotted name (a package by its own name, for its ``__init__``)."""
    return {_module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements run at import time: recurse into blocks and class bodies, never into functions."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _module_level(node.orelse)
            continue
        for field in ("body", "orelse", "finalbody"):
            yield from _module_level(getattr(node, field, None) or [])
        for handler in getattr(node, "handlers", None) or []:
            yield from _module_level(handler.body)
        for case in getattr(node, "cases", None) or []:
            yield from _module_level(case.body)


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module named by a (possibly relative) ``from ... import``."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def module_imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The ``bench`` modules that ``module`` imports at module level."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in _module_level(tree.body):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(node, module, path.name == "__init__.py")
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return {m for m in found if m in known and m != module}


def import_graph() -> dict[str, set[str]]:
    modules = bench_modules()
    known = set(modules)
    return {name: module_imports(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_cycle_finder_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_are_module_level_only(tmp_path: Path):
    source = ("from typing import TYPE_CHECKING\nfrom bench import b\nimport bench.c as c\n"
              "if TYPE_CHECKING:\n    from bench.d import D\ntry:\n    from bench.e import x\nexcept ImportError:\n"
              "    pass\ndef f():\n    from bench.f import g\nclass K:\n    from . import h\n")
    path = tmp_path / "a.py"
    path.write_text(source)
    known = {"bench", "bench.a", "bench.b", "bench.c", "bench.d", "bench.e", "bench.f", "bench.h"}
    assert module_imports("bench.a", path, known) == {"bench.b", "bench.c", "bench.e", "bench.h"}


def test_no_import_cycle_among_bench_modules():
    graph = import_graph()
    assert "bench.sites" in graph and graph["bench.sites"] is not None
    cycle = find_cycle(graph)
    assert cycle is None, "module-level import cycle in bench/: " + " -> ".join(cycle or [])


def _reads_env(node: ast.AST, name: str) -> bool:
    """``os.environ.get(name)``, ``os.getenv(name)`` or ``os.environ[name]``."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "getenv"):
        return bool(node.args) and isinstance(node.args[0], ast.Constant) and node.args[0].value == name
    return (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == name
            and isinstance(node.value, ast.Attribute) and node.value.attr == "environ")


def test_only_the_data_locator_reads_bench_data_dir():
    """Data folders are searched by :func:`bench.paths.find_data_file` alone (``--data-dir``, then the variable)."""
    readers = sorted(name for name, path in bench_modules().items()
                     if any(_reads_env(n, "BENCH_DATA_DIR") for n in ast.walk(ast.parse(path.read_text()))))
    assert readers == ["bench.paths"], f"modules reading $BENCH_DATA_DIR themselves: {readers}"


LAYOUT_NAMES = ("results.json", "results.md", "run_config.json", "per_question", "fold")


def _path_literal(node: ast.AST) -> str | None:
    """The literal text of the right side of ``path / "..."`` (f-strings: their constant parts)."""
    if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)):
        return None
    right = node.right
    if isinstance(right, ast.Constant) and isinstance(right.value, str):
        return right.value
    if isinstance(right, ast.JoinedStr):
        return "".join(v.value for v in right.values if isinstance(v, ast.Constant))
    return None


def test_the_run_folder_layout_is_named_once():
    """Only :class:`bench.runs.RunFolder` joins a run folder's file names onto a path; everything else asks it."""
    assert _path_literal(ast.parse('out / f"fold_{k}.json"', mode="eval").body) == "fold_.json"
    assert _path_literal(ast.parse('"a" + "fold"', mode="eval").body) is None
    offenders = []
    for name, path in bench_modules().items():
        if name in ("bench.runs", "bench.gpu_check"):  # gpu_check writes its own report folder, not a run
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            text = _path_literal(node)
            if text is not None and any(n in text for n in LAYOUT_NAMES):
                offenders.append(f"{name}:{node.lineno}: / {text!r}")
    assert not offenders, "run-folder file names built outside bench.runs.RunFolder:\n" + "\n".join(offenders)


def test_no_function_is_longer_than_80_lines():
    """Long functions hide structure (the runner's 200-line loop was split into phases); 80 lines is the ceiling."""
    long = []
    for folder in ("bench", "florain", "baselines"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > 80:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)
