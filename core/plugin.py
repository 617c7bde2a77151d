"""Plugins as source files and as versions in the log. Pure.

A plugin is one Python module file: ``parse(path, ctx)`` (or ``parse(path)``) and the
module constants ``NAME``, ``VERSION``, optional ``OUTPUTS`` (per output, its columns:
``{"name", "type", "nullable"}``), ``REQUIREMENTS`` (pip requirement strings) and
``MAX_QUARANTINE`` (the share of an output's rows that may break its contract, 0.1 by
default).
:func:`read_plugin` reads them from the source's syntax tree (literals only, as
Casparian's publisher does with ``literal_eval``), so deploying never runs the plugin nor
needs its requirements installed. :class:`PluginRegistry` folds the ``jf.plugin.<name>.*``
events (``deployed``, ``activated``, ``retired``) into each version's status: ``active``
(at most one per name), ``superseded`` or ``retired``; :meth:`PluginRegistry.deploy_check`
says whether a source is a new version, the one already deployed, or refused, and why.
"""

from __future__ import annotations

import ast
import gc
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from jetflow.core.events import Event

__all__ = ["PluginMeta", "PluginError", "PluginVersion", "PluginRegistry", "read_plugin",
           "source_sha256", "ARROW_TYPES", "normalised_requirements", "PLUGIN_ROUTE", "env_route",
           "plugin_route"]

# What a worker that runs deployed plugins announces among its handlers; the sentinel
# offers a plugin job (one with a pinned version) to such workers only.
PLUGIN_ROUTE = "@plugins"


def plugin_route(name: str) -> str:
    """What a plugin's jobs (of a version without REQUIREMENTS) are routed by: announced
    by a worker that serves only some plugins (``--plugins NAMES``), granted by the
    sentinel to one that announces :data:`PLUGIN_ROUTE` (``--plugins all``)."""
    return f"@plugin:{name}"


def env_route(name: str, version: str) -> str:
    """What a plugin job whose version has REQUIREMENTS is routed by: the sentinel grants
    it to a worker once that worker has recorded ``env_ready`` (or ``env_failed``, so that
    the job fails there with the installer's message) for the version."""
    return f"@env:{name}:{version}"

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}\Z")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}\Z")
DEFAULT_MAX_QUARANTINE = 0.1  # share of an output's rows that may break its contract
# The Arrow types an OUTPUTS column may declare (pyarrow's names for them).
ARROW_TYPES = frozenset({
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "string", "large_string", "binary", "large_binary",
    "date32", "date64", "timestamp[s]", "timestamp[ms]", "timestamp[us]", "timestamp[ns]",
    "time32[s]", "time32[ms]", "time64[us]", "time64[ns]", "decimal128(38, 9)"})


class PluginError(ValueError):
    """A plugin source that cannot be deployed; the message names the problem."""


@dataclass(frozen=True)
class PluginMeta:
    name: str
    version: str
    outputs: dict[str, list[dict[str, Any]]] | None
    requirements: tuple[str, ...]
    parse_args: int  # 1: parse(path), 2: parse(path, ctx)
    max_quarantine: float = DEFAULT_MAX_QUARANTINE


def source_sha256(source: bytes) -> str:
    return hashlib.sha256(source).hexdigest()


def _parse(source: bytes, filename: str) -> ast.Module:
    """``ast.parse`` with the garbage collector held off: on CPython 3.11 a finalizer that
    runs in the middle of building the tree fails it with "AST constructor recursion depth
    mismatch" (CPython gh-106905)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(source, filename)
    finally:
        if enabled:
            gc.enable()


def read_plugin(source: bytes, filename: str = "<plugin>") -> PluginMeta:
    """The plugin's constants and ``parse`` signature, from its syntax tree."""
    try:
        tree = _parse(source, filename)
    except SyntaxError as exc:
        raise PluginError(f"{filename}: not valid Python: line {exc.lineno}: {exc.msg}"
                          ) from None
    constants = _constants(filename, tree)
    parse_args = _parse_args(filename, tree)
    name, version = constants.get("NAME"), constants.get("VERSION")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise PluginError(f"{filename}: NAME must be a string of 1-64 letters, digits, _ "
                          f"or - (starting with a letter), got {name!r}")
    if isinstance(version, int | float) and not isinstance(version, bool):
        version = str(version)
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise PluginError(f"{filename}: VERSION must be a version string such as \"1.0.0\", "
                          f"got {version!r}")
    return PluginMeta(name, version, _outputs(filename, constants.get("OUTPUTS")),
                      _requirements(filename, constants.get("REQUIREMENTS")), parse_args,
                      _share(filename, constants.get("MAX_QUARANTINE")))


def _share(filename: str, value: Any) -> float:
    if value is None:
        return DEFAULT_MAX_QUARANTINE
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise PluginError(f"{filename}: MAX_QUARANTINE must be a share between 0 and 1 "
                          f"(0.1: a tenth of the rows), got {value!r}")
    return float(value)


def _constants(filename: str, tree: ast.Module) -> dict[str, Any]:
    constants: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and target.id in _CONSTANTS:
                    constants[target.id] = _literal(filename, target.id, node.value)
    return constants


def _parse_args(filename: str, tree: ast.Module) -> int:
    """How many positional arguments the module's ``parse`` takes (1 or 2)."""
    found = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
             and n.name == "parse"]
    if not found:
        raise PluginError(f"{filename}: defines no parse(path) or parse(path, ctx)")
    node = found[-1]
    if isinstance(node, ast.AsyncFunctionDef):
        raise PluginError(f"{filename}: parse must be a plain function, not async")
    count = len(node.args.posonlyargs) + len(node.args.args)
    if count not in (1, 2):
        raise PluginError(f"{filename}: parse takes {count} arguments; it takes (path) or "
                          "(path, ctx)")
    return count


_CONSTANTS = ("NAME", "VERSION", "OUTPUTS", "REQUIREMENTS", "MAX_QUARANTINE")


def _literal(filename: str, name: str, node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise PluginError(f"{filename}: {name} must be a literal (strings, numbers, lists, "
                          f"dicts), line {node.lineno}") from None


def _outputs(filename: str, value: Any) -> dict[str, list[dict[str, Any]]] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise PluginError(f"{filename}: OUTPUTS must map each output name to its columns")
    out: dict[str, list[dict[str, Any]]] = {}
    for output, columns in value.items():
        where = f"{filename}: OUTPUTS[{output!r}]"
        if not isinstance(output, str) or not NAME_RE.match(output):
            raise PluginError(f"{where}: an output name is 1-64 letters, digits, _ or -")
        if not isinstance(columns, list) or not columns:
            raise PluginError(f"{where} must be a list of columns")
        out[output] = [_column(where, col) for col in columns]
        names = [c["name"] for c in out[output]]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise PluginError(f"{where}: column(s) {twice} twice")
    return out


def _column(where: str, col: Any) -> dict[str, Any]:
    if not isinstance(col, dict) or not isinstance(col.get("name"), str):
        raise PluginError(f"{where}: each column is {{\"name\", \"type\", \"nullable\"}}")
    type_ = col.get("type")
    if type_ not in ARROW_TYPES:
        raise PluginError(f"{where}: column {col['name']!r} has type {type_!r}; types: "
                          f"{', '.join(sorted(ARROW_TYPES))}")
    nullable = col.get("nullable", True)
    if not isinstance(nullable, bool):
        raise PluginError(f"{where}: column {col['name']!r}: nullable is true or false")
    unknown = sorted(set(col) - {"name", "type", "nullable"})
    if unknown:
        raise PluginError(f"{where}: column {col['name']!r}: unknown keys {unknown}")
    return {"name": col["name"], "type": type_, "nullable": nullable}


def _requirements(filename: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple) or not all(isinstance(r, str) and r.strip()
                                                        for r in value):
        raise PluginError(f"{filename}: REQUIREMENTS must be a list of pip requirement "
                          "strings")
    return tuple(r.strip() for r in value)


def normalised_requirements(requirements: tuple[str, ...] | list[str]) -> str:
    """One requirement per line, lower-case, sorted, without spaces: what an
    environment's key hashes (two plugins that need the same share one)."""
    return "\n".join(sorted({re.sub(r"\s+", "", r).lower() for r in requirements}))


@dataclass
class PluginVersion:
    name: str
    version: str
    sha256: str
    outputs: dict[str, list[dict[str, Any]]] | None
    requirements: list[str]
    deployed_at: float
    by: str
    status: str = "active"  # active, superseded, retired
    seq: int = 0
    envs: dict[str, str] = field(default_factory=dict)  # worker -> "ready" or the error

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256,
                "status": self.status, "outputs": self.outputs,
                "requirements": self.requirements, "deployed_at": self.deployed_at,
                "by": self.by, "envs": dict(self.envs)}


@dataclass
class PluginRegistry:
    """Every plugin's versions, folded from its events."""

    versions: dict[str, dict[str, PluginVersion]] = field(default_factory=dict)
    last_seq: dict[str, int] = field(default_factory=dict)  # name -> its last event's seq

    def observe(self, event: Event) -> None:
        if event.kind != "plugin":
            return
        name, d = event.id, event.data
        self.last_seq[name] = max(self.last_seq.get(name, 0), event.seq)
        versions = self.versions.setdefault(name, {})
        version = str(d.get("version"))
        if event.type == "deployed":
            versions[version] = PluginVersion(
                name, version, str(d["sha256"]), d.get("outputs"),
                list(d.get("requirements") or []), event.at, str(d.get("by") or ""),
                seq=event.seq)
            self._activate(name, version)
        elif event.type == "activated" and version in versions:
            self._activate(name, version)
        elif event.type == "retired" and version in versions:
            versions[version].status = "retired"
        elif event.type in ("env_ready", "env_failed") and version in versions:
            versions[version].envs[str(d.get("worker"))] = (
                "ready" if event.type == "env_ready" else str(d.get("error")))

    def _activate(self, name: str, version: str) -> None:
        for v in self.versions[name].values():
            if v.status == "active" and v.version != version:
                v.status = "superseded"
        self.versions[name][version].status = "active"

    def as_doc(self) -> dict[str, Any]:
        """JSON-able (the sentinel's snapshot)."""
        return {"versions": {n: [{**v.as_json(), "seq": v.seq} for v in vs.values()]
                             for n, vs in self.versions.items()},
                "last_seq": dict(self.last_seq)}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> PluginRegistry:
        r = cls(last_seq={str(k): int(v) for k, v in doc["last_seq"].items()})
        for name, versions in doc["versions"].items():
            r.versions[name] = {
                str(v["version"]): PluginVersion(
                    name, str(v["version"]), str(v["sha256"]), v["outputs"],
                    list(v["requirements"]), float(v["deployed_at"]), str(v["by"]),
                    str(v["status"]), int(v["seq"]), dict(v.get("envs") or {}))
                for v in versions}
        return r

    def active(self, name: str) -> PluginVersion | None:
        return next((v for v in self.versions.get(name, {}).values()
                     if v.status == "active"), None)

    def deploy_check(self, meta: PluginMeta, sha256: str) -> PluginVersion | None:
        """The version already deployed with this very source (a no-op), or None for a new
        version; :class:`PluginError` for a deploy that must be refused, saying why."""
        versions = self.versions.get(meta.name, {})
        for v in versions.values():
            if v.sha256 == sha256:
                return v
        same = versions.get(meta.version)
        if same is not None:
            if same.outputs != meta.outputs:
                raise PluginError(
                    f"{meta.name} {meta.version} is deployed with other OUTPUTS: an "
                    "output's schema changes only with a new VERSION")
            raise PluginError(f"{meta.name} {meta.version} is deployed already with other "
                              f"source (sha256 {same.sha256[:12]}): give this one a new "
                              "VERSION")
        return None
