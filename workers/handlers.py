"""The handler registry: handler names a worker declares, and where their code lives.

``--handlers echo,sleep`` names built-ins; ``--handlers resize=examples.images:resize``
binds a name to ``module:function`` (how deployed plugins fit in). References are checked
when the worker starts, so a typo fails at once with a clear message, not per job.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any, cast

__all__ = ["BUILTINS", "HandlerError", "parse_handlers", "resolve"]

BUILTINS: dict[str, str] = {
    "echo": "jetflow.workers.builtins:echo",
    "sleep": "jetflow.workers.builtins:sleep",
    "fail": "jetflow.workers.builtins:fail",
}


class HandlerError(ValueError):
    pass


def parse_handlers(spec: str) -> dict[str, str]:
    """``"echo,img=pkg.mod:fn"`` -> ``{"echo": "jetflow.workers.builtins:echo",
    "img": "pkg.mod:fn"}``; ``@pkg.mod`` binds every handler of the module's ``HANDLERS``
    mapping (name -> function)."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        if item.startswith("@"):
            out.update(bundle(item[1:]))
            continue
        name, _, ref = item.partition("=")
        if not ref:
            if name not in BUILTINS:
                raise HandlerError(f"unknown handler {name!r}: built-ins are "
                                   f"{', '.join(sorted(BUILTINS))}; bind others as "
                                   "name=module:function")
            ref = BUILTINS[name]
        out[name] = ref
    if not out:
        raise HandlerError("no handlers given (e.g. --handlers echo,sleep)")
    return out


def bundle(module_name: str) -> dict[str, str]:
    """The handlers a module lists in ``HANDLERS``, as references."""
    _current_directory_importable()
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to fix
        raise HandlerError(f"cannot import {module_name!r} for @{module_name}: "
                           f"{type(exc).__name__}: {exc}") from None
    handlers = getattr(module, "HANDLERS", None)
    if not isinstance(handlers, dict) or not handlers:
        raise HandlerError(f"@{module_name}: the module has no HANDLERS mapping of name -> "
                           "function")
    return {str(name): f"{module_name}:{getattr(fn, '__name__', name)}"
            for name, fn in handlers.items()}


def resolve(ref: str) -> Callable[..., Any]:
    """The function ``module:function`` names. Modules in the current directory are
    importable, whether the worker runs as ``jetflow worker`` or ``python -m``: the
    directory is appended to ``sys.path`` (after the installed packages, which it does
    not shadow)."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise HandlerError(f"handler reference {ref!r} must be module:function")
    _current_directory_importable()
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to fix
        where = ", ".join(p or "." for p in sys.path)
        raise HandlerError(f"cannot import {module_name!r} for handler {ref!r}: "
                           f"{type(exc).__name__}: {exc} (searched: {where})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise HandlerError(f"{ref!r}: {module_name} has no callable {attr!r}")
    return cast(Callable[..., Any], fn)


def _current_directory_importable() -> None:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
