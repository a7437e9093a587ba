"""The trainer's `error: ...` line, last, under the `deepspeed` launcher.

The launcher (deepspeed.launcher.launch) notices a failed rank a second later and then prints its own lines (each
rank killed, `[ERROR] ... exits with return code = 1`) after the rank's one-line error, so a user would read the
launcher's line, not the trainer's. `repeat_after_launcher(line)` starts a small detached process that waits until
the launcher has exited and then writes the line again to the same stderr: the error is the last line printed.
Outside the launcher it does nothing. A command wraps its work in `error_line_last()` and parses with `LineParser`
(whose usage errors it repeats as well).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

WAIT_S = 120  # the launcher gives the other ranks 30 s to end, then kills them: it has exited well before this

# Run by a fresh interpreter: forks (the parent returns at once, so the waiter belongs to no rank's process tree,
# which the launcher kills), then waits for the launcher to end and writes the line.
WAITER = r"""
import os, sys, time
if os.fork():
    os._exit(0)
os.setsid()
pid, line, marker, limit = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])

def running():
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")

end = time.monotonic() + limit
while running() and time.monotonic() < end:
    time.sleep(0.02)
try:
    if not running():
        os.write(2, (line + "\n").encode())
finally:
    try:
        os.unlink(marker)
    except OSError:
        pass
"""


def launcher_pid() -> int | None:
    """The pid of the deepspeed launcher when it started this process (its parent), else None."""
    ppid = os.getppid()
    try:
        argv = Path(f"/proc/{ppid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return ppid if b"deepspeed.launcher.launch" in argv else None


def repeat_after_launcher(line: str) -> bool:
    """Under the deepspeed launcher, write `line` to stderr again once the launcher has exited; once per launcher
    (the first rank to fail). Returns whether it was arranged."""
    pid = launcher_pid()
    if pid is None or not line:
        return False
    marker = Path(tempfile.gettempdir()) / f"transrec-launcher-error-{os.getuid()}-{pid}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError:  # another rank of this launcher has arranged its line
        return False
    try:
        subprocess.run([sys.executable, "-c", WAITER, str(pid), line, str(marker), str(WAIT_S)],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        marker.unlink(missing_ok=True)
        return False
    return True


class LineParser(argparse.ArgumentParser):
    """argparse, keeping the message it exits with (`exit_message`), for error_line_last to repeat."""

    exit_message = ""

    def exit(self, status: int = 0, message: str | None = None):
        if message:
            LineParser.exit_message = message
        super().exit(status, message)


@contextlib.contextmanager
def error_line_last() -> Iterator[None]:
    """A command's body: when it exits with an error (`SystemExit("error: ...")`, or a LineParser's exit), the
    message's last line is repeated after the launcher's lines (repeat_after_launcher)."""
    try:
        yield
    except SystemExit as e:
        message = e.code if isinstance(e.code, str) else LineParser.exit_message if e.code else ""
        if message.strip():
            repeat_after_launcher(message.strip().splitlines()[-1])
        raise
