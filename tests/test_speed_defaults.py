"""The defaults that make `jetflow up` fast on a small machine (issue 12): the embedded
server's Go scheduler kept to half the cores, and eight jobs at once per worker."""

from __future__ import annotations

from pathlib import Path

import pytest

from jetflow.adapters.nats_server import EmbeddedServer, server_env
from jetflow.cli.main import parser as cli_parser
from jetflow.core.fleet import DEFAULT_CONCURRENCY
from jetflow.up import Stack
from jetflow.workers.worker import Worker


def test_the_server_gets_half_the_cores_unless_gomaxprocs_is_set(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    assert server_env({"PATH": "/bin"}) == {"PATH": "/bin", "GOMAXPROCS": "1"}
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(8)), raising=False)
    assert server_env({})["GOMAXPROCS"] == "4"
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0}, raising=False)
    assert server_env({})["GOMAXPROCS"] == "1"  # never none
    assert server_env({"GOMAXPROCS": "3"})["GOMAXPROCS"] == "3"  # the user's choice wins


@pytest.mark.e2e
async def test_the_embedded_server_runs_with_that_environment(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    monkeypatch.delenv("GOMAXPROCS", raising=False)
    async with EmbeddedServer(tmp_path / "srv", port=0) as srv:
        assert srv.proc is not None
        environ = Path(f"/proc/{srv.proc.pid}/environ").read_bytes().split(b"\0")
        assert f"GOMAXPROCS={server_env()['GOMAXPROCS']}".encode() in environ


def test_eight_jobs_at_once_per_worker_by_default() -> None:
    assert DEFAULT_CONCURRENCY == 8
    parser = cli_parser()
    assert parser.parse_args(["up"]).concurrency == 8
    assert parser.parse_args(["worker"]).concurrency == 8
    assert Worker().concurrency == 8 and Worker().prefetch == 8
    assert Stack(data_dir=Path("unused")).concurrency == 8
