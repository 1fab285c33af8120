"""What every command-line entry point shares: turning errors into one line.

`run_cli(main)` runs `main()`; a `UserError` prints `error: <message>` to
stderr and exits 1, Ctrl-C exits 130, both without a traceback.
"""
import sys

from runtime.errors import UserError


def run_cli(main) -> None:
    """Run a CLI's main function with one-line errors."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
