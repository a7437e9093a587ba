"""The builder's history stage, whichever way it runs: in memory (data_shards/build_input.user_histories, the
reference) or out of core (data_shards/history_engine.py, the default), behind one interface that the sequence
writer and the manifest read: the users in shard order, each one's item indices and times, and the counts of what
was dropped. Both give the same shards to the byte (tests/test_history_engine.py)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from transrec.data_shards import report
from transrec.data_shards.build_input import Histories, ItemPlan, user_histories
from transrec.data_shards.history_dask import DaskHistories, dask_histories
from transrec.data_shards.history_engine import EngineHistories, chunks_of_interactions, engine_histories
from transrec.data_shards.log_reader import LogError, log_files, log_format, read_log
from transrec.data_shards.tables import GenericColumns, RawDomain

ENGINES = ("duckdb", "memory", "dask")


@dataclass
class HistoryStage:
    """The histories and their counts, from either engine."""

    num_users: int
    duplicates: int
    removed: int
    dropped_no_content: int
    unparseable: int
    memory: Histories | None = None
    engine: EngineHistories | DaskHistories | None = None
    item_index: dict[str, int] | None = None

    def histories(self) -> Iterator[tuple[str, list[int], list[float]]]:
        """(raw user id, item indices, times) of every user, in shard order."""
        if self.engine is not None:
            yield from self.engine.histories()
            return
        for raw in self.memory.users:
            its = self.memory.per_user[raw]
            yield raw, [self.item_index[x.item] for x in its], [x.time for x in its]

    def raw_users(self) -> Iterator[str]:
        return self.engine.raw_users() if self.engine is not None else iter(self.memory.users)

    def users_with_features(self, user_features: dict) -> list[str]:
        """The shard users that have a row in the users table, in shard order."""
        if self.engine is not None:
            return self.engine.users_among(user_features, present=True)
        return [u for u in self.memory.users if u in user_features]

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


class Progress:
    """Long build stages, shown on stderr: on a terminal a line every `every` seconds (count, rate and, when the total
    is known, time left); in a log file only each stage's one summary line (BuildTimer)."""

    def __init__(self, what: str, total: int | None = None, every: float = 10.0, stream=None):
        self.what, self.total, self.every = what, total, every
        self.stream = stream or sys.stderr
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int) -> None:
        now = time.perf_counter()
        if not self.live or now - self.last < self.every:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        left = f", about {(self.total - done) / rate:,.0f} s left" if self.total and rate > 0 else ""
        of = f" of {self.total:,}" if self.total else ""
        print(f"[build] {self.what}: {done:,}{of} ({rate:,.0f}/s{left})", file=self.stream, flush=True)


class BuildTimer:
    """One line per finished stage on stderr ("[build] histories: 41.2 s"), kept in `stages` as well."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.stages: dict[str, float] = {}
        self.last = time.perf_counter()

    def done(self, stage: str, detail: str = "") -> None:
        now = time.perf_counter()
        self.stages[stage] = round(now - self.last, 2)
        self.last = now
        print(f"[build] {stage}: {self.stages[stage]:.1f} s{detail}", file=self.stream, flush=True)


def stage_histories(domain: RawDomain, plan: ItemPlan, dedup: str, engine: str, cols: GenericColumns | None,
                    memory_limit: str | None, scratch_parent: Path, input_format: str | None = None,
                    dask_scheduler: str | None = None, workers: int | None = None) -> HistoryStage:
    """The histories, by `engine`; the problems the in-memory path reports are reported here the same way."""
    if engine == "memory":
        h = user_histories(domain, plan.index, dedup)
        return HistoryStage(len(h.users), h.duplicates, h.removed, h.dropped_no_content, h.unparseable, memory=h,
                            item_index=plan.index)
    problems = domain.problems
    first_file = next(iter(domain.input_files))
    before = len(problems.found["unparseable_row"])
    if engine == "dask":
        if domain.log_path is None:
            raise LogError(f"--engine dask reads a generic log (a file or a folder of part files), not the "
                           f"{domain.name} dataset's tables: use the default engine")
        eng = dask_histories(domain.log_path, input_format, (cols.user_col, cols.item_col, cols.time_col),
                             plan.index, domain.items, dedup, domain.has_time_column, problems, first_file,
                             scratch_parent, scheduler=dask_scheduler, workers=workers)
    elif domain.log_path is not None:
        eng = engine_histories(
            read_log(domain.log_path, cols.user_col, cols.item_col, cols.time_col, problems, input_format),
            plan.index, domain.items, dedup, domain.has_time_column, problems,
            None if domain.log_path.is_dir() else first_file, memory_limit, scratch_parent,
            progress=Progress(f"rows read from {domain.log_path.name} ({log_format(domain.log_path, input_format)})"))
    else:
        eng = engine_histories(chunks_of_interactions(domain.interactions, first_file), plan.index, domain.items,
                               dedup, domain.has_time_column, problems, first_file, memory_limit, scratch_parent)
    if domain.log_path is not None:
        found = problems.found["unparseable_row"]  # the log's rows first, as when the log is read before the items
        problems.found["unparseable_row"] = found[before:] + found[:before]
        unparseable = len(found) - before
        if domain.log_path.is_dir():  # each part hashed into the manifest, in place of the folder
            name = first_file
            files = {f"{name}/{p.name}": p for p in log_files(domain.log_path)}
            domain.input_files = {**files, **{k: v for k, v in domain.input_files.items() if k != name}}
    else:
        unparseable = sum(1 for x in problems.found["unparseable_row"] if x.get("file") == first_file)
    stage = HistoryStage(eng.num_users, eng.duplicates, eng.removed, eng.dropped_no_content, unparseable, engine=eng)
    if stage.num_users == 0:
        stage.close()
        raise SystemExit(
            f"error: no interaction is left to build from: {eng.rows_read + unparseable} rows in {first_file}, of "
            f"which unparseable {unparseable}, naming unknown items {len(problems.found['unknown_item'])}, naming "
            f"items without usable content (no text and no readable image) {eng.dropped_no_content}. Check the "
            f"column flags and the item table; details: {report.problem_summary(problems)}")
    if domain.user_features:
        for u in eng.users_among(domain.user_features, present=False):
            problems.add("unknown_user_features", user=u)
    return stage


def write_id_maps(path: Path, items: list[str], users: Iterator[str]) -> None:
    """id_maps.json as json.dumps({"items": items, "users": users}) writes it, with the users streamed."""
    with open(path, "w") as f:
        f.write('{"items": ' + json.dumps(items) + ', "users": [')
        for k, u in enumerate(users):
            f.write((", " if k else "") + json.dumps(u))
        f.write("]}")
