"""What the command line writes where, and the exit codes scripts rely on.

The report goes to stdout: a table for people, or exactly one JSON document with
``--json``. Logs, warnings, progress and the one-line reason of a failure go to
stderr. Anything a library prints while a command runs is sent to stderr too, so
stdout holds the report and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from tqdm import tqdm

from masasurgery.errors import MasaError, VerificationError

__all__ = ["EXIT_CODES_HELP", "ExitCode", "Outcome", "Output", "exit_code_for"]


class ExitCode(IntEnum):
    """The exit status of every command."""

    #: The command did what was asked (and verification passed, when it ran).
    OK = 0
    #: Verification failed: the rewrite is not exact, or a lossless conversion
    #: differs from the original.
    VERIFICATION_FAILED = 1
    #: Bad input: an unknown model, a missing folder, a bad option, a model
    #: without repeated attention, a damaged checkpoint (argparse errors too).
    BAD_INPUT = 2
    #: An unexpected error inside masasurgery or a library: please report it.
    INTERNAL_ERROR = 3
    #: Interrupted with Ctrl-C.
    INTERRUPTED = 130


#: The exit codes, as printed by ``masasurgery --help``.
EXIT_CODES_HELP = """exit codes:
  0    ok (and verification passed, when it ran)
  1    verification failed (the rewrite is not exact, or a lossless
       conversion differs from the original)
  2    bad input: unknown model, missing folder, bad option, no repeated
       attention, damaged checkpoint, missing optional package
  3    unexpected internal error (rerun with -v for the traceback)
  130  interrupted"""


@dataclass
class Outcome:
    """What a command produced.

    Attributes:
        text: The human-readable report.
        data: The JSON document (``--json``).
        code: The exit code.
        reason: One line for stderr when the code is not OK.
    """

    text: str
    data: dict[str, Any] = field(default_factory=dict)
    code: ExitCode = ExitCode.OK
    reason: str | None = None


def exit_code_for(error: BaseException) -> ExitCode:
    """The exit code of an error a command raised.

    Example:
        >>> from masasurgery.errors import ConfigError
        >>> int(exit_code_for(ConfigError("atoms must be positive")))
        2
    """
    if isinstance(error, VerificationError):
        return ExitCode.VERIFICATION_FAILED
    if isinstance(error, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    if isinstance(error, MasaError):
        return ExitCode.BAD_INPUT
    return ExitCode.INTERNAL_ERROR


class Output:
    """Where a command's report, progress and diagnostics go.

    Args:
        as_json: Print the report as one JSON document.
        verbose: 0 for warnings only, 1 for info logs, 2 for debug logs; from 1
            on, failures print their traceback.
        quiet: No progress bar, errors only in the logs.
    """

    def __init__(self, *, as_json: bool, verbose: int = 0, quiet: bool = False):
        self.as_json = as_json
        self.verbose = verbose
        self.quiet = quiet

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Logs to stderr, and library prints away from stdout, while it lasts."""
        logger = logging.getLogger("masasurgery")
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        level = [logging.WARNING, logging.INFO, logging.DEBUG][min(self.verbose, 2)]
        old_level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.ERROR if self.quiet else level)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old_level)

    def steps(self, names: list[str]) -> Steps:
        """A progress bar over the named steps of a command, on stderr."""
        return Steps(names, enabled=not self.quiet)

    def emit(self, outcome: Outcome) -> ExitCode:
        """Print the report to stdout and the reason of a failure to stderr."""
        try:
            if self.as_json:
                document = {**outcome.data, "exit_code": int(outcome.code)}
                print(json.dumps(_plain(document), indent=1), file=sys.stdout)
            elif outcome.text:
                print(outcome.text, file=sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:
            # The reader left (`| head`): silence the interpreter's final flush
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if outcome.reason:
            print(f"masasurgery: {outcome.reason}", file=sys.stderr)
        return outcome.code

    def failure(self, command: str, error: BaseException) -> Outcome:
        """The outcome of an error: one line for stderr (and the traceback with
        -v, printed now), and a JSON document for stdout with ``--json``."""
        code = exit_code_for(error)
        reason = _one_line(error)
        if code is ExitCode.INTERNAL_ERROR:
            reason = (
                f"internal error: {type(error).__name__}: {reason} (rerun with -v "
                "for the traceback, and please report it)"
            )
        if self.verbose:
            traceback.print_exception(error, file=sys.stderr)
        data = {
            "command": command,
            "error": {"type": type(error).__name__, "message": str(error)},
        }
        return Outcome(text="", data=data, code=code, reason=reason)


class Steps:
    """A tqdm bar that names the step in progress; silent when not a terminal."""

    def __init__(self, names: list[str], *, enabled: bool = True) -> None:
        # disable=None: tqdm shows the bar only when stderr is a terminal
        self._bar = tqdm(
            total=len(names),
            file=sys.stderr,
            disable=None if enabled else True,
            bar_format="{desc} [{n_fmt}/{total_fmt}] {elapsed}",
            leave=False,
        )
        self.current: str | None = None

    def start(self, name: str) -> None:
        """Name the step that starts now; the previous one counts as done."""
        if self.current is not None:
            self._bar.update(1)
        self.current = name
        self._bar.set_description_str(name)
        logging.getLogger(__name__).info("step: %s", name)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Steps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _one_line(error: BaseException) -> str:
    # The first line of the message: the reason; the rest is detail for -v
    text = str(error).strip() or type(error).__name__
    lines = text.splitlines()
    return lines[0] + (" (details with -v or --json)" if len(lines) > 1 else "")


def _plain(value: Any) -> Any:
    """JSON-safe data: non-finite floats become null, other objects strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)
