"""Metric logging of a run: TensorBoard, the loss and validation CSVs, progress and the log lines of training.

    log = RunLog(run_dir, rank, world, device)
    meter = log.epoch(stage, epoch, steps_per_epoch, first_batch, steps_total, estimate=True, cache_hits=...)
    for b, batch in enumerate(meter.timer.loader(loader), start=first_batch):
        meter.batch_in(batch)                 # host counts, read before the batch goes to the device
        ... step, its phases timed with meter.timer.span(...) (trainer/monitoring/step_timing.py) ...
        meter.note_grad_norms(norms)          # before the optimizer step of a logging step
        meter.step_done(loss, b, optimizer_steps, run_step, boundary, lrs)
    meter.close()                             # the epoch's losses were finite, or TrainingDiverged
    log.validation(stage, epoch, metrics, run_step, reference=popularity, health=user_vector_health)
    log.run_summary(settings, figures, run_step)  # the HParams tab's row of this run

On --resume, `log.rewind(stage, stage_step, epoch, run_step)` (before anything is logged) cuts the CSV logs back to
the checkpoint and opens TensorBoard with `purge_step`, so no row or event after the checkpoint appears twice.

Losses stay on the device between logging steps: one host read (and one all-reduce over ranks) per `log_every`
optimizer steps; the step timer's events and the gradient norms are read at that point too. Only rank 0 writes files;
without a terminal a log line stands in for the progress bar. docs/monitoring.md lists the tags.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from transrec.trainer.core.model import PARAM_GROUP_NAMES
from transrec.trainer.core.run_setup import LOG, peak_memory_gib
from transrec.trainer.evaluation.collapse_diagnostics import collapse_warning
from transrec.trainer.monitoring.step_timing import PHASES, StepTimer
from transrec.trainer.monitoring.tensorboard_summaries import run_summary, write_layout

ETA_AFTER_STEPS = 5  # steps timed before the estimated time per epoch is logged


class TrainingDiverged(RuntimeError):
    pass


def diverged_remedy(run_dir: Path, stage: int) -> str:
    """What a diverged run leaves and what to do: its checkpoint only when it saved one (resume.json names it)."""
    if (Path(run_dir) / "resume.json").exists():
        left = (f"the last good checkpoint in {Path(run_dir) / 'checkpoints'} is intact, but --resume continues with "
                "the same settings")
    else:
        left = "the run saved no checkpoint before it diverged"
    return f"{left}: start a new run with a lower stage{stage}.lr, or check the input data"


# the files a run appends rows to (rank 0): what a resume cuts back to its checkpoint (truncate_logs)
LOSS_LOG = "loss_stage{stage}.csv"  # step,loss: the stage's optimizer step
VALID_LOG = "valid_curve.csv"  # stage,epoch,metrics...: one row per validation, after the epoch


def _rewrite(path: Path, lines: list[str]) -> None:
    """`path` holds exactly `lines`, replaced in one step (a kill leaves the old file or the new one)."""
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _keep_rows(path: Path, keep: Callable[[list[str]], bool]) -> int:
    """Keep the header and the rows for which keep(fields) is true; a row cut short by a kill (no line end, or
    fields that do not parse) goes too. Returns how many rows were dropped."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    if not lines or not lines[0].endswith("\n"):  # not even a whole header: the next row writes a new one
        path.unlink()
        return len(lines)

    def whole_and_kept(row: str) -> bool:
        try:
            return row.endswith("\n") and keep(row.strip().split(","))
        except (ValueError, IndexError):
            return False

    kept = [r for r in lines[1:] if whole_and_kept(r)]
    dropped = len(lines) - 1 - len(kept)
    if dropped:
        _rewrite(path, [lines[0], *kept])
    return dropped


def truncate_logs(run_dir: Path, stage: int, stage_step: int, epoch: int) -> dict[str, int]:
    """Cut the run's CSV logs back to a checkpoint taken after `stage_step` optimizer steps of `stage`, with `epoch`
    the epoch it continues (its validation not yet done): the loss rows of `stage` up to `stage_step`, every row of
    an earlier stage, none of a later one; the validation rows of the epochs before (stage, epoch). What was logged
    after the checkpoint is logged again by the resumed run. Returns the rows dropped per file."""
    dropped = {}
    for path in sorted(run_dir.glob(LOSS_LOG.format(stage="*"))):
        own = path.name[len("loss_stage"):-len(".csv")]
        if not own.isdigit():
            continue
        limit = math.inf if int(own) < stage else stage_step if int(own) == stage else -1
        dropped[path.name] = _keep_rows(path, lambda f, limit=limit: int(f[0]) <= limit)
    dropped[VALID_LOG] = _keep_rows(run_dir / VALID_LOG, lambda f: (int(f[0]), int(f[1])) < (stage, epoch))
    return {name: n for name, n in dropped.items() if n}


class RunLog:
    def __init__(self, run_dir: Path, rank: int, world: int, device: torch.device, log_every: int):
        self.run_dir, self.rank, self.world, self.device, self.log_every = run_dir, rank, world, device, log_every
        self._writer = None  # TensorBoard's; a resume's rewind() reopens it with purge_step
        self._cosines: dict[int, list[tuple[int, float]]] = {}  # stage -> [(epoch, mean pairwise cosine)] validated
        self.purge_step: int | None = None
        self.writer  # noqa: B018  opened before training starts, so that no training step waits for it

    @property
    def writer(self):
        """Rank 0's SummaryWriter (None on the other ranks); after rewind() it purges the events from purge_step on."""
        if self._writer is None and self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.purge_step)
            write_layout(self._writer)  # the Custom Scalars tab's charts (a step-0 event: a resume keeps it)
        return self._writer

    def rewind(self, stage: int, stage_step: int, epoch: int, run_step: int) -> None:
        """A resume from a checkpoint at `stage_step` optimizer steps of `stage` (`run_step` of the run, TensorBoard's
        x), continuing `epoch`: the CSV logs lose their rows after it (truncate_logs), and TensorBoard drops the
        events logged after it (purge_step = run_step + 1; the step's own events came before the checkpoint)."""
        if self.rank != 0:
            return
        dropped = truncate_logs(self.run_dir, stage, stage_step, epoch)
        if dropped:
            LOG.info("resume: dropped the log rows written after the checkpoint: "
                     + ", ".join(f"{n} from {name}" for name, n in dropped.items()))
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.purge_step = run_step + 1
        self.writer  # noqa: B018  reopened now, before training continues (see __init__)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def epoch(self, stage: int, epoch: int, steps_per_epoch: int, first_batch: int, steps_total: int,
              estimate: bool, cache_hits: Callable[[np.ndarray], int] | None = None,
              window: Window | None = None) -> EpochMeter:
        """`cache_hits(items)`: how many of a batch's unique items have their frozen lower blocks read from the
        feature cache (None: no cache); `window`: what the previous epoch of the stage left of a logging window
        (EpochMeter.close)."""
        return EpochMeter(self, stage, epoch, steps_per_epoch, first_batch, steps_total, estimate, cache_hits,
                          window)

    def validation(self, stage: int, epoch: int, metrics: dict, step: int, reference: dict | None = None,
                   health: dict | None = None) -> None:
        """TensorBoard (eval/stageN/<metric>, at the run's optimizer step `step`), the log line and a row of
        valid_curve.csv for one validation; `reference`: popularity's validation metrics, drawn at the same step
        (eval/popularity/<metric>: a flat line beside each stage's curve); `health`: the user vectors' collapse
        diagnostics (collapse_diagnostics.user_vector_health, health/stageN/<figure>), with a warning in the log
        when they cross the collapse thresholds."""
        shown = {k: v for k, v in metrics.items() if "@" in k}
        self.scalars({f"eval/stage{stage}/{k}": v for k, v in shown.items()}, step)
        if reference is not None:
            self.scalars({f"eval/popularity/{k}": v for k, v in reference.items() if "@" in k}, step)
        LOG.info(f"stage {stage} epoch {epoch} validation: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
        if health is not None:
            self.scalars({f"health/stage{stage}/{k}": v for k, v in health.items() if k != "users"}, step)
            warning = collapse_warning(health)
            if warning:
                LOG.warning(f"stage {stage} epoch {epoch}: {warning}{self._collapse_context(stage, epoch, health)}")
            self._cosines.setdefault(stage, []).append((epoch, health["mean_pairwise_cosine"]))
        if self.rank == 0:
            curve = self.run_dir / VALID_LOG
            with open(curve, "a") as f:
                f.write("" if curve.exists() and curve.stat().st_size else "stage,epoch," + ",".join(shown) + "\n")
                f.write(f"{stage},{epoch}," + ",".join(f"{v:.6f}" for v in shown.values()) + "\n")

    def _collapse_context(self, stage: int, epoch: int, health: dict) -> str:
        """Whether a collapse warning is the expected start of a stage (user vectors from an export or a new user
        encoder begin alike, then spread) or a failure, against the stage's earlier validations in this process."""
        now = health["mean_pairwise_cosine"]
        if epoch == 0:
            return (" (a stage's first epoch often starts there, e.g. fine-tuning from an export: expected at the "
                    "start of fine-tuning if the cosine falls in the next epochs, a failure if it stays)")
        if not self._cosines.get(stage):
            return ""
        (first_epoch, first), (last_epoch, last) = self._cosines[stage][0], self._cosines[stage][-1]
        if now < last - 0.01:
            return (f" (falling: {first:.2f} at epoch {first_epoch}, {last:.2f} at epoch {last_epoch}, {now:.2f} now: "
                    "expected at the start of fine-tuning while the user vectors spread; a failure if it stops "
                    "falling above the threshold)")
        return (f" (not falling since epoch {last_epoch} ({last:.2f}; {first:.2f} at epoch {first_epoch}): not the "
                "start of fine-tuning but a failure)")

    def append_loss(self, stage: int, step: int, loss: float) -> None:
        if self.rank == 0:
            path = self.run_dir / LOSS_LOG.format(stage=stage)
            new = not path.exists()
            with open(path, "a") as f:
                f.write("step,loss\n" if new else "")
                f.write(f"{step},{loss:.8f}\n")

    def run_summary(self, settings: dict, figures: dict[str, float], step: int) -> None:
        """The run's row in TensorBoard's HParams tab: its resolved settings and its final figures (also written as
        scalars, hparams/<figure>, at the run's last optimizer step `step`, which is where the tab reads them)."""
        if self.writer is not None:
            run_summary(self.writer, settings, figures, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@dataclass
class Window:
    """What the time and throughput figures of a logging window have counted: the steps since the last logging step.
    An epoch that ends between two logging steps hands its part of the window to the next epoch of the stage
    (EpochMeter.close), so every step's time is in a window, and the validation between them in none."""

    seconds: float = 0.0  # wall time of the window's steps before the current epoch's meter started
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))  # the same, per phase
    optimizer_steps: int = 0
    sequences: float = 0.0
    items: int = 0
    cached_items: int = 0


class EpochMeter:
    """One epoch's progress: the bar (or its log lines), throughput, the loss on logging steps, the first estimate
    of the time per epoch, and the divergence checks."""

    def __init__(self, log: RunLog, stage: int, epoch: int, steps_per_epoch: int, first_batch: int,
                 steps_total: int, estimate: bool, cache_hits: Callable[[np.ndarray], int] | None = None,
                 window: Window | None = None):
        """`window`: the part of a logging window the stage's previous epoch ended in (its close())."""
        self.log, self.stage, self.epoch, self.cache_hits = log, stage, epoch, cache_hits
        self.timer = StepTimer(log.device)
        self.steps_per_epoch, self.first_batch, self.steps_total = steps_per_epoch, first_batch, steps_total
        self.estimate = estimate
        self.bar = tqdm(total=steps_per_epoch, initial=first_batch, desc=f"stage {stage} epoch {epoch}",
                        disable=log.rank != 0 or not sys.stderr.isatty(),  # carriage returns only on a terminal
                        unit="step", leave=False)
        self.t_start = self.t_last = time.time()
        self.losses: list[torch.Tensor] = []
        self.grad_norms: dict[str, torch.Tensor] = {}
        self.window = window or Window()

    def batch_in(self, batch) -> None:
        w = self.window
        w.sequences += batch.num_real  # host values, read before the batch goes to the device
        w.items += int(batch.unique_items.numel())
        if self.cache_hits is not None:
            w.cached_items += self.cache_hits(batch.unique_items.numpy())

    def note_grad_norms(self, norms: dict[str, torch.Tensor]) -> None:
        """The parts' gradient norms of the optimizer step about to be taken (a logging step), logged with it."""
        self.grad_norms = norms

    def step_done(self, loss: torch.Tensor, batch_index: int, optimizer_steps: int, run_step: int, boundary: bool,
                  lrs: Callable[[], list[float]]) -> None:
        """After a micro-batch: `boundary` when it ended an optimizer step (`optimizer_steps` of this stage,
        `run_step` of the run: TensorBoard's x); `lrs` gives the parameter groups' current learning rates."""
        self.losses.append(loss.detach())
        self.window.optimizer_steps += boundary
        self.bar.update(1)
        if self.estimate and batch_index == self.first_batch + ETA_AFTER_STEPS - 1:
            per_step = (time.time() - self.t_start) / ETA_AFTER_STEPS
            LOG.info(f"stage {self.stage}: {per_step:.2f} s/step over the first {ETA_AFTER_STEPS} steps: about "
                     f"{per_step * self.steps_per_epoch / 60:.1f} min per epoch, "
                     f"{per_step * self.steps_total / 60:.1f} min for the stage's {self.steps_total} steps")
        if not (boundary and optimizer_steps % self.log.log_every == 0):
            return
        log, stage = self.log, self.stage
        mean_loss = self._mean_across_ranks()  # host sync on logging steps only
        log.append_loss(stage, optimizer_steps, mean_loss)
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(f"stage {stage} epoch {self.epoch} step {batch_index}: loss is {mean_loss}; "
                                   f"{diverged_remedy(log.run_dir, stage)}")
        dt = self.window.seconds + time.time() - self.t_last
        rate = self.window.sequences * log.world / dt
        learning_rates = lrs()
        log.scalars({f"train/stage{stage}_loss": mean_loss, "train/lr": learning_rates[0],
                     **{f"lr/{PARAM_GROUP_NAMES[g]}": v for g, v in enumerate(learning_rates)},
                     "perf/sequences_per_s": rate, "perf/items_encoded_per_s": self.window.items * log.world / dt,
                     **self.window_figures(dt), "mem/peak_gib": peak_memory_gib(log.device)}, run_step)
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", seq_s=f"{rate:.0f}")
        if self.bar.disable:  # no progress bar (not a terminal): a log line per logging step instead
            LOG.info(f"stage {stage} epoch {self.epoch} step {batch_index + 1}/{self.steps_per_epoch}: loss "
                     f"{mean_loss:.4f}, {rate:.0f} sequences/s")
        self.t_last, self.losses, self.grad_norms, self.window = time.time(), [], {}, Window()

    def window_figures(self, seconds: float) -> dict[str, float]:
        """Per optimizer step of the window that ends now (`seconds` of wall time): the step time and its phases
        (trainer/monitoring/step_timing.py; `time/accounted_share`: their sum over the step time), items encoded and the
        share of them read from the feature cache; the gradient norm of each part."""
        w = self.window
        steps = max(1, w.optimizer_steps)
        timed = self.timer.read()  # CUDA: waits for the window's timing events (this step's host read came first)
        phases = {p: w.phases[p] + timed[p] for p in PHASES}
        out = {"time/step_s": seconds / steps, **{f"time/{p}_s": phases[p] / steps for p in PHASES},
               "time/accounted_share": sum(phases.values()) / seconds if seconds > 0 else 0.0,
               "perf/items_per_step": w.items / steps}
        if self.cache_hits is not None:
            out["perf/cache_hit_share"] = w.cached_items / w.items if w.items else 0.0
        if self.grad_norms:
            values = torch.stack(list(self.grad_norms.values())).float().cpu().tolist()
            out.update({f"grad_norm/{part}": v for part, v in zip(self.grad_norms, values, strict=True)})
        return out

    def unlogged(self) -> torch.Tensor:
        """The losses since the last logging step, on the host (a resume point saves them; a host sync, taken at
        checkpoints only)."""
        return torch.stack(self.losses).detach().cpu() if self.losses else torch.zeros(0)

    def carry(self, losses: torch.Tensor) -> None:
        """Continue a window from a resume point: `losses` (unlogged() of the run before) enter the next logged mean."""
        self.losses = [*losses.unbind(), *self.losses]

    def close(self) -> Window:
        """End of the epoch: the losses since the last logging step must be finite. Returns the window the epoch
        ended in (its steps since the last logging step, their time and counts), for the stage's next epoch to
        continue; the losses of those steps are not carried (a window's loss is of one epoch)."""
        self.bar.close()
        if self.losses and not math.isfinite(float(torch.stack(self.losses).float().mean())):
            raise TrainingDiverged(f"stage {self.stage} epoch {self.epoch}: loss is not finite; "
                                   f"{diverged_remedy(self.log.run_dir, self.stage)}")
        w = self.window
        w.seconds += time.time() - self.t_last
        timed = self.timer.read()  # CUDA: waits for the epoch's last timing events; validation follows and syncs
        w.phases = {p: w.phases[p] + timed[p] for p in PHASES}
        return w

    def _mean_across_ranks(self) -> float:
        total = torch.stack(self.losses).float().mean().reshape(1)
        if self.log.world > 1:
            dist.all_reduce(total)
            total /= self.log.world
        return float(total)
