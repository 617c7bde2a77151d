"""The pure core stays pure: no module of it imports I/O, the broker or an adapter.

Every ``core/*.py`` must be classified below, so a new module cannot slip in unclassified.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "core"

# Modules with no I/O: events, state machines, codec, subjects, scheduling, retry policy.
PURE = [
    "__init__",
    "argtypes",
    "codec",
    "events",
    "fleet",
    "job",
    "metadata",
    "render",
    "retry",
    "scheduler",
    "subjects",
    "submission",
]
# Adapters: NATS, the server process, the client, the CLI, the process runtime, the
# stack of service processes.
IMPURE = ["bus", "natsclient", "server", "client", "cli", "runtime", "stack", "tracing",
          "collector", "trace_cli"]

# Pure helpers of the sentinel (the service module itself is the adapter).
SENTINEL_PURE = ["intake", "replies"]

FORBIDDEN = [
    "nats",
    "aiosqlite",
    "asyncio",
    "socket",
    "subprocess",
    "opentelemetry.sdk",
    "opentelemetry.exporter",
    "sqlite3",
] + [f"core.{name}" for name in IMPURE]


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
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def forbidden_imports(source: str, package: str) -> list[str]:
    return sorted(
        name
        for name in imported_modules(source, package)
        for bad in FORBIDDEN
        if name == bad or name.startswith(bad + ".")
    )


def core_modules() -> set[str]:
    return {path.stem for path in CORE.glob("*.py")}


def test_every_core_module_is_classified() -> None:
    assert not set(PURE) & set(IMPURE), "a module cannot be both pure and impure"
    unclassified = core_modules() - set(PURE) - set(IMPURE)
    assert not unclassified, (
        f"classify {sorted(unclassified)} in tests/test_purity.py as PURE or IMPURE"
    )


def test_every_pure_module_exists() -> None:
    missing = set(PURE) - core_modules()
    assert not missing, f"PURE names modules that do not exist: {sorted(missing)}"


@pytest.mark.parametrize("name", PURE)
def test_pure_core_module_imports_no_io(name: str) -> None:
    source = (CORE / f"{name}.py").read_text()
    bad = forbidden_imports(source, "core")
    assert not bad, f"core/{name}.py is pure but imports {bad}"


@pytest.mark.parametrize("name", SENTINEL_PURE)
def test_pure_sentinel_helper_imports_no_io(name: str) -> None:
    source = (ROOT / "sentinel" / f"{name}.py").read_text()
    bad = forbidden_imports(source, "sentinel")
    bad += [n for n in imported_modules(source, "sentinel") if n.startswith("sentinel.service")]
    assert not bad, f"sentinel/{name}.py is pure but imports {bad}"


def test_some_impure_module_really_is_impure() -> None:
    """Guards the checker itself: the adapter that talks to NATS is caught."""
    assert "nats" in forbidden_imports((CORE / "bus.py").read_text(), "core")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import nats", ["nats"]),
        ("import nats.js.api as api", ["nats.js.api"]),
        ("from nats.aio.client import Client", ["nats.aio.client", "nats.aio.client.Client"]),
        ("def f():\n    import asyncio\n", ["asyncio"]),
        ("from core import bus", ["core.bus"]),
        ("from . import runtime", ["core.runtime"]),
        ("from .client import Client", ["core.client", "core.client.Client"]),
        ("from opentelemetry.sdk.trace import TracerProvider",
         ["opentelemetry.sdk.trace", "opentelemetry.sdk.trace.TracerProvider"]),
        ("import opentelemetry.trace", []),
        ("import socketserver", []),
        ("from core import subjects, codec", []),
        ("import natsort", []),
    ],
)
def test_checker_detects_forbidden_imports(source: str, expected: list[str]) -> None:
    assert forbidden_imports(source, "core") == sorted(expected)
