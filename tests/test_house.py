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
LONG_PENDING = {
    "distbatch/measure/report.py",  # grown by the sweep-report work in progress (issue #25)
}

# Packages that speak the CLI's language: their strings may name flags.
FLAG_PACKAGES = ("cli", "launch")
# "--word" in a string literal (docstrings and f-string parts included; comments are not strings).
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")

# Library files that still hold "--flag" strings, each waiting for its owner to make it name
# parameters instead. This set must only shrink, to empty: the test fails for a file that
# gains a flag outside it, and for an entry here whose file has none left (remove it then).
PENDING = {
    # owned by the engineer of the adaptive-optimizer rules
    "distbatch/recipes/recipe.py",
    # owned by the engineer of the sweep report and recommend
    "distbatch/measure/recommend.py",
    "distbatch/measure/report.py",
    "distbatch/measure/results.py",
    # replica_run_command builds the CLI child's argv: it moves to distbatch/cli/bench.py
    "distbatch/measure/bench.py",
}

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
