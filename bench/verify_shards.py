"""Cost of verifying shard folders against their manifest's sha256 (data_shards/integrity.py), against a data pass.

    python bench/verify_shards.py [--ml DIR] [--users 1000000] [--items 10000] [--work DIR]
        [--json bench/results/shard_verify_cpu.json]

Two folders: the bundled MovieLens shards (`--ml`, default `shards/movielens-100k-mm-mixed` when it exists, else
built into `--work`) and synthetic shards of `--users` x `--items` (`data_shards.synth`, reused from `--work` when
already built; `--users 0` leaves them out). For each:

- bytes hashed: every file of `file_sha256`;
- cold verification: no record and nothing remembered in the process (`integrity.forget()`, an empty record folder),
  so every file is hashed; twice, the files in the OS page cache both times (a disk read would add what the first
  epoch reads anyway);
- cached verification, same process (the next epoch, the evaluator: a `stat` per file) and in a new process (the
  next run, a spawned worker or another rank: the record is read, a `stat` per file), median of 5;
- for context, one data pass: the training loader's first epoch as `bench/scale.py` runs it (stage-1 windows of 26,
  stride 25, batch 128, no content: sequences streamed) plus every item's payload of every modality read once from
  the `ItemStore` (the least any content epoch reads); for MovieLens also an epoch with content decoded in the loader
  (Pillow, 64 px). The overhead is the cold verification as a share of that pass; a training epoch adds the model's
  compute on top, so the real share is smaller.

Figures on a shared 2-core machine are noisy; the load average at the start is recorded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
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
from transrec.data_shards import integrity
from transrec.data_shards.integrity import verify_shards
from transrec.data_shards.loader import LoaderConfig, make_train_loader
from transrec.data_shards.modalities import ContentSettings, ImageSettings
from transrec.data_shards.shard_io import ItemStore

NEW_PROCESS = ("import json, sys, time; from transrec.data_shards.integrity import verify_shards; "
               "t = time.perf_counter(); r = verify_shards(sys.argv[1]); "
               "print(json.dumps({'s': time.perf_counter() - t, 'hashed': r.hashed_files}))")


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def ml_shards(arg: Path | None, work: Path) -> tuple[Path, float | None]:
    if arg is None and (ROOT / "shards" / "movielens-100k-mm-mixed" / "manifest.json").exists():
        return ROOT / "shards" / "movielens-100k-mm-mixed", None
    out = arg or work / "movielens-100k-mm-mixed"
    if (out / "manifest.json").exists():
        return out, None
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "transrec.data_shards.build", "--dataset", "movielens-100k-mm", "--source",
                    str(ROOT / "data" / "movielens-100k-mm"), "--modality", "mixed", "--out", str(out)], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL)
    return out, time.perf_counter() - t


def synth_shards(work: Path, users: int, items: int) -> tuple[Path, float | None]:
    out = work / f"synth-u{users}-i{items}"
    if (out / "manifest.json").exists():
        return out, None
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "transrec.data_shards.synth", "--users", str(users), "--items", str(items),
                    "--out", str(out)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return out, time.perf_counter() - t


def loader_epoch(shards: Path, content: bool) -> tuple[float, int]:
    cfg = LoaderConfig(window=26, batch_size=128, stride=25, load_content=content, decode_in_loader=content,
                       content=ContentSettings({"image": ImageSettings(size=64, backend="pil")}), shuffle_buffer=4096)
    t = time.perf_counter()
    loader = make_train_loader(shards, cfg)
    sequences = sum(int(b.weights.sum()) for b in loader)
    return time.perf_counter() - t, sequences


def payload_pass(shards: Path) -> tuple[float, int]:
    t = time.perf_counter()
    store = ItemStore(shards)
    total = 0
    for name in store.modality_names:
        for item in map(int, (store.index[f"{name}_size"] > 0).nonzero()[0]):
            total += len(bytes(store.payload(item, name)))
    return time.perf_counter() - t, total


def measure(label: str, shards: Path, build_s: float | None, work: Path, content_epoch: bool) -> dict:
    manifest = json.loads((shards / "manifest.json").read_text())
    listed = manifest["file_sha256"]
    size = sum((shards / n).stat().st_size for n in listed)
    cold = []
    for k in range(2):
        cache = work / f"record-{label}-{k}"
        shutil.rmtree(cache, ignore_errors=True)
        os.environ["TRANSREC_SHARD_CACHE"] = str(cache)  # an empty record folder: nothing known
        integrity.forget()
        report = verify_shards(shards)
        assert report.hashed_files == len(listed), report
        cold.append(report.seconds)
    same = []
    for _ in range(5):
        report = verify_shards(shards)
        assert report.hashed_files == 0
        same.append(report.seconds)
    fresh = []
    for _ in range(5):
        out = subprocess.run([sys.executable, "-c", NEW_PROCESS, str(shards)], capture_output=True, text=True,
                             check=True, cwd=ROOT, env=dict(os.environ))
        r = json.loads(out.stdout)
        assert r["hashed"] == 0, r
        fresh.append(r["s"])
    epoch_s, sequences = loader_epoch(shards, content=False)
    payload_s, payload_bytes = payload_pass(shards)
    row = {
        "label": label, "users": manifest["num_users"], "items": manifest["num_items"],
        "interactions": manifest["num_interactions"], "build_s": build_s, "files": len(listed), "bytes_hashed": size,
        "cold_verify_s": cold, "cold_mib_per_s": size / 2**20 / min(cold),
        "cached_same_process_s": statistics.median(same), "cached_new_process_s": statistics.median(fresh),
        "epoch_no_content_s": epoch_s, "epoch_sequences": sequences,
        "item_payload_pass_s": payload_s, "item_payload_bytes": payload_bytes,
        "data_pass_s": epoch_s + payload_s,
    }
    row["cold_share_of_data_pass"] = min(cold) / row["data_pass_s"]
    row["cached_share_of_data_pass"] = row["cached_new_process_s"] / row["data_pass_s"]
    if content_epoch:
        row["epoch_with_content_s"], _ = loader_epoch(shards, content=True)
        row["cold_share_of_content_epoch"] = min(cold) / row["epoch_with_content_s"]
    return row


def table(rows: list[dict]) -> str:
    lines = ["| shards | files | MiB hashed | cold verify s (MiB/s) | cached s: same / new process | data pass s: "
             "epoch + payloads | cold share | cached share |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['label']} ({r['users']:,} users, {r['items']:,} items) | {r['files']} | "
            f"{r['bytes_hashed'] / 2**20:,.1f} | {min(r['cold_verify_s']):.3f} ({r['cold_mib_per_s']:,.0f}) | "
            f"{r['cached_same_process_s'] * 1e3:.2f} ms / {r['cached_new_process_s'] * 1e3:.2f} ms | "
            f"{r['data_pass_s']:.1f} = {r['epoch_no_content_s']:.1f} + {r['item_payload_pass_s']:.1f} | "
            f"{r['cold_share_of_data_pass']:.1%} | {r['cached_share_of_data_pass']:.3%} |")
        if "epoch_with_content_s" in r:
            lines.append(f"\n{r['label']}: an epoch with content decoded in the loader takes "
                         f"{r['epoch_with_content_s']:.1f} s; the cold verification is "
                         f"{r['cold_share_of_content_epoch']:.2%} of it.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python bench/verify_shards.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ml", type=Path, default=None, help="MovieLens shard folder (built into --work when absent)")
    p.add_argument("--users", type=int, default=1_000_000, help="synthetic users (0: no synthetic shards)")
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--work", type=Path, default=None, help="scratch folder for built shards (default: a temp folder)")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "shard_verify_cpu.json")
    a = p.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="verify-shards-"))
    work.mkdir(parents=True, exist_ok=True)
    record = {
        "command": recorded_command("python bench/verify_shards.py", sys.argv[1:] if argv is None else argv),
        "git_commit": git("rev-parse", "--short", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": os.getloadavg()[0],
        "method": {
            "cold_verify_s": "no record, nothing remembered: every file of file_sha256 hashed (2 runs; the files in "
                             "the OS page cache)",
            "cached_same_process_s": "a second verification in the process: a stat per file (median of 5)",
            "cached_new_process_s": "verification in a new process: the record read, a stat per file (median of 5)",
            "data_pass_s": "the loader's first epoch (windows of 26, stride 25, batch 128, no content) plus every "
                           "item payload read once from the ItemStore",
            "build_s": "time of the build by this invocation; null when the shards were reused",
        },
        "rows": [],
    }
    folders = [("movielens-100k-mm", *ml_shards(a.ml, work), True)]
    if a.users:
        folders.append((f"synthetic-{a.users}", *synth_shards(work, a.users, a.items), False))
    for label, shards, build_s, content in folders:
        row = measure(label, shards, build_s, work, content)
        record["rows"].append(row)
        print(table([row]).splitlines()[2], flush=True)
        write_reports(None, "", a.json, record)
    record["load_average_end"] = os.getloadavg()[0]
    write_reports(None, "", a.json, record)
    print(f"\n{table(record['rows'])}")
    return record


if __name__ == "__main__":
    main()
