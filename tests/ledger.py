"""A Jepsen-style ledger for fault tests: what was attempted, what was acknowledged, and
what the log says happened to each job."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from jetflow.core.events import Event
from jetflow.core.job import TERMINAL


@dataclass
class Ledger:
    seed: int
    attempted: set[str] = field(default_factory=set)
    acked: set[str] = field(default_factory=set)
    kills: int = 0

    def check(self, events: list[Event], name: str) -> dict[str, int]:
        """Assert nothing acknowledged was lost, nothing unexpected appeared and nothing
        succeeded twice; return the counts for the report."""
        job_events = [e for e in events if e.kind == "job"]
        succeeded = Counter(e.id for e in job_events if e.type == "succeeded")
        terminal = {e.id: e.type for e in job_events if e.type in TERMINAL}
        seen = {e.id for e in job_events}
        lost = self.acked - set(succeeded)
        unexpected = seen - self.attempted
        duplicated = {j for j, n in succeeded.items() if n > 1}
        report = {"jobs": len(self.attempted), "acked": len(self.acked), "kills": self.kills,
                  "attempts": sum(1 for e in job_events if e.type == "started"),
                  "lost": len(lost), "unexpected": len(unexpected),
                  "duplicated": len(duplicated)}
        print(f"\nLEDGER {name}: {report} seed={self.seed}")
        assert not (lost or unexpected or duplicated), (
            f"{name} seed={self.seed}: lost={sorted(lost)[:10]} "
            f"(terminal: {[terminal.get(j) for j in sorted(lost)[:10]]}), "
            f"unexpected={sorted(unexpected)[:10]}, duplicated={sorted(duplicated)[:10]}; "
            f"report {report}")
        return report
