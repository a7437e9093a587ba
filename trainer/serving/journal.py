"""The items journal of the recommendation service (`serve --items-journal FILE`): one JSON line per item accepted by
POST /items (the request's content, as sent), written and fsynced before the item's 200, replayed in order at start.

What it promises:
- A confirmed item is never dropped. A damaged line (cut, altered, not JSON) stops the start with one line naming the
  file and the line; nothing is changed, so the line can be repaired. `set_aside=True` (`--items-journal-set-aside`)
  moves the damaged lines, byte for byte, to FILE.damaged and starts with every other item.
- Compaction at start: the lines of items the catalogue already holds (shards rebuilt with them) are moved to
  FILE.archived, so the journal holds only the items it must restore. Lines are moved, never deleted: each is
  appended and fsynced to its new file before the journal is replaced (a new file, fsynced, renamed over it), so a
  kill at any moment leaves every line in the journal or in its new file (possibly in both).
- One service per journal: FILE.lock is locked (flock) while the service runs.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ARCHIVED = ".archived"  # lines of items the catalogue holds now (compaction)
DAMAGED = ".damaged"  # damaged lines set aside (--items-journal-set-aside)
LOCK = ".lock"
SET_ASIDE_FLAG = "--items-journal-set-aside"


class JournalError(Exception):
    """The journal cannot be read, locked or written; the message names the file (and line) and what to do."""


@dataclass(frozen=True)
class JournalLine:
    number: int  # 1-based
    raw: bytes  # the line as it is in the file, without its newline
    entry: dict | None  # None: damaged
    problem: str = ""  # why it is damaged


def _short(text: object, limit: int = 120) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ItemJournal:
    """The journal file at `path`, locked for this service. `entries()` reads it (JournalError at the first damaged
    line, unless `set_aside`); `compact()` moves lines out of it; `append()` adds one item's line."""

    def __init__(self, path: Path, set_aside: bool = False):
        self.path, self.set_aside = Path(path), set_aside
        self._lock = threading.Lock()
        self._lines: list[JournalLine] = []
        self._ends_cleanly = True
        self.damaged: list[JournalLine] = []  # the damaged lines of the last read (set_aside only)
        if not self.path.parent.is_dir():
            raise JournalError(f"--items-journal {self.path}: the folder {self.path.parent} does not exist: create "
                               "it, or give a file in an existing folder")
        if self.path.is_dir():
            raise JournalError(f"--items-journal {self.path} is a folder: give a file (e.g. {self.path}/items.jsonl)")
        lock_path = self.path.with_name(self.path.name + LOCK)
        try:
            self._lock_file = open(lock_path, "a+b")  # noqa: SIM115 - held open (and locked) while the service runs
        except OSError as e:
            raise JournalError(f"--items-journal {self.path}: its lock file {lock_path} cannot be opened "
                               f"({e.strerror or e}): give a journal in a folder the service can write") from None
        try:
            import fcntl

            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no advisory locks on this system
            pass
        except OSError:
            self._lock_file.close()
            raise JournalError(f"--items-journal {self.path} is in use by another running service: stop it, or give "
                               "this service its own journal") from None
        created = not self.path.exists()
        try:
            self._file = open(self.path, "a+b")  # noqa: SIM115 - held open while the service runs
        except OSError as e:
            self._lock_file.close()
            raise JournalError(f"--items-journal {self.path} cannot be opened ({e.strerror or e}): give a file the "
                               "service can write") from None
        if created:
            _fsync_dir(self.path.parent)

    # -- reading -------------------------------------------------------------------------------------------------
    def read(self) -> list[JournalLine]:
        """Every line of the file, parsed (blank lines left out); damaged ones have `entry` None. Changes nothing."""
        self._file.seek(0)
        data = self._file.read()
        self._ends_cleanly = not data or data.endswith(b"\n")
        lines = []
        for number, raw in enumerate(data.split(b"\n"), 1):
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw)
                problem = "" if isinstance(entry, dict) else "not a JSON object"
            except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
                entry, problem = None, _short(e)
            lines.append(JournalLine(number, raw, entry if not problem else None, problem))
        self._lines = lines
        return lines

    def damage(self, number: int, what: str) -> JournalError:
        """The error of damaged line `number` (`what`: what is wrong), saying what to do; with set_aside the caller
        sets the line aside instead."""
        return JournalError(f"{self.path} line {number} {what}: the service did not start and the journal is "
                            "unchanged (its item may have been confirmed): repair that line (the item's JSON as sent "
                            f"to POST /items), or start with {SET_ASIDE_FLAG} to move damaged lines to "
                            f"{self.path.name}{DAMAGED} and restore every other item")

    def entries(self) -> Iterator[tuple[int, dict]]:
        """(line number, entry) of every line, in order. A damaged line: JournalError naming it (nothing changed), or
        with set_aside, kept in `damaged` for compact() to move."""
        self.damaged = []
        lines = self.read()
        for line in lines:
            if line.entry is None:
                if not self.set_aside:
                    raise self.damage(line.number, f"is damaged ({line.problem})")
                self.damaged.append(line)
                continue
            yield line.number, line.entry

    # -- compaction ----------------------------------------------------------------------------------------------
    def compact(self, archive: Iterable[int] = (), aside: Iterable[int] = ()) -> dict[str, int]:
        """Move the lines numbered `archive` to FILE.archived and the damaged lines (`damaged`, and those numbered
        `aside`) to FILE.damaged, byte for byte; the journal keeps every other line, in order. Returns how many
        lines went where."""
        archive, aside = set(archive), set(aside) | {line.number for line in self.damaged}
        moved = {ARCHIVED: [x.raw for x in self._lines if x.number in archive],
                 DAMAGED: [x.raw for x in self._lines if x.number in aside and x.number not in archive]}
        if not any(moved.values()):
            if not self._ends_cleanly:  # a complete last entry whose newline was lost: end it (nothing is cut)
                self._write_synced(self._file, b"\n")
                self._ends_cleanly = True
            return {}
        with self._lock:
            for suffix, raws in moved.items():  # first where the lines go, durably ...
                if raws:
                    target = self.path.with_name(self.path.name + suffix)
                    new = not target.exists()
                    with open(target, "ab") as f:
                        self._write_synced(f, b"".join(r + b"\n" for r in raws))
                    if new:
                        _fsync_dir(self.path.parent)
            kept = [x.raw for x in self._lines if x.number not in archive | aside]
            tmp = self.path.with_name(f".{self.path.name}.partial")  # ... then the journal without them
            with open(tmp, "wb") as f:
                self._write_synced(f, b"".join(r + b"\n" for r in kept))
            self._replace(tmp)
            self._file.close()
            self._file = open(self.path, "a+b")  # noqa: SIM115 - held open while the service runs
        self.read()
        self.damaged = []
        return {suffix: len(raws) for suffix, raws in moved.items() if raws}

    def _replace(self, new: Path) -> None:
        """`new` becomes the journal, durably (one rename: a kill leaves the old file or the new one)."""
        os.replace(new, self.path)
        _fsync_dir(self.path.parent)

    @staticmethod
    def _write_synced(f, data: bytes) -> None:
        f.seek(0, os.SEEK_END)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())

    # -- writing -------------------------------------------------------------------------------------------------
    def append(self, entry: dict) -> None:
        """Write one entry and fsync it; on failure the file is left as it was and JournalError says why."""
        line = json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        with self._lock:
            self._file.seek(0, os.SEEK_END)
            size = self._file.tell()
            try:
                self._write_synced(self._file, line)
            except OSError as e:
                try:  # only this write's own bytes, never confirmed, are undone
                    self._file.truncate(size)
                    self._file.flush()
                except OSError:
                    pass
                raise JournalError(f"the item could not be written to the items journal ({e.strerror or e}): not "
                                   "added; free disk space or fix the file's permissions, then send it again") from None

    def close(self) -> None:
        self._file.close()
        self._lock_file.close()


def _fsync_dir(folder: Path) -> None:
    """Make a new or renamed file's directory entry durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
