"""jetflow: event-sourced job processing on NATS JetStream.

The public API::

    from jetflow import connect, JobContext, PermanentError

    client = await connect("nats://127.0.0.1:4222")
    job_id = await client.submit("echo", {"x": 1})
    job = await client.wait(job_id, timeout=30)

The names below are imported on first use, so importing a subpackage (``jetflow.core``,
the pure domain) does not load the client and its NATS dependencies.

The package has four floors, each importing only the ones below it: the pure domain
(:mod:`jetflow.core`), the adapters that do I/O (:mod:`jetflow.adapters`: the bus, the
embedded server, tracing, the process runtime, the client), the services
(:mod:`jetflow.sentinel`, :mod:`jetflow.workers`, :mod:`jetflow.projections`) and on top
the command line (:mod:`jetflow.cli`) and the stack behind ``jetflow up``
(:mod:`jetflow.up`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jetflow.adapters.auth import Credentials
    from jetflow.adapters.client import (
        Client,
        JobError,
        NoSentinel,
        SubmissionRejected,
        SubmissionsRejected,
        Submitted,
        SubmitTimeout,
        connect,
    )
    from jetflow.core.job import JobState
    from jetflow.core.template import TemplateError
    from jetflow.core.workflow_view import StepView, WorkflowView
    from jetflow.workers.context import JobContext, PermanentError
    from jetflow.workers.plugin_run import Output, PluginContext

__all__ = [
    "Client",
    "Credentials",
    "JobContext",
    "JobError",
    "JobState",
    "NoSentinel",
    "Output",
    "PermanentError",
    "PluginContext",
    "StepView",
    "SubmissionRejected",
    "SubmissionsRejected",
    "SubmitTimeout",
    "Submitted",
    "TemplateError",
    "WorkflowView",
    "connect",
]

_HOME = {
    "Client": "jetflow.adapters.client",
    "Credentials": "jetflow.adapters.auth",
    "JobError": "jetflow.adapters.client",
    "NoSentinel": "jetflow.adapters.client",
    "SubmissionRejected": "jetflow.adapters.client",
    "SubmitTimeout": "jetflow.adapters.client",
    "SubmissionsRejected": "jetflow.adapters.client",
    "Submitted": "jetflow.adapters.client",
    "connect": "jetflow.adapters.client",
    "JobState": "jetflow.core.job",
    "TemplateError": "jetflow.core.template",
    "StepView": "jetflow.core.workflow_view",
    "WorkflowView": "jetflow.core.workflow_view",
    "JobContext": "jetflow.workers.context",
    "PermanentError": "jetflow.workers.context",
    "Output": "jetflow.workers.plugin_run",
    "PluginContext": "jetflow.workers.plugin_run",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'jetflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
