"""Plugins: reading a plugin's constants from its source (pure), the registry's rules
(pure), and the registry against a real nats-server through the CLI (deploy, the no-op,
refusals, supersede, list, retire, rollback), the stored source verified by sha256."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest

from jetflow import Client
from jetflow.adapters.bus import connect
from jetflow.adapters.plugins import PluginStore
from jetflow.core.events import Event
from jetflow.core.plugin import PluginError, PluginRegistry, read_plugin, source_sha256
from tests.conftest import url_of
from tests.test_projections_e2e import cli as run_cli

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "plugins" / "csv_to_parquet.py"

GOOD = b'''
NAME = "p1"
VERSION = "1.0"
OUTPUTS = {"out": [{"name": "a", "type": "int64", "nullable": False}]}
REQUIREMENTS = ["pyarrow>=14"]

def parse(path, ctx):
    return None
'''


def test_the_constants_are_read_without_running_the_plugin() -> None:
    meta = read_plugin(GOOD + b"\nimport module_that_is_not_installed\n", "p1.py")
    assert (meta.name, meta.version, meta.parse_args) == ("p1", "1.0", 2)
    assert meta.outputs == {"out": [{"name": "a", "type": "int64", "nullable": False}]}
    assert meta.requirements == ("pyarrow>=14",)
    assert read_plugin(b"NAME = 'x'\nVERSION = 2\ndef parse(path): pass\n").version == "2"


@pytest.mark.parametrize(("source", "message"), [
    (b"def parse(path):\n  pass\nVERSION='1'", "NAME must be a string"),
    (b"NAME='a b'\nVERSION='1'\ndef parse(p): pass", "NAME must be a string"),
    (b"NAME='a'\ndef parse(p): pass", "VERSION must be a version string"),
    (b"NAME='a'\nVERSION='1'", "defines no parse(path) or parse(path, ctx)"),
    (b"NAME='a'\nVERSION='1'\ndef parse(a, b, c): pass", "parse takes 3 arguments"),
    (b"NAME='a'\nVERSION='1'\nasync def parse(p): pass", "not async"),
    (b"NAME='a'\nVERSION=make()\ndef parse(p): pass", "VERSION must be a literal"),
    (b"NAME='a'\nVERSION='1'\nOUTPUTS={'o': [{'name': 'x', 'type': 'int'}]}\n"
     b"def parse(p): pass", "has type 'int'; types:"),
    (b"NAME='a'\nVERSION='1'\nOUTPUTS={'o': []}\ndef parse(p): pass", "list of columns"),
    (b"NAME='a'\nVERSION='1'\nREQUIREMENTS='pandas'\ndef parse(p): pass",
     "REQUIREMENTS must be a list"),
    (b"NAME='a'\nVERSION='1'\ndef parse(p)\n", "not valid Python: line 3"),
])
def test_a_bad_plugin_is_refused_with_the_reason(source: bytes, message: str) -> None:
    with pytest.raises(PluginError) as info:
        read_plugin(source, "bad.py")
    assert message in str(info.value)


def deployed(seq: int, version: str, sha: str, outputs: object = None) -> Event:
    return Event("plugin", "p1", "deployed", float(seq), {
        "version": version, "sha256": sha, "outputs": outputs}, seq=seq)


def test_the_registry_supersedes_retires_and_rolls_back() -> None:
    r = PluginRegistry()
    r.observe(deployed(1, "1.0", "a" * 64))
    r.observe(deployed(2, "2.0", "b" * 64))
    assert [(v.version, v.status) for v in r.versions["p1"].values()] == [
        ("1.0", "superseded"), ("2.0", "active")]
    r.observe(Event("plugin", "p1", "activated", 3.0, {"version": "1.0"}, seq=3))
    assert r.active("p1") is not None and r.active("p1").version == "1.0"  # type: ignore[union-attr]
    assert r.versions["p1"]["2.0"].status == "superseded"
    r.observe(Event("plugin", "p1", "retired", 4.0, {"version": "1.0"}, seq=4))
    assert r.active("p1") is None and r.last_seq["p1"] == 4


def test_the_registry_refuses_a_changed_source_under_the_same_version() -> None:
    r = PluginRegistry()
    meta = read_plugin(GOOD)
    r.observe(deployed(1, "1.0", source_sha256(GOOD), meta.outputs))
    assert r.deploy_check(meta, source_sha256(GOOD)) is not None  # the same: a no-op
    with pytest.raises(PluginError, match="deployed already with other source"):
        r.deploy_check(meta, "c" * 64)
    other = read_plugin(GOOD.replace(b'"int64"', b'"int32"'))
    with pytest.raises(PluginError, match="OUTPUTS: an output's schema changes only with a "
                                          "new VERSION"):
        r.deploy_check(other, source_sha256(GOOD.replace(b'"int64"', b'"int32"')))
    bumped = read_plugin(GOOD.replace(b'"1.0"', b'"1.1"'))
    assert r.deploy_check(bumped, "d" * 64) is None  # a new version


def test_the_example_plugin_streams_filtered_text_batches(tmp_path: Path) -> None:
    """parse() itself, in-process: text columns (the contract types them), filtered."""
    meta = read_plugin(EXAMPLE.read_bytes(), str(EXAMPLE))
    assert meta.name == "csv_to_parquet" and meta.outputs is not None
    csv = tmp_path / "orders.csv"
    csv.write_text("order_id,customer,amount,day\n" + "".join(
        f"{i},c{i % 3},{i * 1.5},2026-12-0{1 + i % 9}\n" for i in range(100)))
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import csv_to_parquet  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    batches = list(csv_to_parquet.parse(str(csv), SimpleNamespace(args={"min_amount": 30})))
    table = pa.Table.from_batches(batches)
    assert table.num_rows == 80 and table.schema.field("day").type == pa.string()
    assert min(float(a) for a in table["amount"].to_pylist()) == 30.0


async def cli(url: str, *argv: str) -> tuple[int, str, str]:
    return await run_cli(url, "plugin", *argv, cwd=ROOT)


async def test_deploy_list_retire_and_roll_back(client: Client, tmp_path: Path) -> None:
    url = url_of(client)
    code, out, err = await cli(url, "deploy", str(EXAMPLE), "--json")
    assert code == 0, err
    first = json.loads(out)
    assert first["created"] and first["version"] == "1.0.0" and first["status"] == "active"
    assert first["sha256"] == source_sha256(EXAMPLE.read_bytes())
    code, out, _ = await cli(url, "deploy", str(EXAMPLE))
    assert code == 0 and out.startswith("unchanged:"), out

    changed = tmp_path / "csv_to_parquet.py"
    changed.write_text(EXAMPLE.read_text() + "\n# a change\n")
    code, out, err = await cli(url, "deploy", str(changed))
    assert code == 1 and "deployed already with other source" in err and \
        err.count("\n") == 1, err
    changed.write_text(EXAMPLE.read_text().replace('"float64", "nullable": True',
                                                   '"float32", "nullable": True'))
    code, out, err = await cli(url, "deploy", str(changed))
    assert code == 1 and "other OUTPUTS" in err, err
    changed.write_text(EXAMPLE.read_text().replace('VERSION = "1.0.0"', 'VERSION = "1.1.0"'))
    code, out, err = await cli(url, "deploy", str(changed), "--json")
    assert code == 0 and json.loads(out)["version"] == "1.1.0", err

    code, out, _ = await cli(url, "list", "--json")
    assert [(r["version"], r["status"]) for r in json.loads(out)] == [
        ("1.0.0", "superseded"), ("1.1.0", "active")]
    code, out, _ = await cli(url, "list")
    assert "superseded" in out and "active" in out and "SHA256" in out

    code, out, err = await cli(url, "activate", "csv_to_parquet", "--version", "1.0.0")
    assert code == 0 and "1.0.0: active" in out, err
    code, out, _ = await cli(url, "retire", "csv_to_parquet", "--json")
    assert json.loads(out)["version"] == "1.0.0" and json.loads(out)["status"] == "retired"
    code, out, _ = await cli(url, "list", "--json")
    assert [(r["version"], r["status"]) for r in json.loads(out)] == [
        ("1.0.0", "retired"), ("1.1.0", "superseded")]
    code, out, err = await cli(url, "retire", "csv_to_parquet")
    assert code == 1 and "has no active version" in err
    code, out, err = await cli(url, "activate", "nope", "--version", "1")
    assert code == 1 and "no plugin 'nope' is deployed" in err
    code, out, err = await cli(url, "deploy", str(tmp_path / "missing.py"))
    assert code == 1 and "cannot read" in err and "Traceback" not in err

    nc = await connect(url)
    try:
        store = PluginStore(nc)
        source = await store.source("csv_to_parquet", "1.0.0", first["sha256"])
        assert source == EXAMPLE.read_bytes()
        with pytest.raises(PluginError, match="refused"):
            await store.source("csv_to_parquet", "1.0.0", "0" * 64)
    finally:
        await nc.close()
