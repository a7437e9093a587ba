"""User histories out of core: the log's group-by-user, time order, dedup and user order on DuckDB, under a memory cap.

The builder's in-memory path (data_shards/build_input.user_histories) holds every user's interactions as Python
objects: about 390 bytes an interaction, 7.8 GB for 20M. Here the log goes, chunk by chunk, into an on-disk DuckDB
database in a scratch folder; DuckDB joins it with the item index, orders and deduplicates each history with window
functions and sorts the users, spilling to disk past `memory_limit`; the builder then reads the histories back in user
order, a chunk at a time. Python's peak memory no longer grows with the number of users.

Why DuckDB: an embedded engine (one wheel, no server, no JVM), larger-than-memory sorts, windows and joins with a
settable memory limit and temp folder, Parquet and CSV readers of its own; Polars' streaming engine does not run
window functions out of core. The rules are the in-memory path's, to the row (tests/test_history_engine.py builds
both and compares the bytes):

- order: each history by (time, file, row); dedup as order_and_dedup: under `collapse` a repeat of (item, time) is
  removed, under `first` a repeat of the item, `keep` removes nothing; repeats are counted in every mode;
- users: sort_key (ASCII-digit ids by their number, then the others by code point), equal numbers ("01", "1") by
  their first interaction in the log, as Python's stable sort leaves them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from transrec.data_shards.bad_input import Problems
from transrec.data_shards.log_reader import LogChunk

FILE_SHIFT = 1 << 40  # (file, row) packed into one BIGINT: rows per file below 2^40
NUMERIC = "regexp_full_match(usr, '[0-9]+')"
USER_ORDER = (f"CASE WHEN {NUMERIC} THEN 0 ELSE 1 END, CASE WHEN {NUMERIC} THEN length(ltrim(usr, '0')) ELSE 0 END, "
              f"CASE WHEN {NUMERIC} THEN ltrim(usr, '0') ELSE usr END, first_seen")


def default_memory_limit() -> str:
    """A quarter of this machine's memory, at least 1 GB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    return f"{max(1, total // 4 >> 30)}GB"


@dataclass
class EngineHistories:
    """What data_shards/build.py needs of the histories, with the histories themselves left in the engine."""

    con: duckdb.DuckDBPyConnection
    scratch: Path
    num_users: int = 0
    duplicates: int = 0
    dropped_no_content: int = 0
    removed: int = 0
    rows_read: int = 0  # parsed rows of the log
    files: list[str] = field(default_factory=list)

    def histories(self, chunk_rows: int = 1 << 19) -> Iterator[tuple[str, list[int], list[float]]]:
        """(raw user id, item indices, times) of every user, in shard order."""
        users = self.raw_users(chunk_rows)
        cur = self.con.cursor()
        cur.execute("SELECT u, idx, t FROM hist ORDER BY u, t, pos")
        carry_u, carry_i, carry_t = -1, np.zeros(0, np.int64), np.zeros(0, np.float64)
        vectors = max(1, chunk_rows // 2048)
        while True:
            df = cur.fetch_df_chunk(vectors)
            if df is None or len(df) == 0:
                break
            u, i, t = (df[c].to_numpy() for c in ("u", "idx", "t"))
            if carry_u >= 0:
                u = np.concatenate([np.full(len(carry_i), carry_u), u])
                i, t = np.concatenate([carry_i, i]), np.concatenate([carry_t, t])
            starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
            ends = np.r_[starts[1:], len(u)]
            for s, e in zip(starts[:-1], ends[:-1]):  # the last user may go on in the next chunk
                yield next(users), i[s:e].tolist(), t[s:e].tolist()
            carry_u, carry_i, carry_t = int(u[starts[-1]]), i[starts[-1]:], t[starts[-1]:]
        if carry_u >= 0:
            yield next(users), carry_i.tolist(), carry_t.tolist()
        cur.close()

    def raw_users(self, chunk_rows: int = 1 << 19) -> Iterator[str]:
        """The raw user ids in shard order."""
        cur = self.con.cursor()
        cur.execute("SELECT usr FROM users ORDER BY u")
        while True:
            batch = cur.fetchmany(chunk_rows)
            if not batch:
                break
            yield from (r[0] for r in batch)
        cur.close()

    def users_among(self, names: Iterable[str], present: bool) -> list[str]:
        """The shard users (in shard order) that are (present=True) or are not among `names`."""
        self.con.register("named", pd.DataFrame({"usr": pd.Series(list(names), dtype=object)}))
        join = "SEMI" if present else "ANTI"
        rows = self.con.execute(f"SELECT usr FROM users {join} JOIN named USING (usr) ORDER BY u").fetchall()
        self.con.unregister("named")
        return [r[0] for r in rows]

    def close(self) -> None:
        try:
            self.con.close()
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)


def engine_histories(chunks: Iterable[LogChunk], item_index: dict[str, int], all_items: Iterable[str], dedup: str,
                     has_time: bool, problems: Problems, problem_file: str | None = None,
                     memory_limit: str | None = None, scratch_parent: Path | None = None,
                     threads: int | None = None, progress=None) -> EngineHistories:
    """Load the log's chunks, drop and report what cannot be built, order, dedup and number the users.

    `item_index`: usable raw item -> index; `all_items`: every item of the item table (an item there but not usable is
    counted as without content, one not there is an `unknown_item` problem naming `problem_file` or the part file).
    `progress(rows)` is called after each chunk."""
    if scratch_parent is not None:  # the folder --out will be written into may not exist yet
        scratch_parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".history-engine-", dir=scratch_parent))
    con = duckdb.connect(str(scratch / "log.duckdb"), config={
        "memory_limit": memory_limit or default_memory_limit(), "temp_directory": str(scratch / "spill"),
        "preserve_insertion_order": False, **({"threads": threads} if threads else {})})
    eng = EngineHistories(con, scratch)
    try:
        _load(eng, chunks, progress)
        known = pd.DataFrame({"item": pd.Series(list(all_items), dtype=object)})
        known["idx"] = [item_index.get(x, -1) for x in known["item"]]
        con.register("known_df", known)
        con.execute("CREATE TABLE known AS SELECT item, idx::BIGINT AS idx FROM known_df")
        con.unregister("known_df")
        _report_unknown(eng, problems, problem_file)
        eng.dropped_no_content = con.execute(
            "SELECT count(*) FROM log JOIN known USING (item) WHERE idx < 0").fetchall()[0][0]
        con.execute("CREATE TABLE kept AS SELECT usr, idx, t, pos FROM log JOIN known USING (item) WHERE idx >= 0")
        con.execute("DROP TABLE log")
        repeat = "idx, t" if has_time and dedup != "first" else "idx"
        key = "idx" if dedup == "first" else "idx, t"
        total = con.execute("SELECT count(*) FROM kept").fetchall()[0][0]
        eng.duplicates = total - con.execute(f"SELECT count(*) FROM (SELECT DISTINCT usr, {repeat} FROM kept)"
                                             ).fetchall()[0][0]
        if dedup == "keep":
            con.execute("CREATE VIEW deduped AS SELECT * FROM kept")
        else:
            con.execute(f"CREATE TABLE deduped AS SELECT usr, idx, t, pos FROM (SELECT *, row_number() OVER "
                        f"(PARTITION BY usr, {key} ORDER BY t, pos) AS rn FROM kept) WHERE rn = 1")
        eng.removed = total - con.execute("SELECT count(*) FROM deduped").fetchall()[0][0]
        con.execute(f"CREATE TABLE users AS SELECT usr, (row_number() OVER (ORDER BY {USER_ORDER}) - 1)::BIGINT AS u "
                    "FROM (SELECT usr, min(pos) AS first_seen FROM kept GROUP BY usr)")
        con.execute("CREATE TABLE hist AS SELECT u, idx, t, pos FROM deduped JOIN users USING (usr)")
        eng.num_users = con.execute("SELECT count(*) FROM users").fetchall()[0][0]
        return eng
    except BaseException:
        eng.close()
        raise


def _load(eng: EngineHistories, chunks: Iterable[LogChunk], progress) -> None:
    con = eng.con
    con.execute("CREATE TABLE log (usr VARCHAR, item VARCHAR, t DOUBLE, pos BIGINT)")
    for chunk in chunks:
        if chunk.file not in eng.files:
            eng.files.append(chunk.file)
        f = eng.files.index(chunk.file)
        df = pd.DataFrame({"usr": pd.Series(chunk.users, dtype=object), "item": pd.Series(chunk.items, dtype=object),
                           "t": chunk.times, "pos": chunk.rows + f * FILE_SHIFT})
        con.register("chunk_df", df)
        con.execute("INSERT INTO log SELECT usr, item, t, pos FROM chunk_df")
        con.unregister("chunk_df")
        eng.rows_read += len(df)
        if progress:
            progress(eng.rows_read)


def _report_unknown(eng: EngineHistories, problems: Problems, problem_file: str | None) -> None:
    """An `unknown_item` problem for every interaction naming an item the item table lacks, in log order."""
    cur = eng.con.cursor()
    cur.execute("SELECT pos, item, usr FROM log ANTI JOIN known USING (item) ORDER BY pos")
    while True:
        batch = cur.fetchmany(100_000)
        if not batch:
            break
        for pos, item, usr in batch:
            file = problem_file if problem_file is not None else eng.files[pos // FILE_SHIFT]
            problems.add("unknown_item", file=file, line=int(pos % FILE_SHIFT), item=item, user=usr)
    cur.close()


def chunks_of_interactions(interactions: list, file: str, chunk_rows: int = 1 << 19) -> Iterator[LogChunk]:
    """An in-memory interaction list (data_shards/tables.Interaction, a named dataset's loader) as log chunks."""
    for s in range(0, len(interactions), chunk_rows):
        part = interactions[s:s + chunk_rows]
        yield LogChunk(np.fromiter((x.row for x in part), np.int64, len(part)), [x.user for x in part],
                       [x.item for x in part], np.fromiter((x.time for x in part), np.float64, len(part)), file)
