"""An export evaluated on any catalogue's shards, without a Trainer, DeepSpeed or TensorBoard: its own run's shards
give the run's test figures again, another catalogue's give zero-shot transfer.

Items are scored as the export's scoring.json says (absent: the model's user vector), or as asked
(trainer/evaluation/scoring.py); a prior beta of "auto" chooses the popularity prior's weight on the shards' validation
split, then evaluates the split asked for with it. The result compares the export with popularity on the same users
(paired bootstrap).

The catalogue's item vectors are encoded once per export and shards and kept (trainer/evaluation/item_vector_cache.py),
with progress lines on standard error; popularity alone encodes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transrec.trainer.evaluation.item_vector_cache import cached_item_vectors, stderr_line
from transrec.trainer.evaluation.model_ranker import ranker_from_export
from transrec.trainer.evaluation.ranking import (
    EvalUsers,
    UserSample,
    eval_users,
    interaction_counts,
    metrics_from_ranks,
    paired_bootstrap,
    per_user_gain,
    popularity_ranks,
)
from transrec.trainer.evaluation.scoring import (
    PriorChoice,
    Scoring,
    choose_prior,
    read_scoring,
    requested_scoring,
    resolve_scoring,
    scoring_ranks,
)


@dataclass
class ExportEvaluation:
    result: dict  # split, export, shards, scoring, content and popularity metrics, vs_popularity (+ prior_choice)
    users: EvalUsers  # the evaluated users, in the order of `ranks`
    ranks: np.ndarray  # [users] the export's rank of each user's target
    scoring: Scoring
    prior_choice: PriorChoice | None  # the validation table when the prior beta was "auto"
    num_items: int  # the catalogue's size
    popularity_ranks: np.ndarray | None = None  # [users] popularity's rank of each user's target, same order


def evaluate_export(export: Path, shards: Path, split: str = "test", exclude_seen: bool = True,
                    scoring: str = "export", prior_beta: float | str | None = None,
                    device: str = "cpu", vector_cache: str | None = "auto", log=stderr_line,
                    sample: UserSample | None = None) -> ExportEvaluation:
    """`split`'s users of `shards` ranked by the export over the whole catalogue. `scoring`: one of
    scoring.SCORING_CHOICES; `prior_beta`: a weight, "auto" (chosen on validation) or None (the export's);
    `vector_cache`: where the item vectors are kept ("auto": beside the shards; None or "none": not kept); `sample`:
    rank only a seeded sample of the evaluated users (the same ones in validation, where the prior is chosen)."""
    ranker = ranker_from_export(Path(export), Path(shards), device, build_cache=False)  # encoded only if needed
    export_scoring = read_scoring(Path(export))  # the export (its scoring.json included) verified by now
    user, beta = requested_scoring(scoring, prior_beta, export_scoring)
    max_len = ranker.model.cfg.max_len
    data = eval_users(ranker.sequences, split, max_len, ranker.user_feature_names, sample)
    counts = interaction_counts(ranker.sequences, ranker.store.num_items, split)

    def item_vectors():
        return cached_item_vectors(ranker, Path(export), Path(shards), vector_cache, log)

    vectors = None if beta != "auto" else item_vectors()  # otherwise encoded only where needed

    def model_user(hist, chunk):
        return ranker.user_vectors(vectors, hist, chunk)

    choice = None
    if beta == "auto":
        if user == "none":
            raise ValueError("--prior-beta auto chooses the prior for content scoring, and the export scores by "
                             "popularity alone: give --scoring model or mean")
        valid = eval_users(ranker.sequences, "valid", max_len, ranker.user_feature_names, sample)
        choice = choose_prior(model_user, vectors, valid, user,
                              interaction_counts(ranker.sequences, ranker.store.num_items, "valid"), exclude_seen)
        chosen = choice.scoring
    else:
        chosen = resolve_scoring(scoring, prior_beta, export_scoring)
    if chosen == Scoring():  # the model's user vector as the trainer ranks it
        vectors = item_vectors() if vectors is None else vectors
        with ranker.eval_mode():
            ranks = ranker.ranks_in_eval_mode(data, "content", exclude_seen, item_vectors=vectors)
    else:
        if vectors is None and chosen.user != "none":
            vectors = item_vectors()
        ranks = scoring_ranks(model_user, vectors, data, chosen, counts, exclude_seen, ranker.user_batch,
                              ranker.source)
    pop = popularity_ranks(counts, data, exclude_seen)
    result = {"split": split, "export": str(export), "shards": str(shards), "exclude_seen": exclude_seen,
              "scoring": {**chosen.to_dict(), "label": chosen.label},
              "content": metrics_from_ranks(ranks), "popularity": metrics_from_ranks(pop),
              "vs_popularity": {m: paired_bootstrap(per_user_gain(ranks, m), per_user_gain(pop, m))
                                for m in ("hr@10", "ndcg@10")}}
    if sample is not None:
        result["evaluated_users"] = sample.record(len(data), int(ranker.sequences.evaluated.sum()))
    if choice is not None:
        result["prior_choice"] = choice.table
    return ExportEvaluation(result, data, ranks, chosen, choice, ranker.store.num_items, pop)
