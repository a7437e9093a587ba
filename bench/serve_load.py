"""Load test of the recommendation service on loopback: throughput and p50 / p99 latency at several concurrencies.

    python bench/serve_load.py --export RUN_DIR/export --shards DIR [--index DIR] [--requests 300]
        [--concurrency 1,8,32] [--seconds 60] [--out bench/results/serve_cpu]

Starts `trainer.commands.serve` in this process on a free 127.0.0.1 port (uvicorn, one worker), then for each
concurrency sends up to --requests POST /recommend requests (k = 10, the history of a random user of the shards, seen
items excluded) from that many client threads, stopping early after --seconds. Writes OUT.md and OUT.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
try:  # before any other import: this folder off sys.path (trainer/commands/script_path.py)
    from transrec.trainer.commands.script_path import run_as_script
except ModuleNotFoundError:
    raise SystemExit("error: transrec is not installed in this Python: `make install` or `pip install -e .`") from None
run_as_script(__file__)

import httpx
import numpy as np
import torch

from transrec.bench.run_record import recorded_command
from transrec.trainer.serving.app import create_app
from transrec.trainer.serving.item_index import recommender_from_index
from transrec.trainer.serving.recommender import Recommender


def start_server(export: Path, shards: Path, index: Path | None):
    import uvicorn

    if index:
        rec = recommender_from_index(index, export, shards)
    else:
        rec = Recommender.from_export(export, shards)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(rec), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return server, url, rec
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError("the service did not start")


def load(url: str, histories: list[list[str]], concurrency: int, requests: int, seconds: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(histories), size=requests)
    deadline = time.perf_counter() + seconds
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()

    def worker(start: int) -> None:
        nonlocal failures
        with httpx.Client(timeout=60) as client:
            for i in range(start, requests, concurrency):
                if time.perf_counter() > deadline:
                    return
                t0 = time.perf_counter()
                r = client.post(f"{url}/recommend", json={"history": histories[picks[i]], "k": 10})
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    failures += r.status_code != 200

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1e3
    return {"concurrency": concurrency, "requests": len(lat), "failures": failures, "wall_s": round(wall, 2),
            "requests_per_s": round(len(lat) / wall, 1), "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True)
    p.add_argument("--shards", required=True)
    p.add_argument("--index", default=None)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "serve_cpu"))
    p.add_argument("--note", default="", help="a sentence on the conditions (e.g. other load on the machine)")
    a = p.parse_args(argv)
    server, url, rec = start_server(Path(a.export), Path(a.shards), Path(a.index) if a.index else None)
    histories = [[rec.item_ids[i] for i in s["items"][-25:]] for s in rec.ranker.sequences]
    load(url, histories, 4, 40, 30, seed=1)  # warm-up
    rows = [load(url, histories, int(c), a.requests, a.seconds, seed=0) for c in a.concurrency.split(",")]
    server.should_exit = True
    meta = {"command": recorded_command("python bench/serve_load.py", argv if argv is not None else sys.argv[1:]),
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
            "catalogue_items": len(rec.item_ids), "users": len(histories), "torch": torch.__version__,
            "note": a.note}
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Recommendation service under load ({meta['machine']})", "",
             f"Command: `{meta['command']}`; catalogue {meta['catalogue_items']} items; POST /recommend, k = 10, "
             "histories of random users (last 25 items); one uvicorn worker on 127.0.0.1; client threads in the same "
             "process.", "", "| concurrency | requests | failures | requests/s | p50 ms | p99 ms |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['concurrency']} | {r['requests']} | {r['failures']} | {r['requests_per_s']} | {r['p50_ms']} | "
              f"{r['p99_ms']} |" for r in rows]
    if a.note:
        lines += ["", a.note]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
