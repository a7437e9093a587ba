"""One writer per run directory: rank 0 holds an exclusive `flock` on RUN_DIR/.lock for the whole run.

    run_dir = claim_run_dir(Path(cfg.run_dir), rank, world, new_run=not cfg.resume, overwrite=False, command=...)
    ...                                   # train: nothing else writes into run_dir meanwhile
    release_run_dir_locks()               # or decorate the entry point with @releasing_run_dir_locks

The lock file holds its holder's pid, host, start time and command, so a second run into the folder (a new run,
--overwrite or --resume) is refused with a line that names them. The operating system drops a flock when its process
ends, however it ends (kill -9 included): the file a killed run leaves behind locks nothing, and --resume of that run
takes the lock again. flock is per host: ranks or runs on other machines sharing the folder over a network filesystem
may not see it (docs/checkpoints.md).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import functools
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

LOCK_NAME = ".lock"
HOLDER_WAIT_S = 2.0  # how long a refused run waits for a holder that has just locked to write who it is

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class RunDirLock:
    """An exclusive flock held on `path` through the open file descriptor `fd` (None once released)."""

    path: Path
    fd: int | None
    holder: dict = field(default_factory=dict)

    def release(self) -> None:
        """Unlock and close. The explicit unlock also frees the lock where a forked child still shares the
        descriptor."""
        if self.fd is None:
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None


# locks this process holds, in the order taken: released by release_run_dir_locks / @releasing_run_dir_locks
_HELD: list[RunDirLock] = []


def read_holder(lock_file: Path, wait_s: float = HOLDER_WAIT_S) -> dict:
    """The holder's record in `lock_file`; {} when there is none after `wait_s` (a holder writes it just after
    taking the lock) or it cannot be read."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            text = lock_file.read_text()
            if text.strip():
                record = json.loads(text)
                return record if isinstance(record, dict) else {}
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return {}
        time.sleep(0.05)


def in_use_message(run_dir: Path, holder: dict) -> str:
    command = " ".join(str(holder.get("command", "unknown")).split())  # one line, whatever the command held
    return (f"error: --run-dir {run_dir} is in use by pid {holder.get('pid', 'unknown')} on host "
            f"{holder.get('host', 'unknown')} since {holder.get('since', 'unknown')} (command {command}): wait for "
            "it to finish, or choose another --run-dir")


def not_empty_message(run_dir: Path) -> str:
    return (f"error: --run-dir {run_dir} exists and is not empty: continue that run with --resume {run_dir}, "
            "delete it with --overwrite, or choose another --run-dir")


def _entries(run_dir: Path) -> list[Path]:
    """The folder's contents besides the lock file."""
    return [p for p in run_dir.iterdir() if p.name != LOCK_NAME] if run_dir.is_dir() else []


def acquire(run_dir: Path, command: str) -> RunDirLock:
    """Create `run_dir` and take its lock without waiting; SystemExit naming the holder when another open file
    holds it (another process, or another open of the file in this one)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)  # never truncated before it is ours
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(in_use_message(run_dir, read_holder(path))) from None
    except BaseException:
        os.close(fd)
        raise
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "command": command}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    except BaseException:
        RunDirLock(path, fd).release()
        raise
    return RunDirLock(path, fd, holder)


def lock_run_dir(run_dir: Path, new_run: bool, overwrite: bool, command: str) -> RunDirLock:
    """Take the folder's lock, then apply the rules for a folder with contents: a new run refuses it (SystemExit),
    --overwrite empties it (the held lock file stays), --resume (new_run False) continues in it."""
    fresh = new_run and not overwrite
    if fresh and _entries(run_dir) and not (run_dir / LOCK_NAME).exists():
        raise SystemExit(not_empty_message(run_dir))  # refused before anything is written into someone's folder
    lock = acquire(run_dir, command)
    try:
        if fresh and _entries(run_dir):
            raise SystemExit(not_empty_message(run_dir))
        if new_run and overwrite:
            for p in _entries(run_dir):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
    except BaseException:
        lock.release()
        raise
    return lock


def claim_run_dir(run_dir: Path, rank: int, world: int, new_run: bool, overwrite: bool, command: str) -> Path:
    """Rank 0 takes `run_dir`'s lock (lock_run_dir) and keeps it until release_run_dir_locks; the other ranks wait
    for its outcome, so none writes into the folder before rank 0 holds it and has emptied it (--overwrite).
    Returns rank 0's `run_dir` on every rank. A refusal is rank 0's one-line SystemExit; the other ranks exit with
    status 1 and say nothing more."""
    outcome: list = [str(run_dir), None]
    if rank == 0:
        try:
            _HELD.append(lock_run_dir(run_dir, new_run, overwrite, command))
        except SystemExit as e:
            outcome[1] = str(e.code)
        except OSError as e:
            outcome[1] = f"error: --run-dir {run_dir} cannot be locked ({e}): choose a --run-dir this user can write"
    if world > 1:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise SystemExit(outcome[1] if rank == 0 else 1)
    return Path(outcome[0])


def release_run_dir_locks(keep: int = 0) -> None:
    """Release the locks this process took, the newest first, keeping the first `keep`."""
    while len(_HELD) > keep:
        _HELD.pop().release()


def releasing_run_dir_locks(fn: F) -> F:
    """`fn` releases the run-directory locks taken during its call when it returns or raises: an entry point called
    many times in one process (the experiments runner) never blocks its own next run."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        held_before = len(_HELD)
        try:
            return fn(*args, **kwargs)
        finally:
            release_run_dir_locks(keep=held_before)

    return wrapper  # type: ignore[return-value]
