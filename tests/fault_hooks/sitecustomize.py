"""Fault injection for the subprocesses of tests/test_build_safety.py and tests/test_quantize_cli.py.

Python imports this module at start-up when its folder is on PYTHONPATH.
QLLM_FAULT="CALL:PATTERN:ACTION" hooks `os.fsync` (CALL fsync: the path of the
file being synced) or `os.replace` (CALL replace: the destination); each call
whose path the regular expression PATTERN finds a match in gets ACTION first:
`kill` (SIGKILL this process, as kill -9 would), `enospc` (raise OSError
ENOSPC, as a full disk would) or `sleep` (wait 3 s, then go on).
"""
import errno
import os
import re
import signal
import time


def _install(call: str, pattern: str, action: str) -> None:
    original = getattr(os, call)

    def hooked(*args, **kwargs):
        path = os.readlink(f"/proc/self/fd/{args[0]}") if call == "fsync" else os.fspath(args[1])
        if re.search(pattern, path):
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif action == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            elif action == "sleep":
                time.sleep(3)
        return original(*args, **kwargs)

    setattr(os, call, hooked)


def _install_from_environment() -> None:
    fault = os.environ.get("QLLM_FAULT")
    if fault:
        call, rest = fault.split(":", 1)
        _install(call, *rest.rsplit(":", 1))


_install_from_environment()
