"""The house rules that show in the files themselves (issue #25, item 5). Fast; no TensorFlow.

- No library file over MAX_LINES lines: a module that grows past it is split by responsibility.
- No "--flag" string in the library outside distbatch/cli/ and distbatch/launch/: the library
  names PARAMETERS (distbatch.errors.ParameterError, param_name) and only the CLI maps them to
  its flags.
- Result files are named by what they measure and when (benchmarks/results/scale_out/
  2026-11-27_per_tensor_allreduce/), never by the process that made them ("session6").
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "distbatch"
RESULTS = ROOT / "benchmarks" / "results"

MAX_LINES = 500
# Library files over MAX_LINES that their owners are still editing; like PENDING below, this
# set must only shrink, to empty (an entry whose file is back under the limit fails the test).
LONG_PENDING: set = set()

# Packages that speak the CLI's language: their strings may name flags.
FLAG_PACKAGES = ("cli", "launch")
# "--word" in a string literal (docstrings and f-string parts included; comments are not strings).
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")

# Library files that still hold "--flag" strings, each waiting for its owner to make it name
# parameters instead. This set must only shrink, to empty: the test fails for a file that
# gains a flag outside it, and for an entry here whose file has none left (remove it then).
PENDING: set = set()

# A result named by the process that made it: "session4", "round_3", "trial-2", "Sessions".
PROCESS_NAME = re.compile(r"(?<![a-z])(session|round|trial)s?(?![a-z])")


def library_files():
    return sorted(LIBRARY.rglob("*.py"))


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def flag_strings(path: Path) -> list[str]:
    """"line: --flag" for each flag in a string literal of `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [f"{node.lineno}: {m.group()}" for m in FLAG.finditer(node.value)]
    return found


def test_no_library_file_is_over_the_limit():
    long = {relative(p): n for p in library_files()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    new = {path: n for path, n in long.items() if path not in LONG_PENDING}
    assert not new, f"split these by responsibility (at most {MAX_LINES} lines each): {new}"
    done = sorted(LONG_PENDING - set(long))
    assert not done, f"these files are within {MAX_LINES} lines now: remove them from LONG_PENDING: {done}"


def test_library_strings_name_parameters_not_flags():
    outside = [p for p in library_files()
               if p.relative_to(LIBRARY).parts[0] not in FLAG_PACKAGES]
    flags = {relative(p): hits for p in outside if (hits := flag_strings(p))}
    new = {path: hits for path, hits in flags.items() if path not in PENDING}
    assert not new, ("the library names parameters (distbatch.errors.ParameterError, "
                     f"param_name); only distbatch/cli/ maps them to flags: {new}")
    done = sorted(PENDING - set(flags))
    assert not done, f"these files hold no flag any more: remove them from PENDING: {done}"


def test_pending_names_real_files():
    missing = sorted(p for p in PENDING | LONG_PENDING if not (ROOT / p).is_file())
    assert not missing, f"PENDING names files that do not exist: {missing}"


def test_results_are_named_by_what_they_measure():
    named = [relative(p) for p in RESULTS.rglob("*")
             if PROCESS_NAME.search(p.relative_to(RESULTS).as_posix().lower())]
    assert not named, ("name results by what they measure and when "
                       f"(e.g. scale_out/2026-11-27_per_tensor_allreduce/), not by a session: {named}")


def test_the_checks_see_what_they_look_for(tmp_path):
    """The regexes themselves: a flag in a docstring and an f-string, none in a comment."""
    module = tmp_path / "m.py"
    module.write_text('"""Pass --resume."""\n# --comment\nx = f"{1} --out-dir y"\ny = "a -- b, --, x--y"\n')
    assert flag_strings(module) == ["1: --resume", "3: --out-dir"]
    for name in ("session4", "scale_out/round_3/rows.jsonl", "Trial-2", "sessions"):
        assert PROCESS_NAME.search(name.lower()), name
    for name in ("2026-11-27_per_tensor_allreduce", "background.json", "surrounding"):
        assert not PROCESS_NAME.search(name.lower()), name


# -- imports: function-local ones only for optional dependencies, no package cycle ------------
# A function-local import hides an arrow of the dependency graph (three such "back-up arrows"
# hid a package cycle). Local imports stay only for optional dependencies (horovod, mnist1d,
# sklearn, matplotlib, jsonschema, tensorboard plugins), the CLI's per-command dispatch, and
# modules the CLI's parsers and the launcher import without TensorFlow (each says why).
# The target is 40; this budget is the count reached so far and may only shrink
# (what remains: optional dependencies, the CLI's dispatch, Recipe.build and models.py's Keras
# for the parsers, and the batch policies' drivers in goodput.py/batch_schedule.py).
LOCAL_IMPORT_BUDGET = 20

# The packages whose module-level imports must form no cycle (each top-level module, e.g.
# distbatch/errors.py, is a node of its own).
PACKAGES = ("training", "measure", "data", "backends", "recipes", "launch", "cli")
# Package cycles that remain until files being edited by others change; this set must only
# shrink, to empty (an entry whose cycle is gone fails the test).
CYCLES_PENDING = {
}


def local_imports(path: Path) -> list[str]:
    """"line: statement" for each import inside a function (at any depth) of `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found |= {(n.lineno, ast.unparse(n)) for n in ast.walk(fn)
                      if isinstance(n, (ast.Import, ast.ImportFrom))}
    return [f"{line}: {text}" for line, text in sorted(found)]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(body: list) -> list:
    """The import statements a module runs when it is imported: its body, and the blocks of
    its top-level if/try/with statements and class bodies; not `if TYPE_CHECKING:` blocks."""
    found = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                found += top_level_imports(node.body)
            found += top_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            found += top_level_imports(node.body + node.orelse + node.finalbody)
            for handler in node.handlers:
                found += top_level_imports(handler.body)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            found += top_level_imports(node.body)
    return found


def import_graph() -> dict[str, set[str]]:
    """{module: the distbatch modules it imports at module level} (static, from the ast)."""
    modules = {module_name(p): p for p in library_files()}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in top_level_imports(ast.parse(path.read_text(), filename=str(path)).body):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
                continue
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            targets.add(base)
            targets |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
        graph[name] = set()
        for target in targets:
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target != name and target.startswith("distbatch"):
                graph[name].add(target)
    return graph


def package_of(module: str) -> str:
    """distbatch.training.step -> distbatch.training; a top-level module is its own node."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1] in PACKAGES else module


def cycles(graph: dict[str, set[str]]) -> list[frozenset]:
    """The strongly connected components of more than one node (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(set(graph) | {w for ws in graph.values() for w in ws}):
        if v not in index:
            visit(v)
    return found


def test_function_local_imports_stay_within_the_budget():
    found = {relative(p): hits for p in library_files() if (hits := local_imports(p))}
    total = sum(map(len, found.values()))
    assert total <= LOCAL_IMPORT_BUDGET, (
        f"{total} function-local imports in distbatch/, budget {LOCAL_IMPORT_BUDGET}: import at the "
        f"top of the module (move code to the module that owns it if that makes a cycle); keep "
        f"local only optional dependencies, saying why: "
        f"{ {path: len(hits) for path, hits in sorted(found.items())} }")


def test_packages_import_each_other_without_a_cycle():
    graph = import_graph()
    packages: dict[str, set[str]] = {}
    why: dict[tuple[str, str], list[str]] = {}
    for module, targets in graph.items():
        for target in targets:
            a, b = package_of(module), package_of(target)
            if a != b:
                packages.setdefault(a, set()).add(b)
                why.setdefault((a, b), []).append(f"{module} -> {target}")
    found = cycles(packages)
    new = [sorted(c) for c in found if c not in CYCLES_PENDING]
    arrows = {f"{a} -> {b}": why[a, b] for c in found if c not in CYCLES_PENDING
              for a in c for b in c if (a, b) in why}
    assert not new, f"package cycles (move the code to the package that owns it): {new}: {arrows}"
    done = [sorted(c) for c in CYCLES_PENDING if c not in found]
    assert not done, f"these cycles are gone: remove them from CYCLES_PENDING: {done}"


def test_the_import_checks_see_what_they_look_for(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\nif TYPE_CHECKING:\n    import a\ntry:\n    import b\nexcept "
                      "ImportError:\n    b = None\n\ndef f():\n    import c\n    def g():\n"
                      "        from d import e\n")
    assert local_imports(module) == ["10: import c", "12: from d import e"]
    tree = ast.parse(module.read_text())
    assert [ast.unparse(n) for n in top_level_imports(tree.body)] == ["import os", "import b"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]
    assert package_of("distbatch.training.step") == "distbatch.training"
    assert package_of("distbatch.errors") == "distbatch.errors"
