"""The ``jetflow`` command line: one module per command group (``services``, ``submit``,
``control``, ``views``, ``history``, ``replay``, ``trace``), assembled by
:mod:`jetflow.cli.main`. It sits on top: it may import every floor below it."""
