"""Writing the two sides of a split (split_disjoint.py by customer, split_by_release.py by release date): each side
a folder in its source's layout, built under OUT.tmp and moved to OUT only once complete, with split_report.json."""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path


def staging(out: Path) -> Path:
    """OUT.tmp, emptied: where a split is built before it replaces OUT (a half-written split is never OUT)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def write_side(folder: Path, tables: Iterable[tuple[str, list[str], list[list[str]], int | None, set[str] | None]],
               media: Path) -> None:
    """`folder` with one CSV per (file name, header, rows, key column, kept keys): rows copied verbatim, only those
    whose key column is among the kept keys when a column is given; and `media` (the source's image folder) linked
    under its own name."""
    folder.mkdir(parents=True)
    for file, header, body, col, wanted in tables:
        with open(folder / file, "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(header)
            w.writerows(body if col is None else (r for r in body if r[col] in wanted))
    os.symlink(media.resolve(), folder / media.name, target_is_directory=True)


def publish(tmp: Path, out: Path, report: dict) -> None:
    """split_report.json into `tmp`, then `tmp` replaces `out`."""
    (tmp / "split_report.json").write_text(json.dumps(report, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
