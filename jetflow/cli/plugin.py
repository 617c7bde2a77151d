"""``jetflow plugin deploy|list|activate|retire``: the plugin registry."""

from __future__ import annotations

import argparse
import getpass
import json
import socket
import time
from typing import Any

from jetflow.cli.options import common_options

__all__ = ["add_commands"]


async def _store(a: argparse.Namespace) -> Any:
    from jetflow.adapters.bus import connect
    from jetflow.adapters.plugins import PluginStore

    nc = await connect(a.nats, name="jetflow-plugin")
    return nc, PluginStore(nc)


def _by() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except (KeyError, OSError):
        return socket.gethostname()


async def cmd_deploy(a: argparse.Namespace) -> int:
    nc, store = await _store(a)
    try:
        deployed = await store.deploy(a.path, by=_by())
    finally:
        await nc.close()
    if a.json:
        print(json.dumps(dict(deployed)))
    elif deployed.get("created"):
        print(f"deployed {deployed['name']} {deployed['version']} (sha256 "
              f"{deployed['sha256'][:12]}): active")
    else:
        print(f"unchanged: {deployed['name']} {deployed['version']} is deployed with this "
              f"source already ({deployed['status']})")
    return 0


async def cmd_list(a: argparse.Namespace) -> int:
    nc, store = await _store(a)
    try:
        registry = await store.registry()
    finally:
        await nc.close()
    rows = [v.as_json() for name in sorted(registry.versions)
            for v in registry.versions[name].values()]
    if a.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print("no plugins deployed (jetflow plugin deploy PATH)")
        return 0
    wn = max(len(r["name"]) for r in rows)
    wv = max(max(len(r["version"]) for r in rows), 7)
    print(f"{'NAME':<{wn}}  {'VERSION':<{wv}}  STATUS      SHA256        DEPLOYED             "
          "ENVIRONMENTS")
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["deployed_at"]))
        print(f"{r['name']:<{wn}}  {r['version']:<{wv}}  {r['status']:<10}  "
              f"{r['sha256'][:12]}  {when}  {_envs(r)}")
    return 0


def _envs(r: dict[str, Any]) -> str:
    """How the workers' environments for a version stand (- without REQUIREMENTS)."""
    if not r["requirements"]:
        return "-"
    ready = sum(1 for v in r["envs"].values() if v == "ready")
    failed = [v for v in r["envs"].values() if v != "ready"]
    text = f"{ready} ready" + (f", {len(failed)} failed: {failed[0][:80]}" if failed else "")
    return text if r["envs"] else "being built"


async def _change(a: argparse.Namespace, verb: str) -> int:
    nc, store = await _store(a)
    try:
        if verb == "activate":
            out = await store.activate(a.name, a.version)
        else:
            out = await store.retire(a.name, a.version)
    finally:
        await nc.close()
    if a.json:
        print(json.dumps(out))
    elif not out["changed"]:
        print(f"unchanged: {out['name']} {out['version']} is {out['status']} already")
    else:
        print(f"{out['name']} {out['version']}: {out['status']}")
    return 0


async def cmd_activate(a: argparse.Namespace) -> int:
    return await _change(a, "activate")


async def cmd_retire(a: argparse.Namespace) -> int:
    return await _change(a, "retire")


def add_commands(sub: Any) -> None:
    top = sub.add_parser("plugin", help="deploy, list, activate and retire plugins",
                         description="Plugins: versioned Python modules stored in the "
                                     "JF_PLUGINS object store, their life in the log.")
    common_options(top)
    cmds = top.add_subparsers(dest="plugin_command", required=True, metavar="COMMAND")

    p = cmds.add_parser("deploy", help="store a plugin file as a new active version (the "
                                       "same source again is a no-op)")
    common_options(p)
    p.add_argument("path", metavar="PATH")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_deploy)

    p = cmds.add_parser("list", help="every version: status, sha256, deploy time")
    common_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_list)

    p = cmds.add_parser("activate", help="make a version the active one (a rollback)")
    common_options(p)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--version", required=True)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_activate)

    p = cmds.add_parser("retire", help="retire a version (default: the active one)")
    common_options(p)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--version")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_retire)
