"""Hash every file of shard folders again against their manifests and refresh the verification records.

    python -m transrec.data_shards.verify DIR [DIR ...]

Readers verify a folder by themselves (data_shards/integrity.py): each file is hashed once, then known by its stat.
This command forgets what was recorded and hashes everything: for a change that keeps a file's size and times (bit
rot on the disk, a write below the file system), or to pay the hashing once, ahead of a run, after copying shards.
Exit status 0 when every folder verifies; 1 with one line per folder that does not (or has no hashes to verify).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transrec.data_shards.integrity import IntegrityError, record_path, verify_shards


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m transrec.data_shards.verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", nargs="+", type=Path, help="shard folders (each with its manifest.json)")
    a = p.parse_args(argv)
    failed = 0
    for folder in a.shards:
        try:
            report = verify_shards(folder, force=True)
        except (IntegrityError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        if report is None:
            print(f"error: {folder}: manifest.json has no file_sha256 (built before file hashes were recorded): "
                  "nothing to verify against; rebuild the shards to have them checked", file=sys.stderr)
            failed += 1
            continue
        print(f"{folder}: {report.files} files, {report.hashed_bytes / 2**20:,.1f} MiB hashed in "
              f"{report.seconds:.2f} s: all match manifest.json (record: {record_path(folder)})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
