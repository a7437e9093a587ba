"""The two-stage TransRec trainer on DeepSpeed: stage 1 (catalogue softmax), stage 2 (CPC), evaluation.

One DeepSpeed engine per stage wraps the same model; the trainable parameters differ between stages.
Validation after each epoch picks the best model across both stages (NDCG@10); the test split is evaluated
with each stage's best model and with the overall best, which is exported: that half, evaluation and selection, is
trainer/training/model_selection.py, the Trainer's base.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import numpy as np
import torch

from transrec.data_shards.loader import LoaderConfig, make_train_loader
from transrec.data_shards.modalities import ContentOptions, content_kind
from transrec.trainer.core.checkpoint import gathered, load_model_state, load_resume_point, save_resume_point
from transrec.trainer.core.choices import STAGES, Scorer
from transrec.trainer.core.config import RunConfig, StageConfig
from transrec.trainer.core.feature_cache import FeatureCache, resolve_store
from transrec.trainer.core.losses import Objective, build_objective
from transrec.trainer.core.modalities import MODALITIES, content_options, content_settings
from transrec.trainer.core.model import optimizer_param_groups
from transrec.trainer.core.run_setup import LOG, fill_ds_config
from transrec.trainer.monitoring.grad_norms import part_grad_norms, trainable_parts
from transrec.trainer.monitoring.run_monitoring import cache_hit_counter
from transrec.trainer.training.catalogue_mixture import mixing_weights
from transrec.trainer.training.device_prefetch import prefetched, resolve_ahead
from transrec.trainer.training.model_selection import ModelSelection
from transrec.trainer.training.parts import build_parts
from transrec.trainer.training.schedule import lr_factor


class Trainer(ModelSelection):
    """The two-stage loop over a run's parts (trainer/training/parts.py: the model, the shards, the evaluated users,
    the run directory and its log): `run()` trains the stages the configuration names and returns the results."""

    def __init__(self, cfg: RunConfig, ds_config_path: str, resume_state: dict | None = None):
        self.cfg = cfg
        parts = build_parts(cfg, ds_config_path)
        for f in dataclasses.fields(parts):  # self.model, self.store, self.valid_users, ... (TrainingParts' fields)
            setattr(self, f.name, getattr(parts, f.name))
        self.options: ContentOptions | None = None  # content_options(), made on first use
        self.popularity_valid: np.ndarray | None = None  # popularity's validation ranks, computed on first use
        self.state = resume_state or {"best": None, "stage_best": {}, "done_stages": [], "test": {}}
        self.global_step = self.state.get("global_step", 0)  # optimizer steps of the finished stages (TensorBoard x)

    # -- helpers ------------------------------------------------------------------------------------------
    def content_options(self) -> ContentOptions:
        """What collating items' content needs (made on first use: it holds a decoder)."""
        if self.options is None:
            self.options = content_options(self.cfg.model, self.cfg.data.decoder, self.device)
        return self.options

    def stage_trainable(self, stage: int) -> dict[str, int]:
        """Top blocks of each tower that train in `stage`, by modality (stage 2's `trainable`; none in stage 1, in
        frozen mode, and untrained: stage 0)."""
        trainable = self.cfg.stage2.trainable
        unknown = sorted(set(trainable) - set(MODALITIES))
        if unknown:
            raise ValueError(f"stage2.trainable names {unknown}, which are no registered modality "
                             f"(known: {', '.join(MODALITIES)})")
        if stage != 2 or self.cfg.model.frozen_towers:
            return {}
        return dict(trainable)

    def set_stage(self, stage: int) -> StageConfig:
        sc = self.cfg.stage1 if stage == 1 else self.cfg.stage2
        trainable = self.stage_trainable(stage)
        for name, tower in self.model.towers.items():
            tower.set_trainable(trainable.get(name, 0))
            if self.cfg.model.frozen_towers:
                tower.requires_grad_(False)
        self.model.cache = None
        if self.model.towers:
            t0, options = time.time(), self.content_options()
            with gathered(self.model):  # ZeRO-3: lower blocks read outside the engine need full weights
                self.model.cache = FeatureCache.build(
                    self.model,
                    self.store,
                    self.modality,
                    options,
                    self.device,
                    chunk=self.cfg.eval.item_batch,
                    show_progress=self.rank == 0,
                    store_dir=resolve_store(self.cfg.data.feature_store, self.shards),
                    log=LOG.info,
                )
            if self.model.cache is not None:
                LOG.info(
                    f"stage {stage}: cached frozen lower blocks of {sorted(self.model.cache.covered)} "
                    f"({self.model.cache.nbytes() / 2**20:.0f} MiB) in {time.time() - t0:.1f} s"
                )
        return sc

    def needs_content(self) -> bool:
        return any(not (self.model.cache and self.model.cache.covers(n)) for n in self.model.towers)

    def objective(self, stage: int) -> Objective:
        """The stage's loss component (trainer/core/losses.py); call after set_stage (full-catalogue candidates need
        every tower's lower blocks cached)."""
        sc = self.cfg.stage1 if stage == 1 else self.cfg.stage2
        cached = not self.needs_content()
        # a mixture's batch is scored against one catalogue: the largest decides whether the full softmax fits
        scored = self.num_items if self.bounds is None else int(np.diff(self.bounds).max())
        obj = build_objective(sc, scored, cached, self.item_share, self.device, counts=self.summary.counts["train"])
        self.model.head.requires_grad_(obj.trains_free_head)
        return obj

    def mix(self, obj: Objective, loader) -> None:
        """A mixture's mixing rule (data.mixing_alpha) as the objective's loss multiplier per catalogue."""
        if self.bounds is None:
            return
        obj.catalogue_weights = mixing_weights(loader.stream.catalogue_windows, self.cfg.data.mixing_alpha)
        LOG.info("catalogues (training windows, loss weight): " + ", ".join(
            f"{name} ({n}, {1.0 if obj.catalogue_weights is None else obj.catalogue_weights[c]:.3f})"
            for c, (name, n) in enumerate(zip(self.catalogues, loader.stream.catalogue_windows))))

    def scoring(self, obj: Objective) -> Scorer:
        return obj.scorer(self.cfg.model.item_encoder)

    def make_loader(self, stage: int, sc: StageConfig, obj: Objective | None = None):
        m = self.cfg.model
        obj = obj or self.objective(stage)
        window, min_len = obj.loader_window(m.max_len, sc)
        lc = LoaderConfig(
            window=window,
            batch_size=sc.micro_batch,
            stride=sc.stride,
            min_len=min_len,
            shuffle_buffer=self.cfg.data.shuffle_buffer,
            seed=self.cfg.seed,
            num_workers=self.cfg.data.num_workers,
            num_negatives=obj.negatives,
            load_content=self.needs_content(),
            decode_in_loader=self.device.type == "cpu",
            content=content_settings(m, self.cfg.data.decoder),
            user_fraction=self.cfg.data.user_fraction,
            pin_memory=self.device.type == "cuda",
            split=self.cfg.data.split,
        )
        return make_train_loader(self.shards, lc, self.rank, self.world, item_modality=self.modality)

    def make_engine(self, sc: StageConfig, steps_total: int):
        import deepspeed

        groups = optimizer_param_groups(self.model, sc.lr, sc.tower_lr)
        opt = torch.optim.AdamW(groups, lr=sc.lr, weight_decay=sc.weight_decay,
                                **adamw_implementation(self.cfg.optimizer, self.device))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(lr_factor, warmup_steps=sc.warmup_steps,
                                                                          steps_total=steps_total))
        ds = fill_ds_config(self.ds_base, sc, self.world)
        if ds.get("zero_optimization", {}).get("stage", 0) == 3:
            # The stage-1 head's weights are read directly in TransRec.forward (the fused loss), not by a forward
            # of their own module: ZeRO-3 must gather them with the parent's.
            for p in self.model.head.parameters():
                deepspeed.zero.register_external_parameter(self.model, p)
        engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=opt, lr_scheduler=sched, config=ds)
        return engine

    # -- a stage ------------------------------------------------------------------------------------------
    def run_stage(self, stage: int, resume: dict | None = None) -> None:
        """Train `stage` epoch by epoch (from `resume`, a resume point of this stage, when given), validating after
        each epoch and stopping early by eval.patience; then test with the stage's best model."""
        sc, obj, loader = self.stage_parts(stage)
        scoring = self.scoring(obj)
        steps_total = stage_steps(sc, loader.steps_per_epoch)
        engine = self.make_engine(sc, steps_total)
        at = self.resume_stage(stage, sc, engine, loader, resume)
        LOG.info(f"stage {stage}: {loader.steps_per_epoch} steps/epoch/rank x {sc.epochs} epochs, "
                 f"{loader.stream.num_samples} windows, micro batch {sc.micro_batch}, world {self.world}; objective "
                 f"{obj.name}{' over the full catalogue' if getattr(obj, 'full_catalogue', False) else ''}, "
                 f"{obj.negatives} shared negatives, scored by {scoring}")
        stage_best = self.state["stage_best"].get(str(stage))
        watch = self.step_watch()
        for epoch in range(at.epoch, sc.epochs):
            steps_done = self.train_epoch(stage, epoch, sc, obj, loader, engine, at, steps_total, watch)
            at.stale, stage_best, stop = self.validate(stage, epoch, at.stale, stage_best, scoring,
                                                       self.global_step + steps_done)
            self.save_resume_point(engine, stage, epoch + 1, 0, at.stale)
            if stop or (sc.max_steps and steps_done >= sc.max_steps):
                break
        self.global_step += engine.global_steps
        self.state["global_step"] = self.global_step
        engine.destroy()  # removes its ZeRO gradient hooks: the next stage's engine wraps the same parameters
        self.finish_stage(stage, scoring)

    def stage_parts(self, stage: int):
        """The stage's settings (towers set trainable, frozen blocks cached), objective and loader."""
        sc = self.set_stage(stage)
        obj = self.objective(stage)
        loader = self.make_loader(stage, sc, obj)
        self.mix(obj, loader)
        return sc, obj, loader

    def resume_stage(self, stage: int, sc: StageConfig, engine, loader, resume: dict | None) -> StagePosition:
        """Where the stage starts: its beginning, or a resume point's epoch and batch (the engine's state loaded)."""
        if resume is None:
            return StagePosition()
        unlogged = load_resume_point(engine, self.run_dir, resume["tag"], self.rank).get("unlogged_losses")
        at = StagePosition(resume["epoch"], resume["batches_done"], resume.get("stale", 0), unlogged)
        self.log.rewind(stage, engine.global_steps, at.epoch, self.global_step + engine.global_steps)
        patience = self.cfg.eval.patience
        if (sc.max_steps and engine.global_steps >= sc.max_steps) or (patience and at.stale >= patience):
            # saved after the stage's last step (or its early stop): no batch is left; an epoch cut there still
            # validates, as it did in a run never interrupted
            at.epoch, at.skip = (at.epoch, loader.steps_per_epoch) if at.skip else (sc.epochs, 0)
        at.first_epoch = at.epoch
        LOG.info(f"resumed stage {stage} at epoch {at.epoch}, batch {at.skip} (optimizer step "
                 f"{self.global_step + engine.global_steps} of the run)")
        return at

    def step_watch(self) -> StepWatch:
        return StepWatch(resolve_ahead(self.cfg.data.device_prefetch, self.device),
                         trainable_parts(self.model) if self.cfg.monitor.grad_norms else {},
                         cache_hit_counter(self.model.cache, self.store.modality_names, self.modality))

    def train_epoch(self, stage: int, epoch: int, sc: StageConfig, obj: Objective, loader, engine,
                    at: StagePosition, steps_total: int, watch: StepWatch) -> int:
        """One epoch's steps (from batch `at.skip` of a resumed epoch), logged and checkpointed; returns the stage's
        optimizer steps so far."""
        loader.set_epoch(epoch)
        loader.skip_batches(at.skip)
        meter = self.log.epoch(stage, epoch, loader.steps_per_epoch, at.skip, steps_total, epoch == at.first_epoch,
                               watch.cache_hits, watch.window)
        if at.unlogged is not None and epoch == at.first_epoch:
            meter.carry(at.unlogged.to(self.device))  # the losses of the steps before the checkpoint, not yet logged
        timer = meter.timer  # the phases of each step (trainer/monitoring/step_timing.py), read on logging steps
        batches = prefetched(timer.loader(loader), timer.timed(self.prepare_batch, "to_device"), self.device,
                             watch.ahead)
        steps_done = engine.global_steps
        for b_idx, (host, batch) in enumerate(batches, start=at.skip):
            meter.batch_in(host)
            boundary = (b_idx + 1) % sc.grad_accum == 0  # an optimizer step ends with this micro-batch
            with timer.span("forward"):
                loss = engine(batch, objective=obj)
            with timer.span("backward"):
                engine.backward(loss)
            if watch.grad_parts and boundary and (engine.global_steps + 1) % self.cfg.log_every == 0:
                meter.note_grad_norms(part_grad_norms(watch.grad_parts))  # a logging step: before the step uses them
            with timer.span("optimizer"):
                engine.step()
            steps_done = engine.global_steps
            meter.step_done(loss, b_idx, steps_done, self.global_step + steps_done, boundary, engine.get_lr)
            if boundary and steps_done % self.cfg.save_every_steps == 0:
                with timer.span("checkpoint"):
                    self.save_resume_point(engine, stage, epoch, b_idx + 1, at.stale, meter.unlogged())
            if sc.max_steps and steps_done >= sc.max_steps:
                break
        watch.window = meter.close()  # the logging window the epoch's end cut, continued by the next epoch
        at.skip = 0
        return steps_done

    def time_steps(self, stage: int, steps: int = 3) -> tuple[float, int]:
        """(seconds per micro-batch of `stage`, the median of `steps` timed after one warm-up batch; micro-batches per
        epoch): what a cost estimate needs before a run trains (trainer/training/transfer_auto.py). It trains those
        batches, so it changes the model: call it on a Trainer whose results are already written."""
        sc, obj, loader = self.stage_parts(stage)
        engine = self.make_engine(sc, steps + 1)
        loader.set_epoch(0)
        times = []
        for k, (_, batch) in enumerate(prefetched(loader, self.prepare_batch, self.device, 0)):
            t0 = time.perf_counter()
            loss = engine(batch, objective=obj)
            engine.backward(loss)
            engine.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            if k >= steps:
                break
        engine.destroy()
        timed = times[1:] or times  # a one-batch epoch: its only (warm-up) time
        return (float(np.median(timed)) if timed else 0.0), loader.steps_per_epoch

    def prepare_batch(self, batch):
        """The loader's (host) batch on the device; payloads left to the main process (JPEGs) are decoded here, on
        the training device, by their modality's content kind."""
        c = batch.content
        pending = {} if c is None else {name: batch.unique_items[c.rows[name]].numpy() for name in c.payloads}
        batch = batch.to(self.device)  # non-blocking from pinned memory on CUDA
        if pending:
            options = self.content_options()
            for name, items in pending.items():
                batch.content.inputs[name] = content_kind(name).collate(batch.content.payloads.pop(name), items,
                                                                        options.of(name))
        return batch

    def save_resume_point(self, engine, stage: int, epoch: int, batches_done: int, stale: int,
                          unlogged: torch.Tensor | None = None) -> None:
        """`unlogged`: this rank's losses since its last logging step (mid-epoch), so that the resumed run logs the
        same window means as a run never interrupted."""
        save_resume_point(engine, self.run_dir, self.rank, {"stage": stage, "epoch": epoch,
                                                            "batches_done": batches_done, "stale": stale,
                                                            "state": self.state},
                          None if unlogged is None else {"unlogged_losses": unlogged})

    # -- the whole run ------------------------------------------------------------------------------------
    def run(self, resume_point: dict | None = None) -> dict:
        if self.cfg.stages == "none":
            self.evaluate_untrained()
            return self.finish()
        stages = STAGES[self.cfg.stages]
        if self.cfg.eval.initial_candidate and 0 not in self.state["done_stages"]:
            self.evaluate_untrained()  # the starting model competes with the fine-tuned ones (stage 0)
        for stage in stages:
            if stage in self.state["done_stages"]:
                continue
            resume = resume_point if resume_point and resume_point["stage"] == stage else None
            if stage == 2 and 1 in self.state["done_stages"]:
                load_model_state(
                    self.model, self.run_dir / "best_stage1.safetensors"
                )  # stage 2 starts from stage 1's best
            self.run_stage(stage, resume)
        return self.finish()

@dataclasses.dataclass
class StagePosition:
    """Where a stage's training stands: the epoch and batch it (re)starts from, validations without improvement,
    and the losses of a resumed epoch's steps not yet logged."""

    epoch: int = 0
    skip: int = 0
    stale: int = 0
    unlogged: torch.Tensor | None = None
    first_epoch: int = 0  # the epoch the stage (re)starts with


@dataclasses.dataclass
class StepWatch:
    """What the steps of a stage record beside training: batches made ready ahead, gradient norms' parts, the
    feature cache's hits, and the logging window an epoch's end cut (continued by the next epoch)."""

    ahead: int
    grad_parts: dict
    cache_hits: object
    window: object = None


def stage_steps(sc: StageConfig, batches_per_epoch: int) -> int:
    """The stage's optimizer steps: its epochs' micro-batches over grad_accum, capped by max_steps."""
    steps = sc.epochs * batches_per_epoch // sc.grad_accum
    return min(steps, sc.max_steps) if sc.max_steps else steps


def adamw_implementation(choice: str, device: torch.device) -> dict:
    """torch.optim.AdamW's implementation flags for `optimizer` (config): "auto" = one fused kernel on CUDA, torch's
    own default elsewhere."""
    if choice == "auto":
        return {"fused": True} if device.type == "cuda" else {}
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "plain": {"foreach": False}}[choice]
