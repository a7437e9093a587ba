"""Train and evaluate on shards of millions of users: what one training step and one evaluation cost there.

    python bench/train_at_scale.py --shards .cache/scale10m/shards [--max-users 10000] [--preset tiny] \
        [--out bench/results/train_scale_cpu]

Runs `trainer/main.py` in a fresh process on the shards (built by `python bench/build_scale.py` or
`data_shards.build`): both stages of the preset, one optimizer step each (`stage1.max_steps=1`,
`stage2.max_steps=1`), validation and test over a seeded sample of `--max-users` evaluated users (`eval.max_users`:
whole-split ranking of millions of users takes hours on a CPU), no projector. Records the wall time, the trainer's
own timing lines (the streaming pass over every user, feature caching, each stage), the process's peak RSS, the
shards' size, and the run's evaluated users and test figures, with the command and commit, to OUT.json / OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:  # before any other import: this folder off sys.path (trainer/commands/script_path.py)
    from transrec.trainer.commands.script_path import run_as_script
except ModuleNotFoundError:
    raise SystemExit("error: transrec is not installed in this Python: `make install` or `pip install -e .`") from None
run_as_script(__file__, offline=True)

from transrec.bench.run_record import recorded_command, write_reports  # noqa: E402
from transrec.data_shards.shard_io import load_manifest  # noqa: E402
from transrec.trainer.core.run_setup import git_hash  # noqa: E402

STAMP = re.compile(r"^\[transrec (\d\d):(\d\d):(\d\d)\] (.*)$")


def timeline(log: str) -> list[tuple[float, str]]:
    """(seconds since the first stamped line, message) of the trainer's log lines."""
    out, first = [], None
    for line in log.splitlines():
        m = STAMP.match(line)
        if m:
            t = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3))
            first = t if first is None else first
            out.append((t - first if t >= first else t + 86400 - first, m.group(4)))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--max-users", type=int, default=10_000)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_scale_cpu")
    a = p.parse_args(argv)
    manifest = load_manifest(a.shards)
    run_dir = Path(tempfile.mkdtemp(prefix="train-at-scale-")) / "run"
    cmd = [sys.executable, str(ROOT / "trainer" / "main.py"), "--preset", a.preset, "--shards", str(a.shards),
           "--run-dir", str(run_dir), "--set", "stage1.max_steps=1", "stage2.max_steps=1",
           f"eval.max_users={a.max_users}", "monitor.projector=false"]
    print(f"training on {a.shards} ({manifest['num_users']:,} users): {' '.join(cmd)}", file=sys.stderr, flush=True)
    commit, load, t0 = git_hash(), round(os.getloadavg()[0], 1), time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    (run_dir.parent / "trainer.log").write_text(log)
    if proc.returncode != 0:
        raise SystemExit(f"error: the run failed (exit {proc.returncode}); its log: {run_dir.parent / 'trainer.log'}"
                         f"\n{log[-3000:]}")
    log = log.replace(str(run_dir.parent), "SCRATCH").replace(f"{ROOT}/", "")  # no one machine's paths in reports
    metrics = json.loads((run_dir / "metrics.json").read_text())
    row = {"users": manifest["num_users"], "items": manifest["num_items"],
           "interactions": manifest["num_interactions"],
           "shards_gib": round(sum(f.stat().st_size for f in a.shards.iterdir() if f.is_file()) / 2**30, 2),
           "wall_s": round(wall, 1), "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
                                                           / 2**20, 2),
           "evaluated_users": metrics["evaluated_users"], "test": metrics["test"],
           "popularity_test": metrics["popularity_test"], "best": metrics["best"],
           "timeline": timeline(log), "commit": commit, "load_1min": load, "preset": a.preset}
    command = recorded_command("python bench/train_at_scale.py", sys.argv[1:] if argv is None else argv)
    write(a.out, command, row)
    return row


def write(out: Path, command: str, r: dict) -> None:
    ev, test, pop = r["evaluated_users"], r["test"], r["popularity_test"]
    lines = ["# Training and evaluation on shards of millions of users (CPU)", "",
             f"Command: `{command}` (commit {r['commit']}, {os.cpu_count()} cores, 1-min load {r['load_1min']} at the "
             f"start). One optimizer step in each stage of the {r['preset']} preset, validation and test over a seeded "
             f"sample of {ev['evaluated']:,} of the {ev['of']:,} evaluated users (`eval.max_users`).", "",
             "| users | items | interactions | shards GiB | wall s | peak RSS GiB | test users | test NDCG@10 | "
             "popularity NDCG@10 |", "|---|---|---|---|---|---|---|---|---|",
             f"| {r['users']:,} | {r['items']:,} | {r['interactions']:,} | {r['shards_gib']} | {r['wall_s']} | "
             f"{r['peak_rss_gib']} | {test['users']:,} | {test['ndcg@10']:.4f} | {pop['ndcg@10']:.4f} |", "",
             "The trainer's log, seconds from its first line:", "", "```"]
    lines += [f"{t:7.0f}  {msg[:150]}" for t, msg in r["timeline"]] + ["```", ""]
    write_reports(out.with_suffix(".md"), "\n".join(lines), out.with_suffix(".json"), r)


if __name__ == "__main__":
    main()
