"""Answers to ``nats req jf.submit.<queue>``.

JF_SUBMIT stores submissions without acking them (``no_ack``), so the requester's inbox is
only seen by a core subscription. The sentinels share one queue group on ``jf.submit.>``:
the member that receives the request remembers its inbox under the submission's
fingerprint, and answers when the ``submitted``/``rejected`` event carrying that
fingerprint reaches its view of the log, whichever sentinel appended it.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque

from jetflow.core.codec import dumps
from jetflow.core.events import Event

__all__ = ["ReplyBook"]

# At most this many answers (and answered events) are kept, however busy the minute: an
# answer is kept for a request whose event came first, which is milliseconds behind it.
MAX_KEPT = 20_000
EARLY_ANSWER_S = 2.0  # how long a request may trail its own event (a body without msg id)


class ReplyBook:
    def __init__(self, ttl_s: float = 60.0) -> None:
        self.ttl_s = ttl_s
        self._waiting: OrderedDict[str, deque[tuple[str, float]]] = OrderedDict()
        # fingerprint -> (answer, when, may be given again: a submission with a msg id)
        self._answers: OrderedDict[str, tuple[bytes, float, bool]] = OrderedDict()
        # the events answered already, by sequence: a sentinel sees its own appends twice
        # (when appended, and read back from the log), and must answer each once
        self._answered: OrderedDict[int, float] = OrderedDict()

    def expect(self, fingerprint: str, inbox: str) -> bytes | None:
        """Remember an inbox; return the answer at once if the event was seen already."""
        known = self._answers.get(fingerprint)
        if known is not None:
            if known[2]:
                return known[0]
            del self._answers[fingerprint]
            # a body without a msg id, answered before its request came: only a request
            # that was on its way is its own (later, the same body is another submission)
            if time.monotonic() - known[1] <= EARLY_ANSWER_S:
                return known[0]
        self._waiting.setdefault(fingerprint, deque()).append((inbox, time.monotonic()))
        return None

    def is_waiting(self, fingerprint: str, inbox: str) -> bool:
        return any(item[0] == inbox for item in self._waiting.get(fingerprint, ()))

    def withdraw(self, fingerprint: str, inbox: str) -> bool:
        """Stop waiting for this inbox; False if it was answered meanwhile."""
        waiting = self._waiting.get(fingerprint)
        if not waiting:
            return False
        for item in list(waiting):
            if item[0] == inbox:
                waiting.remove(item)
                if not waiting:
                    del self._waiting[fingerprint]
                return True
        return False

    def answer(self, fingerprint: str, body: bytes, *, everyone: bool = False,
               seq: int | None = None, keep: bool = True) -> list[str]:
        """The inboxes to answer: the oldest waiting one, or with ``everyone`` (a submission
        with a Nats-Msg-Id, whose repeats are the same submission) all of them. The answer
        is also kept a while, for a request still on its way. The event at ``seq`` is
        answered once: seen again, it answers nobody (another waiting request of the same
        body is another submission's). ``keep`` false (a sentinel catching up with the log,
        before it takes requests): nobody is on the way, nothing is kept."""
        if seq is not None:
            if seq in self._answered:
                return []
            self._answered[seq] = time.monotonic()
            self._expire()
        waiting = self._waiting.get(fingerprint)
        if keep and (everyone or not waiting):
            # a copy of its own size: orjson's bytes keep a 4 KiB buffer, and a minute of
            # answers at thousands a second would hold hundreds of MB
            self._answers[fingerprint] = (bytes(memoryview(body)), time.monotonic(), everyone)
            self._expire()
        if not waiting:
            return []
        if everyone:
            del self._waiting[fingerprint]
            return [inbox for inbox, _ in waiting]
        inbox, _ = waiting.popleft()
        if not waiting:
            del self._waiting[fingerprint]
        return [inbox]

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.ttl_s  # both books are oldest first
        while self._answers and (next(iter(self._answers.values()))[1] < cutoff
                                 or len(self._answers) > MAX_KEPT):
            self._answers.popitem(last=False)
        while self._waiting and next(iter(self._waiting.values()))[0][1] < cutoff:
            self._waiting.popitem(last=False)
        while self._answered and (next(iter(self._answered.values())) < cutoff
                                  or len(self._answered) > MAX_KEPT):
            self._answered.popitem(last=False)

    @staticmethod
    def body_for(event: Event, duplicate: bool = False,
                 differs: list[str] | None = None) -> bytes:
        """The answer: the job id; ``duplicate`` when the job existed already, and then
        ``differs``, the fields in which this submission is not the job's (not an
        idempotent retry: the job keeps what it was first submitted with)."""
        if event.type == "rejected":
            return dumps({"error": event.data["reason"], "code": event.data["code"],
                          "job_id": event.id})
        body: dict[str, object] = {"workflow_id" if event.kind == "wf" else "job_id": event.id}
        if duplicate:
            body["duplicate"] = True
        if differs:
            body["differs"] = differs
        return dumps(body)
