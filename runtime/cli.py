"""What every command-line entry point shares: a checked command line and errors in one line.

`run_cli(main)` first refuses a command line that is not valid UTF-8 (Python
turns such bytes into lone surrogates, which would fail later, deep inside),
then runs `main()`; a `UserError` prints `error: <message>` to stderr and
exits 1, Ctrl-C exits 130, both without a traceback. `ArgumentParser` reports
a malformed option the same way (one line, exit 1) instead of argparse's
usage block and exit 2.
"""
import argparse
import sys

from runtime.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors (unknown option, bad number, ...) raise a one-line UserError."""

    def error(self, message):
        raise UserError(f"{message} (see python {self.prog} --help)")


def check_argv(argv: list[str]) -> None:
    """UserError naming the first argument of `argv` (as Python decoded it) that is not valid UTF-8."""
    for position, arg in enumerate(argv, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            raw = arg.encode("utf-8", "surrogateescape")  # the bytes as given
            raise UserError(f"command-line argument {position} ({raw!r:.60}) is not valid UTF-8: "
                            f"give text and paths in UTF-8") from None


def run_cli(main) -> None:
    """Run a CLI's main function with one-line errors."""
    try:
        check_argv(sys.argv[1:])
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
