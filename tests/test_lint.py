"""The code stays ruff-clean and type-checks under ``mypy --strict`` (configured in
pyproject.toml): part of the test suite, so CI holds every change to it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests import typecheck_tree

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_ruff_is_clean() -> None:
    done = _run("ruff", "check", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_strict_is_clean() -> None:
    typecheck_tree.build()  # the jetflow package as mypy reads it
    done = _run("mypy")
    assert done.returncode == 0, done.stdout + done.stderr
