"""Import direction, stated by folder (README "Development").

Every module under ``yeastarfs/`` is parsed with ``ast`` (never imported) and every import in
it is collected, including imports inside functions and ``importlib.import_module("...")``
calls with a literal name. A module is named by its dotted path inside the package
(``fs``, ``pbx.sseries.client``, ``app.cli``); a rule names folders (``pbx``, ``app``,
``sim``) or modules, so a module added to a folder falls under that folder's rules at once.
"""

from __future__ import annotations

import ast
import pathlib
import re
import textwrap

import pytest

PACKAGE = "yeastarfs"
PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[2] / PACKAGE

FUSE_BINDINGS = {"mfusepy", "fuse", "fusepy", "llfuse", "pyfuse3"}
HTTP_CLIENTS = {"requests", "urllib3", "http"}  # http: http.client/http.server


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _resolve_relative(module: str, level: int, target: str | None, is_package: bool) -> str:
    parts = module.split(".") if module != "__init__" else []
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([PACKAGE, *base, *([target] if target else [])])


def _imports_of_source(source: str, module: str, modules: set[str], is_package: bool = False) -> set[str]:
    """What *module* imports: package-internal modules as their names inside the package
    (``__init__`` for the package itself), third-party and stdlib ones by top-level name."""
    found: set[str] = set()

    def add_internal(dotted: str) -> None:
        inner = dotted[len(PACKAGE) + 1:] if dotted != PACKAGE else "__init__"
        # `from yeastarfs.pbx import sseries` names a module; `import yeastarfs.x.Class` does not exist.
        while inner not in modules and "." in inner:
            inner = inner.rsplit(".", 1)[0]
        found.add(inner)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add_internal(alias.name)
                else:
                    found.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve_relative(module, node.level, node.module, is_package)
            else:
                base = node.module or ""
            if base == PACKAGE or base.startswith(PACKAGE + "."):
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    inner = candidate[len(PACKAGE) + 1:]
                    add_internal(candidate if inner in modules else base)
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
    found.discard(module)
    return found


def _package_graph() -> dict[str, set[str]]:
    paths = {_module_name(path): path for path in PACKAGE_DIR.rglob("*.py")}
    modules = set(paths)
    return {name: _imports_of_source(path.read_text(encoding="utf-8"), name, modules,
                                     is_package=path.name == "__init__.py")
            for name, path in paths.items()}


GRAPH = _package_graph()


def internal(module: str) -> set[str]:
    """The yeastarfs modules *module* imports, by their names inside the package."""
    return {name for name in GRAPH[module] if name in GRAPH}


def in_folder(module: str, folder: str) -> bool:
    return module == folder or module.startswith(folder + ".")


def modules_in(folder: str) -> set[str]:
    return {module for module in GRAPH if in_folder(module, folder)}


def importers_of_external(top_levels: set[str]) -> set[str]:
    return {module for module, imported in GRAPH.items() if imported & top_levels}


TOP_LEVEL = {module for module in GRAPH if "." not in module} - {"__init__", "__main__", "app", "pbx", "sim"}


# -- the collector itself ----------------------------------------------------------------------


def test_collector_sees_every_form_of_import():
    source = textwrap.dedent("""
        import os.path
        import requests.adapters as ra
        from yeastarfs import errors, __version__
        from yeastarfs.models import Recording
        import yeastarfs.index
        from . import cache
        from .downloads import DownloadManager
        def later():
            from yeastarfs.app.mount import run_mount
            import importlib
            importlib.import_module("yeastarfs.sim.sseries")
            return __import__("sqlite3")
        class K:
            import mfusepy
    """)
    modules = set(GRAPH)
    assert _imports_of_source(source, "fs", modules) == {
        "os", "requests", "errors", "__init__", "models", "index", "cache", "downloads",
        "app.mount", "importlib", "sim.sseries", "sqlite3", "mfusepy"}
    relative = "from . import client\nfrom .. import Pbx\nfrom ...errors import PbxError\n"
    assert _imports_of_source(relative, "pbx.sseries", modules, is_package=True) == {
        "pbx.sseries.client", "pbx", "errors"}


def test_the_graph_is_not_empty_so_the_rules_can_fail():
    # Known edges: if these vanish, the collector is broken and every rule below passes vacuously.
    assert "mfusepy" in GRAPH["fs"]
    assert "requests" in GRAPH["pbx.sseries.client"]
    assert "cachetools" in GRAPH["cache"]
    assert "sqlite3" in GRAPH["index"]
    assert "fs" in internal("app.mount")
    assert "app.cli" in internal("__main__")
    assert "sim.sseries" in internal("app.demo")
    assert "errors" in internal("cache")
    assert {"app", "pbx", "pbx.sseries", "sim"} <= set(GRAPH)


# -- third-party and stdlib libraries with a single owner --------------------------------------


@pytest.mark.parametrize("libraries, owners", [
    (FUSE_BINDINGS, {"fs"}),
    ({"cachetools"}, {"cache"}),
    ({"sqlite3"}, {"index"}),
])
def test_library_has_a_single_owner(libraries, owners):
    offenders = importers_of_external(libraries) - owners
    assert not offenders, f"{sorted(offenders)} import {sorted(libraries)}; only {sorted(owners)} may"


def test_only_the_pbx_folder_and_the_simulators_speak_http():
    # The simulators are PBXs (servers); the metrics endpoint is the application's own server.
    offenders = {m for m in importers_of_external(HTTP_CLIENTS)
                 if not (in_folder(m, "pbx") or in_folder(m, "sim") or in_folder(m, "app"))}
    assert not offenders, f"{sorted(offenders)} speak HTTP; only pbx/ may talk to a PBX"
    assert not {m for m in modules_in("app") if GRAPH[m] & {"requests", "urllib3"}}


# -- package-internal direction ----------------------------------------------------------------


def test_simulators_import_nothing_outside_their_folder():
    for module in modules_in("sim"):
        outside = {m for m in internal(module) if not in_folder(m, "sim")}
        assert not outside, f"{module} imports {sorted(outside)}"


def test_only_the_application_imports_the_simulators():
    offenders = {m for m in GRAPH if "sim" in {t.split(".")[0] for t in internal(m)}
                 and not in_folder(m, "sim") and not in_folder(m, "app")}
    assert not offenders, f"{sorted(offenders)} import sim/"


def test_nothing_below_the_application_imports_it():
    offenders = {m for m in GRAPH if any(in_folder(t, "app") for t in internal(m))
                 and not in_folder(m, "app") and m != "__main__"}
    assert not offenders, f"{sorted(offenders)} import app/"


def test_the_pbx_folder_builds_only_on_errors_models_and_config():
    allowed = {"errors", "models", "config", "__init__"}
    for module in modules_in("pbx"):
        outside = {m for m in internal(module) if not in_folder(m, "pbx")} - allowed
        assert not outside, f"{module} imports {sorted(outside)}; the PBX side gets callables instead"


@pytest.mark.parametrize("module", sorted(TOP_LEVEL))
def test_top_level_modules_never_reach_a_pbx_family_or_the_application(module):
    # The storage, download and core modules know the PBX only through the seam (pbx/__init__).
    forbidden = {m for m in internal(module)
                 if (in_folder(m, "pbx") and m != "pbx") or in_folder(m, "app") or in_folder(m, "sim")}
    assert not forbidden, f"{module} imports {sorted(forbidden)}"


@pytest.mark.parametrize("module", ["index", "cache"])
def test_storage_layers_are_fed_data_not_clients(module):
    assert internal(module) <= {"errors", "models", "__init__"}, f"{module} imports {sorted(internal(module))}"


def test_errors_imports_nothing_from_the_package():
    assert internal("errors") == set()


def test_models_imports_at_most_errors():
    assert internal("models") <= {"errors"}


def test_config_imports_at_most_errors():
    assert internal("config") <= {"errors"}


def test_options_imports_at_most_errors_and_config():
    assert internal("app.options") <= {"errors", "config"}


def test_tools_never_reach_the_pbx_or_mount_anything():
    # tools.py's docstring: commands that work on a mount or its cache from outside, with no
    # socket, no credentials and no PBX access. (Reading the index or the cache is fine.)
    forbidden = {m for m in internal("app.tools")
                 if in_folder(m, "pbx") or in_folder(m, "sim") or m in {"downloads", "fs", "app.mount", "app.demo"}}
    assert not forbidden, f"tools imports {sorted(forbidden)}"
    assert not GRAPH["app.tools"] & ({"requests", "urllib3"} | FUSE_BINDINGS)


def test_no_import_cycles_between_modules():
    def visit(module, stack):
        for target in internal(module) - {"__init__"}:
            if target in ("pbx", "app", "sim", "pbx.sseries"):  # a package importing its own modules
                continue
            assert target not in stack, "import cycle: " + " -> ".join(stack + [target])
            visit(target, stack + [target])

    for module in GRAPH:
        visit(module, [module])


# -- PBX knowledge lives in pbx/ only ---------------------------------------------------------------

PBX_ENDPOINTS = ("get_random", "recording/download", "cdr/download", "api/v2.0.0", "/openapi/", "get_token",
                 "refresh_token", "recording/search", "recording/list")
PBX_CSV_COLUMNS = ("callduraction", "talkduraction", "srctrunkname", "dsttrunkname", "dsttrcunkname",
                   "didnumber", "callid,timestart")


def _code_strings(path: pathlib.Path) -> list[str]:
    """The string constants of a module's code: docstrings (prose) are left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and id(node) not in docstrings]


def test_no_module_outside_the_pbx_folder_knows_an_endpoint_errno_or_csv_column():
    # Issue 13: the rest of yeastarfs must not know which PBX family it talks to. The simulators
    # are PBXs themselves and may know everything.
    offenders = []
    for path in PACKAGE_DIR.rglob("*.py"):
        module = _module_name(path)
        if in_folder(module, "pbx") or in_folder(module, "sim"):
            continue
        for text in _code_strings(path):
            lowered = text.lower()
            if any(word in lowered for word in PBX_ENDPOINTS + PBX_CSV_COLUMNS) \
                    or re.fullmatch(r"[123]000\d|[123]00[1-3]\d", text.strip()):
                offenders.append(f"{module}: {text[:60]!r}")
    assert not offenders, "PBX knowledge outside pbx/: " + "; ".join(offenders)


def test_the_knowledge_check_can_fail():
    assert any("recording/download" in text for text in _code_strings(PACKAGE_DIR / "pbx" / "sseries" / "client.py"))
