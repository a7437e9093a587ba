"""Interaction logs read in chunks, whatever their format: CSV, gzip'ed CSV, Parquet, or a folder of part files.

A chunk is four parallel columns (row number, user, item, time in seconds) of the rows that parsed; a row that does
not (an empty user, item or time, a time that is neither a number nor an ISO date) is reported to `Problems` as
`unparseable_row` with its file, row number, reason and cells. Every reader of interaction rows goes through here
(the in-memory tables too: data_shards/tables.read_interactions), so a log gives the same validation report whichever
engine reads it. Row numbers count data rows from 1 in each file (blank CSV lines are skipped, as csv.DictReader
skips them).

Formats come from the path (`.csv`, `.csv.gz` / `.gz`, `.parquet`; a folder: its part files of one such format, in
name order) or from `fmt`. Parquet is read through DuckDB (data_shards/history_engine.py's engine), typed columns
given as text to the same parser.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np

from transrec.data_shards.bad_input import Problems, parse_time

FORMATS = ("csv", "csv.gz", "parquet")


class LogError(ValueError):
    """A log that cannot be read as given: one line naming the file and what to do."""
CHUNK_ROWS = 500_000


def log_format(path: Path, fmt: str | None = None) -> str:
    """The format of a log file or folder: `fmt` when given, else from the name (a folder: from its part files)."""
    if fmt:
        if fmt not in FORMATS:
            raise LogError(f"--input-format {fmt!r}: choose {', '.join(FORMATS)}")
        return fmt
    if path.is_dir():
        kinds = {log_format(p) for p in part_files(path)}
        if len(kinds) != 1:
            raise LogError(f"{path}: a folder of part files must hold one format, found {sorted(kinds)}: give "
                             "--input-format or keep one kind of file there")
        return kinds.pop()
    name = path.name.lower()
    if name.endswith((".csv.gz", ".tsv.gz", ".gz")):
        return "csv.gz"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    return "csv"


def part_files(folder: Path) -> list[Path]:
    """A folder's log files in name order (hidden files and _SUCCESS-style markers left out)."""
    parts = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(("_", ".")))
    if not parts:
        raise FileNotFoundError(f"{folder} holds no part files: point the interactions flag at a file or a folder "
                                "of .csv, .csv.gz or .parquet files")
    return parts


def log_files(path: Path) -> list[Path]:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: check --source (and the dataset layout in data_shards/README)")
    return part_files(path) if path.is_dir() else [path]


def _open_text(path: Path, fmt: str):
    if fmt == "csv.gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, newline="", encoding="utf-8")


def log_columns(path: Path, fmt: str | None = None) -> list[str]:
    """The column names of a log (the first part file's, for a folder)."""
    first = log_files(path)[0]
    kind = log_format(path, fmt)
    if kind == "parquet":
        return [r[0] for r in duckdb.sql(f"DESCRIBE SELECT * FROM read_parquet('{_sql_path(first)}')").fetchall()]
    try:
        with _open_text(first, kind) as f:
            return next(csv.reader(f), [])
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise LogError(f"{first}: cannot be read as {kind} ({type(e).__name__}: {e}): give --input-format or "
                         "check the file") from None


def _sql_path(p: Path) -> str:
    return str(p).replace("'", "''")


@dataclass
class LogChunk:
    rows: np.ndarray  # int64: data row number in its file, from 1
    users: list[str]
    items: list[str]
    times: np.ndarray  # float64 seconds
    file: str  # the part file's name


def _row_dict(fields: list[str], values: list) -> dict:
    """The row as csv.DictReader gives it: missing cells None, extra cells under the key None."""
    d = {k: (values[i] if i < len(values) else None) for i, k in enumerate(fields)}
    if len(values) > len(fields):
        d[None] = list(values[len(fields):])
    return d


def _clean_chunk(file: str, lines: list[int], raw: list[list[str]], ui: int, ii: int,
                 ti: int | None) -> LogChunk | None:
    """A chunk of CSV text rows whose every row parses, converted column-wise; None when any row does not (the
    caller then checks row by row). Numbers convert as float() converts them (numpy calls it on text), so the times
    are the row-by-row path's to the bit; ISO dates and bad rows take that path."""
    try:
        users = [v[ui].strip() for v in raw]
        items = [v[ii].strip() for v in raw]
        times = np.array([v[ti] for v in raw] if ti is not None else lines, dtype=np.float64)
    except (IndexError, AttributeError, ValueError, TypeError):
        return None
    if not (all(users) and all(items) and np.isfinite(times).all()):
        return None
    return LogChunk(np.asarray(lines, dtype=np.int64), users, items, times, file)


def _chunk_of(file: str, fields: list[str], lines: list[int], raw: list[list], ui: int, ii: int, ti: int | None,
              problems: Problems, text_rows: bool = False) -> LogChunk:
    """Parse and check one chunk of raw rows; bad rows go to `problems` in row order. `text_rows`: every cell is
    text (CSV), so the column-wise path may be tried first."""
    if text_rows:
        clean = _clean_chunk(file, lines, raw, ui, ii, ti)
        if clean is not None:
            return clean
    rows, users, items, times = [], [], [], []
    for line, values in zip(lines, raw):
        n = len(values)
        user = _text(values[ui]) if ui < n else ""
        item = _text(values[ii]) if ii < n else ""
        raw_time = (values[ti] if ti < n else None) if ti is not None else str(line)
        try:
            if not user or not item or raw_time is None:
                raise ValueError("empty user, item or time")
            t = _fast_time(raw_time)
        except ValueError as e:
            problems.add("unparseable_row", file=file, line=line, reason=str(e), row=_row_dict(fields, values))
            continue
        rows.append(line)
        users.append(user)
        items.append(item)
        times.append(t)
    return LogChunk(np.asarray(rows, dtype=np.int64), users, items, np.asarray(times, dtype=np.float64), file)


def _text(v) -> str:
    return "" if v is None else (v if isinstance(v, str) else str(v)).strip()


def _fast_time(value) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # a typed Parquet column
        t = float(value)
        if not math.isfinite(t):
            raise ValueError(f"time {value!r} is not a finite number")
        return t
    return parse_time(str(value))


def read_log(path: Path, user_col: str, item_col: str, time_col: str | None, problems: Problems,
             fmt: str | None = None, chunk_rows: int = CHUNK_ROWS) -> Iterator[LogChunk]:
    """The log's parsed rows in chunks of at most `chunk_rows`, file by file in order; `time_col=None`: file order is
    the order (time = row number)."""
    kind = log_format(path, fmt)
    for part in log_files(path):
        reader = _parquet_rows(part, chunk_rows) if kind == "parquet" else _csv_rows(part, kind, chunk_rows)
        fields = next(reader)
        missing = [c for c in (user_col, item_col, time_col) if c and c not in fields]
        if missing:
            raise LogError(f"{part} has no column {missing[0]!r} (its columns: {', '.join(fields) or 'none'}): "
                             "every part file of a log needs the same columns")
        ui, ii = fields.index(user_col), fields.index(item_col)
        ti = fields.index(time_col) if time_col else None
        for lines, raw in reader:
            yield _chunk_of(part.name, fields, lines, raw, ui, ii, ti, problems, text_rows=kind != "parquet")


def _csv_rows(path: Path, kind: str, chunk_rows: int):
    """Yields the header, then (row numbers, rows) chunks; blank lines skipped and not counted (csv.DictReader)."""
    try:
        f = _open_text(path, kind)
        reader = csv.reader(f)
        yield next(reader, [])
        lines, raw, n = [], [], 0
        for values in reader:
            if not values:
                continue
            n += 1
            lines.append(n)
            raw.append(values)
            if len(raw) == chunk_rows:
                yield lines, raw
                lines, raw = [], []
        if raw:
            yield lines, raw
        f.close()
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise LogError(f"{path}: unreadable as {kind} ({type(e).__name__}: {e}): check the file, or give "
                         "--input-format") from None


def _parquet_rows(path: Path, chunk_rows: int):
    con = duckdb.connect()
    try:
        rel = con.execute(f"SELECT * FROM read_parquet('{_sql_path(path)}')")
    except duckdb.Error as e:
        raise LogError(f"{path}: unreadable as Parquet ({e}): check the file, or give --input-format") from None
    fields = [d[0] for d in rel.description]
    yield fields
    n = 0
    while True:
        batch = rel.fetchmany(chunk_rows)
        if not batch:
            break
        lines = list(range(n + 1, n + len(batch) + 1))
        n += len(batch)
        yield lines, [[_cell(v) for v in r] for r in batch]
    con.close()


def _cell(v):
    """A Parquet value as the parser takes it: numbers stay numbers, timestamps become ISO text, None stays None
    (an empty cell), anything else its text."""
    if v is None or isinstance(v, (int, float, str)):
        return v
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return str(v)
