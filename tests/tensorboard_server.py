"""The real TensorBoard backend on a logdir, in a subprocess, for tests that read a run's scalars back over HTTP.

    with serve_tensorboard(run_dir, expect_run="tensorboard") as base:
        scalar_tags(base)                                    # {run: [tag, ...]}
        scalar_series(base, "tensorboard", "train/lr")       # [(step, value), ...]

TensorBoard names a run by the folder of its event files relative to the logdir: `--logdir RUN_DIR` serves
RUN_DIR/tensorboard/events.* as run "tensorboard", `--logdir RUN_DIR/tensorboard` serves them as run ".".

The server is started as `python -m tensorboard.main` (what the `tensorboard` console script calls: main.run_main)
with:
  --load_fast=false   the pure-Python event loader, not the tensorboard_data_server binary (one process, nothing
                      platform-specific);
  --reload_interval   0 (default): `--reload_task=blocking` loads the logdir once, completely, before the HTTP port
                      opens, so the first answer already has every event of a finished run; > 0: a background thread
                      reloads every that many seconds, and an answer may come before the first load has finished.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Loopback requests go straight to the server, whatever *_proxy variables the environment sets.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_REQUEST_TIMEOUT = 10.0  # seconds, one HTTP request
_POLL = 0.1  # seconds between start-up polls
_STOP_TIMEOUT = 10.0  # seconds that TensorBoard gets to exit on SIGTERM before it is killed


class TensorBoardURL(str):
    """The base URL of a served TensorBoard (http://127.0.0.1:PORT), with the server's process, the file holding
    its stdout and stderr, and the seconds it took from launch to answering with the runs loaded."""

    process: subprocess.Popen
    log_file: Path
    startup_s: float

    def output(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


class TensorBoardStartError(RuntimeError):
    pass


def free_port() -> int:
    """A loopback port that nothing listened on a moment ago (another process may still take it before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(base: str, path: str, params: dict | None = None, data: dict | None = None):
    """The decoded JSON answer of base + path (GET with `params` as query string; POST with `data` form-encoded,
    repeated keys from list values)."""
    url = base.rstrip("/") + path + ("?" + urllib.parse.urlencode(params) if params else "")
    body = urllib.parse.urlencode(data, doseq=True).encode() if data is not None else None
    with _OPENER.open(urllib.request.Request(url, data=body), timeout=_REQUEST_TIMEOUT) as response:
        return json.load(response)


def post_json(base: str, path: str, payload: dict):
    """The decoded JSON answer of a POST of `payload` as JSON to base + path (the HParams plugin's requests)."""
    request = urllib.request.Request(base.rstrip("/") + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with _OPENER.open(request, timeout=_REQUEST_TIMEOUT) as response:
        return json.load(response)


def runs(base: str) -> list[str]:
    """/data/runs: the names of the runs that the server has found under its logdir."""
    return get_json(base, "/data/runs")


def scalar_tags(base: str) -> dict[str, list[str]]:
    """/data/plugin/scalars/tags: {run: [tag, ...]} of every run with scalar summaries (sorted tags)."""
    return {run: sorted(tags) for run, tags in get_json(base, "/data/plugin/scalars/tags").items()}


def scalar_series(base: str, run: str, tag: str) -> list[tuple[int, float]]:
    """/data/plugin/scalars/scalars?run=&tag=: the (step, value) points of one run's tag, in step order as served
    (the server answers [wall_time, step, value] triples; a run/tag it does not have is an HTTP 400/404)."""
    points = get_json(base, "/data/plugin/scalars/scalars", {"run": run, "tag": tag})
    return [(int(step), float(value)) for _, step, value in points]


def _answers(url: str) -> list | None:
    """The JSON list at `url`, or None while nothing answers there (connection refused, reset, timeout)."""
    try:
        with _OPENER.open(url, timeout=1.0) as response:
            return json.load(response)
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
        return None


def port_answers(base: str) -> bool:
    """Whether anything answers HTTP at `base` (any status counts)."""
    try:
        with _OPENER.open(base, timeout=1.0):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()  # TensorBoard handles SIGTERM: it exits and removes its .tensorboard-info file
        try:
            process.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def serve_tensorboard(logdir: Path, timeout: float = 60, expect_run: str | None = None,
                      reload_interval: float = 0) -> Iterator[str]:
    """TensorBoard on `logdir` at a free loopback port, for the duration of the block; yields its base URL (a
    TensorBoardURL). Up when /data/runs lists `expect_run` (any run when None) within `timeout` seconds, else
    TensorBoardStartError with the server's output; the same when the process exits before. The process is
    terminated (killed if it does not exit) when the block ends, however it ends."""
    with tempfile.TemporaryDirectory(prefix="tensorboard-") as tmp:
        log_file = Path(tmp) / "tensorboard.log"
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        reload = ["--reload_interval", "0", "--reload_task", "blocking"] if reload_interval == 0 else [
            "--reload_interval", str(reload_interval)]
        command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
                   "--port", str(port), "--load_fast=false", *reload]
        # TMPDIR: TensorBoard records each server in $TMPDIR/.tensorboard-info (for `tensorboard --list`); this
        # server's record goes to the temporary folder of this block, not the machine's /tmp.
        env = {**os.environ, "TMPDIR": tmp, "PYTHONUNBUFFERED": "1"}
        start = time.monotonic()
        with open(log_file, "wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env)
        try:
            url = TensorBoardURL(base)
            url.process, url.log_file = process, log_file
            while True:
                listed = _answers(base + "/data/runs")
                if listed and (expect_run is None or expect_run in listed):
                    break
                if process.poll() is not None:
                    raise TensorBoardStartError(f"TensorBoard exited with {process.returncode} before it served "
                                                f"{logdir}: {' '.join(command)}\n{url.output()}")
                if time.monotonic() - start > timeout:
                    raise TensorBoardStartError(
                        f"TensorBoard did not list {'run ' + repr(expect_run) if expect_run else 'a run'} at "
                        f"{base}/data/runs within {timeout:.0f} s (last answer: {listed!r}): {' '.join(command)}\n"
                        f"{url.output()}")
                time.sleep(_POLL)
            url.startup_s = time.monotonic() - start
            yield url
        finally:
            _stop(process)


def hparams_summaries(board: Path) -> dict:
    """The HParams plugin's summaries in the event files of `board`, by kind (experiment, session start, session
    end)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    found = {}
    for path in sorted(board.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    found[data.WhichOneof("data")] = data
    return found
