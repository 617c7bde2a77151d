"""Runs many ``jetflow`` commands in one process, for tests that try a lot of them:
``python -m tests.cli_driver`` reads a JSON list of argument lists on stdin and prints,
for each, ``[exit code, stdout, stderr]``. Each command goes through ``main()`` as the
console script would (its own event loop, logging and error handling); an exception that
escapes ``main()`` is written to its stderr as the interpreter would print it, so a test
sees a traceback exactly when a user would. It saves the interpreter's start and
jetflow's imports (~0.6 s of CPU) per command."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback

from jetflow.cli.main import main


def run_one(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse, and what exits on purpose
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - what the user would see
            traceback.print_exc()
            code = 1
    return code, out.getvalue(), err.getvalue()


if __name__ == "__main__":
    commands = json.load(sys.stdin)
    json.dump([run_one(argv) for argv in commands], sys.stdout)
