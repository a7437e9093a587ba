"""Scale of the data path on synthetic shards: build, shard bytes, loader throughput and memory per rank, evaluation.

    python bench/scale.py [--grid 10000x10000,100000x10000,100000x100000] [--mean-length 20] [--batches 40]
        [--work DIR] [--md bench/results/scale_cpu.md] [--json FILE]

For each users x items: `data_shards.synth` builds the shards (max(1000, users / 64) users a shard, so 2 ranks read
their own from 8 shards on; build time and bytes), then the training loader runs as 1 rank and as 2 ranks at once
(two processes, each its own `make_train_loader(..., rank, 2)`): stage-1 windows of 26 items with the cpu-small
stride of 25, batch 128, towers cached (no content loaded: what a cached stage reads), sequences/s per rank over
`--batches` batches after one warm-up batch, each process's peak RSS, and whether the ranks read only their own
shards (the split the loader chose). Evaluation, in its own process, as the trainer holds it: one streaming pass
over every user (`trainer.evaluate.SplitSummary`), then every evaluated user of the test split ranked over the whole
catalogue by `trainer.evaluate.rank_with_vectors`, users streamed from the shards in batches (`EvalStream`), with
random item vectors (d=256) and the mean of the history as user vector; users/s and the process's peak RSS.
Figures on a shared 2-core machine are noisy; the extrapolation below the table is arithmetic, stated as such.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:  # before any other import: this folder off sys.path (trainer/commands/script_path.py)
    from transrec.trainer.commands.script_path import run_as_script
except ModuleNotFoundError:
    raise SystemExit("error: transrec is not installed in this Python: `make install` or `pip install -e .`") from None
run_as_script(__file__, offline=True)

import torch

from transrec.bench.run_record import peak_rss_mib, recorded_command, write_reports  # noqa: E402
from transrec.data_shards.loader import LoaderConfig, make_train_loader
from transrec.data_shards.shard_io import load_manifest
from transrec.data_shards.synth import synthesize
from transrec.trainer.core.run_setup import git_hash
from transrec.trainer.evaluation import ranking as ev


def build(work: Path, users: int, items: int, mean_length: float) -> tuple[Path, float, int]:
    out = work / f"synth-u{users}-i{items}-l{mean_length:g}"
    t0, built = time.perf_counter(), False
    if not (out / "manifest.json").exists():
        synthesize(out, users, items, mean_length)
        built = True
    seconds = time.perf_counter() - t0 if built else float("nan")
    return out, seconds, sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


def loader_rank(shards: str, rank: int, world: int, batches: int, queue) -> None:
    """One rank's loader in its own process: sequences/s, peak RSS, the split it chose."""
    cfg = LoaderConfig(window=26, batch_size=128, stride=25, load_content=False, shuffle_buffer=4096)
    loader = make_train_loader(shards, cfg, rank=rank, world_size=world)
    n, start = 0, None
    for k, batch in enumerate(loader):
        if k == 0:
            start = time.perf_counter()
            continue
        n += int(batch.items.shape[0])
        if k == batches:
            break
    seconds = time.perf_counter() - start
    queue.put({"rank": rank, "sequences_per_s": n / seconds, "steps_per_epoch": loader.steps_per_epoch,
               "split": loader.stream.split, "shards_read": len(loader.stream.own_urls),
               "peak_rss_mib": peak_rss_mib()})


def run_loader(shards: Path, world: int, batches: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=loader_rank, args=(str(shards), r, world, batches, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out = [queue.get() for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"a loader rank failed (exit {p.exitcode}) on {shards}")
    return sorted(out, key=lambda r: r["rank"])


def eval_pass(shards: str, queue) -> None:
    """What a training process holds for evaluation, in its own process: the one streaming pass over every user
    (trainer.evaluate.SplitSummary: counts per item, evaluated users and targets), then the test split ranked over
    the whole catalogue with users streamed from the shards in batches (EvalStream), as the trainer does."""
    t0 = time.perf_counter()
    summary = ev.SplitSummary.read(shards)
    summary_s = time.perf_counter() - t0
    torch.manual_seed(0)
    items = torch.randn(load_manifest(shards)["num_items"], 256)

    def user_vectors(hist, _chunk):
        mask = (hist >= 0).float()[..., None]
        return (items[hist.clamp(min=0)] * mask).sum(1) / mask.sum(1).clamp(min=1)

    stream = ev.EvalStream(shards, "test", 25, summary.users["test"], summary.targets["test"])
    t0 = time.perf_counter()
    ev.rank_with_vectors(user_vectors, items, stream, exclude_seen=True, user_batch=256)
    queue.put({"eval_users": len(stream), "eval_users_per_s": len(stream) / (time.perf_counter() - t0),
               "summary_s": summary_s, "eval_peak_rss_mib": peak_rss_mib()})


def run_eval(shards: Path) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=eval_pass, args=(str(shards), queue))
    proc.start()
    out = queue.get()
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"the evaluation pass failed (exit {proc.exitcode}) on {shards}")
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# Data path at scale (CPU, synthetic shards)", "", f"Command: `{meta['command']}`  ",
             f"git {meta['git_hash']}, {meta['device']}; load average at the start {meta['load_start']:.1f}.", "",
             "| users | items | interactions | build s | shard MiB | 1 rank: seq/s, RSS MiB | 2 ranks: seq/s per rank, "
             "RSS MiB per rank, split (shards read) | evaluation: summary pass s, users ranked/s (items), peak RSS "
             "MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        one, two = (r["loader_1"] or [None])[0], r["loader_2"]
        loader = "- | - | " if one is None else (
            f"{one['sequences_per_s']:.0f}, {one['peak_rss_mib']:.0f} | "
            + " / ".join(f"{x['sequences_per_s']:.0f}" for x in two) + ", "
            + " / ".join(f"{x['peak_rss_mib']:.0f}" for x in two)
            + f", {two[0]['split']} ({' / '.join(str(x['shards_read']) for x in two)}) | ")
        lines.append(
            f"| {r['users']:,} | {r['items']:,} | {r['interactions']:,} | {r['build_s']:.0f} | "
            f"{r['shard_bytes'] / 2**20:.0f} | " + loader +
            f"{r['summary_s']:.0f}, {r['eval_users_per_s']:.0f} ({r['items']:,}), {r['eval_peak_rss_mib']:.0f} |")
    if rows and rows[-1]["loader_2"]:
        big = rows[-1]
        per_rank = min(x["sequences_per_s"] for x in big["loader_2"])
        lines += ["", "Extrapolation (arithmetic, not a measurement): 10M users x 100 interactions = 1B interactions "
                  f"give about 1B / 25 = 40M stage-1 windows per epoch at stride 25; at this machine's "
                  f"{per_rank:.0f} sequences/s per loader rank (cached towers, no content decoding), one epoch "
                  f"needs about {40e6 / per_rank / 3600:.2f} rank-hours of loading, e.g. "
                  f"{40e6 / per_rank / 60 / 64:.1f} min over 64 ranks; the loader's memory per rank does not grow "
                  "with users in the shard split (window counts come from the manifest, sequences stream)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python bench/scale.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="10000x10000,100000x10000,100000x100000", help="USERSxITEMS,...")
    p.add_argument("--mean-length", type=float, default=20.0)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "scale")
    p.add_argument("--md", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--no-loader", action="store_true", help="leave the loader columns out (evaluation only)")
    a = p.parse_args(argv)
    meta = {"command": recorded_command("python bench/scale.py", sys.argv[1:] if argv is None else argv),
            "git_hash": git_hash(), "load_start": os.getloadavg()[0],
            "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"}
    rows = []
    for cell in a.grid.split(","):
        users, items = (int(x) for x in cell.lower().split("x"))
        print(f"[scale] {users} users x {items} items", flush=True)
        shards, build_s, nbytes = build(a.work, users, items, a.mean_length)
        row = {"users": users, "items": items, "interactions": load_manifest(shards)["num_interactions"],
               "build_s": build_s, "shard_bytes": nbytes,
               "loader_1": None if a.no_loader else run_loader(shards, 1, a.batches),
               "loader_2": None if a.no_loader else run_loader(shards, 2, a.batches),
               **run_eval(shards)}
        rows.append(row)
        print(f"[scale]   eval {row['eval_users_per_s']:.0f} users/s, peak RSS {row['eval_peak_rss_mib']:.0f} MiB",
              flush=True)
        write_reports(a.md, markdown(rows, meta), a.json, {"meta": meta, "rows": rows})
    print(markdown(rows, meta))
    return rows


if __name__ == "__main__":
    main()
