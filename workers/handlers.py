"""The handler registry: handler names a worker declares, and where their code lives.

``--handlers echo,sleep`` names built-ins; ``--handlers resize=examples.images:resize``
binds a name to ``module:function`` (how deployed plugins fit in). References are checked
when the worker starts, so a typo fails at once with a clear message, not per job.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, cast

__all__ = ["BUILTINS", "HandlerError", "parse_handlers", "resolve"]

BUILTINS: dict[str, str] = {
    "echo": "workers.builtins:echo",
    "sleep": "workers.builtins:sleep",
    "fail": "workers.builtins:fail",
}


class HandlerError(ValueError):
    pass


def parse_handlers(spec: str) -> dict[str, str]:
    """``"echo,img=pkg.mod:fn"`` -> ``{"echo": "workers.builtins:echo", "img": "pkg.mod:fn"}``."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
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


def resolve(ref: str) -> Callable[..., Any]:
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise HandlerError(f"handler reference {ref!r} must be module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to fix
        raise HandlerError(f"cannot import {module_name!r} for {ref!r}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise HandlerError(f"{ref!r}: {module_name} has no callable {attr!r}")
    return cast(Callable[..., Any], fn)
