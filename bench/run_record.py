"""What a bench records about its own run: the command (without one machine's absolute paths), peak memory, and its
Markdown / JSON reports."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def recorded_command(prog: str, args: list[str]) -> str:
    """The command as reports record it: paths inside the repository relative to it, other absolute paths as
    SCRATCH (a machine's own folder means nothing elsewhere), also as the value of a setting (`data.shards=/x`)."""
    def path(a: str) -> str:
        if not a.startswith("/"):
            return a
        resolved = Path(a).resolve()
        return os.path.relpath(resolved, ROOT) if resolved.is_relative_to(ROOT) else "SCRATCH"

    def token(a: str) -> str:
        key, eq, value = a.partition("=")
        return f"{key}={path(value)}" if eq and not a.startswith("/") else path(a)

    return " ".join([prog, *(token(a) for a in args)])


def write_reports(md: Path | None, markdown: str, json_path: Path | None = None, record: dict | None = None) -> None:
    """The Markdown table to `md` and `record` as JSON to `json_path` (each when given), folders made as needed; a
    bench calls it after every row, so an interrupted run still leaves its figures."""
    for path, body in ((md, markdown), (json_path, None if record is None else json.dumps(record, indent=1))):
        if path and body is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: reset at exec, unlike getrusage's ru_maxrss, which keeps the
    launching process's peak)."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
