"""The one exception type a user sees: a bad input explained in one line.

Command-line entry points catch `UserError` and print its message (no
traceback) before exiting with status 1. Library code raises it wherever the
cause is something the user can fix: a wrong name, a corrupt file, an option
out of range. The message says what was wrong and how to fix it.
"""


class UserError(Exception):
    """A problem with the user's input, with a one-line message saying how to fix it."""
