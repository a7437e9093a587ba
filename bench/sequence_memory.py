"""Memory per rank of the users' sequences the trainer keeps (evaluation, popularity, log-q): a dict per user
(`shard_io.read_sequences`, what the trainer held before) against the compact `SequenceTable`.

    python bench/sequence_memory.py --shards DIR [DIR ...] [--md bench/results/sequence_memory_cpu.md]

Each (shards, reader) pair runs in a fresh process: peak RSS after the imports and after reading, the time to read,
and the same for the validation and test users' arrays built from it (`trainer.evaluate.eval_users`, window 25).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:  # before any other import: this folder off sys.path (trainer/commands/script_path.py)
    from transrec.trainer.commands.script_path import run_as_script
except ModuleNotFoundError:
    raise SystemExit("error: transrec is not installed in this Python: `make install` or `pip install -e .`") from None
run_as_script(__file__)

import time

from transrec.bench.run_record import peak_rss_mib, recorded_command, write_reports  # noqa: E402
from transrec.data_shards.sequence_table import SequenceTable
from transrec.data_shards.shard_io import load_manifest, read_sequences
from transrec.trainer.evaluation.ranking import eval_users

READERS = ("dicts", "table")


def measure(shards: str, reader: str) -> dict:
    """In this process: read the sequences with `reader`, then the evaluation users; peak RSS and times."""
    rss_mib = peak_rss_mib
    base = rss_mib()
    t0 = time.perf_counter()
    sequences = read_sequences(shards) if reader == "dicts" else SequenceTable(shards)
    t_read, after_read = time.perf_counter() - t0, rss_mib()
    t0 = time.perf_counter()
    users = [eval_users(sequences, split, 25) for split in ("valid", "test")]
    t_eval = time.perf_counter() - t0
    manifest = load_manifest(shards)
    return {"shards": Path(shards).name, "reader": reader, "users": manifest["num_users"],
            "interactions": manifest["num_interactions"], "read_s": round(t_read, 1),
            "read_mib": round(after_read - base, 1), "eval_users_s": round(t_eval, 1),
            "peak_mib": round(rss_mib() - base, 1), "evaluated": len(users[1].users)}


def markdown(rows: list[dict], argv: list[str]) -> str:
    lines = ["# Memory of the users' sequences per rank (CPU)", "",
             f"- command: `{recorded_command('python bench/sequence_memory.py', argv)}`",
             f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other "
             "work: times are indicative)", "",
             "Memory above the process's footprint after its imports (peak RSS). `dicts`: a Python dict of lists per "
             "user (`read_sequences`); `table`: `SequenceTable` (flat arrays). 'with eval users' adds the validation "
             "and test users' history arrays the trainer builds from it.", "",
             "| shards | users | interactions | reader | read (s) | after reading (MiB) | with eval users (MiB) | "
             "bytes per interaction |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = r["read_mib"] * 2**20 / r["interactions"]
        lines.append(f"| {r['shards']} | {r['users']:,} | {r['interactions']:,} | {r['reader']} | {r['read_s']} | "
                     f"{r['read_mib']:,.0f} | {r['peak_mib']:,.0f} | {per:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", nargs="+", required=True, help="shard folders (e.g. from data_shards.synth)")
    p.add_argument("--readers", default=",".join(READERS), help="comma-separated: dicts, table")
    p.add_argument("--md", type=Path, help="write the Markdown table here")
    p.add_argument("--one", nargs=2, metavar=("SHARDS", "READER"), help=argparse.SUPPRESS)  # the child process
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(measure(*a.one)))
        return []
    rows = []
    for shards in a.shards:
        for reader in a.readers.split(","):
            if reader not in READERS:
                raise SystemExit(f"unknown reader {reader!r}: choose from {', '.join(READERS)}")
            out = subprocess.run([sys.executable, __file__, "--shards", shards, "--one", shards, reader],
                                 capture_output=True, text=True, check=False)
            if out.returncode:
                raise SystemExit(f"measuring {reader} on {shards} failed:\n{out.stderr[-2000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows, sys.argv[1:] if argv is None else argv)
    print(table)
    write_reports(a.md, table)
    return rows


if __name__ == "__main__":
    main()
