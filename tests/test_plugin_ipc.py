"""A plugin's outputs travel from its child to the worker as Arrow IPC streams, and the
worker writes the Parquet (no server: the child's side runs in a thread here, the FIFOs
are real)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jetflow.workers import plugin_hooks as hooks
from jetflow.workers import plugin_run
from jetflow.workers.context import PermanentError
from jetflow.workers.outputs import Receiver

CONTRACT = {"nums": [{"name": "n", "type": "int64", "nullable": False}]}


def receiver(tmp: Path, outputs: dict[str, Any] | None = None) -> Receiver:
    (tmp / "ipc").mkdir(exist_ok=True)
    spec = {"name": "p", "version": "3", "output": str(tmp / "out"), "ipc": str(tmp / "ipc"),
            "outputs": outputs, "max_quarantine": 0.5}
    return Receiver(spec, "job1", 1)


async def child_side(r: Receiver, tmp: Path, outputs: list[tuple[str, Any]],
                     contracts: bool = True) -> BaseException | None:
    """What the child does, in a thread: each output streamed through a FIFO (checked
    against its contract, unless ``contracts`` is false: a child that does not)."""
    loop = asyncio.get_running_loop()
    hooks.send_frame = lambda frame: loop.call_soon_threadsafe(r.on_output, frame)

    def run() -> None:
        for n, (name, data) in enumerate(outputs):
            contract = (r.spec["outputs"] or {}).get(name) if contracts else None
            plugin_run._stream(tmp / "ipc" / f"job1-1-{n}.arrow", name, data, contract)
    try:
        await asyncio.to_thread(run)
    except BaseException as exc:  # noqa: BLE001 - what the child would report
        return exc
    finally:
        hooks.send_frame = None
    return None


def batches(count: int, rows: int, type_: pa.DataType | None = None
            ) -> Iterator[pa.RecordBatch]:
    for i in range(count):
        values = pa.array(range(i * rows, (i + 1) * rows)).cast(type_ or pa.int64())
        yield pa.record_batch([values], ["n"])


async def test_outputs_are_streamed_and_written_by_the_receiver(tmp_path: Path) -> None:
    r = receiver(tmp_path, CONTRACT)
    tags = pa.table({"t": ["x", None]})
    bad = pa.record_batch([pa.array(["1", "oops", None], pa.string())], ["n"])
    nums = iter([*batches(20, 5000, pa.string()), bad])  # cast to the contract's int64
    assert await child_side(r, tmp_path, [("nums", nums),
                                          ("tags", tags), ("none", iter([]))]) is None
    outputs = {o["name"]: o for o in await r.finish()}
    assert set(outputs) == {"nums", "nums_quarantine", "tags"}  # an empty output: none
    assert outputs["nums"]["rows"] == 100_001 and outputs["nums"]["quarantined"] == 2
    table = pq.read_table(tmp_path / "out" / "nums" / "job1-1.parquet")
    assert table.column_names == ["n", "_jf_job_id", "_jf_plugin_version"]
    assert table.column("n").to_pylist()[-2:] == [99_999, 1]
    assert set(table.column("_jf_plugin_version").to_pylist()) == {"3"}
    reasons = pq.read_table(tmp_path / "out" / "nums_quarantine" / "job1-1.parquet")
    assert reasons.column("_jf_reason").to_pylist() == [
        "n: 'oops' is not int64", "n: null in a non-nullable column"]
    assert outputs["tags"]["rows"] == 2
    assert os.listdir(tmp_path / "ipc") == []  # the FIFOs are gone
    assert not list((tmp_path / "out").rglob("*.tmp"))


async def test_a_schema_change_mid_stream_fails_and_discard_leaves_nothing(
        tmp_path: Path) -> None:
    r = receiver(tmp_path)
    changed = [*batches(2, 10), pa.record_batch([pa.array(["x"])], ["n"])]
    error = await child_side(r, tmp_path, [("nums", iter(changed))])
    assert isinstance(error, PermanentError)
    assert "batch 2 has schema (n: string), the first had (n: int64)" in str(error)
    await r.discard()
    assert list((tmp_path / "out").rglob("*.parquet*")) == []


async def test_a_contract_the_child_breaks_fails_on_the_workers_side(
        tmp_path: Path) -> None:
    r = receiver(tmp_path, CONTRACT)
    uncast = batches(10_000, 1000, pa.string())  # streamed as text: not the contract
    error = await child_side(r, tmp_path, [("nums", uncast)], contracts=False)
    assert isinstance(error, BrokenPipeError | OSError)  # the child stops, not hangs
    found = await r.failure()
    assert found is not None and "its contract declares (n: int64 not null)" in str(found)
    await r.discard()
    assert list((tmp_path / "out").rglob("*.parquet*")) == []


async def test_a_missing_contract_column_fails_in_the_child(tmp_path: Path) -> None:
    r = receiver(tmp_path, {"nums": [{"name": "missing", "type": "int64",
                                      "nullable": True}]})
    error = await child_side(r, tmp_path, [("nums", batches(3, 10))])
    assert isinstance(error, PermanentError) and "no column(s) ['missing']" in str(error)
    await r.discard()
    assert list((tmp_path / "out").rglob("*.parquet*")) == []


async def test_too_many_quarantined_rows_fail_the_attempt(tmp_path: Path) -> None:
    r = receiver(tmp_path, CONTRACT)  # max_quarantine 0.5
    rows = pa.record_batch([pa.array(["1", "x", "y", None], pa.string())], ["n"])
    assert await child_side(r, tmp_path, [("nums", iter([rows]))]) is None
    with pytest.raises(PermanentError, match="3 of 4 rows broke its contract"):
        await r.finish()
    assert list((tmp_path / "out").rglob("*.parquet*")) == []


async def test_discard_lets_go_a_stream_whose_child_died_before_opening_it(
        tmp_path: Path) -> None:
    r = receiver(tmp_path)
    fifo = tmp_path / "ipc" / "job1-1-0.arrow"
    os.mkfifo(fifo)
    r.on_output({"name": "nums", "path": str(fifo)})  # ...and the child was killed
    await asyncio.sleep(0.2)
    await asyncio.wait_for(r.discard(), 5)
    assert not fifo.exists()
    assert threading.active_count() < 50


async def test_an_output_named_twice_is_refused(tmp_path: Path) -> None:
    r = receiver(tmp_path)
    fifo = tmp_path / "ipc" / "a.arrow"
    os.mkfifo(fifo)
    r.on_output({"name": "nums", "path": str(fifo)})
    with pytest.raises(PermanentError, match="output 'nums' twice"):
        r.on_output({"name": "nums", "path": str(fifo)})
    await r.discard()
