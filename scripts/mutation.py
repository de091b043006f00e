#!/usr/bin/env python3
"""Mutation testing of the modules that hold policy and integrity, against the unit tests.

    .venv/bin/python scripts/mutation.py                       # every module (hours on 2 cores)
    .venv/bin/python scripts/mutation.py --module downloads --module cache
    .venv/bin/python scripts/mutation.py --summary /tmp/mutation.txt --survivors

Two passes, each over a scratch copy of the checkout (``build/mutation``), never the work tree:

1. mutmut 3 (installed into this interpreter's environment when missing) mutates the code
   inside every function and method, and runs for each mutant only the unit tests that
   reached that function, forked from a warm process: thousands of mutants in minutes.
2. mutmut 3 never mutates module-level assignments, and those are where the policy numbers
   live (FINISH_SHARE, MAX_FAILURES, the event body cap, the login pauses). The constant pass
   changes each numeric module-level constant of the same modules (an int by +1 and -1, a
   float by +20 % and -20 %) and runs that module's unit test files against it.

Each mutant is *killed* (a test failed, or it ran past its timeout) or *survived*. mutmut
mutants that change nothing but a logging statement are not scored (`LOGGING_STATEMENTS`). Mutants
listed in scripts/mutation-equivalent.txt (one name per line, then `#` and why no test can
tell it from the original) are left out of the score. The summary gives, per module, killed
over non-equivalent mutants for both passes. Not part of the default test command: it is slow.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import dataclasses
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Iterator, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK_DIR = os.path.join(REPO, "build", "mutation")
EQUIVALENT_FILE = os.path.join(REPO, "scripts", "mutation-equivalent.txt")
MUTMUT_REQUIREMENT = "mutmut==3.8.1"

# module name -> (source file, unit test files the constant pass runs for it). mutmut itself
# picks, per mutant, the tests that reached the mutated function, among UNIT_TESTS.
MODULES = {
    "downloads": ("yeastarfs/downloads.py",
                  ["tests/unit/test_downloads.py", "tests/unit/test_core.py", "tests/unit/test_download_rules.py"]),
    "cache": ("yeastarfs/cache.py",
              ["tests/unit/test_cache.py", "tests/unit/test_core.py", "tests/unit/test_cache_rules.py"]),
    "core": ("yeastarfs/core.py",
             ["tests/unit/test_core.py", "tests/unit/test_fs_ops.py", "tests/unit/test_core_rules.py",
              "tests/unit/test_documented_limits.py"]),
    "client": ("yeastarfs/pbx/sseries/client.py",
               ["tests/unit/test_api.py", "tests/unit/test_tls.py", "tests/unit/test_client_rules.py"]),
    "models": ("yeastarfs/models.py", ["tests/unit/test_models.py"]),
    "index": ("yeastarfs/index.py",
              ["tests/unit/test_index.py", "tests/unit/test_fs_ops.py", "tests/unit/test_index_rules.py"]),
    "discovery": ("yeastarfs/discovery.py", ["tests/unit/test_discovery.py"]),
    "cdr": ("yeastarfs/pbx/sseries/cdr.py",
            ["tests/unit/test_cdr.py", "tests/unit/test_discovery.py", "tests/unit/test_cdr_rules.py",
             "tests/unit/test_documented_limits.py"]),
    "clock": ("yeastarfs/pbx/clock.py",
              ["tests/unit/test_cdr.py", "tests/unit/test_discovery.py", "tests/unit/test_clock_rules.py",
               "tests/unit/test_documented_limits.py"]),
    "events": ("yeastarfs/pbx/events.py",
               ["tests/unit/test_events.py", "tests/unit/test_tcpevents.py", "tests/unit/test_pseries_events.py",
                "tests/unit/test_event_requests.py", "tests/unit/test_event_guard.py",
                "tests/unit/test_documented_limits.py"]),
}
# The fast unit layer, less what cannot reach these modules (the simulators' own tests) and
# the two scale tests (a minute of 20,000 polls, 200,000 index rows) that would time every
# mutant they reach by their own length.
UNIT_TESTS = ["tests/unit", "--ignore=tests/unit/test_simulator.py", "--ignore=tests/unit/test_simulator_pseries.py",
              "--deselect=tests/unit/test_cdr.py::test_memory_and_log_line_cost_stay_flat_over_20000_polls",
              "--deselect=tests/unit/test_index.py::test_scale_200k_recordings"]
# Mutants that change only a logging statement are counted apart, not scored: the wording
# and level of a log line are diagnostics, not policy or integrity, and the log lines that
# are promises (secrets redacted, one line per refusal a minute) are tested through their
# effects. A statement is a logging one when its first line matches one of these.
LOGGING_STATEMENTS = [r"^\s*log\.(debug|info|warning|error|exception)\(", r"_throttle\.emit\(",
                      r"^\s*\(log\.\w+ if .+ else log\.\w+\)\("]
# Files the tests read besides the package and the tests (mutmut copies those two itself).
ALSO_COPY = ["README.md", "scripts/", ".ci/"]
# The mutants issue 12's audit made by hand, each of which the unit tests let through then:
# (module, the text it changes, what it becomes). The constant pass tests them too.
NAMED_MUTANTS = [
    ("downloads", "FINISH_SHARE = 0.5", "FINISH_SHARE = 0.2"),
    ("downloads", "FINISH_SHARE = 0.5", "FINISH_SHARE = 0.9"),
    ("downloads", "MAX_FAILURES = 4", "MAX_FAILURES = 6"),
    ("downloads", "max(INITIAL_WINDOW_BYTES, 2 * self._want_bytes)", "max(INITIAL_WINDOW_BYTES, 8 * self._want_bytes)"),
    ("downloads", "if self._partial.pread(len(overlap), held_offset) != overlap:", "if False:"),
    ("client", "AUTH_RETRY_AFTER_S = 300.0", "AUTH_RETRY_AFTER_S = 5.0"),
    ("client", "LOCKOUT_RETRY_AFTER_S = 600.0", "LOCKOUT_RETRY_AFTER_S = 5.0"),
    ("events", "MAX_BODY_BYTES = 65536", "MAX_BODY_BYTES = 16 << 20"),
]
# A constant-pass mutant whose tests run longer than this many times the unmutated run is
# counted as killed (it hangs).
TIMEOUT_FACTOR = 5.0
# mutmut's own limit is this many times the mutant's tests' unmutated time (mutmut's default of
# 15 let a download mutant that hangs its readers hold a worker for 9 minutes).
MUTMUT_TIMEOUT_FACTOR = 3.0
CONSTANT_RESULTS = "constant-results.json"  # in the scratch copy, for --incremental
TIMEOUT_MIN_S = 30.0
KILLED = {"killed", "timeout", "segfault", "caught by type check"}
NOT_RUN = {"skipped", "not checked"}


@dataclasses.dataclass
class Tally:
    killed: int = 0
    survived: int = 0
    equivalent: int = 0

    @property
    def scored(self) -> int:
        return self.killed + self.survived

    def text(self) -> str:
        if not self.scored:
            return "-"
        return f"{self.killed}/{self.scored} ({100.0 * self.killed / self.scored:.1f} %)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append", choices=sorted(MODULES),
                        help="mutate only this module (repeatable); default: all")
    parser.add_argument("--jobs", type=int, default=2,
                        help="mutants tested at once (default 2; most wait in real time, so more than the cores help)")
    parser.add_argument("--no-constants", action="store_true", help="skip the constant pass")
    parser.add_argument("--no-mutmut", action="store_true", help="skip the mutmut pass")
    parser.add_argument("--named-only", action="store_true", help="in the constant pass, only the audit's named mutants")
    parser.add_argument("--summary", help="also write the summary to this file")
    parser.add_argument("--survivors", action="store_true", help="list every surviving mutant")
    parser.add_argument("--work-dir", default=WORK_DIR, help=f"the scratch copy (default {WORK_DIR})")
    parser.add_argument("--incremental", action="store_true",
                        help="keep the last run's results: test only mutmut mutants of changed functions, and "
                             "the last run's survivors of both passes, again (tests may have been added since)")
    args = parser.parse_args()
    globals()["WORK_DIR"] = os.path.abspath(args.work_dir)  # every function below works there
    modules = args.module or list(MODULES)
    equivalent = read_equivalent()
    started = time.monotonic()
    fresh_copy(WORK_DIR, keep=["mutants", CONSTANT_RESULTS] if args.incremental else [])
    results: dict[str, str] = {}
    with open(os.path.join(WORK_DIR, "pyproject.toml"), "a", encoding="utf-8") as handle:
        handle.write(mutmut_config(modules))
    if not args.no_mutmut:
        ensure_mutmut()
        results.update(run_mutmut(modules, args.jobs, args.incremental, equivalent))
    elif os.path.isdir(os.path.join(WORK_DIR, "mutants")):
        results.update(mutmut_results())  # the last run's, kept with --incremental
    if not args.no_constants:
        earlier = read_constant_results() if args.incremental else {}
        results.update(run_constant_pass(modules, args.jobs, equivalent, args.named_only, earlier))
    summary = summarize(results, modules, equivalent, time.monotonic() - started, args.survivors)
    print(summary)
    if args.summary:
        with open(args.summary, "w", encoding="utf-8") as handle:
            handle.write(summary + "\n")
    return 0


# -- the scratch copy ------------------------------------------------------------------------


def fresh_copy(target: str, keep: list[str] = ()) -> None:
    """The checkout's tracked and new (not ignored) files, copied into *target*, where
    nothing else is left but the entries named in *keep*."""
    if os.path.isdir(target):
        for entry in os.listdir(target):
            if entry not in keep:
                path = os.path.join(target, entry)
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for relative in filter(None, listed):
        source = os.path.join(REPO, relative)
        if not os.path.isfile(source):
            continue  # deleted but not yet committed
        destination = os.path.join(target, relative)
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        shutil.copy2(source, destination)


def read_equivalent() -> dict[str, str]:
    """Mutant name -> why it is equivalent, from scripts/mutation-equivalent.txt."""
    found = {}
    with open(EQUIVALENT_FILE, encoding="utf-8") as handle:
        for line in handle:
            name, _, reason = line.partition("#")
            if name.strip():
                found[name.strip()] = reason.strip()
    return found


# -- pass 1: mutmut --------------------------------------------------------------------------


def ensure_mutmut() -> None:
    try:
        import mutmut  # noqa: F401
    except ImportError:
        print(f"installing {MUTMUT_REQUIREMENT} into {sys.prefix}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", MUTMUT_REQUIREMENT], check=True)


def mutmut_config(modules: list[str]) -> str:
    def toml_list(items: list[str]) -> str:
        return "[" + ", ".join(f'"{item}"' for item in items) + "]"

    return ("\n[tool.mutmut]\n"
            'source_paths = ["yeastarfs/"]\n'
            f"only_mutate = {toml_list([MODULES[m][0] for m in modules])}\n"
            f"pytest_add_cli_args_test_selection = {toml_list(UNIT_TESTS)}\n"
            f"also_copy = {toml_list(ALSO_COPY)}\n"
            'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-n0"]\n'
            f"timeout_multiplier = {MUTMUT_TIMEOUT_FACTOR}\n")


MUTMUT = [sys.executable, "-m", "mutmut"]


def run_mutmut(modules: list[str], jobs: int, incremental: bool, equivalent: dict[str, str]) -> dict[str, str]:
    """Run mutmut in the scratch copy (configured by `main`); mutant name -> status."""
    print(f"mutmut: mutating {', '.join(modules)} (progress in {WORK_DIR}/mutmut-run*.log)", flush=True)
    earlier = mutmut_results() if incremental and os.path.isdir(os.path.join(WORK_DIR, "mutants")) else {}
    _mutmut_run(jobs, [], "mutmut-run.log")  # new mutants, and those of changed functions
    if earlier:
        again = [name for name, status in mutmut_results().items()
                 if status not in KILLED | NOT_RUN and earlier.get(name) == status and name not in equivalent]
        again = sorted(set(again) - logging_only(again))  # not scored: no test is meant to kill them
        if again:
            print(f"mutmut: testing the last run's {len(again)} survivors again", flush=True)
            _mutmut_run(jobs, again, "mutmut-run-survivors.log")
    return mutmut_results()


def _mutmut_run(jobs: int, names: list[str], log_name: str) -> None:
    log_path = os.path.join(WORK_DIR, log_name)
    with open(log_path, "wb") as log:
        run = subprocess.run(MUTMUT + ["run", "--max-children", str(jobs), *names], cwd=WORK_DIR, stdout=log,
                             stderr=subprocess.STDOUT)
    last = re.split(rb"[\r\n]", open(log_path, "rb").read().strip())[-3:]
    print("mutmut: " + " | ".join(line.decode(errors="replace").strip() for line in last), flush=True)
    if run.returncode != 0:
        raise SystemExit(f"mutmut run failed ({run.returncode}); see {log_path}")


def mutmut_results() -> dict[str, str]:
    listed = subprocess.run(MUTMUT + ["results", "--all", "true"], cwd=WORK_DIR, check=True,
                            capture_output=True, text=True).stdout
    results = {}
    for line in listed.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if name:
            results[name] = status
    return results


def logging_only(names: list[str]) -> set[str]:
    """The mutmut mutants among *names* that change nothing but logging statements (read
    from the mutated copies mutmut keeps under mutants/: each mutant is a function beside
    its ``__mutmut_orig``)."""
    parsed: dict[str, tuple[str, dict]] = {}
    found = set()
    for name in names:
        match = re.match(r"(.+?)\.((?:x_|xǁ).+)$", name)
        if not match:
            continue
        path = os.path.join(WORK_DIR, "mutants", match.group(1).replace(".", "/") + ".py")
        if path not in parsed:
            try:
                source = open(path, encoding="utf-8").read()
            except OSError:
                continue
            parsed[path] = (source.splitlines(), {node.name: node for node in ast.walk(ast.parse(source))
                                                  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))})
        lines, functions = parsed[path]
        function = match.group(2)
        mutant = functions.get(function)
        original = functions.get(re.sub(r"__mutmut_\d+$", "__mutmut_orig", function))
        if mutant is None or original is None:
            continue
        old_lines = lines[original.lineno - 1:original.end_lineno]
        new_lines = lines[mutant.lineno - 1:mutant.end_lineno]
        new_lines[0] = new_lines[0].replace(mutant.name, original.name, 1)
        changed = []  # lines of the original that the mutant changes (a call re-wrapped may gain or lose lines)
        for tag, i1, i2, _, _ in difflib.SequenceMatcher(None, old_lines, new_lines, autojunk=False).get_opcodes():
            if tag != "equal":
                changed += range(original.lineno + i1, original.lineno + max(i2, i1 + 1))
        statements = [node for node in ast.walk(original) if isinstance(node, ast.stmt) and node is not original]

        def logging_line(line: int) -> bool:
            around = [node for node in statements if node.lineno <= line <= node.end_lineno]
            if not around:
                return False
            innermost = min(around, key=lambda node: node.end_lineno - node.lineno)
            return any(re.search(pattern, lines[innermost.lineno - 1]) for pattern in LOGGING_STATEMENTS)

        if changed and all(logging_line(line) for line in changed):
            found.add(name)
    return found


def mutmut_module(name: str) -> Optional[str]:
    """The MODULES key of a mutmut mutant name (yeastarfs.pbx.sseries.cdr.x_f__mutmut_3)."""
    dotted = re.split(r"\.x_|\.xǁ", name)[0]
    for module, (path, _) in MODULES.items():
        if path[:-3].replace("/", ".") == dotted:
            return module
    return None


# -- pass 2: module-level constants ------------------------------------------------------------


@dataclasses.dataclass
class ConstantMutant:
    module: str
    path: str
    name: str          # e.g. yeastarfs.downloads.FINISH_SHARE=0.6
    start: int         # character offsets of the value in the file
    end: int
    replacement: str


def constant_mutants(module: str) -> Iterator[ConstantMutant]:
    """Each module-level `NAME = <number or arithmetic of numbers>` changed up and down."""
    path = MODULES[module][0]
    source = open(os.path.join(REPO, path), encoding="utf-8").read()
    line_starts = [0]
    for line in source.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    dotted = path[:-3].replace("/", ".")
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if not (isinstance(target, ast.Name) and target.id.lstrip("_").isupper()):
            continue
        number = _numeric_value(value)
        if number is None:
            continue
        start = line_starts[value.lineno - 1] + value.col_offset
        end = line_starts[value.end_lineno - 1] + value.end_col_offset
        if isinstance(number, int):
            changed = [number + 1, number - 1]
        else:
            changed = [round(number * 1.2, 6), round(number * 0.8, 6)]
        for new in changed:
            yield ConstantMutant(module, path, f"{dotted}.{target.id}={new!r}", start, end, repr(new))


def _numeric_value(node: ast.AST):
    """The value of a literal number or of arithmetic on literal numbers, else None."""
    for part in ast.walk(node):
        if isinstance(part, ast.Name) or (isinstance(part, ast.Constant) and type(part.value) not in (int, float)):
            return None
        if not isinstance(part, (ast.Constant, ast.BinOp, ast.UnaryOp, ast.operator, ast.unaryop, ast.Expression)):
            return None
    try:
        value = eval(compile(ast.Expression(node), "<constant>", "eval"), {"__builtins__": {}})  # noqa: S307
    except Exception:  # noqa: BLE001 - not a plain number after all
        return None
    return value if type(value) in (int, float) else None


def named_mutants(module: str) -> Iterator[ConstantMutant]:
    path = MODULES[module][0]
    source = open(os.path.join(REPO, path), encoding="utf-8").read()
    for named_module, old, new in NAMED_MUTANTS:
        if named_module == module:
            start = source.find(old)
            if start < 0 or source.find(old, start + 1) >= 0:
                raise SystemExit(f"named mutant: {old!r} is not once in {path}; update NAMED_MUTANTS")
            yield ConstantMutant(module, path, f"{path[:-3].replace('/', '.')}:{old}=>{new}", start,
                                 start + len(old), new)


def read_constant_results() -> dict[str, str]:
    """The constant pass's results kept from earlier runs in this scratch copy."""
    try:
        with open(os.path.join(WORK_DIR, CONSTANT_RESULTS), encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return {}


def run_constant_pass(modules: list[str], jobs: int, equivalent: dict[str, str],
                      named_only: bool = False, earlier: Optional[dict[str, str]] = None) -> dict[str, str]:
    """Test every constant mutant (and the named ones) in scratch copies of their own, but
    those listed as equivalent and those *earlier* killed; mutant name -> status. Results
    are kept in the scratch copy for ``--incremental``."""
    earlier = earlier or {}
    mutants = [m for module in modules
               for m in [*named_mutants(module), *([] if named_only else constant_mutants(module))]
               if m.name not in equivalent]
    kept = {m.name: earlier[m.name] for m in mutants if earlier.get(m.name) in KILLED}
    mutants = [m for m in mutants if m.name not in kept]
    print(f"constants: {len(mutants)} mutants of module-level numbers and named ones to test, "
          f"{len(kept)} killed in an earlier run", flush=True)
    baseline_s = {module: _timed_tests(WORK_DIR, module) for module in sorted({m.module for m in mutants})}
    jobs = min(jobs, os.cpu_count() or 1)  # CPU-bound, unlike mutmut's mutants: more would time out
    workers = [WORK_DIR] + [f"{WORK_DIR}-{i}" for i in range(1, max(1, jobs))]
    for worker in workers[1:]:
        fresh_copy(worker)
    free = list(workers)
    results: dict[str, str] = {}

    def test(mutant: ConstantMutant) -> tuple[str, str]:
        worker = free.pop()
        try:
            return mutant.name, _test_constant(worker, mutant, baseline_s[mutant.module])
        finally:
            free.append(worker)

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(workers)) as pool:
        for done, (name, status) in enumerate(pool.map(test, mutants), 1):
            results[name] = status
            print(f"constants: {done}/{len(mutants)} {name}: {status}", flush=True)
            with open(os.path.join(WORK_DIR, CONSTANT_RESULTS), "w", encoding="utf-8") as handle:
                json.dump({**earlier, **results}, handle, indent=0)  # after each: a stopped run keeps them
    return {**kept, **results}


def _pytest(worker: str, module: str, timeout_s: Optional[float]) -> Optional[int]:
    """Exit status of the module's unit test files in *worker*; None after *timeout_s*."""
    files = [path for path in MODULES[module][1] if os.path.exists(os.path.join(worker, path))]
    command = ["nice", "-n", "19", sys.executable, "-m", "pytest", "-n0", "-x", "-q", "-p", "no:cacheprovider",
               *files, *UNIT_TESTS[3:]]
    try:
        return subprocess.run(command, cwd=worker, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        return None


def _timed_tests(worker: str, module: str) -> float:
    began = time.monotonic()
    code = _pytest(worker, module, None)
    if code != 0:
        raise SystemExit(f"constants: the unmutated tests of {module} fail ({code}): nothing to measure")
    return time.monotonic() - began


def _test_constant(worker: str, mutant: ConstantMutant, baseline_s: float) -> str:
    path = os.path.join(worker, mutant.path)
    original = open(path, encoding="utf-8").read()
    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(original[:mutant.start] + mutant.replacement + original[mutant.end:])
        code = _pytest(worker, mutant.module, max(TIMEOUT_MIN_S, TIMEOUT_FACTOR * baseline_s))
    finally:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(original)
    if code is None:
        return "timeout"
    return "survived" if code == 0 else "killed"


# -- the summary -------------------------------------------------------------------------------


def summarize(results: dict[str, str], modules: list[str], equivalent: dict[str, str], elapsed_s: float,
              list_survivors: bool) -> str:
    rows: dict[str, tuple[Tally, Tally]] = {module: (Tally(), Tally()) for module in modules}
    survivors = []
    logging = logging_only([name for name in results if "=" not in name])
    for name, status in sorted(results.items()):
        if name in logging:
            continue
        constant = "=" in name
        module = _constant_module(name) if constant else mutmut_module(name)
        if module not in rows or status in NOT_RUN:
            continue
        tally = rows[module][1 if constant else 0]
        if name in equivalent:
            tally.equivalent += 1
        elif status in KILLED:
            tally.killed += 1
        else:
            tally.survived += 1
            survivors.append(f"  {name}: {status}")
    for name in equivalent:  # constant mutants listed as equivalent are not even run
        module = _constant_module(name) if "=" in name else None
        if module in rows and name not in results:
            rows[module][1].equivalent += 1
    total_functions, total_constants = Tally(), Tally()
    not_run = sum(1 for name, status in results.items() if status in NOT_RUN)
    lines = [f"mutation testing ({MUTMUT_REQUIREMENT} inside functions, module constants by scripts/mutation.py), "
             f"{elapsed_s / 60:.0f} min; not scored: {len(logging)} mutants of logging statements only, "
             f"{not_run} not run",
             f"{'module':<10} | {'mutmut: killed/scored':<24} | {'constants: killed/scored':<24} | "
             f"{'equivalent':>10} | {'all: killed/scored':<24}",
             "-" * 106]
    for module, (functions, constants) in rows.items():
        both = Tally(functions.killed + constants.killed, functions.survived + constants.survived,
                     functions.equivalent + constants.equivalent)
        lines.append(f"{module:<10} | {functions.text():<24} | {constants.text():<24} | {both.equivalent:>10} | "
                     f"{both.text():<24}")
        for total, part in ((total_functions, functions), (total_constants, constants)):
            total.killed += part.killed
            total.survived += part.survived
            total.equivalent += part.equivalent
    everything = Tally(total_functions.killed + total_constants.killed,
                       total_functions.survived + total_constants.survived,
                       total_functions.equivalent + total_constants.equivalent)
    lines.append("-" * 106)
    lines.append(f"{'all':<10} | {total_functions.text():<24} | {total_constants.text():<24} | "
                 f"{everything.equivalent:>10} | {everything.text():<24}")
    if list_survivors and survivors:
        lines += ["surviving mutants (`cd build/mutation && ../../.venv/bin/mutmut show NAME` shows one):"] + survivors
    return "\n".join(lines)


def _constant_module(name: str) -> Optional[str]:
    dotted = name.split(":")[0] if ":" in name else name.split("=")[0].rsplit(".", 1)[0]
    for module, (path, _) in MODULES.items():
        if path[:-3].replace("/", ".") == dotted:
            return module
    return None


if __name__ == "__main__":
    sys.exit(main())
