"""The adapters: everything that does I/O on behalf of the domain. The JetStream bus
(:mod:`~jetflow.adapters.bus`, with raw subscriptions in
:mod:`~jetflow.adapters.natsclient`), the embedded nats-server
(:mod:`~jetflow.adapters.nats_server`), OpenTelemetry tracing and logging
(:mod:`~jetflow.adapters.tracing`, a local OTLP receiver in
:mod:`~jetflow.adapters.collector`), the process runtime (signals, supervised loops:
:mod:`~jetflow.adapters.runtime`) and the Python client (:mod:`~jetflow.adapters.client`).

They import the domain (:mod:`jetflow.core`) and each other, never a service or the CLI.
"""
