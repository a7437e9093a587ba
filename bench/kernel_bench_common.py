"""Shared harness for the kernel benches: timing, copy bandwidth, peak memory, CSV rows, Markdown table.

On CUDA each case is timed with ``triton.testing.do_bench`` (median and 20/80 % quantiles); on CPU a
plain timer with warm-up does the same, and only the PyTorch reference (eager and torch.compile) runs,
since compiled Triton needs CUDA. Rows are appended to the CSV as they are measured.

``python bench/kernel_bench_common.py --table CSV [--md OUT.md]`` renders a CSV as one Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:  # before any other import: this folder off sys.path (trainer/commands/script_path.py)
    from transrec.trainer.commands.script_path import run_as_script
except ModuleNotFoundError:
    raise SystemExit("error: transrec is not installed in this Python: `make install` or `pip install -e .`") from None
run_as_script(__file__)

import torch  # noqa: E402

from transrec.bench.flops import measure_peak_tflops  # noqa: E402
from transrec.kernels.triton import tuning  # noqa: E402

DEFAULT_CSV = ROOT / "bench" / "results" / "kernels.csv"
FIELDS = [
    "device", "torch", "triton", "git", "op", "shape", "dtype", "impl", "mode",
    "ms_median", "ms_p20", "ms_p80", "gbps", "pct_copy_bw", "tflops", "peak_mib", "note", "pct_matmul_peak",
]
MODES = ("forward", "backward", "full")


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--scale", choices=["cpu", "paper"], default="cpu")
    p.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="CSV file rows are appended to")
    p.add_argument("--md", type=Path, default=None, help="also write the Markdown table here")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--compile-all", action="store_true",
                   help="torch.compile baseline for every case (default: only the first case of the scale)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--budget-s", type=float, default=float("inf"),
                   help="stop starting new cases after this many seconds (rows so far are kept)")
    return p.parse_args()


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_hash() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        return (out.stdout.strip() or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_ms(fn: Callable[[], object], dev: torch.device) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of fn()."""
    if dev.type == "cuda":
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return float(q[0]), float(q[1]), float(q[2])
    fn()  # warm-up (and first-call compilation)
    times: list[float] = []
    t_end = time.perf_counter() + 1.0
    while len(times) < 5 or (time.perf_counter() < t_end and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return statistics.median(times), qs[1], qs[7]


def copy_bandwidth_gbps(dev: torch.device) -> float:
    """Measured device copy bandwidth (bytes read + written per second) on a large tensor."""
    n = (256 << 20) // 4 if dev.type == "cuda" else (64 << 20) // 4
    src = torch.empty(n, device=dev, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms, _, _ = time_ms(lambda: dst.copy_(src), dev)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def peak_mib(fn: Callable[[], object], dev: torch.device) -> float:
    """Peak extra device memory of one fn() call (CUDA only; NaN on CPU)."""
    if dev.type != "cuda":
        return math.nan
    sync(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    sync(dev)
    return (torch.cuda.max_memory_allocated(dev) - base) / 2**20


@dataclass
class Case:
    """One shape of one op: builds inputs, runs an impl forward, gives the traffic/FLOP model."""

    op: str
    shape: str
    dtype: torch.dtype
    make: Callable[[], tuple[list[torch.Tensor], dict]]  # -> (differentiable inputs, other kwargs)
    impls: dict[str, Callable[..., torch.Tensor]]  # name -> f(*inputs, **kwargs) -> output
    bytes_fwd: float
    bytes_bwd: float
    flops_fwd: float = 0.0
    flops_bwd: float = 0.0
    skip: dict[str, str] = field(default_factory=dict)  # impl -> reason to skip
    compile_base: str = "torch"  # the impl that torch_compile compiles


class Bench:
    def __init__(self, args: argparse.Namespace, op: str) -> None:
        self.args, self.op = args, op
        self.dev = device()
        self.meta = {"device": device_name(self.dev), "torch": torch.__version__, "triton": triton_version(),
                     "git": git_hash()}
        self.rows: list[dict] = []
        self.extra_impls: list[str] = []  # further baselines of an op, run after "torch"
        self.t0 = time.perf_counter()
        self.copy_bw = copy_bandwidth_gbps(self.dev)
        self.matmul_peak: dict[torch.dtype, float] = {}  # measured on first use per dtype (TFLOP/s)
        print(f"# {op} on {self.meta['device']} | torch {self.meta['torch']} | triton {self.meta['triton']} | "
              f"git {self.meta['git']} | copy bandwidth {self.copy_bw:.1f} GB/s")
        if self.dev.type != "cuda":
            print("# CPU run: only the PyTorch reference is timed (compiled Triton kernels need CUDA); "
                  "peak memory is measured on CUDA only.")

    def impl_names(self, case_index: int) -> list[str]:
        # triton_untuned: the heuristic tiling, untimed (TRANSREC_KERNEL_AUTOTUNE=0), to show what tuning gains
        names = ["triton", "triton_untuned"] if self.dev.type == "cuda" else []
        names += ["torch", *self.extra_impls]
        if not self.args.no_compile and (self.args.compile_all or case_index == 0):
            names.append("torch_compile")
        return names

    def run(self, cases: Sequence[Case]) -> None:
        """Every case with Triton and the eager references first, then the (slow) torch.compile baselines."""
        for pass_compiled in (False, True):
            for i, case in enumerate(cases):
                if time.perf_counter() - self.t0 > self.args.budget_s:
                    print(f"# budget of {self.args.budget_s:.0f} s spent: skipping the remaining cases")
                    return
                for impl in self.impl_names(i):
                    if (impl == "torch_compile") == pass_compiled:
                        self._run_impl(case, impl)

    def _run_impl(self, case: Case, impl: str) -> None:
        base_name = {"torch_compile": case.compile_base, "triton_untuned": "triton"}.get(impl, impl)
        if base_name in case.skip:
            self._row(case, impl, "all", math.nan, math.nan, math.nan, math.nan, case.skip[base_name])
            return
        inputs, kwargs = case.make()
        base = case.impls[base_name]
        fn = torch.compile(base) if impl == "torch_compile" else base
        autotune_before = os.environ.get(tuning.ENV_VAR)
        if impl == "triton_untuned":
            os.environ[tuning.ENV_VAR] = "0"
        try:
            out = fn(*inputs, **kwargs)
            grad = torch.randn_like(out)
            out.backward(grad, retain_graph=True)
            runs = {
                "forward": lambda: fn(*inputs, **kwargs),
                "backward": lambda: out.backward(grad, retain_graph=True),
                "full": lambda: fn(*inputs, **kwargs).backward(grad),
            }
            for mode in self.args.modes:
                for t in inputs:
                    t.grad = None
                ms = time_ms(runs[mode], self.dev)
                mem = peak_mib(runs[mode], self.dev)
                self._row(case, impl, mode, *ms, mem, "")
        except Exception as e:  # noqa: BLE001 - OOM, or compile unavailable here: record and go on
            msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            self._row(case, impl, "all", math.nan, math.nan, math.nan, math.nan, f"failed: {msg}")
        finally:
            if autotune_before is None:
                os.environ.pop(tuning.ENV_VAR, None)
            else:
                os.environ[tuning.ENV_VAR] = autotune_before
            if self.dev.type == "cuda":
                torch.cuda.empty_cache()

    def _row(self, case: Case, impl: str, mode: str, med: float, p20: float, p80: float, mem: float,
             note: str) -> None:
        nbytes = {"forward": case.bytes_fwd, "backward": case.bytes_bwd}.get(mode, case.bytes_fwd + case.bytes_bwd)
        flops = {"forward": case.flops_fwd, "backward": case.flops_bwd}.get(mode, case.flops_fwd + case.flops_bwd)
        gbps = nbytes / (med * 1e-3) / 1e9 if not math.isnan(med) else math.nan
        tflops = flops / (med * 1e-3) / 1e12 if flops and not math.isnan(med) else math.nan
        if not math.isnan(tflops) and case.dtype not in self.matmul_peak:
            self.matmul_peak[case.dtype] = measure_peak_tflops(self.dev, case.dtype)
        row = dict(
            self.meta, op=case.op, shape=case.shape, dtype=str(case.dtype).replace("torch.", ""), impl=impl,
            mode=mode, ms_median=f"{med:.4f}", ms_p20=f"{p20:.4f}", ms_p80=f"{p80:.4f}", gbps=f"{gbps:.4g}",
            pct_copy_bw=f"{100 * gbps / self.copy_bw:.3g}",
            tflops="" if math.isnan(tflops) else f"{tflops:.4g}",
            pct_matmul_peak="" if math.isnan(tflops) else f"{100 * tflops / self.matmul_peak[case.dtype]:.3g}",
            peak_mib=f"{mem:.1f}", note=note,
        )
        self.rows.append(row)
        append_csv(self.args.csv, row)
        print(f"  {case.shape:<34} {row['dtype']:<9} {impl:<14} {mode:<9} {row['ms_median']:>10} ms "
              f"{row['gbps']:>8} GB/s  {row['peak_mib']:>9} MiB {note}", flush=True)

    def finish(self) -> None:
        table = markdown_table(self.rows) + tuned_tilings_table()
        print()
        print(table)
        if self.args.md is not None:
            self.args.md.parent.mkdir(parents=True, exist_ok=True)
            self.args.md.write_text(table + "\n")


def tuned_tilings_table() -> str:
    """What the CUDA autotuner measured per kernel and key (empty when nothing was tuned, e.g. on CPU)."""
    found = tuning.timings()
    if not found:
        return ""
    lines = ["", "", "Tilings timed by the autotuner (kernels/triton/tuning.py; ms per launch, the fastest chosen):",
             "", "| kernel | key | candidate | ms |", "|---|---|---|---|"]
    for (kernel, *key), results in found.items():
        key_text = ", ".join(str(k).replace("torch.", "") for k in key)
        for cfg, ms in results:
            lines.append(f"| {kernel} | {key_text} | {cfg} | {ms if isinstance(ms, str) else f'{ms:.4f}'} |")
    return "\n".join(lines)


def append_csv(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != FIELDS:
            raise SystemExit(f"{path} has other columns ({len(header)}) than this bench writes ({len(FIELDS)}): it was "
                             "written by an earlier version; pass another --csv, or delete it")
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in FIELDS})


def markdown_table(rows: Sequence[dict]) -> str:
    cols = ["op", "shape", "dtype", "impl", "mode", "ms_median", "ms_p20", "ms_p80", "gbps", "pct_copy_bw",
            "tflops", "pct_matmul_peak", "peak_mib", "note"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    if rows:
        r = rows[0]
        lines.append(f"\n{r.get('device', '')}, torch {r.get('torch', '')}, triton {r.get('triton', '')}, "
                     f"git {r.get('git', '')}")
    return "\n".join(lines)


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def main() -> None:
    p = argparse.ArgumentParser(description="Render a kernel bench CSV as one Markdown table.")
    p.add_argument("--table", type=Path, required=True)
    p.add_argument("--md", type=Path, default=None)
    a = p.parse_args()
    with a.table.open() as f:
        table = markdown_table(list(csv.DictReader(f)))
    print(table)
    if a.md is not None:
        a.md.write_text(table + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
