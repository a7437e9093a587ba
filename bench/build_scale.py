"""The shard builder at scale: build time, its stages and peak memory for synthetic logs of 1M and 10M users.

    python bench/build_scale.py [--users 1000000,10000000] [--engines duckdb,memory] [--memory-limit 4GB] \
        [--work .cache/bench_build] [--out bench/results/build_scale_cpu]

The raw log of each size is written once by data_shards/synth.py's generator (10,000 items, 20 interactions a user
on average: about 20M and 200M rows; CSV), then built by `data_shards.build --dataset generic` in a fresh process per
engine: `duckdb` (the default: histories out of core under --memory-limit) and `memory` (the in-memory reference,
which holds every interaction as a Python object, run only up to --memory-users-max users: past that it does not fit
this machine). Per build: wall seconds, each stage's seconds (the builder's `[build]` lines: tables and items,
histories, item shards, sequence shards, manifest and hashes), the process's peak RSS, the shard folder's bytes; the
files of the two engines' folders are compared where both ran. Figures go to OUT.json / OUT.md with the command and
commit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:  # before any other import: this folder off sys.path (trainer/commands/script_path.py)
    from transrec.trainer.commands.script_path import run_as_script
except ModuleNotFoundError:
    raise SystemExit("error: transrec is not installed in this Python: `make install` or `pip install -e .`") from None
run_as_script(__file__, offline=True)

from transrec.bench.run_record import recorded_command, write_reports  # noqa: E402
from transrec.data_shards.build import BuildOptions, build  # noqa: E402
from transrec.data_shards.synth import write_raw  # noqa: E402
from transrec.data_shards.tables import GenericColumns  # noqa: E402
from transrec.trainer.core.run_setup import git_hash  # noqa: E402

PARTS = "parts"  # the dask engine's input: the log cut into this many part files under raw/parts/
N_PARTS = 16
STAGE = re.compile(r"^\[build\] (.+?): ([0-9.]+) s")


def one(engine: str, raw: Path, out: Path, memory_limit: str | None) -> dict:
    """In this process: one build; its peak RSS from the kernel. `dask:N`: the dask engine on N local processes over
    the log cut into part files."""
    t0 = time.perf_counter()
    name, _, workers = engine.partition(":")
    cols = GenericColumns(interactions=PARTS if name == "dask" else GenericColumns().interactions)
    manifest = build(BuildOptions(dataset="generic", source=raw, out=out, engine=name, memory_limit=memory_limit,
                                  users_per_shard=10_000, items_per_shard=2000, generic=cols,
                                  workers=int(workers or 4)))
    return {"wall_s": round(time.perf_counter() - t0, 1), "users": manifest["num_users"],
            "interactions": manifest["num_interactions"],
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "peak_worker_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)}


def cut_into_parts(raw: Path, n: int = N_PARTS) -> None:
    """raw/interactions.csv as n part files of whole users (the synthetic log lists each user's rows together),
    each with the header: the partitioned log the dask engine reads."""
    folder = raw / PARTS
    if (folder / "_SUCCESS").exists():
        return
    folder.mkdir(exist_ok=True)
    size = (raw / "interactions.csv").stat().st_size
    with open(raw / "interactions.csv") as f:
        header = f.readline()
        k, out, last_user, done = 0, None, None, len(header)
        for line in f:
            user = line.split(",", 1)[0]
            done += len(line)  # the synthetic log is ASCII: characters are bytes
            if out is None or (user != last_user and done > size * (k + 1) / n and k < n - 1):
                if out is not None:
                    out.close()
                    k += 1
                out = open(folder / f"part-{k:03d}.csv", "w")
                out.write(header)
            out.write(line)
            last_user = user
        out.close()
    (folder / "_SUCCESS").write_text(str(k + 1))  # a marker the log reader skips, as Spark writes it


def run_one(engine: str, raw: Path, out: Path, memory_limit: str | None) -> dict:
    cmd = [sys.executable, __file__, "--one", engine, str(raw), str(out)] + (
        ["--memory-limit", memory_limit] if memory_limit else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the {engine} build of {raw} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    res["stages_s"] = {m.group(1): float(m.group(2)) for m in map(STAGE.match, proc.stderr.splitlines()) if m}
    res["shard_mib"] = round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20)
    return res


def digest(folder: Path) -> str:
    """One hash of every file of a shard folder but the manifest's input hashes (names and bytes, in order)."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = f.read_bytes()
        if f.name == "manifest.json":
            m = json.loads(data)
            m.pop("input_files", None)
            data = json.dumps(m, sort_keys=True).encode()
        h.update(f.relative_to(folder).as_posix().encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", default="1000000,10000000")
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--engines", default="duckdb,memory",
                   help="duckdb, memory, dask:N (the dask engine on N local processes over the log in 16 parts)")
    p.add_argument("--memory-limit", default=None)
    p.add_argument("--memory-users-max", type=int, default=1_000_000)
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench_build")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "build_scale_cpu")
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print("RESULT " + json.dumps(one(a.one[0], Path(a.one[1]), Path(a.one[2]), a.memory_limit)))
        return
    rows = []
    for users in (int(x) for x in a.users.split(",")):
        raw = a.work / f"raw-u{users}"
        if not (raw / "done").exists():
            t0 = time.perf_counter()
            print(f"writing the synthetic log of {users:,} users to {raw}", file=sys.stderr, flush=True)
            n = write_raw(raw, users, a.items, 20.0, 1.1, 64, 0)
            (raw / "done").write_text(json.dumps({"interactions": n, "seconds": time.perf_counter() - t0}))
        log_mib = round((raw / "interactions.csv").stat().st_size / 2**20)
        digests = {}
        for engine in a.engines.split(","):
            if engine == "memory" and users > a.memory_users_max:
                rows.append({"users": users, "engine": engine, "skipped": f"over --memory-users-max "
                             f"{a.memory_users_max:,}: the in-memory builder needs about 7.8 GB per 1M users"})
                continue
            if engine.startswith("dask"):
                cut_into_parts(raw)
            out = a.work / f"shards-u{users}-{engine.replace(':', '-')}"
            print(f"building {raw} with --engine {engine}", file=sys.stderr, flush=True)
            commit, load = git_hash(), round(os.getloadavg()[0], 1)  # the code and load this build starts with
            res = run_one(engine, raw, out, a.memory_limit)
            digests[engine] = digest(out)
            rows.append({"users": users, "engine": engine, "log_mib": log_mib, "commit": commit, "load_1min": load,
                         "memory_limit": a.memory_limit, **res})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if len(digests) >= 2:
            for r in rows:
                if r["users"] == users and "skipped" not in r:
                    r["same_shards_as_other_engines"] = len(set(digests.values())) == 1
    write(a, kept_rows(a.out.with_suffix(".json"), rows) + rows)


def kept_rows(path: Path, new: list[dict]) -> list[dict]:
    """The rows of an earlier report for (users, engine) pairs this invocation did not run."""
    if not path.exists():
        return []
    ran = {(r["users"], r["engine"]) for r in new}
    return [r for r in json.loads(path.read_text())["rows"] if (r["users"], r["engine"]) not in ran]


def write(a: argparse.Namespace, rows: list[dict]) -> None:
    limit = a.memory_limit or "default (a quarter of RAM)"
    lines = ["# The shard builder at scale (CPU, synthetic logs)", "",
             f"Command: `{recorded_command('python bench/build_scale.py', sys.argv[1:])}` (commit {git_hash()}; "
             f"{os.cpu_count()} cores; each row records its own commit, 1-min load when it started and the engine's "
             f"memory limit, this invocation's: {limit}); rows of sizes not rerun are kept from the earlier "
             "report.", "",
             "| users | engine | interactions | log MiB | wall s | tables, items s | histories s | item shards s | "
             "sequence shards s | manifest s | peak RSS GiB (largest child process) | shards MiB | same shards | "
             "commit, load, limit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {"memory": 0, "duckdb": 1}
    for r in sorted(rows, key=lambda r: (r["users"], order.get(r["engine"], 2), r["engine"])):
        if "skipped" in r:
            lines.append(f"| {r['users']:,} | {r['engine']} | skipped: {r['skipped']} |" + " |" * 11)
            continue
        st = r["stages_s"]
        workers = f" ({r['peak_worker_rss_gib']})" if r.get("peak_worker_rss_gib") else ""
        same = r.get("same_shards_as_other_engines", r.get("same_shards_as_other_engine", "-"))
        hist = next((v for k, v in st.items() if k.startswith("histories")), float("nan"))
        lines.append(f"| {r['users']:,} | {r['engine']} | {r['interactions']:,} | {r['log_mib']} | {r['wall_s']} | "
                     f"{st.get('tables read, items checked', float('nan'))} | {hist} | {st.get('item shards')} | "
                     f"{st.get('sequence shards')} | {st.get('manifest and hashes')} | {r['peak_rss_gib']}{workers} | "
                     f"{r['shard_mib']} | {same} | {r.get('commit', '?')}, "
                     f"{r.get('load_1min', '?')}, {r.get('memory_limit') or 'default'} |")
    write_reports(a.out.with_suffix(".md"), "\n".join(lines) + "\n", a.out.with_suffix(".json"), {"rows": rows})


if __name__ == "__main__":
    main()
