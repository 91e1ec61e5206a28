"""The ``masasurgery`` command line: ``analyze``, ``convert`` and ``verify``.

Run ``masasurgery --help``, or see docs/cli.md. :func:`main` is the console
script's entry point and also runs in-process: ``main(["analyze", "vit_..."])``
returns the exit code instead of exiting.
"""

from __future__ import annotations

from collections.abc import Sequence

from masasurgery.cli.commands import COMMANDS
from masasurgery.cli.output import ExitCode, Output
from masasurgery.cli.parser import build_parser

__all__ = ["ExitCode", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code (0 ok, 1 verification failed,
    2 bad input, 3 internal error).

    Args:
        argv: The arguments after the program name; None reads ``sys.argv``.

    Example:
        >>> main(["convert", "vit_tiny_patch16_224", "--atoms", "0"])
        2
    """
    # Parse: usage errors, --help and --version end here, as argparse decides
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else ExitCode.BAD_INPUT

    # Run the command; an error becomes an exit code and one line on stderr
    out = Output(as_json=args.json, verbose=args.verbose, quiet=args.quiet)
    with out.session():
        try:
            outcome = COMMANDS[args.command](args, out)
        except (Exception, KeyboardInterrupt) as error:
            outcome = out.failure(args.command, error)

    # The report on stdout, once the command's own output went to stderr
    return int(out.emit(outcome))
