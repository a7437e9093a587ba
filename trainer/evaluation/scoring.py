"""How an export's item vectors become a ranking on a catalogue: which user vector, and a target popularity prior.

A `Scoring` has two parts:

- `user`: "model", the export's user encoder (score = user vector . item vector, as trained); "mean", the
  training-free content baseline (the mean of the history's unit item vectors, scored by cosine: no user encoder at
  all, so it says what the towers alone carry to a catalogue); "none", no content (popularity alone).
- `prior_beta`: score + beta * log(1 + the item's interactions on this catalogue). The counts need no training, so a
  zero-shot model can use its target's popularity, which no source can know. Beta is chosen on the catalogue's
  validation split (`choose_prior`), never on test.

The prior is one more coordinate of the vectors (item: log(1 + count), user: beta), so every ranking path (exact
ranks, top-k, FAISS indexes) scores it as it scores the content. An export carries its scoring in `scoring.json`
(written by transfer=auto when it selects a training-free candidate); `evaluate`, `recommend` and `serve` apply it
unless told otherwise (`--scoring`, `--prior-beta`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from transrec.data_shards.integrity import IntegrityError
from transrec.trainer.core.checkpoint import CHECKPOINT_HASHES, write_checkpoint_hashes
from transrec.trainer.evaluation import ranking as ev

SCORING_FILE = "scoring.json"
USER_VECTORS = ("model", "mean", "none")
FLOAT32_MAX = float(np.finfo(np.float32).max)
# beta as a multiple of the content score's spread over the prior's spread (prior_scale): 0 first, so that a tie on
# validation keeps the smaller prior
BETA_GRID = (0.0, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 100.0, 1000.0)


@dataclass(frozen=True)
class Scoring:
    user: str = "model"
    prior_beta: float = 0.0

    def __post_init__(self) -> None:
        if self.user not in USER_VECTORS:
            raise ValueError(f"scoring user vector must be one of {', '.join(USER_VECTORS)}, not {self.user!r}")
        if isinstance(self.prior_beta, bool) or not isinstance(self.prior_beta, (int, float)) \
                or not math.isfinite(self.prior_beta) or not 0 <= self.prior_beta <= FLOAT32_MAX:
            raise ValueError(f"prior_beta must be a number from 0 to {FLOAT32_MAX:.4g} (it scores in float32), not "
                             f"{self.prior_beta!r}")
        if self.user == "none" and self.prior_beta <= 0:
            raise ValueError("scoring without content (user none) ranks by the prior alone: give prior_beta > 0")

    @property
    def label(self) -> str:
        what = {"model": "the model's user vector", "mean": "the mean of the history's item vectors (cosine)",
                "none": "popularity alone"}[self.user]
        if self.user == "none" or not self.prior_beta:
            return what
        return f"{what} + {self.prior_beta:.4g} x log(1 + count)"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "scoring") -> Scoring:
        if not isinstance(d, dict) or set(d) - {"user", "prior_beta"}:
            raise ValueError(f"{where}: expected {{'user': ..., 'prior_beta': ...}}, got {d!r}")
        return cls(**d)


def read_scoring(export_dir: Path) -> Scoring:
    """The export's scoring.json (covered by its files.sha256.json, verified when the export loads); an export
    without one scores with its user encoder and no prior."""
    path = Path(export_dir) / SCORING_FILE
    if not path.exists():
        return Scoring()
    hashes = Path(export_dir) / CHECKPOINT_HASHES
    if hashes.exists() and SCORING_FILE not in json.loads(hashes.read_text()):
        raise IntegrityError(f"{path} is not covered by {hashes} (added after the export was written): write it with "
                             "trainer.evaluation.scoring.write_scoring, or remove it")
    try:
        return Scoring.from_dict(json.loads(path.read_text()), str(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): re-export the run or restore the file") from None


def write_scoring(export_dir: Path, scoring: Scoring) -> None:
    """scoring.json into an export, its hashes rewritten to cover it."""
    (Path(export_dir) / SCORING_FILE).write_text(json.dumps(scoring.to_dict(), indent=1) + "\n")
    write_checkpoint_hashes(Path(export_dir))


# What a command may ask for (--scoring): the export's own scoring, or one user vector
SCORING_CHOICES = ("export", "model", "mean", "popularity")
USER_OF = {"model": "model", "mean": "mean", "popularity": "none"}  # choice -> Scoring.user


def requested_scoring(choice: str, prior_beta: float | str | None, export: Scoring) -> tuple[str, float | str]:
    """(Scoring.user, prior beta or "auto") asked for by `choice` (SCORING_CHOICES) and `prior_beta` (None: the
    export's when it scores with the same user vector, else 0; popularity alone: 1) over the export's scoring."""
    user = export.user if choice == "export" else USER_OF[choice]
    if prior_beta is not None:
        return user, prior_beta
    if user == export.user:
        return user, export.prior_beta
    return user, 1.0 if user == "none" else 0.0


def resolve_scoring(choice: str, prior_beta: float | str | None, export: Scoring) -> Scoring:
    """The Scoring asked for (not "auto"); ValueError naming the problem when it is not valid with the export's
    scoring (e.g. an export scoring by popularity alone and a prior beta of 0)."""
    user, beta = requested_scoring(choice, prior_beta, export)
    if beta == "auto":
        raise ValueError("--prior-beta auto is for evaluate only")
    try:
        return Scoring(user, float(beta))
    except ValueError as e:
        raise ValueError(f"--scoring {choice} --prior-beta {beta}: {e}") from None


def prior_column(counts: np.ndarray) -> torch.Tensor:
    """[V] log(1 + interactions) per item."""
    return torch.as_tensor(np.log1p(np.asarray(counts, dtype=np.float64)), dtype=torch.float32)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def scored_items(item_vectors: torch.Tensor, scoring: Scoring, counts: np.ndarray | None) -> torch.Tensor:
    """[V, d (+1)]: the item side of `scoring` (unit vectors for "mean", nothing but the prior for "none")."""
    iv = item_vectors.float()
    if scoring.user == "mean":
        iv = unit(iv)
    elif scoring.user == "none":
        iv = iv.new_zeros(len(iv), 0)
    if not scoring.prior_beta:
        return iv
    if counts is None or len(counts) != len(iv):
        raise ValueError(f"a popularity prior needs interaction counts for all {len(iv)} items")
    return torch.cat([iv, prior_column(counts).to(iv.device)[:, None]], 1)


def mean_history_vector(item_vectors: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
    """[B, d]: the unit mean of the unit item vectors of each left-padded history `hist` [B, L] (-1 = padding);
    zero for an empty history (then only the prior ranks)."""
    mask = (hist >= 0)[..., None]
    vecs = unit(item_vectors.float())[hist.clamp(min=0)] * mask
    total = vecs.sum(1)
    return torch.where(mask.any(1), unit(total), total)


def user_side(scoring: Scoring, model_user: Callable[[torch.Tensor], torch.Tensor], item_vectors: torch.Tensor,
              hist: torch.Tensor) -> torch.Tensor:
    """[B, d (+1)]: the user side of `scoring` for histories `hist`; `model_user(hist)` gives the model's vectors."""
    if scoring.user == "model":
        u = model_user(hist).float()
    elif scoring.user == "mean":
        u = mean_history_vector(item_vectors, hist)
    else:
        u = item_vectors.new_zeros(len(hist), 0)
    if not scoring.prior_beta:
        return u
    return torch.cat([u, u.new_full((len(u), 1), float(scoring.prior_beta))], 1)


def prior_scale(user_vectors: torch.Tensor, item_vectors: torch.Tensor, counts: np.ndarray, sample: int = 256) -> float:
    """The spread of the content scores (mean over up to `sample` users of the std of their scores over the items)
    over the spread of log(1 + count): beta = g * this puts g on the same footing for any model's score scale."""
    u = user_vectors[:sample].float()
    content = (u @ item_vectors.float().T).std(1).mean().item() if len(u) and len(item_vectors) > 1 else 1.0
    prior = float(np.log1p(counts).std())
    if not (math.isfinite(content) and content > 0) or prior <= 0:
        return 1.0
    return content / prior


@torch.no_grad()
def scoring_ranks(model_user: Callable[[torch.Tensor, ev.EvalUsers], torch.Tensor], item_vectors: torch.Tensor,
                  data: ev.EvalUsers, scoring: Scoring, counts: np.ndarray | None, exclude_seen: bool,
                  user_batch: int = 256, what: str = "the model") -> np.ndarray:
    """Exact ranks of `data`'s targets under `scoring` (evaluate.rank_with_vectors); `model_user(hist, chunk)`: the
    model's user vectors. Popularity alone ranks as evaluate.popularity_ranks does (count ties broken at random)."""
    if scoring.user == "none":
        return ev.popularity_ranks(np.asarray(counts), data, exclude_seen)
    items = scored_items(item_vectors, scoring, counts)
    return ev.rank_with_vectors(
        lambda hist, chunk: user_side(scoring, lambda h: model_user(h, chunk), item_vectors, hist),
        items, data, exclude_seen, user_batch, what=what)


@dataclass
class PriorChoice:
    scoring: Scoring  # the best on validation
    scale: float  # prior_scale: beta = g * scale
    table: list[dict]  # per grid point: g, beta, the validation metric
    ranks: np.ndarray  # the validation ranks of the chosen beta


@torch.no_grad()
def choose_prior(model_user: Callable[[torch.Tensor, ev.EvalUsers], torch.Tensor], item_vectors: torch.Tensor,
                 valid: ev.EvalUsers, user: str, counts: np.ndarray, exclude_seen: bool, metric: str = "ndcg@10",
                 grid: tuple[float, ...] = BETA_GRID, user_batch: int = 256) -> PriorChoice:
    """The prior's beta for `user` vectors that ranks `valid` best on `metric` (the first grid point on a tie, so 0
    when the prior adds nothing). `counts`: interactions known before the validation targets
    (evaluate.interaction_counts(..., "valid")). The user vectors are computed once; each beta is one exact ranking."""
    base = Scoring(user)
    rows = {}
    for pos, chunk in _chunks(valid, user_batch):
        hist = torch.as_tensor(chunk.histories, device=item_vectors.device)
        u = user_side(base, lambda h, c=chunk: model_user(h, c), item_vectors, hist)
        for p, vec in zip(pos, u):
            rows[int(valid.users[p])] = vec
    users = torch.stack([rows[int(x)] for x in valid.users]) if len(valid) else item_vectors.new_zeros(0, 1)
    row_of = {int(x): i for i, x in enumerate(valid.users)}
    scale = prior_scale(users, scored_items(item_vectors, base, None), counts)
    table, best = [], None
    for g in grid:
        scoring = Scoring(user, g * scale)
        items = scored_items(item_vectors, scoring, counts)
        beta_col = users.new_full((len(users), 1), float(scoring.prior_beta))
        fixed = torch.cat([users, beta_col], 1) if scoring.prior_beta else users

        def vectors(hist, chunk, fixed=fixed):
            return fixed[torch.as_tensor([row_of[int(x)] for x in chunk.users], device=fixed.device)]

        ranks = ev.rank_with_vectors(vectors, items, valid, exclude_seen, user_batch)
        value = float(ev.per_user_gain(ranks, metric).mean()) if len(ranks) else 0.0
        table.append({"g": g, "beta": scoring.prior_beta, metric: value})
        if best is None or value > best[0]:
            best = (value, scoring, ranks)
    return PriorChoice(best[1], scale, table, best[2])


def _chunks(data: ev.EvalUsers, batch: int):
    for start in range(0, len(data), batch):
        pos = np.arange(start, min(start + batch, len(data)))
        yield pos, data.take(pos)
