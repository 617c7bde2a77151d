"""The worker: the execution plane's adapter.

``receive -> claim -> execute -> record``, one function each. Offers arrive as core NATS
messages on ``jf.work.<worker>`` (a list of offers each); those beyond the free slots wait
here, in order. A claim is the ``started`` event appended with the expected subject
sequence the offer carried, so of any number of workers offered the same attempt exactly
one runs it; a late result from a worker that lost its lease fails the same check and is
dropped (and logged). The heartbeat lists what it runs and what it holds, so the sentinel
can tell an offer that was lost on the way.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg

from jetflow.adapters.auth import Credentials
from jetflow.adapters.bus import (
    FIRST_CONNECT_WAIT_S,
    Ack,
    EventLog,
    Publisher,
    connect,
    ensure_streams,
    read_ack,
)
from jetflow.adapters.plugins import PluginStore
from jetflow.adapters.runtime import cancel_and_wait, supervise
from jetflow.core import subjects as S
from jetflow.core.codec import CodecError, decode_event, dumps, loads
from jetflow.core.events import Event
from jetflow.core.fleet import DEFAULT_CONCURRENCY, default_heartbeat_s
from jetflow.core.metadata import status_of
from jetflow.core.origin import Signer
from jetflow.core.plugin import NAME_RE, PLUGIN_ROUTE, PluginError, plugin_route
from jetflow.workers.attempt import PLUGIN_REF, Attempt, Deps
from jetflow.workers.envs import Environments
from jetflow.workers.handlers import HandlerError, parse_handlers, resolve
from jetflow.workers.plugin_cache import PluginCache
from jetflow.workers.pool import ChildPool

__all__ = ["Worker", "make_worker_id"]

log = logging.getLogger("jetflow.worker")
EARLY_ACK_WAIT_S = 5.0  # an early offer whose ack has not come by then is dropped
EARLY_ACKS_KEPT = 1024  # acks that came before their offer, waiting for it


async def _until_done(tasks: list[asyncio.Task[None]], timeout_s: float,
                      hurry: asyncio.Future[Any] | None) -> set[asyncio.Task[None]]:
    """Wait until ``tasks`` are done, ``timeout_s`` has passed or ``hurry`` is done (it is
    the caller's: left as it is); the tasks still running."""
    grace = asyncio.ensure_future(asyncio.wait(tasks, timeout=timeout_s))
    await asyncio.wait({grace, *([hurry] if hurry else [])},
                       return_when=asyncio.FIRST_COMPLETED)
    if hurry is not None and hurry.done() and not grace.done():
        log.info("a second stop signal: handing the running jobs back now")
    await cancel_and_wait([grace])
    return {task for task in tasks if not task.done()}




def make_worker_id() -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return f"{host[:40]}-{os.getpid()}-{secrets.token_hex(2)}"


def parse_plugins(value: str) -> frozenset[str] | None:
    """``--plugins``: None for all, an empty set for none, else the names (comma-separated)."""
    value = value.strip()
    if value == "all":
        return None
    if value == "none":
        return frozenset()
    names = frozenset(n.strip() for n in value.split(",") if n.strip())
    bad = sorted(n for n in names if not NAME_RE.match(n))
    if not names or bad:
        raise HandlerError(f"--plugins is all, none or plugin names separated by commas "
                           f"(letters, digits, _ or -), not {value!r}")
    return names


class Worker:
    def __init__(self, url: str | None = None, *, handlers: str | dict[str, str] = "echo",
                 queues: tuple[str, ...] = ("default",),
                 concurrency: int = DEFAULT_CONCURRENCY,
                 heartbeat_s: float | None = None, lease_s: float = 15.0, grace_s: float = 30.0,
                 prefetch: int | None = None, memory_limit_mb: int | None = None,
                 worker_id: str | None = None,
                 wait_nats_s: float = FIRST_CONNECT_WAIT_S, plugins: str = "all",
                 data_dir: Path | str = ".jetflow", keep_envs: int = 8) -> None:
        self.url = url
        self.wait_nats_s = wait_nats_s
        self.handlers = parse_handlers(handlers) if isinstance(handlers, str) else handlers
        self.plugin_names = parse_plugins(plugins)
        self.plugins = self.plugin_names != frozenset()
        # announced: the sentinel offers this worker the jobs of all plugins, or of these
        routes = [PLUGIN_ROUTE] if self.plugin_names is None else \
            [plugin_route(n) for n in sorted(self.plugin_names)]
        self.handlers = {**self.handlers, **{r: PLUGIN_REF for r in routes}}
        self.data_dir = Path(data_dir)
        self.keep_envs = keep_envs
        for name in queues:
            S.check_token(name, "queue")
        self.queues = tuple(queues)
        self.concurrency = concurrency
        self.prefetch = concurrency if prefetch is None else prefetch
        self.memory_limit_mb = memory_limit_mb
        # several heartbeats per lease, or a busy machine makes healthy workers look lost
        self.heartbeat_s = heartbeat_s or default_heartbeat_s(lease_s)
        self.lease_s = lease_s
        self.grace_s = grace_s
        self.worker_id = S.check_token(worker_id or make_worker_id(), "worker id")
        self.running: dict[str, Attempt] = {}
        self._held: OrderedDict[str, dict[str, Any]] = OrderedDict()  # offers, in order
        # early offers (no seq yet) by the subject of the ack that says it: (since, offer)
        self._awaiting: dict[str, tuple[float, dict[str, Any]]] = {}
        self._acks_first: OrderedDict[str, tuple[bytes, bool]] = OrderedDict()
        self._busy: set[str] = set()  # attempts that hold a slot: claiming or in a child
        self._tasks_by_job: dict[str, asyncio.Task[None]] = {}
        self._draining = False
        self._joined = False
        self._tasks: list[asyncio.Task[None]] = []
        self._ipc: Path | None = None

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> Worker:
        for ref in self.handlers.values():
            if ref != PLUGIN_REF:  # plugins load in the child, per job
                resolve(ref)  # fail now, clearly, on a typo or a broken handler
        self.pool = ChildPool(self.concurrency, memory_limit_mb=self.memory_limit_mb)
        try:
            await self.pool.start()
            await self._join()
        except BaseException:  # cancelled (a stop signal) or failed: leave nothing behind
            await self._abandon()
            raise
        self._tasks = [asyncio.create_task(supervise("heartbeat", self._heartbeat_loop))]
        if self.plugins:
            self._tasks.append(asyncio.create_task(self._prepare_active()))
        log.info("worker %s ready: handlers %s, queues %s, concurrency %d", self.worker_id,
                 ",".join(self.handlers), ",".join(self.queues), self.concurrency)
        return self

    async def _join(self) -> None:
        self.nc = await connect(self.url, name=f"jetflow-worker-{self.worker_id}",
                                wait_s=self.wait_nats_s)
        self.js = self.nc.jetstream()
        await ensure_streams(self.js)
        # signed with this worker's own key, when it has one (see core.origin)
        key = Credentials.from_env().key_bytes()
        self.log = EventLog(Publisher(self.nc),
                            signer=Signer(key, public=True) if key else None)
        self.deps = Deps(self.nc, self.log, self.pool, self.worker_id, self.lease_s,
                         self.handlers,
                         PluginCache(self.nc, self.data_dir / "plugins") if self.plugins
                         else None, self.data_dir / "outputs",
                         Environments(self.data_dir / "envs", keep=self.keep_envs),
                         self._ipc_dir())
        await self.nc.subscribe(S.worker_subject(self.worker_id, "lost"), cb=self._on_lost)
        for kind in ("cancel_requested", "timed_out"):
            await self.nc.subscribe(f"{S.PREFIX}.job.*.{kind}", cb=self._on_job_event)
        await self.nc.subscribe_raw(S.work_acks_of(self.worker_id), self._on_early_ack)
        self._offers = await self.nc.subscribe_raw(S.work_subject(self.worker_id),
                                                   self._on_offers)
        if self.plugins:  # environments are built when a plugin is deployed, not later
            await self.nc.subscribe(f"{S.PREFIX}.plugin.*.deployed", cb=self._on_deployed)
        await self.nc.flush()  # subscribed before anyone learns of us
        await self._heartbeat()
        await self._announce()

    async def _abandon(self) -> None:
        """Undo a start that did not finish: record leaving if it had joined, close all."""
        if self._joined:
            await self._leave("stopped")
        await self.pool.stop()
        nc = getattr(self, "nc", None)
        if nc is not None and not nc.is_closed:
            await nc.close()

    async def _announce(self) -> None:
        event = Event("worker", self.worker_id, "joined", time.time(), {
            "handlers": sorted(self.handlers), "queues": list(self.queues),
            "concurrency": self.concurrency, "prefetch": self.prefetch,
            "host": socket.gethostname(), "pid": os.getpid(), "lease_s": self.lease_s,
            "heartbeat_s": self.heartbeat_s,
            "early_offers": True})  # offers whose seq comes with the append's ack
        if self.log.signer is not None:  # what readers check this worker's events against
            event.data["key"] = self.log.signer.public_hex
        self._joined = True  # before: stored but unacknowledged is joined too
        await self.log.append(event, msg_id=f"worker:{self.worker_id}:joined:{event.at}")

    # -- plugin environments ---------------------------------------------------------
    async def _prepare_active(self) -> None:
        """A worker that joins builds the environments of the active versions."""
        try:
            registry = await PluginStore(self.nc).registry()
        except Exception as exc:  # noqa: BLE001 - a job builds its own if need be
            log.warning("could not read the plugin registry: %s", exc)
            return
        for name in registry.versions:
            if self.plugin_names is not None and name not in self.plugin_names:
                continue
            active = registry.active(name)
            if active is not None and active.requirements:
                await self._prepare(name, active.version, active.sha256)

    async def _on_deployed(self, msg: Msg) -> None:
        try:
            event = decode_event(msg.subject, msg.data, 0)
        except CodecError:
            return
        if event.data.get("requirements") and (self.plugin_names is None
                                               or event.id in self.plugin_names):
            self._tasks.append(asyncio.create_task(self._prepare(
                event.id, str(event.data["version"]), str(event.data["sha256"]))))

    async def _prepare(self, name: str, version: str, sha256: str) -> None:
        """Build the environment of a plugin version and say so in the log
        (``env_ready``, or ``env_failed`` with the installer's message)."""
        assert self.deps.plugins is not None and self.deps.envs is not None
        try:
            path = await self.deps.plugins.path(name, version, sha256)
            await self.deps.envs.python_for(self.deps.plugins.requirements(path))
            event = Event("plugin", name, "env_ready", time.time(),
                          {"version": version, "worker": self.worker_id})
        except PluginError as exc:
            event = Event("plugin", name, "env_failed", time.time(),
                          {"version": version, "worker": self.worker_id, "error": str(exc)})
        try:
            await self.log.append(event)
        except Exception as exc:  # noqa: BLE001 - the environment is there all the same
            log.warning("%s %s: %s not recorded: %s", name, version, event.type, exc)

    async def _on_lost(self, msg: Msg) -> None:
        if not self._draining:
            log.warning("the sentinel declared this worker lost; joining again")
            await self._announce()

    async def drain(self, hurry: asyncio.Future[Any] | None = None) -> None:
        """Stop claiming, let running jobs finish within the grace period (or until
        ``hurry`` is done: a second stop signal), then hand back the rest and leave."""
        self._draining = True  # no more claims: what is held is dropped (the heartbeat
        self._held.clear()     # says draining, and the sentinel offers it elsewhere)
        self._awaiting.clear()
        await self._heartbeat()
        running = list(self._tasks_by_job.values())
        if running:
            log.info("draining: waiting up to %.0fs for %d running job(s) (a second stop "
                     "signal hands them back at once)", self.grace_s, len(running))
            late = await _until_done(running, self.grace_s, hurry)
            for attempt in list(self.running.values()):
                attempt.request_stop("handback")
            if late:
                log.info("handing back %d running job(s)", len(late))
                await asyncio.wait(late, timeout=10.0)
        await self._leave("drained" if self._draining else "stopped")
        await self.stop()

    async def _leave(self, reason: str) -> None:
        event = Event("worker", self.worker_id, "left", time.time(), {"reason": reason})
        try:
            await self.log.append(event, msg_id=f"worker:{self.worker_id}:left")
        except Exception as exc:  # noqa: BLE001 - the sentinel will find us lost instead
            log.warning("could not record leaving: %s", exc)

    def _ipc_dir(self) -> Path:
        """A private directory for the FIFOs plugin outputs stream through (removed by
        :meth:`stop`; one left by a killed worker holds nothing but names)."""
        if self._ipc is None:
            self._ipc = Path(tempfile.mkdtemp(prefix="jetflow-ipc-"))
        return self._ipc

    async def stop(self) -> None:
        await cancel_and_wait([*self._tasks, *self._tasks_by_job.values()])
        await self.pool.stop()
        if self._ipc is not None:
            shutil.rmtree(self._ipc, ignore_errors=True)
        if not self.nc.is_closed:
            await self.nc.close()

    async def __aenter__(self) -> Worker:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.drain()

    # -- heartbeats ---------------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            await self._heartbeat()

    async def _heartbeat(self) -> None:
        self._expire_early(time.monotonic())
        claimed = [j for j, a in self.running.items() if a.started_seq is not None]
        held = [*self._held, *(o["job_id"] for _at, o in self._awaiting.values()),
                *(j for j, a in self.running.items() if a.started_seq is None)]
        body = {"at": time.time(), "running": sorted(claimed), "held": held,
                "free": self.concurrency - len(self._busy), "draining": self._draining}
        await self.nc.publish(S.heartbeat_subject(self.worker_id), dumps(body))

    # -- receive ------------------------------------------------------------------------
    def serves(self, offer: dict[str, Any]) -> bool:
        """This worker runs the plugin of the offer."""
        return self.plugins and (self.plugin_names is None
                                 or offer.get("handler") in self.plugin_names)

    def _on_offers(self, subject: bytes, reply: bytes, data: bytes,
                   headers: bytes | None) -> None:
        """A message of offers (raw: called in the reading task, so it only files them)."""
        if self._draining:
            return  # the sentinel knows (the heartbeat says so) and offers them elsewhere
        try:
            offers = loads(data)
            if not isinstance(offers, list):
                raise ValueError("not a list of offers")
            valid = [o for o in offers if isinstance(o, dict) and isinstance(o.get("job_id"), str)
                     and (isinstance(o.get("seq"), int) or self._early_ack_of(o)) and (
                         o.get("handler") in self.handlers
                         or (isinstance(o.get("plugin"), dict) and self.serves(o)))]
        except Exception:  # noqa: BLE001 - a malformed offer is dropped, loudly
            log.error("dropping a malformed offer on %s: %r", subject.decode(errors="replace"),
                      data[:200])
            return
        if len(valid) < len(offers):
            log.error("dropping %d malformed offer(s) of %d", len(offers) - len(valid),
                      len(offers))
        for offer in valid:
            if offer["job_id"] in self.running:
                continue  # a repeat of one we run
            ack = self._early_ack_of(offer)
            if ack is None:
                self._held[offer["job_id"]] = offer
            elif ack in self._acks_first:
                self._settle_early(offer, *self._acks_first.pop(ack))
            else:
                self._awaiting[ack] = (time.monotonic(), offer)
        self._start_held()

    # -- early offers: the seq comes with the ack of the job's `submitted` -------------
    def _early_ack_of(self, offer: dict[str, Any]) -> str | None:
        """The subject an early offer's ack comes on (one of ours), else None."""
        ack = offer.get("ack")
        if offer.get("seq") is None and isinstance(ack, str) \
                and ack.startswith(self._acks_prefix):
            return ack
        return None

    @functools.cached_property
    def _acks_prefix(self) -> str:
        return S.work_acks_of(self.worker_id)[:-1]

    def _on_early_ack(self, subject: bytes, reply: bytes, data: bytes,
                      headers: bytes | None) -> None:
        """The ack of an early offer's ``submitted`` (raw, in the reading task). It
        usually comes after its offer (published first, on the same connection)."""
        status = status_of(headers)
        no_stream = status is not None and status[0] == "503"
        entry = self._awaiting.pop(subject.decode(), None)
        if entry is not None:
            self._settle_early(entry[1], data, no_stream)
            self._start_held()
            return
        self._acks_first[subject.decode()] = (data, no_stream)
        while len(self._acks_first) > EARLY_ACKS_KEPT:
            self._acks_first.popitem(last=False)

    def _settle_early(self, offer: dict[str, Any], data: bytes, no_stream: bool) -> None:
        """An early offer with its ack: held to be claimed with the sequence the ack says,
        or dropped when the append was not stored or was a duplicate (the sentinel frees
        the slot on the same ack)."""
        ack = read_ack(data, no_stream)
        if not isinstance(ack, Ack) or ack.duplicate:
            log.debug("job %s: early offer dropped: %s", offer["job_id"],
                      "a duplicate submission" if isinstance(ack, Ack) else ack)
            return
        if self._draining or offer["job_id"] in self.running:
            return
        offer["seq"] = ack.seq
        offer.pop("ack", None)
        self._held[offer["job_id"]] = offer

    def _expire_early(self, now: float) -> None:
        """Drop early offers whose ack never came (the heartbeat then says so, and the
        sentinel offers the job again once it has seen it stored)."""
        for ack, (since, offer) in list(self._awaiting.items()):
            if now - since > EARLY_ACK_WAIT_S:
                del self._awaiting[ack]
                log.warning("job %s: no ack for its early offer in %.0fs: dropped",
                            offer["job_id"], EARLY_ACK_WAIT_S)

    def _start_held(self) -> None:
        """Start attempts for held offers, oldest first, while a slot is free."""
        while self._held and len(self._busy) < self.concurrency and not self._draining:
            job_id, offer = self._held.popitem(last=False)
            if job_id in self.running:
                continue  # offered again while its outcome is being recorded
            headers = offer.pop("headers", None)
            attempt = Attempt(self.deps, offer, dict(headers) if isinstance(headers, dict)
                              else {})
            attempt.child_free = functools.partial(self._free, job_id)
            self.running[job_id] = attempt
            self._busy.add(job_id)
            self._tasks_by_job[job_id] = asyncio.create_task(self._handle(attempt))

    def _free(self, job_id: str) -> None:
        """The attempt's slot is free (its child ran it): the next held offer may go."""
        if job_id in self._busy:
            self._busy.discard(job_id)
            self._start_held()

    async def _handle(self, attempt: Attempt) -> None:
        try:
            await attempt.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s: unexpected error in the worker", attempt.job_id)
        finally:
            self.running.pop(attempt.job_id, None)
            self._tasks_by_job.pop(attempt.job_id, None)
            self._free(attempt.job_id)

    # -- stop signals -----------------------------------------------------------------------
    async def _on_job_event(self, msg: Msg) -> None:
        """cancel_requested / timed_out of a job running here: stop its child."""
        parts = msg.subject.split(".")
        attempt = self.running.get(parts[2]) if len(parts) == 4 else None
        if attempt is None or attempt.started_seq is None:
            return
        if parts[3] == "cancel_requested":
            attempt.cancel_reason = _reason_of(msg.data) or attempt.cancel_reason
            attempt.request_stop("cancel")
        elif parts[3] == "timed_out" and _by_someone_else(msg.data, self.worker_id):
            attempt.request_stop("lost")


def _reason_of(data: bytes) -> str | None:
    """The ``reason`` of an event's data, if it has one (a hand-made message may not)."""
    try:
        reason = loads(data).get("data", {}).get("reason")
    except Exception:  # noqa: BLE001 - not an event: no reason
        return None
    return reason[:500] if isinstance(reason, str) else None


def _by_someone_else(data: bytes, worker_id: str) -> bool:
    """A timed_out the sentinel wrote (lease, deadline), not our own run timeout."""
    try:
        return bool(loads(data).get("data", {}).get("worker") != worker_id)
    except Exception:  # noqa: BLE001 - not a real event: ignore it
        return False
