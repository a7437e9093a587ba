"""What grows with the catalogue: a stage-1 epoch, the feature cache and an evaluation at several item counts.

    python bench/catalogue_scale.py [--items 1700,10000,100000] [--users 943] [--mean-length 106]
        [--heads free,content] [--steps 6] [--work DIR] [--md bench/results/catalogue_scale_cpu.md] [--set k=v ...]

Data: synthetic shards from `data_shards.synth` (the same users and sequence lengths at every size, so only the
catalogue changes), built once under --work. Each (size, head) is measured in a fresh process (its peak RSS is its
own): the trainer set-up, the stage-1 feature cache (seconds per tower), `--steps` timed stage-1 steps of the
project's training path (bench/throughput.py: median step, spans for input, towers, user encoder, loss, backward,
optimizer), and one validation pass (item vectors, then ranking). The epoch estimate is steps per epoch x the
median step. Heads: `free` = the paper's stage-1 head (one output row per item), `content` = the towers' item
vectors (the full catalogue up to `stage1.full_catalogue_max` items, sampled candidates above).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))

import platform
import tempfile
from contextlib import contextmanager

import torch

import transrec.bench.throughput as tp
from transrec.bench.run_record import peak_rss_mib, recorded_command, write_reports  # noqa: E402
from transrec.data_shards.synth import synthesize
from transrec.trainer.core.feature_cache import resolve_store
from transrec.trainer.core.overrides import apply_overrides
from transrec.trainer.core.presets import preset
from transrec.trainer.core.run_setup import git_hash
from transrec.trainer.training.loop import Trainer

SECTIONS = ("input", "text tower", "image tower", "user encoder", "loss", "backward", "optimizer")


def synth_shards(work: Path, users: int, items: int, mean_length: float) -> tuple[Path, float]:
    out = work / f"synth-u{users}-i{items}-l{mean_length:g}"
    if (out / "manifest.json").exists():
        return out, float("nan")
    t0 = time.perf_counter()
    synthesize(out, users, items, mean_length)
    return out, time.perf_counter() - t0


def measure_one(shards: Path, head: str, steps: int, extra: list[str]) -> dict:
    """One (catalogue, head) measurement in this process."""
    cfg = preset("cpu-small")
    cfg.data.shards, cfg.stage1.head = str(shards), head
    cfg = apply_overrides(cfg, extra)  # the command line's --set
    tmp = tempfile.TemporaryDirectory(prefix="catalogue-scale-")
    cfg.run_dir = tmp.name
    t0 = time.perf_counter()
    t = Trainer(cfg, str(ROOT / "ds_configs" / "zero2.json"))
    setup_s = time.perf_counter() - t0

    lower_s: dict[str, float] = {}

    @contextmanager
    def lower_blocks(name: str):  # the model's timing hook (trainer/core/timing_hook.py): each tower's lower blocks
        s = time.perf_counter()
        try:
            yield
        finally:
            if name.endswith(" lower blocks"):
                tower = name.removesuffix(" lower blocks")
                lower_s[tower] = lower_s.get(tower, 0.0) + time.perf_counter() - s

    store = resolve_store(cfg.data.feature_store, shards)
    before = set(store.glob("*.pt")) if store else set()
    t.model.spans = lower_blocks
    t0 = time.perf_counter()
    sc = t.set_stage(1)
    cache_s = time.perf_counter() - t0
    t.model.spans = None
    cache_how = "computed" if not store or set(store.glob("*.pt")) - before else "read from the store"
    obj = t.objective(1)
    loader = t.make_loader(1, sc, obj)
    steps_per_epoch = loader.steps_per_epoch
    loader.close() if hasattr(loader, "close") else None

    spans = tp.Spans(t.device)
    default = tp.Switches(kernels=cfg.model.kernels, zero=int(t.ds_base.get("zero_optimization", {}).get("stage", 0)))
    res = tp.run_project(t, 1, sc, default, default, steps, 1, spans, label=head)
    step_s = statistics.median(res.step_s)

    t0 = time.perf_counter()
    with torch.no_grad():
        vectors = t.item_vectors()
    vectors_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    t.evaluate("valid", t.scoring(obj))
    eval_s = time.perf_counter() - t0
    tmp.cleanup()
    return {"items": t.num_items, "users": t.manifest["num_users"], "head": head, "candidates": describe(obj),
            "setup_s": setup_s, "cache_s": cache_s, "cache_how": cache_how, "cache_mib": (t.model.cache.nbytes() / 2**20
                                                                  if t.model.cache is not None else 0.0),
            "lower_s": lower_s, "steps_per_epoch": steps_per_epoch, "step_s": step_s,
            "step_s_all": res.step_s, "epoch_s": steps_per_epoch * step_s,
            "sections_per_step": {k: v / max(res.steps, 1) for k, v in res.sections.items()},
            "item_vectors_s": vectors_s, "valid_eval_s": eval_s, "vector_rows": int(vectors.shape[0]),
            "peak_rss_gib": peak_rss_mib() / 1024,
            "threads": torch.get_num_threads(), "load": os.getloadavg()[0]}


def describe(obj) -> str:
    name = type(obj).__name__
    full = getattr(obj, "full_catalogue", None)
    if full is None:
        return name
    return f"{name} ({'full catalogue' if full else f'in-batch + {obj.negatives} negatives'})"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Stage-1 cost against catalogue size (CPU)",
        "",
        f"Command: `{meta['command']}`  ",
        f"git {meta['git_hash']}, {meta['device']}, torch {meta['torch']}; load average at the start "
        f"{meta['load_start']:.1f} (other work shared the cores: figures are medians of the timed steps).",
        "",
        "Synthetic shards (`data_shards.synth`, the same users and sequence lengths at every size). Epoch = steps "
        "per epoch x the median step; cache = the frozen lower blocks of every item: computed once, then read from "
        "the feature store (`data.feature_store`, on by default) by later runs on the same catalogue and weights.",
        "",
        "| items | head (candidates) | cache s (text / image), how | cache MiB | step s | steps/epoch | epoch s | "
        "loss s/step | item vectors s | valid eval s | peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        low = r["lower_s"]
        lines.append(
            f"| {r['items']:,} | {r['head']} ({r['candidates']}) | {r['cache_s']:.1f} "
            f"({low.get('text', 0):.1f} / {low.get('image', 0):.1f}), {r['cache_how']} | {r['cache_mib']:.0f} | "
            f"{r['step_s']:.2f} | "
            f"{r['steps_per_epoch']} | {r['epoch_s']:.0f} | {r['sections_per_step'].get('loss', 0):.3f} | "
            f"{r['item_vectors_s']:.1f} | {r['valid_eval_s']:.1f} | {r['peak_rss_gib']:.2f} |")
    lines += ["", "Time per step by span (seconds, mean of the timed steps):", "",
              "| items | head | " + " | ".join(SECTIONS) + " |", "|---|---|" + "---|" * len(SECTIONS)]
    for r in rows:
        s = r["sections_per_step"]
        lines.append(f"| {r['items']:,} | {r['head']} | " + " | ".join(f"{s.get(k, 0):.3f}" for k in SECTIONS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python bench/catalogue_scale.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", default="1700,10000,100000")
    p.add_argument("--users", type=int, default=943)
    p.add_argument("--mean-length", type=float, default=106.0)
    p.add_argument("--heads", default="free,content")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "catalogue_scale")
    p.add_argument("--md", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--set", nargs="*", default=[], metavar="section.key=value")
    p.add_argument("--one", nargs=2, metavar=("SHARDS", "HEAD"), help=argparse.SUPPRESS)  # the measuring child
    a = p.parse_args(argv)
    if a.one:
        print("RESULT " + json.dumps(measure_one(Path(a.one[0]), a.one[1], a.steps, a.set)), flush=True)
        return []

    meta = {"command": recorded_command("python bench/catalogue_scale.py", sys.argv[1:] if argv is None else argv),
            "git_hash": git_hash(), "torch": torch.__version__, "load_start": os.getloadavg()[0],
            "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"}
    rows = []
    for items in (int(x) for x in a.items.split(",")):
        shards, build_s = synth_shards(a.work, a.users, items, a.mean_length)
        for head in a.heads.split(","):
            print(f"[catalogue-scale] {items} items, head {head}", flush=True)
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", str(shards), head,
                                   "--steps", str(a.steps), "--set", *a.set], capture_output=True, text=True)
            found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not found:
                raise SystemExit(f"measurement failed for {items} items, head {head} (exit {proc.returncode}):\n"
                                 f"{proc.stderr[-3000:]}")
            row = {**json.loads(found[-1][len("RESULT "):]), "synth_build_s": build_s}
            rows.append(row)
            print(f"[catalogue-scale]   step {row['step_s']:.2f} s, epoch {row['epoch_s']:.0f} s, cache "
                  f"{row['cache_s']:.0f} s, eval {row['valid_eval_s']:.1f} s", flush=True)
            write_reports(a.md, markdown(rows, meta), a.json, {"meta": meta, "rows": rows})
    print(markdown(rows, meta))
    return rows


if __name__ == "__main__":
    main()
