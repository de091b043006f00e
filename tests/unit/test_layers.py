"""Import direction (style-guide.md §3.3, adapted to this repository's modules).

Every module under ``yeastarfs/`` is parsed with ``ast`` (never imported), and every import
in it is collected, including imports inside functions and ``importlib.import_module("...")``
calls with a literal name. The rules below are then checked against that graph.
"""

from __future__ import annotations

import ast
import pathlib
import textwrap

import pytest

PACKAGE = "yeastarfs"
PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[2] / PACKAGE

KNOWN_MODULES = {"api", "cache", "cdrsync", "cli", "config", "demo", "downloads", "errors", "events",
                 "fs", "index", "models", "mount", "options", "simulator", "tcpevents", "tools",
                 "__init__", "__main__"}

FUSE_BINDINGS = {"mfusepy", "fuse", "fusepy"}
HTTP_CLIENTS = {"requests", "urllib3"}


def _imports_of_source(source: str, module: str, submodules: set[str]) -> set[str]:
    """Dotted names *module* imports. Package-internal ones as ``yeastarfs.X``
    (``yeastarfs`` alone for the package's ``__init__``); third-party ones by top-level name."""
    found: set[str] = set()

    def add_internal(dotted: str) -> None:
        parts = dotted.split(".")
        found.add(".".join(parts[:2]))

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add_internal(alias.name)
                else:
                    found.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: always inside the package (it is flat)
                base = PACKAGE + ("." + node.module if node.module else "")
            else:
                base = node.module or ""
            if base == PACKAGE:
                for alias in node.names:
                    add_internal(f"{PACKAGE}.{alias.name}" if alias.name in submodules else PACKAGE)
            elif base.startswith(PACKAGE + "."):
                add_internal(base)
            elif base:
                found.add(base.split(".")[0])
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and node.args and \
                    isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                target = node.args[0].value
                if target == PACKAGE or target.startswith(PACKAGE + "."):
                    add_internal(target)
                else:
                    found.add(target.split(".")[0])
    found.discard(f"{PACKAGE}.{module}")
    return found


def _package_graph() -> dict[str, set[str]]:
    modules = {path.stem: path for path in PACKAGE_DIR.glob("*.py")}
    submodules = set(modules) - {"__init__"}
    return {name: _imports_of_source(path.read_text(encoding="utf-8"), name, submodules)
            for name, path in modules.items()}


GRAPH = _package_graph()


def internal(module: str) -> set[str]:
    """The yeastarfs modules *module* imports, by short name ("__init__" for the package)."""
    names = set()
    for dotted in GRAPH[module]:
        if dotted == PACKAGE:
            names.add("__init__")
        elif dotted.startswith(PACKAGE + "."):
            names.add(dotted.split(".", 1)[1])
    return names


def importers_of(target: str) -> set[str]:
    return {module for module in GRAPH if target in internal(module)}


def importers_of_external(top_levels: set[str]) -> set[str]:
    return {module for module, imported in GRAPH.items() if imported & top_levels}


# -- the collector itself ----------------------------------------------------------------------


def test_collector_sees_every_form_of_import():
    source = textwrap.dedent("""
        import os.path
        import requests.adapters as ra
        from yeastarfs import errors, __version__
        from yeastarfs.models import Recording
        import yeastarfs.index
        from . import cache
        from .api import PbxClient
        def later():
            from yeastarfs.mount import run_mount
            import importlib
            importlib.import_module("yeastarfs.simulator")
            return __import__("sqlite3")
        class K:
            import mfusepy
    """)
    submodules = KNOWN_MODULES - {"__init__"}
    assert _imports_of_source(source, "x", submodules) == {
        "os", "requests", "yeastarfs.errors", "yeastarfs", "yeastarfs.models", "yeastarfs.index",
        "yeastarfs.cache", "yeastarfs.api", "yeastarfs.mount", "importlib", "yeastarfs.simulator",
        "sqlite3", "mfusepy"}


def test_the_package_is_what_the_rules_were_written_for():
    assert set(GRAPH) >= KNOWN_MODULES, "a module the rules name is missing"
    unknown = set(GRAPH) - KNOWN_MODULES
    assert not unknown, f"new module(s) {sorted(unknown)}: add them to the rules in this file"


def test_the_graph_is_not_empty_so_the_rules_can_fail():
    # Known edges: if these vanish, the collector is broken and every rule below passes vacuously.
    assert "mfusepy" in GRAPH["fs"]
    assert "requests" in GRAPH["api"]
    assert "cachetools" in GRAPH["cache"]
    assert "sqlite3" in GRAPH["index"]
    assert "fs" in internal("mount")
    assert "cli" in internal("__main__")
    assert "simulator" in internal("demo")
    assert "errors" in internal("cache")
    assert "events" in internal("tcpevents")


# -- third-party and stdlib libraries with a single owner --------------------------------------


@pytest.mark.parametrize("libraries, owners", [
    (FUSE_BINDINGS, {"fs"}),               # mount runs fs.FusePlus
    (HTTP_CLIENTS, {"api"}),
    ({"cachetools"}, {"cache"}),
    ({"sqlite3"}, {"index"}),
])
def test_library_has_a_single_owner(libraries, owners):
    offenders = importers_of_external(libraries) - owners
    assert not offenders, f"{sorted(offenders)} import {sorted(libraries)}; only {sorted(owners)} may"


# -- package-internal direction ----------------------------------------------------------------


def test_simulator_imports_nothing_from_the_package():
    assert internal("simulator") == set()


def test_only_demo_imports_the_simulator():
    assert importers_of("simulator") <= {"demo"}


@pytest.mark.parametrize("target, allowed", [
    ("cli", {"__main__"}),
    ("mount", {"cli", "demo"}),
    ("fs", {"mount"}),
    ("__main__", set()),
    ("options", {"cli"}),
    ("tools", {"cli"}),
])
def test_upper_layers_have_only_the_allowed_importers(target, allowed):
    offenders = importers_of(target) - allowed
    assert not offenders, f"{sorted(offenders)} import {target}; only {sorted(allowed)} may"


@pytest.mark.parametrize("module", ["index", "cache"])
def test_storage_layers_are_fed_data_not_clients(module):
    forbidden = internal(module) & {"api", "downloads", "events", "tcpevents", "cdrsync"}
    assert not forbidden, f"{module} imports {sorted(forbidden)}"


def test_errors_imports_nothing_from_the_package():
    assert internal("errors") == set()


def test_models_imports_at_most_errors():
    assert internal("models") <= {"errors"}


def test_cache_imports_nothing_above_errors():
    # cache.py's docstring: "imports nothing above ``errors``".
    assert internal("cache") <= {"errors"}


def test_config_imports_at_most_errors():
    # config.py's docstring: "imports nothing else from yeastarfs but ``errors``".
    assert internal("config") <= {"errors"}


def test_options_imports_at_most_errors():
    # options.py's docstring: "Stdlib only; no yeastarfs imports but ``errors``."
    assert internal("options") <= {"errors"}


def test_tools_never_reach_the_pbx_or_mount_anything():
    # tools.py's docstring: commands that work on a mount or its cache from outside, with no
    # socket, no credentials and no PBX access. (Reading the index or the cache is fine.)
    forbidden = internal("tools") & {"api", "events", "tcpevents", "downloads", "cdrsync", "mount",
                                     "fs", "simulator", "demo"}
    assert not forbidden, f"tools imports {sorted(forbidden)}"
    assert not GRAPH["tools"] & (HTTP_CLIENTS | FUSE_BINDINGS)


@pytest.mark.parametrize("module", ["downloads", "cdrsync", "events", "tcpevents"])
def test_network_side_does_not_reach_into_index_or_fs(module):
    forbidden = internal(module) & {"index", "fs"}
    assert not forbidden, f"{module} imports {sorted(forbidden)}; pass a callable instead"


def test_tcpevents_builds_on_events_never_the_reverse():
    # events.py's docstring: tcpevents imports it for the shared sink; never the reverse.
    assert "tcpevents" not in internal("events")
    assert internal("tcpevents") <= {"events", "models", "errors"}


def test_no_import_cycles_between_modules():
    def visit(module, stack):
        for target in internal(module) - {"__init__"}:
            assert target not in stack, "import cycle: " + " -> ".join(stack + [target])
            visit(target, stack + [target])

    for module in GRAPH:
        visit(module, [module])
