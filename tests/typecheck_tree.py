"""The ``jetflow`` tree mypy checks: ``build/typecheck/jetflow/``, symlinks to the files
of ``jetflow/`` and to the design card's folders that the package maps onto its
subpackages (``core/`` is ``jetflow.core``...). mypy does not follow setuptools'
editable finder, so it reads the package through this tree (``mypy_path`` in
pyproject.toml). Built anew on each run: ``python -m tests.typecheck_tree``."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "typecheck"


def package_dirs() -> dict[str, str]:
    """pyproject's ``[tool.setuptools.package-dir]``: package name -> folder."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return dict(config["tool"]["setuptools"]["package-dir"])


def build() -> Path:
    shutil.rmtree(TREE, ignore_errors=True)
    top = TREE / "jetflow"
    top.mkdir(parents=True)
    mapped = {name.split(".", 1)[1]: folder
              for name, folder in package_dirs().items() if "." in name}
    for entry in (ROOT / "jetflow").iterdir():
        if entry.name != "__pycache__" and entry.name not in mapped:
            (top / entry.name).symlink_to(entry)
    for sub, folder in mapped.items():
        (top / sub).symlink_to(ROOT / folder, target_is_directory=True)
    return TREE


if __name__ == "__main__":
    print(build())
