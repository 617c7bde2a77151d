"""The layering, read from the import statements of every module (no module is imported).

Four floors, each importing only the ones below it: the domain (``jetflow.core``: pure,
nothing of jetflow outside itself, no I/O), the adapters (``jetflow.adapters``: the
domain and each other), the services (``jetflow.sentinel``, ``jetflow.workers``,
``jetflow.projections``: the domain, the adapters and their own package, never each
other), and on top the CLI (``jetflow.cli``), ``jetflow up`` (``jetflow.up``) and the
public API (``jetflow``). No import cycles between modules, counting every import (those
inside functions and under ``TYPE_CHECKING`` too). Nothing imports the repository's
folders by their own names (``core``, ``workers``...): installed, only ``jetflow`` exists.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "core"

SERVICES = ("jetflow.sentinel", "jetflow.workers", "jetflow.projections")
TOP = ("jetflow.cli", "jetflow.up", "jetflow.examples")
# what users write: it shows the public API, so it imports from the facade
USER_CODE = ("jetflow.examples",)
FLOORS = {"domain": 0, "adapters": 1, "services": 2, "top": 3}

# What the domain may not touch: the broker, files and databases, processes, exporters.
IO_MODULES = [
    "nats",
    "aiosqlite",
    "asyncio",
    "socket",
    "subprocess",
    "opentelemetry.sdk",
    "opentelemetry.exporter",
    "sqlite3",
    "pyarrow",
    "rich",
]
# The repository's folders are subpackages of jetflow once installed.
OLD_NAMES = ("core", "sentinel", "workers", "projections", "examples")

# Pure helpers of the sentinel (the service module itself is the adapter).
SENTINEL_PURE = ["intake", "replies"]


# -- reading the imports --------------------------------------------------------------------

def imported_modules(source: str, package: str) -> set[str]:
    """Every module name an import statement anywhere in ``source`` may load.

    ``from a import b`` yields both ``a`` and ``a.b`` (``b`` may be a submodule);
    relative imports are resolved against ``package``.
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _from_module(node, package)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _from_module(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def forbidden_imports(source: str, package: str) -> list[str]:
    """What a domain module imports that the domain may not: I/O, or jetflow outside it."""
    bad = []
    for name in imported_modules(source, package):
        io = any(name == io or name.startswith(io + ".") for io in IO_MODULES)
        if io or (_is_jetflow(name) and not _within(name, "jetflow.core")):
            bad.append(name)
    return sorted(bad)


def _is_jetflow(name: str) -> bool:
    return name == "jetflow" or name.startswith("jetflow.")


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


# -- the package's modules ---------------------------------------------------------------------

def package_dirs() -> dict[str, Path]:
    """pyproject's package-dir: ``jetflow`` -> jetflow/, ``jetflow.core`` -> core/..."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {name: ROOT / folder
            for name, folder in config["tool"]["setuptools"]["package-dir"].items()}


def package_modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name, with its file."""
    dirs = package_dirs()
    mapped = set(dirs.values())
    modules: dict[str, Path] = {}
    for package, folder in dirs.items():
        for path in folder.rglob("*.py"):
            if any(parent in mapped and parent != folder for parent in path.parents):
                continue  # (a mapped folder under another: it has its own entry)
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


MODULES = package_modules()


def package_of(module: str) -> str:
    """The package relative imports of ``module`` resolve against."""
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def imports_of(module: str) -> set[str]:
    """The package modules ``module`` imports (``from a import b``: ``a.b`` if that is a
    module, else ``a``)."""
    tree = ast.parse(MODULES[module].read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _from_module(node, package_of(module))
            subs = {f"{base}.{a.name}" for a in node.names} & MODULES.keys()
            found.update(subs or {base})
    return {name for name in found if name in MODULES and name != module}


def floor_of(module: str) -> str:
    if _within(module, "jetflow.core"):
        return "domain"
    if _within(module, "jetflow.adapters"):
        return "adapters"
    if any(_within(module, s) for s in SERVICES):
        return "services"
    if module == "jetflow" or any(_within(module, t) for t in TOP):
        return "top"
    raise AssertionError(f"{module} is on no floor: place it in tests/test_purity.py")


def service_of(module: str) -> str | None:
    return next((s for s in SERVICES if _within(module, s)), None)


def layering_violations(module: str, imported: set[str]) -> list[str]:
    """Why each of ``module``'s imports breaks the layering (empty when none does)."""
    mine, problems = floor_of(module), []
    for name in sorted(imported):
        theirs = floor_of(name)
        if name == "jetflow" and module != "jetflow" \
                and not any(_within(module, u) for u in USER_CODE):
            problems.append(f"{name} (the public facade: import the module that defines it)")
        elif FLOORS[theirs] > FLOORS[mine]:
            problems.append(f"{name} ({theirs} floor, above {mine})")
        elif mine == theirs == "services" and service_of(name) != service_of(module):
            problems.append(f"{name} (another service's internals)")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of more than one module that can each reach the others by imports."""
    reach = {node: _reachable(graph, node) for node in graph}
    found: list[list[str]] = []
    placed: set[str] = set()
    for node in sorted(graph):
        group = {node} | {m for m in reach[node] if node in reach.get(m, set())}
        if len(group) > 1 and node not in placed:
            found.append(sorted(group))
            placed |= group
    return found


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph.get(start, ()))
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return seen


def python_files_outside_package() -> Iterator[Path]:
    for folder in ("tests", "bench"):
        yield from (ROOT / folder).rglob("*.py")


# -- the tests -----------------------------------------------------------------------------

def test_the_package_is_found() -> None:
    """Guards the checks below: they read the modules the package really has."""
    for name in ("jetflow", "jetflow.core.job", "jetflow.adapters.bus", "jetflow.cli.main",
                 "jetflow.sentinel.service", "jetflow.workers.worker", "jetflow.up",
                 "jetflow.projections.projector"):
        assert name in MODULES, name
    assert MODULES["jetflow.core.job"] == CORE / "job.py"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if _within(m, "jetflow.core")))
def test_domain_module_imports_no_io_and_nothing_outside_the_domain(name: str) -> None:
    bad = forbidden_imports(MODULES[name].read_text(), package_of(name))
    assert not bad, f"{MODULES[name].relative_to(ROOT)} is the pure domain but imports {bad}"


@pytest.mark.parametrize("name", SENTINEL_PURE)
def test_pure_sentinel_helper_imports_no_io(name: str) -> None:
    source = (ROOT / "sentinel" / f"{name}.py").read_text()
    found = imported_modules(source, "jetflow.sentinel")
    bad = [n for n in found if any(n == io or n.startswith(io + ".") for io in IO_MODULES)]
    bad += [n for n in found if _within(n, "jetflow.sentinel.service")
            or _within(n, "jetflow.adapters")]
    assert not bad, f"sentinel/{name}.py is pure but imports {bad}"


def test_every_module_keeps_to_its_floor() -> None:
    problems = {f"{name} ({MODULES[name].relative_to(ROOT)})": bad
                for name in sorted(MODULES)
                if (bad := layering_violations(name, imports_of(name)))}
    assert not problems, f"imports that break the layering: {problems}"


def test_no_import_cycles() -> None:
    graph = {name: imports_of(name) for name in MODULES}
    assert not cycles(graph), f"modules that import each other: {cycles(graph)}"


def test_nothing_imports_the_folders_by_their_own_names() -> None:
    """``import core...`` works from the repository's root only; installed, it is
    ``jetflow.core``."""
    files = [*MODULES.values(), *python_files_outside_package()]
    bad = sorted(f"{path.relative_to(ROOT)}: {name}"
                 for path in files
                 for name in imported_modules(path.read_text(), "")
                 if name.split(".")[0] in OLD_NAMES)
    assert not bad, f"import jetflow.<folder>, not the folder: {bad}"


# -- the checker itself --------------------------------------------------------------------

def test_checker_catches_an_adapter_that_talks_to_nats() -> None:
    assert "nats" in {n.split(".")[0] for n in
                      imported_modules(MODULES["jetflow.adapters.bus"].read_text(), "")}
    assert forbidden_imports("import nats", "jetflow.core") == ["nats"]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import nats", ["nats"]),
        ("import nats.js.api as api", ["nats.js.api"]),
        ("from nats.aio.client import Client", ["nats.aio.client", "nats.aio.client.Client"]),
        ("def f():\n    import asyncio\n", ["asyncio"]),
        ("from jetflow.adapters import bus", ["jetflow.adapters", "jetflow.adapters.bus"]),
        ("from .. import up", ["jetflow", "jetflow.up"]),
        ("from jetflow import connect", ["jetflow", "jetflow.connect"]),
        ("from opentelemetry.sdk.trace import TracerProvider",
         ["opentelemetry.sdk.trace", "opentelemetry.sdk.trace.TracerProvider"]),
        ("import opentelemetry.trace", []),
        ("import socketserver", []),
        ("from jetflow.core import subjects, codec", []),
        ("from . import job", []),
        ("import natsort", []),
    ],
)
def test_checker_detects_forbidden_imports(source: str, expected: list[str]) -> None:
    assert forbidden_imports(source, "jetflow.core") == sorted(expected)


@pytest.mark.parametrize(
    ("module", "imported", "expected"),
    [
        ("jetflow.core.job", {"jetflow.adapters.bus"}, ["jetflow.adapters.bus (adapters floor, "
                                                        "above domain)"]),
        ("jetflow.adapters.bus", {"jetflow.cli.main"}, ["jetflow.cli.main (top floor, above "
                                                        "adapters)"]),
        ("jetflow.workers.worker", {"jetflow.projections.store"},
         ["jetflow.projections.store (another service's internals)"]),
        ("jetflow.workers.worker", {"jetflow.workers.pool", "jetflow.adapters.bus",
                                    "jetflow.core.job"}, []),
        ("jetflow.cli.main", {"jetflow.sentinel.service", "jetflow.up"}, []),
        ("jetflow.up", {"jetflow"}, ["jetflow (the public facade: import the module that "
                                     "defines it)"]),
    ],
)
def test_layering_checker(module: str, imported: set[str], expected: list[str]) -> None:
    assert layering_violations(module, imported) == expected


def test_cycle_finder() -> None:
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
