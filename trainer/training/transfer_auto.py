"""Transfer that never ships a worse model: `--init-from EXPORT --set transfer=auto`.

How to fine-tune from an export decides whether transfer helps, and no single way wins everywhere
(RESULTS.md, reports/README.md): plain fine-tuning won with a close source and scarce target data, keeping the start or
a low learning rate won on image-only feedback, a new user encoder on the source's towers was the safe choice from a
distant source. So the run trains each way as a candidate, in its own folder under RUN_DIR/candidates/, and keeps the
one whose best model validates best:

- start     the export as it is, scored by content on this catalogue (zero-shot; no training);
- prior     the start + the target's popularity prior, beta chosen on validation (no training; training_free.py);
- content   the training-free content baseline: the mean of the history's item vectors from the export's towers,
            cosine scoring, with the prior when it validates better (no training);
- popularity  the target's most frequent items (no content): a run never ships a model below it on validation;
- finetune  plain fine-tuning (both stages, the preset's rates);
- lowlr     fine-tuning at a lower rate (transfer.low_lr, default a tenth of each stage's rate);
- towers    the export's towers with a new user encoder (init_parts=towers);
- scratch   (transfer.include_scratch=true) no export at all: answers "did the export help?".

Each candidate is a whole run (both stages, early stopping, its own export); they share the frozen lower blocks'
feature cache (same frozen weights) and the evaluation streams of the same shards. Selection is on validation only;
RUN_DIR gets the chosen candidate's export, ranks and best model, so `trainer.commands.compare` and `trainer.evaluate`
read it as any run, and `metrics.json` ("candidates", "transfer") and `results.md` add every candidate's validation and
test figures, the paired intervals of the chosen model against scratch and popularity on test, and a verdict on
validation. A candidate that fails is reported and the others still run; `--resume RUN_DIR` skips the finished
candidates and resumes an interrupted one from its checkpoint.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
import traceback
from pathlib import Path

from transrec.trainer.core.checkpoint import barrier
from transrec.trainer.core.choices import STAGES, Scorer
from transrec.trainer.core.config import RunConfig
from transrec.trainer.core.config_records import read_run_config
from transrec.trainer.core.run_setup import (
    LOG,
    load_ds_config,
    make_run_dir,
    setup_distributed,
    setup_logging,
    write_run_record,
)
from transrec.trainer.training.loop import Trainer
from transrec.trainer.transfer.candidates import Candidate, candidate_config, candidate_plan
from transrec.trainer.transfer.selection import write_selection
from transrec.trainer.transfer.training_free import run_training_free


def run_candidate(cfg: RunConfig, ds_config: str, rank: int):
    """Train (or resume, or skip when finished) one candidate's run; returns its Trainer, or None when skipped."""
    d = Path(cfg.run_dir)
    if (d / "metrics.json").exists():
        return None
    point = d / "resume.json"
    if point.exists():  # interrupted: continue from its last checkpoint, with its own recorded configuration
        resume = json.loads(point.read_text())
        own = read_run_config(d)
        LOG.info(f"[transfer] resuming candidate {d.name} at stage {resume['stage']}, epoch {resume['epoch']}")
        trainer = Trainer(own, str(d / "ds_config.json"), resume_state=resume["state"])
        trainer.run(resume)
        return trainer
    if rank == 0 and d.exists():  # a failed or unstarted earlier attempt: start it again
        shutil.rmtree(d)
    barrier()
    trainer = Trainer(cfg, ds_config)
    trainer.run()
    return trainer


def estimate_minutes(trainer, cfg: RunConfig, setup_s: float) -> dict[str, float]:
    """Minutes for a candidate that trains, at most (every epoch; early stopping ends sooner), from the start's run
    on `trainer` (done; `setup_s` its wall time): one validation and a few batches of each stage are timed on it, and
    its one-off frozen-block pass (later candidates read the feature store) is taken out of its set-up."""
    cache = getattr(getattr(trainer, "model", None), "cache", None)
    cache_s = getattr(cache, "computed_s", 0.0)  # read before time_steps replaces the cache
    t0 = time.perf_counter()
    trainer.evaluate("valid", Scorer.CONTENT)
    eval_s = time.perf_counter() - t0
    stages = []
    for stage in STAGES[cfg.stages]:
        per_batch, batches = trainer.time_steps(stage)
        stages.append(((cfg.stage1 if stage == 1 else cfg.stage2).epochs, batches, per_batch))
    return plan_estimate(setup_s, cache_s, eval_s, stages)


def plan_estimate(setup_s: float, cache_s: float, eval_s: float,
                  stages: list[tuple[int, int, float]]) -> dict[str, float]:
    """Minutes: "train", a candidate that trains, at most: the set-up (the start's wall time `setup_s` less its
    frozen-block pass `cache_s` and its own validation and test evaluations, 2 x `eval_s`), then per stage (epochs,
    micro-batches per epoch, seconds per micro-batch) every epoch's batches and validation and the stage's test
    evaluation; "setup", that set-up; "start", the start's time."""
    setup = max(setup_s - cache_s - 2 * eval_s, 0.0)
    train = setup + sum(epochs * (batches * per_batch + eval_s) + eval_s for epochs, batches, per_batch in stages)
    return {"train": train / 60, "setup": setup / 60, "start": setup_s / 60}


def measured_estimate(estimate: dict[str, float], name: str, minutes: float) -> dict[str, float]:
    """The estimate once the first candidate that trains has finished in `minutes`: the others train as long (same
    catalogue and stages, the feature store warm), early stopping included; the bound stays as timed."""
    return {**estimate, "typical": minutes, "typical_from": name}


def run_auto(cfg: RunConfig, ds_config: str) -> dict | None:
    """Every candidate in turn (skipping finished ones on --resume), then the selection and the reports."""
    rank, _, _ = setup_distributed()
    setup_logging(rank)
    run_dir = make_run_dir(cfg, rank)
    plan = candidate_plan(cfg)
    if rank == 0 and not (run_dir / "run_config.json").exists():
        write_run_record(run_dir, cfg, load_ds_config(ds_config), {"transfer_candidates": [c.name for c in plan]})
    LOG.info(f"[transfer] transfer=auto from {cfg.init_from}: {len(plan)} candidates, chosen on validation "
             f"{cfg.eval.select}: " + "; ".join(f"{c.name} = {c.label}" for c in plan))
    estimate: dict[str, float] | None = None
    ordered = sorted(plan, key=lambda c: c.trains)  # the start first: cheap, and it times the rest
    for i, cand in enumerate(ordered, 1):
        c_cfg = candidate_config(cfg, cand, run_dir)
        d = Path(c_cfg.run_dir)
        if i > 1 and cand.trains and not ordered[i - 2].trains and rank == 0:
            LOG.info(training_free_summary(run_dir, [c for c in ordered if not c.trains], cfg.eval.select))
        LOG.info(candidate_line(i, ordered, estimate, run_dir))
        t0 = time.perf_counter()
        trainer = None
        try:
            if cand.free:
                done = run_training_free(c_cfg, cand.name, rank)  # None: finished earlier, or not rank 0
                minutes = (time.perf_counter() - t0) / 60
                if done is not None:
                    _record(d, {"status": "done", "minutes": round(minutes, 2)}, rank)
                    LOG.info(f"[transfer] {cand.name} done in {minutes:.1f} min: validation {cfg.eval.select} "
                             f"{_valid(d, cfg):.4f} ({done['scoring']['label']})")
                barrier()
                continue
            trainer = run_candidate(c_cfg, ds_config, rank)
            minutes = (time.perf_counter() - t0) / 60
            if trainer is None:
                LOG.info(f"[transfer] {cand.name}: finished in an earlier attempt, kept")
            else:
                _record(d, {"status": "done", "minutes": round(minutes, 2)}, rank)
                LOG.info(f"[transfer] {cand.name} done in {minutes:.1f} min: validation {cfg.eval.select} "
                         f"{_valid(d, cfg):.4f}")
            if estimate is None and trainer is not None:  # a trained candidate's time is no set-up: it is measured
                estimate = estimate_minutes(trainer, cfg, setup_s=0.0 if cand.trains else time.perf_counter() - t0)
                if cand.trains:
                    estimate = measured_estimate(estimate, cand.name, minutes)
                _print_estimate(estimate, ordered, run_dir, timed_on=cand.name)
            elif estimate is not None and trainer is not None and cand.trains and "typical" not in estimate:
                estimate = measured_estimate(estimate, cand.name, minutes)
        except Exception as e:  # noqa: BLE001  a candidate's failure is reported; the others still run
            _record(d, {"status": "failed", "error": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc()}, rank)
            LOG.error(f"[transfer] candidate {cand.name} FAILED ({type(e).__name__}: {e}); the others continue; "
                      f"details in {d / 'candidate.json'}")
        finally:
            del trainer
            gc.collect()
    barrier()
    if rank != 0:
        return None
    return write_selection(run_dir, cfg, plan)


def candidate_line(i: int, ordered: list[Candidate], estimate: dict[str, float] | None, run_dir: Path) -> str:
    """The log line that starts candidate i (from 1) of `ordered`: what it is and, once a candidate has been timed,
    its estimated minutes and the minutes of candidates left."""
    cand = ordered[i - 1]
    line = f"[transfer] candidate {i}/{len(ordered)} {cand.name}: {cand.label}"
    if not estimate:
        return line
    left = sum(_minutes(estimate, c) for c in still_to_run(ordered, run_dir))
    typical = (f"about {estimate['typical']:.1f} min as {estimate['typical_from']} took, "
               if "typical" in estimate and cand.trains else "")
    return (f"{line}; estimated {typical}at most {estimate['train' if cand.trains else 'start']:.1f} min, "
            f"{left:.1f} min of candidates left")


def training_free_summary(run_dir: Path, free: list[Candidate], metric: str) -> str:
    """One line, before the candidates that train: what the export gives with no training, against popularity
    (a user learns in seconds whether the export can help at all, before the training candidates' minutes)."""
    valid = {}
    for c in free:
        f = run_dir / "candidates" / c.name / "metrics.json"
        if f.exists():
            valid[c.name] = json.loads(f.read_text())["valid"][metric]
    if not valid:
        return "[transfer] no training-free candidate finished"
    best = max(valid, key=valid.get)
    line = ", ".join(f"{n} {v:.4f}" for n, v in valid.items())
    verdict = ""
    if "popularity" in valid:
        above = [n for n in valid if n != "popularity" and valid[n] > valid["popularity"]]
        verdict = ("; above popularity with no training: " + ", ".join(above) if above else
                   "; nothing from the export validates above popularity without training")
    return f"[transfer] training-free candidates, validation {metric}: {line}; best {best}{verdict}"


def still_to_run(ordered: list[Candidate], run_dir: Path) -> list[Candidate]:
    return [c for c in ordered if not (run_dir / "candidates" / c.name / "metrics.json").exists()]


def _minutes(estimate: dict, c: Candidate) -> float:
    """A candidate's expected minutes: as the first trained one took once one has, else the bound."""
    return estimate.get("typical", estimate["train"]) if c.trains else estimate["start"]


def _print_estimate(estimate: dict[str, float], ordered: list[Candidate], run_dir: Path, timed_on: str) -> None:
    todo = still_to_run(ordered, run_dir)
    total = sum(estimate["train" if c.trains else "start"] for c in todo)
    LOG.info(f"[transfer] cost estimate (timed on {timed_on}'s model): at most {estimate['train']:.1f} min per "
             f"candidate that trains (set-up {estimate['setup']:.1f} min, then every epoch of each stage); still to "
             f"run: {', '.join(c.name for c in todo) or 'none'}, at most {total:.1f} min in all (early stopping ends "
             "sooner; once the first of them has trained, the lines below say how long it took)")


def _record(d: Path, record: dict, rank: int) -> None:
    if rank == 0:
        d.mkdir(parents=True, exist_ok=True)
        (d / "candidate.json").write_text(json.dumps(record, indent=1))


def _valid(d: Path, cfg: RunConfig) -> float:
    return json.loads((d / "metrics.json").read_text())["valid"][cfg.eval.select]
