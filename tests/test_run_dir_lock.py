"""One writer per run directory (trainer/training/run_lock.py): a second run into a locked folder is refused naming the
holder, a lock left by a killed process locks nothing, main() releases its lock when it returns; and a busy master port
is one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from transrec.trainer.training import run_lock
from transrec.trainer.training.run_lock import LOCK_NAME, acquire, lock_run_dir

TAIL = ": wait for it to finish, or choose another --run-dir"
# a process that takes the lock on argv[1] as a run would, says so, and waits to be killed
HOLDER = ("import sys, time; from pathlib import Path; from transrec.trainer.training.run_lock import acquire; "
          "acquire(Path(sys.argv[1]), 'trainer/main.py --run-dir elsewhere'); print('locked', flush=True); "
          "time.sleep(600)")


def in_use(run_dir: Path, pid: int, since: str, command: str) -> str:
    return (f"error: --run-dir {run_dir} is in use by pid {pid} on host {socket.gethostname()} since {since} "
            f"(command {command}){TAIL}")


def hold_from_another_process(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def kill_9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    proc.stdout.close()


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    """flock conflicts between two opens of the lock file, even in one process: a new run, --overwrite and --resume
    are each refused with the holder's pid, host, start time and command; nothing is deleted."""
    run = tmp_path / "run"
    first = acquire(run, "trainer/main.py --run-dir run --seed 1")
    (run / "metrics.json").write_text("{}")
    record = json.loads((run / LOCK_NAME).read_text())
    assert record == {"pid": os.getpid(), "host": socket.gethostname(), "since": first.holder["since"],
                      "command": "trainer/main.py --run-dir run --seed 1"}
    want = in_use(run, os.getpid(), record["since"], "trainer/main.py --run-dir run --seed 1")
    for new_run, overwrite in ((True, False), (True, True), (False, False)):  # new run, --overwrite, --resume
        with pytest.raises(SystemExit) as e:
            lock_run_dir(run, new_run=new_run, overwrite=overwrite, command="trainer/main.py --seed 2")
        assert e.value.code == want
    assert (run / "metrics.json").exists() and json.loads((run / LOCK_NAME).read_text()) == record
    first.release()
    second = lock_run_dir(run, new_run=False, overwrite=False, command="trainer/main.py --resume run")
    assert json.loads((run / LOCK_NAME).read_text())["command"] == "trainer/main.py --resume run"
    second.release()


def test_a_lock_left_by_a_killed_process_locks_nothing(tmp_path):
    """Held by a live process: refused, naming that process. Killed with SIGKILL (no clean-up ran, its .lock file
    stays): the OS dropped the flock, so the next run takes it and records itself."""
    run = tmp_path / "run"
    holder = hold_from_another_process(run)
    since = json.loads((run / LOCK_NAME).read_text())["since"]
    with pytest.raises(SystemExit) as e:
        lock_run_dir(run, new_run=False, overwrite=False, command="trainer/main.py --resume run")
    assert e.value.code == in_use(run, holder.pid, since, "trainer/main.py --run-dir elsewhere")
    kill_9(holder)
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == holder.pid  # the stale record is still there
    lock = lock_run_dir(run, new_run=False, overwrite=False, command="trainer/main.py --resume run")
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_new_run_overwrite_and_the_lock_file(tmp_path):
    """A new run refuses a folder with contents (without writing a lock file into it); a folder holding only a stale
    lock file counts as empty; --overwrite deletes everything but the lock it holds."""
    run = tmp_path / "old"
    (run / "checkpoints" / "tag").mkdir(parents=True)
    (run / "resume.json").write_text("{}")
    not_empty = (f"error: --run-dir {run} exists and is not empty: continue that run with --resume {run}, delete it "
                 "with --overwrite, or choose another --run-dir")
    with pytest.raises(SystemExit) as e:
        lock_run_dir(run, new_run=True, overwrite=False, command="c")
    assert e.value.code == not_empty and not (run / LOCK_NAME).exists()
    lock = lock_run_dir(run, new_run=True, overwrite=True, command="c")
    assert [p.name for p in run.iterdir()] == [LOCK_NAME]
    with pytest.raises(SystemExit, match="is in use by pid"):  # the file left is the held lock
        acquire(run, "d")
    lock.release()
    (run / "resume.json").write_text("{}")
    with pytest.raises(SystemExit) as e:  # contents besides a lock file: still refused after taking the lock
        lock_run_dir(run, new_run=True, overwrite=False, command="c")
    assert e.value.code == not_empty
    (run / "resume.json").unlink()
    lock_run_dir(run, new_run=True, overwrite=False, command="c").release()  # only the (free) lock file: empty


def test_main_holds_the_lock_while_it_runs_and_releases_it(ml_shards, tiny_bert_dir, tmp_path, monkeypatch):
    """One tiny training through main(): during the run its folder is locked by this process; after main() returns
    another process can lock it; while that process holds it, --resume, --overwrite and a new run are refused with
    one line naming it (nothing deleted); once it is killed with SIGKILL, --resume works, and returns the lock."""
    from transrec.trainer.main import main
    from transrec.trainer.training.loop import Trainer

    run = tmp_path / "run"
    argv = ["--preset", "tiny", "--shards", str(ml_shards), "--text-encoder", str(tiny_bert_dir), "--run-dir",
            str(run), "--ds_config", str(REPO / "ds_configs" / "zero2.json"), "--stage", "1", "--set",
            "stage1.max_steps=1", "save_every_steps=1"]
    during = []
    real_finish = Trainer.finish

    def finish_probing_the_lock(self):
        with pytest.raises(SystemExit) as e:
            acquire(self.run_dir, "probe")
        during.append(e.value.code)
        return real_finish(self)

    monkeypatch.setattr(Trainer, "finish", finish_probing_the_lock)
    assert main(argv) is not None
    monkeypatch.setattr(Trainer, "finish", real_finish)
    record = json.loads((run / LOCK_NAME).read_text())
    assert record["pid"] == os.getpid() and record["command"].startswith("trainer/main.py --preset tiny")
    assert during == [in_use(run, os.getpid(), record["since"], record["command"])]

    holder = hold_from_another_process(run)  # possible only because main() let go of the lock
    since = json.loads((run / LOCK_NAME).read_text())["since"]
    want = in_use(run, holder.pid, since, "trainer/main.py --run-dir elsewhere")
    for attempt in (["--resume", str(run)], [*argv, "--overwrite"], argv):
        with pytest.raises(SystemExit) as e:
            main(attempt)
        assert e.value.code == want
    assert (run / "metrics.json").exists() and (run / "resume.json").exists()  # --overwrite deleted nothing
    kill_9(holder)
    (run / "metrics.json").unlink()
    assert main(["--resume", str(run)]).metrics["test"]["users"] == 943
    assert json.loads((run / LOCK_NAME).read_text())["command"].endswith(f"--resume {run}")
    acquire(run, "after the resume").release()  # released again: a further run into the folder may start


def test_a_busy_master_port_is_one_line(tmp_path):
    """MASTER_PORT held by another socket: setup_distributed stops with one line and status 1, no traceback."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
        out = subprocess.run([sys.executable, "-c", "from transrec.trainer.core.run_setup import setup_distributed; "
                              "setup_distributed()"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    assert out.stderr.strip().splitlines() == [
        f"error: MASTER_PORT {port} is already in use on 127.0.0.1: pass another port (deepspeed --master_port N) "
        "or stop the process holding it"], out.stderr[-3000:]


def test_only_rank_0_locks(tmp_path):
    """Another rank takes no lock and writes nothing: it goes on with rank 0's folder once rank 0 holds it."""
    run = tmp_path / "run"
    assert run_lock.claim_run_dir(run, rank=1, world=1, new_run=True, overwrite=False, command="c") == run
    assert not run.exists()
