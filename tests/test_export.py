"""``jetflow export --parquet DIR`` against a real nats-server: a directory it cannot use
is one clear error line before anything is read, and however exports into one directory
overlap, it holds each sequence of the log exactly once and loses none; one that fails or
is killed mid-way loses none either (and the same export run again leaves each once), and
a ``*.parquet`` glob over the directory never finds its unfinished files."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

import jetflow.projections.export as export_module
from jetflow.adapters.bus import connect
from jetflow.adapters.nats_server import EmbeddedServer
from jetflow.adapters.reader import StreamReader
from jetflow.core.subjects import EVENTS_STREAM
from jetflow.projections.export import ExportError, ExportResult, _Runs, export_parquet
from tests.test_projections_e2e import cli, publish_synthetic

pytestmark = pytest.mark.e2e


def seqs_in(out_dir: Path) -> list[int]:
    return sorted(pads.dataset(out_dir, partitioning="hive").to_table()["seq"].to_pylist())


def hidden_entries(out_dir: Path) -> list[str]:
    return sorted(p.name for p in out_dir.rglob(".*"))


def hidden_parquet_files(out_dir: Path) -> list[Path]:
    """What ``DIR/**/*.parquet`` finds in hidden places (DuckDB enters hidden directories,
    as rglob does; Arrow's dataset reader skips them)."""
    return [f for f in out_dir.rglob("*.parquet")
            if any(part.startswith(".") for part in f.relative_to(out_dir).parts)]


def assert_a_parquet_glob_reads_only_final_files(out_dir: Path) -> None:
    """``read_parquet('DIR/**/*.parquet')`` reads exactly the rows Arrow's reader reads."""
    assert hidden_parquet_files(out_dir) == []
    files = sorted(out_dir.rglob("*.parquet"))
    seqs = [s for f in files for s in pq.read_table(f, columns=["seq"])["seq"].to_pylist()]
    assert sorted(seqs) == seqs_in(out_dir)


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
    (out_dir / "day=x" / "type=y").mkdir(parents=True)
    (out_dir / "day=x" / "type=y" / "part-bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ExportError, match="part-bad.parquet is not a readable Parquet file"):
        await export(server.url, out_dir)
    assert sorted(p.name for p in out_dir.rglob("*")) == ["day=x", "part-bad.parquet", "type=y"]


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


# -- failures and kills in the middle of an export -------------------------------------------

@pytest.fixture
def small_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read 10 messages at a time, so that ``chunk`` cuts a small log into several chunks
    (a chunk is written once the reads add up to it) and file names meet again."""
    def reader(*args: Any, **kwargs: Any) -> StreamReader:
        return StreamReader(*args, **{**kwargs, "batch": 10})
    monkeypatch.setattr(export_module, "StreamReader", reader)


def break_replace(monkeypatch: pytest.MonkeyPatch, out_dir: Path,
                  fails: Callable[[list[str]], bool]) -> list[str]:
    """Make the ``os.replace`` call that ``fails`` picks (given the sources of the calls
    so far, this one last) raise ENOSPC; at every call, check that a Parquet glob finds no
    file in a hidden directory. Returns the sources of the calls."""
    real, calls = os.replace, []

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append(os.fspath(src))
        assert hidden_parquet_files(out_dir) == []
        if fails(calls):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    return calls


@pytest.mark.usefixtures("small_reads")
@pytest.mark.parametrize("step", ["moving a later file in", "rewriting an earlier file"])
async def test_a_failure_mid_commit_loses_no_sequence_and_a_re_run_leaves_each_once(
        server: EmbeddedServer, tmp_path: Path, step: str) -> None:
    """A chunk that starts where one of the earlier export did (part-151, shorter now) is
    moved in, then moving in the next file or rewriting part-1 fails."""
    head = await publish_synthetic(server.url, 600)
    out_dir = tmp_path / "parquet"
    await export(server.url, out_dir, chunk=150)  # part-1, part-151, part-301, part-451
    with pytest.MonkeyPatch.context() as mp:
        if "moving" in step:  # the call after part-151 moved in
            calls = break_replace(mp, out_dir, lambda c: "part-000000000151" in "".join(c[-2:-1]))
        else:
            calls = break_replace(mp, out_dir, lambda c: c[-1].endswith(".tmp"))
        with pytest.raises(ExportError, match="No space left.*run the same export again"):
            await export(server.url, out_dir, from_seq=101, chunk=50)
    seqs = seqs_in(out_dir)
    assert set(seqs) == set(range(1, head + 1)) and len(seqs) > head  # some twice, none lost
    assert calls[-1].endswith(".tmp" if "rewriting" in step else ".staged")
    assert any("part-000000000151" in src for src in calls[:-1])
    assert_a_parquet_glob_reads_only_final_files(out_dir)
    assert hidden_entries(out_dir) == []  # the staging directory and the .tmp file are gone
    await export(server.url, out_dir, from_seq=101, chunk=50)
    assert seqs_in(out_dir) == list(range(1, head + 1))


async def test_an_export_killed_at_any_step_loses_nothing_and_a_re_run_leaves_each_once(
        server: EmbeddedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        small_reads: None) -> None:
    """Each rename of a commit (moving a staged file in, replacing a rewritten file) is
    preceded by a copy of DIR: what ``kill -9`` right then leaves, leftovers included."""
    head = await publish_synthetic(server.url, 200)
    out_dir = tmp_path / "parquet"
    await export(server.url, out_dir, chunk=100)  # part-1, part-101
    killed: list[Path] = []
    real = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        killed.append(tmp_path / f"killed-{len(killed) + 1}-{Path(src).suffix[1:]}")
        shutil.copytree(out_dir, killed[-1])
        real(src, dst)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", replace)
        await export(server.url, out_dir, from_seq=51, chunk=50)  # part-101 again, shorter
    monkeypatch.undo()  # whole reads again: the re-runs below need no particular chunks
    assert seqs_in(out_dir) == list(range(1, head + 1))
    for snapshot in killed:
        assert set(seqs_in(snapshot)) == set(range(1, head + 1)), snapshot.name
    assert {p.name.rsplit("-", 1)[1] for p in killed} == {"staged", "tmp"}  # both phases
    nc = await connect(server.url)
    try:
        for snapshot in killed:
            assert_a_parquet_glob_reads_only_final_files(snapshot)
            await export_parquet(nc, snapshot, from_seq=51)
            assert seqs_in(snapshot) == list(range(1, head + 1)), snapshot.name
            assert hidden_entries(snapshot) == [], snapshot.name
    finally:
        await nc.close()


async def test_everything_new_is_on_disk_before_an_earlier_file_changes(
        server: EmbeddedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a power loss keeps is what was synced: each file moved in is synced before its
    rename, and the directories holding the renames before any earlier file is rewritten
    or deleted; a rewrite syncs its temporary file before the rename, its directory after."""
    await publish_synthetic(server.url, 200)
    out_dir = tmp_path / "parquet"
    await export(server.url, out_dir, chunk=100)  # part-1, part-101
    earlier = {str(p) for p in out_dir.rglob("part-*.parquet")}
    ops: list[tuple[str, str, str]] = []
    real_fsync, real_replace, real_unlink = os.fsync, os.replace, Path.unlink

    def fsync(fd: int) -> None:
        ops.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), ""))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        ops.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    def unlink(path: Path, missing_ok: bool = False) -> None:
        ops.append(("unlink", str(path), ""))
        real_unlink(path, missing_ok)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Path, "unlink", unlink)
    await export(server.url, out_dir, from_seq=51, chunk=50)  # rewrites part-1, drops part-101
    monkeypatch.undo()

    def at(op: str, a: str, b: str = "") -> int:
        return ops.index((op, a, b))
    changes = [i for i, (op, a, b) in enumerate(ops)
               if (op == "replace" and b in earlier) or (op == "unlink" and a in earlier)]
    kinds = {ops[i][0] for i in changes}
    assert kinds == {"replace", "unlink"}, ops  # part-1s rewritten, part-101s deleted
    moved = [(a, b) for op, a, b in ops if op == "replace" and a.endswith(".staged")]
    assert moved
    for src, dst in moved:
        assert at("fsync", src) < at("replace", src, dst)
        synced_dir = at("fsync", str(Path(dst).parent))
        assert at("replace", src, dst) < synced_dir < changes[0]
    assert at("fsync", str(out_dir)) < changes[0]
    for op, src, dst in ops:
        if op == "replace" and src.endswith(".tmp"):
            assert at("fsync", src) < at("replace", src, dst)
            assert at("replace", src, dst) < max(i for i, o in enumerate(ops)
                                                 if o == ("fsync", str(Path(dst).parent), ""))
    assert seqs_in(out_dir) == list(range(1, 201))


# -- what an export touches --------------------------------------------------------------------

async def test_files_an_export_does_not_name_are_left_alone(server: EmbeddedServer,
                                                            tmp_path: Path) -> None:
    head = await publish_synthetic(server.url, 200)
    out_dir = tmp_path / "parquet"
    foreign = [out_dir / "backup" / "x.parquet", out_dir / "day=2020-01-01" / "notes.parquet",
               out_dir / "day=2020-01-01" / "type=x" / "mine.parquet"]
    for path in foreign:
        path.parent.mkdir(parents=True)
        pq.write_table(pa.table({"seq": pa.array(range(1, head + 1), pa.int64())}), path)
    before = {path: path.read_bytes() for path in foreign}
    await export(server.url, out_dir)
    await export(server.url, out_dir, from_seq=50)
    assert {path: path.read_bytes() for path in foreign} == before
    ours = [s for f in out_dir.glob("day=*/type=*/part-*.parquet")
            for s in pq.read_table(f, columns=["seq"])["seq"].to_pylist()]
    assert sorted(ours) == list(range(1, head + 1))


async def test_a_directory_that_cannot_be_locked_is_one_clear_error(
        server: EmbeddedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", flock)
    with pytest.raises(ExportError, match="cannot lock .*: No locks available"):
        await export(server.url, tmp_path / "out")


@pytest.mark.parametrize("gap_every", [0, 3, 40])
def test_the_exported_runs_mask_exactly_their_sequences(gap_every: int) -> None:
    """Few runs (range masks) and many (a value set between the file's min and max)."""
    rng = random.Random(gap_every)
    seqs = [s for s in range(100, 2000) if not gap_every or rng.randrange(gap_every)]
    runs = _Runs()
    for seq in seqs:
        runs.add(seq)
    exported = set(seqs)
    for lo, hi in [(1, 99), (1, 100), (90, 3000), (500, 520), (1999, 2500), (2000, 2100)]:
        values = [*rng.sample(range(lo, hi + 1), min(50, hi - lo + 1)), lo, hi]
        column = pa.chunked_array([values, [None]], pa.int64())
        mask = runs.mask(column)
        expected = [v in exported for v in values] + [False]
        assert (mask.to_pylist() if mask is not None else [False] * len(expected)) == expected
        assert runs.overlaps(lo, hi) == any(expected)
    with pytest.raises(ExportError, match="out of order"):
        runs.add(seqs[-1])
