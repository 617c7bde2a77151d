"""``jetflow export --parquet DIR`` against a real nats-server: a directory it cannot use
is one clear error line before anything is read, and however exports into one directory
overlap, it holds each sequence of the log exactly once and loses none."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from core.bus import connect
from core.server import EmbeddedServer
from core.subjects import EVENTS_STREAM
from projections.export import ExportError, ExportResult, export_parquet
from tests.test_projections_e2e import cli, publish_synthetic

pytestmark = pytest.mark.e2e


def seqs_in(out_dir: Path) -> list[int]:
    return sorted(pads.dataset(out_dir, partitioning="hive").to_table()["seq"].to_pylist())


def hidden_entries(out_dir: Path) -> list[str]:
    return sorted(p.name for p in out_dir.rglob(".*"))


async def export(url: str, out_dir: Path, *, from_seq: int = 1, chunk: int = 100
                 ) -> ExportResult:
    nc = await connect(url)
    try:
        return await export_parquet(nc, out_dir, from_seq=from_seq, chunk=chunk)
    finally:
        await nc.close()


# -- a directory it cannot use -----------------------------------------------------------------

@pytest.mark.parametrize("where", ["a regular file", "under a regular file", "/sys/x",
                                   "/proc/x"])
async def test_a_bad_directory_is_one_error_line(server: EmbeddedServer, tmp_path: Path,
                                                 where: str) -> None:
    await publish_synthetic(server.url, 50)
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    out_dir = {"a regular file": afile, "under a regular file": afile / "sub"}.get(
        where, Path(where))
    code, out, err = await cli(server.url, "export", "--parquet", str(out_dir))
    assert code == 1 and out == "", out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(out_dir) in lines[0], err
    assert afile.read_text() == "keep me"


async def test_an_unreadable_parquet_file_is_refused_before_anything_is_written(
        server: EmbeddedServer, tmp_path: Path) -> None:
    await publish_synthetic(server.url, 50)
    out_dir = tmp_path / "out"
    (out_dir / "day=x").mkdir(parents=True)
    (out_dir / "day=x" / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ExportError, match="bad.parquet is not a readable Parquet file"):
        await export(server.url, out_dir)
    assert sorted(p.name for p in out_dir.rglob("*")) == ["bad.parquet", "day=x"]


async def test_two_exports_into_one_directory_cannot_run_at_once(
        server: EmbeddedServer, tmp_path: Path) -> None:
    await publish_synthetic(server.url, 50)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running export holds it
        with pytest.raises(ExportError, match="another export is writing into"):
            await export(server.url, out_dir)
    finally:
        os.close(fd)
    assert list(out_dir.iterdir()) == []
    assert (await export(server.url, out_dir)).events == 50


# -- overlapping exports -----------------------------------------------------------------------

async def test_an_overlapping_tail_export_replaces_rows_instead_of_adding_them(
        server: EmbeddedServer, tmp_path: Path) -> None:
    """The acceptance report, through the command: a full export, then --from-seq N."""
    head = await publish_synthetic(server.url, 400)
    out_dir = tmp_path / "parquet"
    for args in ([], ["--from-seq", "140"]):
        code, out, err = await cli(server.url, "export", "--parquet", str(out_dir), *args)
        assert code == 0, out + err
    assert seqs_in(out_dir) == list(range(1, head + 1))
    assert hidden_entries(out_dir) == []


async def test_any_re_export_leaves_each_sequence_once(server: EmbeddedServer,
                                                       tmp_path: Path) -> None:
    head = await publish_synthetic(server.url, 600)
    out_dir = tmp_path / "parquet"
    await export(server.url, out_dir, from_seq=350)
    assert seqs_in(out_dir) == list(range(350, head + 1))
    await export(server.url, out_dir)  # a superset
    assert seqs_in(out_dir) == list(range(1, head + 1))
    await export(server.url, out_dir, from_seq=1)  # the same range again
    assert seqs_in(out_dir) == list(range(1, head + 1))
    head = await publish_synthetic(server.url, 800, skip=600)
    result = await export(server.url, out_dir, from_seq=275, chunk=150)  # other chunks
    assert result.events == head - 274 and result.last_seq == head
    assert seqs_in(out_dir) == list(range(1, head + 1))
    await export(server.url, out_dir, from_seq=head + 1)  # nothing new: nothing changes
    assert seqs_in(out_dir) == list(range(1, head + 1))
    assert hidden_entries(out_dir) == []


async def test_a_re_export_keeps_rows_of_messages_gone_from_the_stream(
        server: EmbeddedServer, tmp_path: Path) -> None:
    head = await publish_synthetic(server.url, 300)
    out_dir = tmp_path / "parquet"
    await export(server.url, out_dir)
    nc = await connect(server.url)
    try:
        for seq in (1, 150):
            await nc.jetstream().delete_msg(EVENTS_STREAM, seq)
    finally:
        await nc.close()
    result = await export(server.url, out_dir)
    assert result.events == head - 2
    assert seqs_in(out_dir) == list(range(1, head + 1))
