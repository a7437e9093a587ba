"""DeepSpeed's CPU all-reduce segments in /dev/shm: the trainer unlinks its own at exit and sweeps those that no live
process maps (the two-rank run in test_training_runs.py checks that a real run leaves none behind)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from transrec.trainer.core.run_setup import SHM_PREFIX, shm_buffer, stale_shm_buffers


def test_only_this_users_unmapped_old_segments_are_stale(tmp_path, monkeypatch):
    shm, proc = tmp_path / "shm", tmp_path / "proc"
    shm.mkdir()
    uid = os.getuid()
    old = time.time() - 3600
    names = {"mapped": f"{SHM_PREFIX}_{uid}_127.0.0.1_29500_0", "killed": f"{SHM_PREFIX}_{uid}_127.0.0.1_29500_1",
             "starting": f"{SHM_PREFIX}_{uid}_127.0.0.1_31000_0", "other user": f"{SHM_PREFIX}_{uid + 1}_127.0.0.1_1_0",
             "not a segment": "torch_123"}
    for key, name in names.items():
        (shm / name).write_bytes(b"\0" * 8)
        if key != "starting":
            os.utime(shm / name, (old, old))
    (proc / "4242").mkdir(parents=True)
    (proc / "4242" / "maps").write_text(
        "7f00-7f10 rw-s 00000000 00:1a 99  /lib/x86_64-linux-gnu/libc.so.6\n"
        f"7f20-7f30 rw-s 00000000 00:1a 12 {shm / names['mapped']}\n")
    (proc / "self-less").mkdir()  # not a process
    assert stale_shm_buffers(shm, proc) == [shm / names["killed"]]
    assert stale_shm_buffers(shm, proc, min_age_s=0) == sorted([shm / names["killed"], shm / names["starting"]])
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert shm_buffer(1, shm) == shm / names["killed"]


def test_no_segments_no_scan(tmp_path):
    missing_proc = tmp_path / "no-proc"
    assert stale_shm_buffers(tmp_path, missing_proc) == []
    assert not Path(missing_proc).exists()


def test_a_segment_unlinked_during_the_sweep_is_not_an_error(tmp_path):
    """A rank unlinks its own segment at exit, so one listed a moment ago may be gone when it is looked at (a
    dangling name here): it is no stale segment, and the sweep goes on."""
    shm, proc = tmp_path / "shm", tmp_path / "proc"
    shm.mkdir()
    proc.mkdir()
    uid, old = os.getuid(), time.time() - 3600
    gone, killed = shm / f"{SHM_PREFIX}_{uid}_127.0.0.1_29500_0", shm / f"{SHM_PREFIX}_{uid}_127.0.0.1_29500_1"
    gone.symlink_to(tmp_path / "unlinked")
    killed.write_bytes(b"\0")
    os.utime(killed, (old, old))
    assert stale_shm_buffers(shm, proc) == [killed]
