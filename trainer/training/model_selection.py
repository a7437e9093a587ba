"""Evaluation and model selection of a training run, the base of the Trainer (trainer/training/loop.py): validation
after each epoch keeps each stage's best model by `eval.select`; the test split is ranked with each stage's best; the
run's best content-scoring model is exported and reported (metrics.json, results.md, the per-user rank files), with
popularity on the same users as the reference.

It reads the run's parts as the Trainer holds them (trainer/training/parts.py `TrainingParts`: the model, the store,
the evaluated users, the run directory and its log) and the Trainer's `state` (each stage's best record, the test
figures, the finished stages).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from transrec.trainer.core.checkpoint import barrier, gathered, load_model_state, save_export, save_model_state
from transrec.trainer.core.choices import ItemEncoder, Scorer, record_scoring
from transrec.trainer.core.config_records import to_dict
from transrec.trainer.core.modalities import export_preprocessing
from transrec.trainer.core.run_setup import LOG
from transrec.trainer.evaluation import ranking as ev
from transrec.trainer.evaluation.model_ranker import ModelRanker
from transrec.trainer.evaluation.run_stats import write_ranks
from transrec.trainer.monitoring.run_monitoring import validation_health, write_run_projector
from transrec.trainer.monitoring.run_results import write_run_results
from transrec.trainer.monitoring.tensorboard_summaries import run_figures
from transrec.trainer.training.catalogue_mixture import across_catalogues, catalogue_results, metrics_by_catalogue


class ModelSelection:
    """What a run does with validation and test ranks (see the module docstring). Trainer adds the training loop and
    the three methods used here: `content_options()`, `set_stage(stage)` and `stage_trainable(stage)`."""

    def ranker(self) -> ModelRanker:
        return ModelRanker(self.model, self.store, self.modality, None, self.user_feature_names,
                           self.content_options, self.device, self.cfg.eval.item_batch,
                           self.cfg.eval.user_batch, self.cfg.eval.precision, nonfinite="worst",
                           source="the model in training", bounds=self.bounds)

    def item_vectors(self) -> torch.Tensor:
        return self.ranker().item_vectors()

    @torch.no_grad()
    def evaluate(self, split: str, scoring: str) -> np.ndarray:
        """Ranks of the split's targets; `scoring` "free_head" ranks with stage 1's head, "content" / "id" with
        user . item vector (the tower's content vectors, or the ID table's)."""
        data = self.valid_users if split == "valid" else self.test_users
        with gathered(self.model):  # ZeRO-3: evaluation reads weights outside module forwards
            return self.ranker().ranks(data, scoring, self.cfg.eval.exclude_seen)

    @torch.no_grad()
    def validation_ranks(self, scoring: str) -> tuple[np.ndarray, dict | None]:
        """evaluate("valid", scoring) and, from the same item vectors, the user vectors' collapse diagnostics of the
        first monitor.health_users validation users (None when off)."""
        with gathered(self.model):
            ranker = self.ranker()
            with ranker.eval_mode():
                iv = ranker.item_vectors()
                ranks = ranker.ranks_in_eval_mode(self.valid_users, scoring, self.cfg.eval.exclude_seen, iv)
                health = validation_health(ranker, iv, self.valid_users, self.cfg.monitor.health_users)
        return ranks, health

    def popularity_valid_ranks(self) -> np.ndarray:
        """Popularity's validation ranks: the reference line of validation, and the baseline of the report."""
        if self.popularity_valid is None:
            self.popularity_valid = ev.popularity_ranks(self.summary.counts["valid"], self.valid_users,
                                                        self.cfg.eval.exclude_seen, self.bounds)
        return self.popularity_valid

    def write_ranks(self, name: str, data: ev.EvalStream, ranks: np.ndarray) -> None:
        if self.rank != 0:
            return
        write_ranks(self.run_dir / f"{name}.tsv", data.users, data.targets, ranks)

    def validate(self, stage: int, epoch: int, stale: int, stage_best: dict | None, scoring: str, run_step: int):
        """Rank the validation split; keep the stage's best model by `eval.select`; early stopping's count.
        `run_step`: the run's optimizer steps so far, the x at which TensorBoard shows this validation (the x of the
        training scalars of the same step)."""
        ranks, health = self.validation_ranks(scoring)
        metrics = self.valid_metrics(ranks)
        reference = self.valid_metrics(self.popularity_valid_ranks())
        self.log.validation(stage, epoch, metrics, run_step, reference=reference, health=health)
        record = {"stage": stage, "epoch": epoch, "valid": metrics, "scoring": scoring}
        if self.bounds is not None:
            record["valid_by_catalogue"] = self.by_catalogue(ranks, self.valid_users)
            self.log.scalars({f"eval/stage{stage}/{name}/{k}": v for name, m in record["valid_by_catalogue"].items()
                              for k, v in m.items() if "@" in k}, run_step)
        select = self.cfg.eval.select
        if stage_best is None or metrics[select] > stage_best["valid"][select]:
            stage_best, stale = record, 0
            save_model_state(self.model, self.run_dir / f"best_stage{stage}.safetensors", write=self.rank == 0)
            self.save_valid_ranks(stage, ranks)
            self.state["stage_best"][str(stage)] = record
        else:
            stale += 1
        patience = self.cfg.eval.patience
        return stale, stage_best, bool(patience and stale >= patience)

    def by_catalogue(self, ranks: np.ndarray, data: ev.EvalStream) -> dict[str, dict]:
        return metrics_by_catalogue(ranks, data.targets, self.bounds, self.catalogues, self.cfg.eval.ks)

    def valid_metrics(self, ranks: np.ndarray) -> dict:
        """The validation figures selection reads: over all users, or a mixture's rule over its catalogues
        (eval.across_catalogues, trainer/training/catalogue_mixture.py)."""
        pooled = ev.metrics_from_ranks(ranks, self.cfg.eval.ks)
        if self.bounds is None:
            return pooled
        return across_catalogues(self.by_catalogue(ranks, self.valid_users), pooled, self.cfg.eval.across_catalogues)

    def save_valid_ranks(self, stage: int, ranks: np.ndarray) -> None:
        """The stage's best model's per-user validation ranks (valid_ranks_stageN.npy, in `valid_users` order): a
        choice between runs on validation (transfer=auto) is judged with a paired interval over these users."""
        if self.rank == 0:
            np.save(self.run_dir / f"valid_ranks_stage{stage}.npy", ranks)

    def finish_stage(self, stage: int, scoring: str) -> None:
        """Test with this stage's best model (the table's 'after stage N' row)."""
        barrier()
        best_file = self.run_dir / f"best_stage{stage}.safetensors"
        load_model_state(self.model, best_file)
        ranks = self.evaluate("test", scoring)
        self.write_ranks(f"test_ranks_stage{stage}", self.test_users, ranks)
        self.state["test"][str(stage)] = ev.metrics_from_ranks(ranks, self.cfg.eval.ks)
        self.state["done_stages"].append(stage)
        if self.rank == 0:
            np.save(self.run_dir / f"test_ranks_stage{stage}.npy", ranks)

    def evaluate_untrained(self) -> None:
        """`--stage none`, or `eval.initial_candidate`: the initial model (e.g. a source export given by --init-from:
        zero-shot transfer) scored by content on this catalogue, recorded as stage 0."""
        if self.cfg.model.item_encoder != ItemEncoder.CONTENT:
            raise ValueError("--stage none and eval.initial_candidate evaluate a content model without training; an "
                             "ID model would be random: drop them for an ID model")
        if not self.cfg.init_from:
            LOG.warning("--stage none without --init-from: evaluating randomly initialised upper blocks")
        self.set_stage(1)  # every tower's frozen blocks cached; nothing trains
        ranks = self.evaluate("valid", Scorer.CONTENT)
        record = {"stage": 0, "epoch": 0, "valid": ev.metrics_from_ranks(ranks, self.cfg.eval.ks),
                  "scoring": Scorer.CONTENT}
        self.state["stage_best"]["0"] = record
        save_model_state(self.model, self.run_dir / "best_stage0.safetensors", write=self.rank == 0)
        self.save_valid_ranks(0, ranks)
        LOG.info(f"untrained model (stage 0) validation NDCG@10 {record['valid']['ndcg@10']:.4f}")
        self.finish_stage(0, Scorer.CONTENT)

    def finish(self) -> dict:
        """Select, export and report the best content-scoring model on validation (the model that transfers and
        ranks cold items); a run without one (ID baselines, a free-head-only stage 1) selects its best model."""
        sb = self.state["stage_best"]
        content = [s for s in sb if record_scoring(sb[s]) == Scorer.CONTENT]
        best_stage = max(content or list(sb), key=lambda s: sb[s]["valid"][self.cfg.eval.select])
        if not content:
            LOG.warning(f"no content-scoring model was trained: selecting stage {best_stage} "
                        f"({record_scoring(sb[best_stage])}), which cannot rank items never seen in training")
        load_model_state(self.model, self.run_dir / f"best_stage{best_stage}.safetensors")
        pop_valid = self.popularity_valid_ranks()
        pop_test = ev.popularity_ranks(self.summary.counts["test"], self.test_users, self.cfg.eval.exclude_seen,
                                       self.bounds)
        test_ranks = np.load(self.run_dir / f"test_ranks_stage{best_stage}.npy") if self.rank == 0 else None
        save_export(
            self.model,
            self.cfg.model,
            self.run_dir / "export",
            {"best_stage": int(best_stage), "shards_manifest_inputs": self.manifest["input_files"],
             "trainable": self.stage_trainable(int(best_stage)), **export_preprocessing(self.manifest, self.cfg.model)},
            write=self.rank == 0,
        )
        result = None
        if self.rank == 0:
            self.write_ranks("test_ranks", self.test_users, test_ranks)
            self.write_ranks("test_ranks_popularity", self.test_users, pop_test)
            result = self.report(best_stage, test_ranks, pop_valid, pop_test)
            if self.bounds is not None:
                self.write_catalogue_results(best_stage, test_ranks, pop_valid, pop_test)
        if self.cfg.monitor.projector:  # after the report: the run's results are on disk whatever happens here
            self.write_projector()
        if self.rank == 0:
            self.log.run_summary({"run": self.run_dir.name, **to_dict(self.cfg)},
                                 run_figures(result, self.cfg.eval.select), self.global_step)
            LOG.info(f"export written to {self.run_dir / 'export'}; run directory: {self.run_dir}")
            self.log.close()
        barrier()
        return result

    def write_catalogue_results(self, best_stage: str, test_ranks, pop_valid, pop_test) -> None:
        """catalogues.json: a mixture's selected model and popularity per catalogue
        (trainer/training/catalogue_mixture.py)."""
        out = catalogue_results(self.cfg, self.state["stage_best"][str(best_stage)], self.manifest["catalogues"],
                                {"valid_popularity": self.by_catalogue(pop_valid, self.valid_users),
                                 "test": self.by_catalogue(test_ranks, self.test_users),
                                 "test_popularity": self.by_catalogue(pop_test, self.test_users)})
        (self.run_dir / "catalogues.json").write_text(json.dumps(out, indent=1))
        LOG.info(f"test {self.cfg.eval.select} per catalogue (model / popularity): " + ", ".join(
            f"{name} {out['test'][name][self.cfg.eval.select]:.4f} / "
            f"{out['test_popularity'][name][self.cfg.eval.select]:.4f}" for name in self.catalogues))

    @torch.no_grad()
    def write_projector(self) -> None:
        """The selected model's item vectors and a sample of user vectors for TensorBoard's projector (rank 0 writes;
        every rank computes, as ZeRO-3 gathers the weights on all)."""
        with gathered(self.model):
            ranker = self.ranker()
            with ranker.eval_mode():
                iv = ranker.item_vectors()
                if self.rank == 0:
                    written = write_run_projector(self.log.writer, self, ranker, iv)
                    LOG.info("projector: " + ", ".join(f"{tag} {w['written']} of {w['total']}"
                                                       for tag, w in written.items() if isinstance(w, dict)))

    def report(self, best_stage: str, test_ranks, pop_valid, pop_test) -> dict:
        cold = self.item_share[self.test_users.targets] == 0  # test targets in no user's training portion
        evaluated = {"evaluated": len(self.test_users), "of": len(self.summary.users["test"]), "sampled": False}
        if self.test_users.sample is not None:
            evaluated = self.test_users.sample.record(len(self.test_users), len(self.summary.users["test"]))
        return write_run_results(self.run_dir, self.state, best_stage, test_ranks, pop_valid, pop_test, cold,
                                 self.cfg.eval, log=LOG.warning, evaluated_users=evaluated)
