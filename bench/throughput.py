"""Throughput of the TransRec trainer: training steps, MFU, full-catalogue evaluation, against a reference path.

    python bench/throughput.py --preset cpu-small [--json FILE] [--csv FILE] [--stages 2,1] [--steps 3]
        [--ref-steps 1]
        [--toggles dedup,host_plan,eager_attn,channels_last,cudnn_benchmark,optimizer,compile,kernels,ckpt,bf16,
        zero0,zero1,device_prefetch]
        [--no-cache] [--set k=v ...]

Training composes the Trainer's pieces (set_stage with its feature cache, make_loader, make_engine, prepare_batch):
sequences/s, items encoded/s (unique, and every slot consumed), tokens/s, images/s, peak memory, a breakdown
(CUDA events or perf_counter spans) and MFU (bench/flops.py). Toggle rows flip ONE switch of the project's
configuration; the reference row (bench/reference_path.py) runs the original code's structure on the same
model and batches. Evaluation: users ranked per second by trainer.evaluate.rank_with_vectors at 10k / 100k /
1M items and two user counts, against a per-user full-argsort reference. Outputs: a Markdown table (stdout,
--md), a JSON object (--json), CSV rows appended to --csv after each stage and on exit."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:  # before any other import: this folder off sys.path (trainer/commands/script_path.py)
    from transrec.trainer.commands.script_path import run_as_script
except ModuleNotFoundError:
    raise SystemExit("error: transrec is not installed in this Python: `make install` or `pip install -e .`") from None
run_as_script(__file__, offline=True)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))

import numpy as np
import torch

from transrec.bench import flops as fl
from transrec.bench.op_counts import step_counts
from transrec.bench.reference_path import ReferenceTrainer, expand_slots, reference_ranks
from transrec.bench.run_record import recorded_command
from transrec.bench.throughput_report import NOTES, Report, TrainResult
from transrec.kernels import ops as kernels
from transrec.trainer.core.compiled import set_compiled
from transrec.trainer.core.overrides import apply_overrides
from transrec.trainer.core.presets import PRESETS, preset
from transrec.trainer.core.run_setup import git_hash
from transrec.trainer.evaluation import ranking as ev
from transrec.trainer.training.device_prefetch import prefetched, resolve_ahead
from transrec.trainer.training.loop import Trainer

LOAD = lambda: " ".join(f"{x:.1f}" for x in os.getloadavg())  # the load average: is the machine shared?


# -- measurement tools ----------------------------------------------------------------------------------
class Spans:
    """Named time spans of the measured steps: host perf_counter, and CUDA events on a GPU (read once,
    after the final synchronisation, so the steps carry no extra host syncs)."""

    def __init__(self, device: torch.device):
        self.cuda, self.enabled, self.records = device.type == "cuda", False, []

    @contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if self.cuda else [None, None]
        events[0] and events[0].record()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            events[1] and events[1].record()
            self.records.append((name, t0, time.perf_counter(), *events))

    def totals(self) -> dict[str, float]:
        """Seconds per name: CUDA event time on a GPU (host time for "input"), host time on CPU."""
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for name, t0, t1, e0, e1 in self.records:
            s = e0.elapsed_time(e1) / 1e3 if e0 is not None and name != "input" else t1 - t0
            out[name] = out.get(name, 0.0) + s
        return out


class PeakMemory:
    """Peak memory of a block: CUDA max allocated, or on CPU the process RSS sampled every 5 ms.
    `peak_gib` is the peak; `extra_mib` the peak minus the memory in use when the block started."""

    def __init__(self, device: torch.device):
        self.cuda, self.peak = device.type == "cuda", 0

    def _now(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else __import__("psutil").Process().memory_info().rss

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._now())

    def __enter__(self):  # entering and leaving synchronise the GPU: the block can be timed around them
        torch.cuda.synchronize() if self.cuda else None
        self.base = self.peak = self._now()
        self._stop, self._thread = threading.Event(), threading.Thread(target=self._sample, daemon=True)
        torch.cuda.reset_peak_memory_stats() if self.cuda else self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._now())
        self.peak_gib, self.extra_mib = self.peak / 2**30, (self.peak - self.base) / 2**20


# -- the project's model, instrumented ------------------------------------------------------------------
@contextmanager
def instrumented(model: torch.nn.Module, spans: Spans):
    """Spans around each tower call ("text tower", ...), the user encoder and the loss of the project's forward:
    the model's own instrumentation hook (TransRec.spans), set for the block."""
    model.spans = spans
    try:
        yield
    finally:
        model.spans = None


# -- switches -------------------------------------------------------------------------------------------
def set_checkpointing(model: torch.nn.Module, on: bool) -> None:
    for m in [*model.towers.values(), model.user_encoder]:
        m.checkpointing = on


def ds_config_for(base: dict, zero: int, bf16: bool) -> dict:
    ds = {k: v for k, v in copy.deepcopy(base).items() if k != "data_types"}
    ds.setdefault("zero_optimization", {})["stage"] = zero
    ds["bf16"] = {"enabled": bf16}
    ds.update({"data_types": {"buffer_dtype": "bf16"}} if bf16 else {})  # BatchNorm buffers follow bf16 params
    return ds


@dataclasses.dataclass
class Switches:
    dedup: bool = True
    kernels: str = "auto"
    ckpt: bool = False
    bf16: bool = False
    zero: int = 2
    host_plan: bool = True  # the loader's host-side routing / kept positions (False: computed on the device)
    attention: str = "sdpa"  # model.text_attention
    channels_last: bool = False  # model.channels_last
    optimizer: str = "auto"  # optimizer (AdamW implementation)
    compile: str = "none"  # model.compile (trainer/core/compiled.py; inductor, dynamic shapes)
    cudnn_benchmark: bool = False  # model.cudnn_benchmark
    device_prefetch: int = -1  # data.device_prefetch (auto: the next batch prepared on a side stream on CUDA)

    def label(self, default: Switches) -> str:
        return ", ".join(["project"] + [f"{k}={v}" for k, v in dataclasses.asdict(self).items()
                                         if getattr(default, k) != v])


# -- training measurement -------------------------------------------------------------------------------
def tally(res: TrainResult, t, batch, stage: int, encoded: torch.Tensor, width: int, cached: dict) -> None:
    """Add one step's counts and analytic FLOPs; `encoded` = the items the towers ran on."""
    counts = fl.batch_counts(t.model, batch, stage, t.cfg.stage2.n_continuation, encoded, width)
    try:
        res.flops += fl.step_flops(t.model, counts, t.cfg.model.image.size, cached).total
    except NotImplementedError:  # a user encoder without a FLOP formula
        res.flops = math.nan
    res.steps += 1
    res.sequences += float(batch.weights.sum())
    res.unique += len(encoded)
    res.slots += int((batch.items >= 0).sum()) + (len(batch.negatives) if stage == 2 else 0)
    res.text_tokens += counts.n_text * width
    res.images += counts.n_image


def timed_steps(t, stage: int, sc, res: TrainResult, steps: int, warmup: int, spans: Spans, step_fn, encoded_fn,
                transform=None, warm_fn=None, count_ops: bool = False, ahead: int = 0) -> TrainResult:
    """`warmup` steps (warm_fn, or step_fn), then `steps` timed steps on the live loader (epoch 0); with
    `count_ops`, one more step under the profiler counts its operator calls and host read-backs. `ahead` batches are
    prepared on the device ahead of their step (trainer/training/device_prefetch.py): the "input" span then times only
    what is left to wait for."""
    # a fresh loader: epoch 0, the same batches for every row
    it = prefetched(t.make_loader(stage, sc), t.prepare_batch, t.device, ahead)
    cached = {n: bool(t.model.cache and t.model.cache.covers(n)) for n in t.model.towers}
    losses, mem = [], PeakMemory(t.device)
    try:
        for i in range(warmup + steps):
            if i == warmup:  # the timed part starts here
                spans.records.clear()
                spans.enabled = True
                mem.__enter__()
                t_step = time.perf_counter()
            with spans("input"):
                _, batch = next(it)
                batch = transform(batch) if transform else batch
            if i < warmup:
                (warm_fn or step_fn)(batch)
                continue
            losses.append(step_fn(batch))
            torch.cuda.synchronize() if t.device.type == "cuda" else None
            res.step_s.append(time.perf_counter() - t_step)
            tally(res, t, batch, stage, encoded_fn(batch), fl.executed_text_width(t.model, batch), cached)
            t_step = time.perf_counter()  # counting is outside the step times
        mem.__exit__()
        res.seconds = sum(res.step_s)
        if count_ops:
            spans.enabled = False
            _, batch = next(it)
            batch = transform(batch) if transform else batch
            res.op_counts = step_counts(lambda: step_fn(batch))
    finally:
        spans.enabled = False
        it.close()
    res.peak_gib, res.sections = mem.peak_gib, spans.totals()
    res.loss = float(torch.stack(losses).float().mean()) if losses else math.nan
    return res


def run_project(t, stage: int, sc, sw: Switches, default: Switches, steps: int, warmup: int, spans: Spans,
                label: str | None = None) -> TrainResult:
    kernels.set_default_impl(sw.kernels)
    set_checkpointing(t.model, sw.ckpt)
    if "text" in t.model.towers:
        t.model.towers["text"].set_attention(sw.attention)
    if "image" in t.model.towers:
        t.model.towers["image"].set_channels_last(sw.channels_last)
    t.cfg.optimizer = sw.optimizer
    set_compiled(t.model, sw.compile, zero_stage=sw.zero)
    torch.backends.cudnn.benchmark = sw.cudnn_benchmark
    t.ds_base = ds_config_for(t.ds_base, sw.zero, sw.bf16)
    engine = t.make_engine(sc, steps_total=1000)
    objective = t.objective(stage)
    res = TrainResult(stage, label or sw.label(default), "bf16" if sw.bf16 else "fp32")

    def step(batch):
        with spans("forward"):
            loss = engine(batch, objective=objective)
        with spans("backward"):
            engine.backward(loss)
        with spans("optimizer"):
            engine.step()
        return loss.detach()

    try:
        with instrumented(t.model, spans):
            timed_steps(t, stage, sc, res, steps, warmup, spans, step, lambda b: b.unique_items,
                        batch_transform(sw), count_ops=True, ahead=resolve_ahead(sw.device_prefetch, t.device))
    finally:
        engine.destroy()
        set_compiled(t.model, "none")
    return res


def batch_transform(sw: Switches):
    """The batch as the switches want it: every slot its own entry (dedup off), no host-side plan (host_plan off)."""
    def transform(batch):
        batch = batch if sw.dedup else expand_slots(batch)
        if not sw.host_plan:
            batch = dataclasses.replace(batch, routing=None, keep=None)
        return batch

    return None if sw.dedup and sw.host_plan else transform


def run_reference(t, stage: int, sc, steps: int, spans: Spans, label: str = "reference") -> TrainResult:
    """The reference path: fp32, torch kernels, per-position routing, every slot, plain AdamW."""
    kernels.set_default_impl("torch")
    set_checkpointing(t.model, False)
    ref = ReferenceTrainer(t.model, sc, spans)
    res = TrainResult(stage, label, "fp32")
    return timed_steps(t, stage, sc, res, steps, 1, spans, lambda b: ref.step(b, stage),
                       lambda b: ref.encoded_items(b, stage), warm_fn=lambda b: ref.warm_up(b, stage))


def restore(t, snapshot: dict) -> None:
    """Back to the fp32 starting weights (a bf16 engine converts the module in place)."""
    t.model.train().float().load_state_dict(snapshot)
    gc.collect()
    torch.cuda.empty_cache() if t.device.type == "cuda" else None


# -- evaluation -----------------------------------------------------------------------------------------
def tile_users(data: ev.EvalUsers, n: int) -> ev.EvalUsers:
    return data.take(np.arange(n) % len(data.users))


def run_eval(t, sizes: list[int], user_counts: list[int], ref_budget_s: float, report: Report, budget_left) -> None:
    """Ranking cost against catalogue size. The user vector is a simple one (the mean of the history's item
    vectors), the same for both paths, so the rows measure ranking, not the user encoder."""
    device, d = t.device, t.model.cfg.d
    test_users = t.test_users.in_memory()
    for i, V in enumerate(sizes):
        if i and not budget_left():
            break
        iv = (torch.randn(V, d, generator=torch.Generator().manual_seed(V)) * d**-0.5).to(device)

        def user_vec(hist, _chunk, iv=iv):
            mask = (hist >= 0)[..., None]
            return (iv[hist.clamp(min=0)] * mask).sum(1) / mask.sum(1).clamp(min=1)

        ev.rank_with_vectors(user_vec, iv, tile_users(test_users, 8), True, t.cfg.eval.user_batch)  # warm-up
        for n in sorted(user_counts):
            data = tile_users(test_users, n)
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                ranks = ev.rank_with_vectors(user_vec, iv, data, True, t.cfg.eval.user_batch)
            ups = n / (time.perf_counter() - t0)
            report.eval_row(V, "project", n, ups, mem.extra_mib)
            if device.type == "cuda":  # eval.precision=tf32: the score matmuls on the TF32 tensor cores
                with PeakMemory(device) as mem:
                    t0 = time.perf_counter()
                    tf32 = ev.rank_with_vectors(user_vec, iv, data, True, t.cfg.eval.user_batch, precision="tf32")
                ups = n / (time.perf_counter() - t0)
                diff = np.abs(tf32 - ranks)
                report.eval_row(V, "tf32", n, ups, mem.extra_mib, f"ranks equal to fp32's for {(diff == 0).sum()} "
                                f"of {n} users, max difference {diff.max()}", int(diff.max()))
        with PeakMemory(device) as mem:  # one user at a time until the time budget is spent
            t0 = time.perf_counter()
            ref_ranks = reference_ranks(user_vec, iv, data, np.arange(n), True, ref_budget_s)
        ref_ups = len(ref_ranks) / (time.perf_counter() - t0)
        diff = np.abs(ref_ranks - ranks[: len(ref_ranks)])  # GEMM vs GEMV rounding can swap near-tied scores
        report.eval_row(V, "reference", len(ref_ranks), ref_ups, mem.extra_mib, f"ranks equal to the project's for "
                        f"{(diff == 0).sum()} of {len(diff)} users, max difference {diff.max()}", int(diff.max()))
        del iv
        gc.collect()


# -- the run --------------------------------------------------------------------------------------------
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOGGLES = ("dedup", "host_plan", "eager_attn", "channels_last", "cudnn_benchmark", "optimizer", "compile", "kernels",
           "ckpt", "bf16", "zero0", "zero1", "device_prefetch")


def toggle(name: str, default: Switches, cuda: bool) -> Switches | str:
    """The default with one switch flipped, or why that row is not measured here."""
    if name == "kernels" and not cuda:
        return "on CPU 'auto' already runs the PyTorch reference (the Triton kernels need CUDA)"
    if name == "bf16" and not cuda:
        return "bf16 rows run on CUDA only"
    if name == "cudnn_benchmark" and not cuda:
        return "cuDNN runs on CUDA only"
    if name == "device_prefetch" and not cuda:
        return "nothing to overlap on CPU: batches are prepared inline either way"
    flips = {"dedup": {"dedup": False}, "host_plan": {"host_plan": False},
             "eager_attn": {"attention": "eager" if default.attention == "sdpa" else "sdpa"},
             "channels_last": {"channels_last": not default.channels_last},
             "optimizer": {"optimizer": "plain" if default.optimizer != "plain" else "auto"},
             "compile": {"compile": "all" if default.compile == "none" else "none"},
             "cudnn_benchmark": {"cudnn_benchmark": not default.cudnn_benchmark},
             "device_prefetch": {"device_prefetch": 0 if default.device_prefetch != 0 else 1},
             "kernels": {"kernels": "torch" if default.kernels != "torch" else "auto"},
             "ckpt": {"ckpt": not default.ckpt}, "bf16": {"bf16": not default.bf16}, "zero0": {"zero": 0},
             "zero1": {"zero": 1}, "zero2": {"zero": 2}}
    if name not in flips:
        raise SystemExit(f"unknown toggle {name!r}: choose from {TOGGLES}")
    return dataclasses.replace(default, **flips[name])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-small", choices=list(PRESETS))
    p.add_argument("--ds-config", default=None, help="default: zero2_bf16.json on CUDA, zero2.json on CPU")
    p.add_argument("--set", nargs="*", default=[], metavar="section.key=value",
                   help="config overrides, e.g. data.shards=DIR model.text_encoder=DIR stage2.micro_batch=32")
    p.add_argument("--stages", default="2,1")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--steps", type=int, default=3, help="timed steps of the project's default")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--toggle-steps", type=int, default=2)
    p.add_argument("--ref-steps", type=int, default=1, help="one reference step is thousands of tower calls")
    p.add_argument("--toggles", default=",".join(TOGGLES), help=f"comma list of {TOGGLES}, or 'none'")
    p.add_argument("--no-cache", action="store_true", help="end to end: no feature cache, on every path")
    p.add_argument("--eval-sizes", default="10000,100000,1000000")
    p.add_argument("--eval-users", default=None, help="two user counts (default 256,943 on CPU, 943,7544 on CUDA)")
    p.add_argument("--eval-ref-budget-s", type=float, default=4.0, help="reference ranking seconds per size")
    p.add_argument("--budget-s", type=float, default=math.inf, help="skip optional rows after this many seconds")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--csv", type=Path, default=ROOT / "bench" / "results" / "throughput.csv")
    p.add_argument("--md", type=Path, default=None, help="default: the --json path with .md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start, cuda = time.perf_counter(), torch.cuda.is_available()
    torch.set_num_threads(args.threads) if args.threads else None  # on a shared CPU, 1 avoids OpenMP stalls
    # The paper's objectives (free-head catalogue softmax, CPC): the reference path and the FLOP formulas model them.
    cfg = apply_overrides(preset(args.preset), ["stage1.head=free", "stage2.loss=cpc", *args.set])
    run_dir = tempfile.TemporaryDirectory(prefix="throughput-")
    cfg.run_dir = run_dir.name
    ds_path = args.ds_config or str(ROOT / "ds_configs" / ("zero2_bf16.json" if cuda else "zero2.json"))
    t = Trainer(cfg, ds_path)
    default = Switches(kernels=cfg.model.kernels, ckpt=cfg.model.activation_checkpointing,
                       bf16=bool(t.ds_base.get("bf16", {}).get("enabled")),
                       zero=int(t.ds_base.get("zero_optimization", {}).get("stage", 0)),
                       attention=cfg.model.text.attention, channels_last=cfg.model.image.channels_last,
                       optimizer=cfg.optimizer, compile=cfg.model.compile,
                       cudnn_benchmark=cfg.model.image.cudnn_benchmark,
                       device_prefetch=cfg.data.device_prefetch)
    peak = {k: fl.measure_peak_tflops(t.device, DTYPES[k]) for k in (["fp32", "bf16"] if cuda else ["fp32"])}
    meta = {"device": torch.cuda.get_device_name(t.device) if cuda else
            f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)", "git_hash": git_hash(),
            "torch": torch.__version__, "preset": args.preset, "peak_tflops": peak, "ds_config": Path(ds_path).name,
            "command": recorded_command("python bench/throughput.py", sys.argv[1:] if argv is None else argv),
            "default_switches": dataclasses.asdict(default), "load_start": LOAD(),
            "feature_cache": not args.no_cache}
    report = Report(meta, args.csv)
    md_path = args.md or (args.json.with_suffix(".md") if args.json else None)
    print(f"# {meta['device']} | git {meta['git_hash']} | matmul peak TFLOP/s {peak}", flush=True)

    def write(csv_rows: bool = True) -> dict:  # JSON and Markdown rewritten whole; CSV rows appended once
        meta["load_end"] = LOAD()
        report.flush(csv_rows)
        out = {**report.summary(), "meta": meta, "train": report.train, "eval": report.eval, "notes": NOTES,
               "elapsed_s": time.perf_counter() - t_start}
        for path, text in ((args.json, json.dumps(out, indent=1, default=str)), (md_path, report.markdown())):
            if path:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text + "\n")
        return out

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`: still write what was measured
    row = lambda res, ref=None: (report.train_row(res, ref), write(csv_rows=False))
    spans, budget_left = Spans(t.device), lambda: time.perf_counter() - t_start < args.budget_s
    try:
        for i, stage in enumerate(int(x) for x in args.stages.split(",")):
            if i and not budget_left():
                report.skipped(stage, "project", "time budget spent")
                continue
            sc = t.set_stage(stage)
            t.model.cache = None if args.no_cache else t.model.cache  # end to end: whole towers on content
            snapshot = {k: v.detach().clone() for k, v in t.model.state_dict().items()}  # this stage's fp32 start
            row(run_project(t, stage, sc, default, default, args.steps, args.warmup, spans), "reference")
            restore(t, snapshot)
            for name in [x for x in args.toggles.split(",") if x and x != "none"] if stage == 2 else []:
                sw = toggle(name, default, cuda)
                if isinstance(sw, str) or not budget_left():
                    report.skipped(stage, f"project, {name} flipped", sw if isinstance(sw, str) else "budget spent")
                elif sw != default:
                    try:  # a configuration this machine cannot run (memory, a DeepSpeed combination) is a row too
                        row(run_project(t, stage, sc, sw, default, args.toggle_steps, args.warmup, spans), "reference")
                    except Exception as e:  # noqa: BLE001
                        report.skipped(stage, sw.label(default), f"failed: {type(e).__name__}: {str(e)[:150]}")
                    restore(t, snapshot)
            if stage == 2 and args.eval_sizes:
                sizes = [int(x) for x in args.eval_sizes.split(",")]
                users = [int(x) for x in (args.eval_users or ("943,7544" if cuda else "256,943")).split(",")]
                run_eval(t, sizes, users, args.eval_ref_budget_s, report, budget_left)
                write(csv_rows=False)
            # The reference last (always run; on a GPU its one step takes the longest): toggles and evaluation come
            # first within --budget-s. Its x reference figures are filled in when it is measured.
            row(run_reference(t, stage, sc, args.ref_steps, spans))
            restore(t, snapshot)
            write()
        for k in peak:  # the peak again at the end (a shared machine): MFU uses the better of the two
            peak[k] = max(peak[k], fl.measure_peak_tflops(t.device, DTYPES[k]))
    finally:
        kernels.set_default_impl(cfg.model.kernels)
        out = write()
        print("\n" + report.markdown(), flush=True)
        run_dir.cleanup()
    return out


if __name__ == "__main__":
    main()
