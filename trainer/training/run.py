"""One run as a library call: `train(cfg) -> RunResult`.

The training command (`deepspeed trainer/main.py`) parses its flags into a RunConfig and calls `train`; so do the
experiments runner and anything else that trains. `train` checks the inputs (shards, the --init-from export, the
resume point) before anything is written, claims the run directory (one writer per folder:
trainer/training/run_lock.py), then trains the stages the config names (trainer/training/loop.py), or with
`transfer=auto` each transfer candidate (trainer/training/transfer_auto.py), and returns what the run selected and where
it wrote it.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from transrec.data_shards.remote import local_shards
from transrec.trainer.core.checkpoint import read_export_config
from transrec.trainer.core.choices import Scorer
from transrec.trainer.core.config import RunConfig
from transrec.trainer.core.config_records import read_run_config
from transrec.trainer.core.run_setup import default_run_dir, load_ds_config, setup_distributed
from transrec.trainer.training.loop import Trainer
from transrec.trainer.training.run_lock import claim_run_dir, releasing_run_dir_locks
from transrec.trainer.training.transfer_auto import run_auto

DEFAULT_DS_CONFIG = "ds_configs/zero2.json"  # relative to the working directory, as the command documents it


@dataclass(frozen=True)
class RunResult:
    """What a finished run selected (on validation) and where it wrote it. `metrics` is the run's metrics.json
    (validation and test figures of the selected model, popularity, the intervals; with transfer=auto, every
    candidate and the verdict)."""

    run_dir: Path
    best_stage: int
    best_epoch: int
    scoring: Scorer  # how the selected model scores items
    metrics: dict

    @property
    def export(self) -> Path:
        return self.run_dir / "export"

    @classmethod
    def read(cls, run_dir: Path | str) -> RunResult:
        """The result of a finished run, from its metrics.json."""
        run_dir = Path(run_dir)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        best = metrics["best"]
        return cls(run_dir, int(best["stage"]), int(best["epoch"]), Scorer(best["scoring"]), metrics)


class RunInputError(ValueError):
    """The run cannot start from what it was given (no shards, no resume point); the message says what to do."""


@releasing_run_dir_locks  # the run directory's lock (claim) ends with the call
def train(cfg: RunConfig, ds_config: str | None = None, *, overwrite: bool = False,
          command: list[str] | None = None) -> RunResult | None:
    """Train (or evaluate, `stages="none"`) as `cfg` says and return the selected model's result on rank 0 (None on
    the other ranks). `ds_config`: the DeepSpeed engine config (default ds_configs/zero2.json, or a resumed run's own);
    `overwrite`: empty an existing non-empty run directory first; `command`: the argv recorded in the run's lock
    (default this process's). `cfg.run_dir` is set to the claimed folder."""
    cfg.data.shards = local_shards(cfg.data.shards)
    if not (Path(cfg.data.shards) / "manifest.json").exists():
        raise RunInputError(
            f"no shards at {cfg.data.shards}: build them with `python -m transrec.data_shards.build "
            f"--dataset movielens-100k-mm --source data/movielens-100k-mm --modality mixed "
            f"--out {cfg.data.shards}` (or `make shards`)")
    auto = cfg.transfer.mode == "auto"  # candidates under RUN_DIR/candidates/, chosen on validation; each resumes
    resume_point = read_resume_point(Path(cfg.resume)) if cfg.resume and not auto else None  # ... on its own
    if cfg.init_from:  # before anything trains: a folder that is not an export, or a damaged one, is named now
        read_export_config(Path(cfg.init_from))
    if ds_config is None:
        ds_config = str(Path(cfg.resume) / "ds_config.json") if cfg.resume else DEFAULT_DS_CONFIG
    try:  # checked before the run directory is touched; the stages load it again
        load_ds_config(ds_config)
    except (FileNotFoundError, ValueError) as e:
        raise RunInputError(str(e)) from None
    claim(cfg, overwrite, command)
    if auto:
        done = run_auto(cfg, ds_config)
    else:
        trainer = Trainer(cfg, ds_config, resume_state=resume_point["state"] if resume_point else None)
        done = trainer.run(resume_point)
    return None if done is None else RunResult.read(cfg.run_dir)


def resumed_config(run_dir: str, given: list[str] = ()) -> RunConfig:
    """The settings the run in `run_dir` recorded, to continue it. RunInputError in one line when setting flags were
    `given` with it (they would be ignored) or the record cannot be read."""
    if given:
        raise RunInputError(f"--resume {run_dir} continues the run with the settings it recorded: {', '.join(given)} "
                            "would be ignored; drop it (to train with other settings, start a new run, e.g. with "
                            f"--init-from {Path(run_dir) / 'export'} when the run has one)")
    record = Path(run_dir) / "run_config.json"
    if not record.exists():
        raise RunInputError(f"--resume {run_dir}: no run_config.json there; is it a run directory?")
    try:
        return read_run_config(run_dir)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        what = f"no {e} section" if isinstance(e, KeyError) else str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RunInputError(f"--resume {run_dir}: {record} cannot be used ({what}): it was altered or written by "
                            "another version; restore it, or start a new run") from None


def read_resume_point(run_dir: Path) -> dict:
    """Where an interrupted run stopped (its resume.json)."""
    point_file = run_dir / "resume.json"
    if point_file.exists():
        return json.loads(point_file.read_text())
    raise RunInputError(f"{point_file} not found: the run saved no checkpoint yet; start it again")


def claim(cfg: RunConfig, overwrite: bool, command: list[str] | None) -> None:
    """One writer per run folder, and a new run never writes into an old run's folder (its best models and
    resume.json could be picked up). Rank 0 locks RUN_DIR (trainer/training/run_lock.py: a run, an overwrite or a resume
    into a folder another live run holds is refused, naming it) before anything is written there; then a new run refuses
    a non-empty folder unless `overwrite`, which empties it. The other ranks wait for that outcome. Without a run
    directory, rank 0 names the new folder under runs/ here."""
    rank, world, _ = setup_distributed()
    run_dir = claim_run_dir(Path(cfg.run_dir or default_run_dir(cfg)), rank, world, new_run=not cfg.resume,
                            overwrite=overwrite, command=shlex.join(sys.argv if command is None else command))
    cfg.run_dir = str(run_dir)
