"""Training objectives as components, chosen by config: each owns its loss and its batch requirements.

| objective | config | scores with | windows |
|---|---|---|---|
| `FreeHeadSoftmax` | `stage1.head=free` | a free head W^U [V, d] + b (one row per item: an ID table) | dense |
| `ContentSoftmax` | `stage1.head=content`, `stage2.loss=sampled_softmax` | user . item content vector | dense |
| `CPC` | `stage2.loss=cpc` (the paper's Eq. 9) | user . item content vector | history + continuation |

Each says what it needs of the data and the model: the loader's windows (`loader_window`), its shared negatives
(`negatives`), whether the free head trains (`trains_free_head`); the model only encodes (items, sequences).

Dense windows: every position predicts its next item (causal), as in stage 1. `ContentSoftmax` scores against the
towers' own item vectors, so what it trains is what transfers and what ranks a never-seen item. Its candidates are
either the whole catalogue (exact softmax; needs every tower's lower blocks cached, `candidates=full`) or the batch's
unique items plus `negatives` shared uniform samples (in-batch negatives are free: they are already encoded), with
the log-q correction of a sampled softmax (Yi et al. 2019, "Sampling-bias-corrected neural modeling"): each
candidate's logit is lowered by log q_i, q_i its probability of being among the candidates. Candidates that are
one of the user's earlier items (other than the target) are left out of that position's softmax (accidental hits;
evaluation removes seen items from the ranking the same way). The loss runs through `kernels.catalog_cross_entropy`
with the candidates' vectors as the weight: gradients reach the towers, logits are never materialised on CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from transrec.kernels import ops as kernels
from transrec.trainer.core.choices import Candidates, ObjectiveName, Scorer, scorer_of
from transrec.trainer.core.model import kept_positions
from transrec.trainer.core.timing_hook import span


@dataclass
class Objective:
    name: str
    ranks_with_free_head: bool  # evaluated with stage 1's catalogue head, else user . item vectors
    dense: bool  # True: every position predicts its next item (windows of max_len + 1)
    negatives: int = 0  # shared negatives the loader samples per batch
    trains_free_head: bool = False  # the model's catalogue head W^U trains (only the free-head softmax reads it)
    # A mixture's loss multiplier per catalogue (the mixing rule, trainer/training/catalogue_mixture.py); None: every
    # batch weighs 1
    catalogue_weights: tuple[float, ...] | None = None

    def weighted(self, loss: torch.Tensor, batch) -> torch.Tensor:
        """The loss of `batch` times its catalogue's weight (a mixture's batches each hold one catalogue)."""
        if self.catalogue_weights is None:
            return loss
        return loss * self.catalogue_weights[getattr(batch, "catalogue", 0)]

    def __call__(self, model, batch) -> torch.Tensor:
        raise NotImplementedError

    def scorer(self, item_encoder: str) -> Scorer:
        """How a model trained with this objective is evaluated."""
        return scorer_of(self.ranks_with_free_head, item_encoder)

    def loader_window(self, max_len: int, sc) -> tuple[int, int]:
        """(items per window, shortest window) of the loader: dense objectives read max_len inputs and their next
        items, from 2 items on (`min_window` overrides the shortest)."""
        return max_len + 1, sc.min_window or 2


@dataclass
class FreeHeadSoftmax(Objective):
    trains_free_head: bool = True

    def __call__(self, model, batch) -> torch.Tensor:
        return free_head_loss(model, batch)


@dataclass
class CPC(Objective):
    n_history: int = 20
    n_continuation: int = 5

    def __call__(self, model, batch) -> torch.Tensor:
        return cpc_loss(model, batch, self.n_continuation)

    def loader_window(self, max_len: int, sc) -> tuple[int, int]:
        """History + continuation items, from 1 history item on."""
        return self.n_history + self.n_continuation, sc.min_window or self.n_continuation + 1


@dataclass
class ContentSoftmax(Objective):
    full_catalogue: bool = False
    log_item_share: torch.Tensor | None = None  # [V] log of each item's share of training interactions (log-q)
    mask_history: bool = True
    popularity_bias: torch.Tensor | None = None  # [V] tau * log(smoothed share), added to training logits, or None

    def __call__(self, model, batch) -> torch.Tensor:
        return content_softmax_loss(model, batch, self)


def popularity_bias(counts: np.ndarray, tau: float) -> np.ndarray:
    """tau * log of each item's training share, add-one smoothed ((count + 1) / (total + V): an item no one trained
    on keeps a finite logit): the logit adjustment of `popularity_correction`."""
    return tau * np.log((counts + 1.0) / (counts.sum() + len(counts)))


def item_share(counts: np.ndarray, bounds: np.ndarray | None = None) -> np.ndarray:
    """Each item's share of the training interactions (the in-batch sampler's distribution), floor 0; `counts`:
    training interactions per item (evaluate.interaction_counts, or SplitSummary.counts["train"]). With a mixture's
    catalogue `bounds`, the share within the item's own catalogue (a batch holds one catalogue's windows)."""
    if bounds is None:
        return counts / max(1.0, counts.sum())
    out = np.zeros(len(counts), dtype=np.float64)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        out[lo:hi] = counts[lo:hi] / max(1.0, counts[lo:hi].sum())
    return out


def batch_columns(batch, num_items: int) -> tuple[int, int]:
    """(lo, hi): the item range a batch is scored against: its catalogue's in a mixture, else the whole catalogue."""
    item_range = getattr(batch, "span", None)
    return (0, num_items) if item_range is None else item_range


def shifted(ids: torch.Tensor, lo: int) -> torch.Tensor:
    """Item ids as columns of a range starting at `lo` (-1 padding stays -1)."""
    return ids if lo == 0 else torch.where(ids >= 0, ids - lo, ids)


def log_inclusion_probability(log_share: torch.Tensor, slots_filled: torch.Tensor, negatives: int,
                              num_items: int) -> torch.Tensor:
    """log q_i = log P(item i is a candidate) for a batch of `slots_filled` interactions drawn by item share
    plus `negatives` uniform draws: q_i = 1 - (1 - p_i)^T (1 - 1/V)^j. Stays on the device (T is a tensor)."""
    log_miss = slots_filled.to(torch.float32) * torch.log1p(-log_share.exp().clamp(max=1 - 1e-7))
    if negatives:
        log_miss = log_miss + negatives * math.log1p(-1.0 / num_items)
    return torch.log((-torch.expm1(log_miss)).clamp(min=1e-30))


def history_exclusions(ids: torch.Tensor) -> torch.Tensor:
    """[B, L] ids of the window's inputs (-1 padding) -> [B, L, L]: for position t, the ids at positions <= t
    (the items the user had when predicting item t + 1), -1 elsewhere."""
    L = ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()  # [t, j]: j <= t
    return torch.where(causal[None], ids[:, None, :], torch.full_like(ids[:, None, :], -1))


def free_head_loss(model, batch) -> torch.Tensor:
    """Causal next-item softmax cross-entropy over the whole catalogue through the free head (Eq. 7-8), every
    position a target."""
    _, h, mask = model.position_states(batch)  # [B, L-1, d]
    head = model.head
    # Only real (position, next item) pairs enter the catalogue softmax: padded slots would cost a full [V]
    # row of logits each (most H&M windows are short) and contribute nothing to the mean.
    keep = kept_positions(batch, mask)
    if keep.numel() == 0:  # a rank's batch of zero-weight padding: a zero loss that still reaches every weight
        return h.sum() * 0.0 + head.weight.sum() * 0.0 + head.bias.sum() * 0.0
    lo, hi = batch_columns(batch, model.num_items)
    rows, targets = h.flatten(0, 1)[keep], shifted(batch.items[:, 1:], lo).flatten()[keep]
    with span(model, "loss"):
        return kernels.catalog_cross_entropy(rows, head.weight[lo:hi], head.bias[lo:hi], targets,
                                             relu=model.cfg.stage1_relu)


def cpc_loss(model, batch, n_continuation: int) -> torch.Tensor:
    """CPC (Eq. 9): user vector from the history, BCE on the continuation items and shared negatives."""
    item_vecs = model.encode_items(batch.unique_items, batch.content, routing=getattr(batch, "routing", None))
    vecs, mask = model.slot_vectors(batch, item_vecs)
    hist_vecs, hist_mask = vecs[:, :-n_continuation], mask[:, :-n_continuation]
    user = model.user_vector(hist_vecs, hist_mask, batch.user_features)
    pos = vecs[:, -n_continuation:]
    real = batch.weights > 0
    pos_mask = mask[:, -n_continuation:] & real[:, None]
    neg = item_vecs[batch.negative_slots]  # [N, d] shared
    # Negatives equal to any of the user's items in the window are dropped (masks built from ids).
    neg_mask = (batch.negatives[None, :, None] != batch.items[:, None, :]).all(-1) & real[:, None]
    # Scores are u.v / sqrt(d): the same ranking as the plain dot product, but logits of order 1 when stage 2
    # starts from stage 1's unnormalised item vectors (plain dot products saturate the sigmoid there).
    u = user * model.cfg.d**-0.5
    # Positives and negatives are averaged separately and added: with hundreds of shared negatives per
    # positive, one mean over all terms is minimised by scoring every item low, which ranks nothing.
    none_pos, none_neg = torch.zeros_like(pos_mask), torch.zeros_like(neg_mask)
    with span(model, "loss"):
        return kernels.cpc_loss(u, pos, neg, pos_mask=pos_mask, neg_mask=none_neg) + kernels.cpc_loss(
            u, pos, neg, pos_mask=none_pos, neg_mask=neg_mask
        )


def content_softmax_loss(model, batch, obj: ContentSoftmax) -> torch.Tensor:
    item_vecs, h, mask = model.position_states(batch)  # [U, d] (batch items + negatives), [B, L, d], [B, L + 1]
    lo, hi = batch_columns(batch, model.num_items)  # a mixture's batch: its own catalogue's items only
    if obj.full_catalogue:  # candidates = every item, columns = item ids; exact softmax, no log-q correction
        item_range = getattr(batch, "span", None)
        weight = model.encode_catalogue() if item_range is None else model.encode_catalogue(item_range)
        columns = shifted(batch.items, lo)
        bias = None if obj.popularity_bias is None else obj.popularity_bias[lo:hi].to(weight.dtype)
    else:
        weight, columns = item_vecs, batch.slots
        bias = None
        if obj.log_item_share is not None:
            bias = -log_inclusion_probability(obj.log_item_share[batch.unique_items], mask.sum(), obj.negatives,
                                              hi - lo).to(weight.dtype)
        if obj.popularity_bias is not None:
            adjust = obj.popularity_bias[batch.unique_items].to(weight.dtype)
            bias = adjust if bias is None else bias + adjust
    target = columns[:, 1:].flatten()
    exclude = history_exclusions(columns[:, :-1]).flatten(0, 1) if obj.mask_history else None
    # Only real (position, next item) pairs enter the softmax (padded positions would cost a row each).
    keep = kept_positions(batch, mask)
    if keep.numel() == 0:  # a rank's batch of zero-weight padding: a zero loss that still reaches every weight
        return h.sum() * 0.0 + weight.sum() * 0.0
    scale = model.logit_scale.exp().to(h.dtype)  # 1 / temperature
    rows, targets = h.flatten(0, 1)[keep] * scale, target[keep]
    exclude = None if exclude is None else exclude[keep]
    with span(model, "loss"):
        return kernels.catalog_cross_entropy(rows, weight, bias, targets, exclude=exclude)


def build_objective(sc, num_items: int, towers_cached: bool, share: np.ndarray | None,
                    device: torch.device, counts: np.ndarray | None = None) -> Objective:
    """A stage's objective from its config (`sc.objective`: from `stage1.head` / `stage2.loss`; `candidates`, ...);
    `counts`: training interactions per item (needed by `popularity_correction`)."""
    if sc.objective == ObjectiveName.FREE_HEAD_SOFTMAX:
        return FreeHeadSoftmax(ObjectiveName.FREE_HEAD_SOFTMAX, True, dense=True)
    if sc.objective == ObjectiveName.CPC:
        return CPC(ObjectiveName.CPC, False, dense=False, negatives=sc.negatives, n_history=sc.n_history,
                   n_continuation=sc.n_continuation)
    full = sc.candidates == Candidates.FULL or (sc.candidates == Candidates.AUTO and num_items <= sc.full_catalogue_max)
    if full and not towers_cached:
        if sc.candidates == Candidates.FULL:
            raise ValueError(
                f"{sc.section}.candidates=full needs every tower's lower blocks cached (towers that train all their "
                "blocks read content from the batch only); use candidates=sampled or a smaller trainable depth")
        full = False
    log_share = None
    if not full and sc.logq_correction and share is not None:
        log_share = torch.as_tensor(np.log(np.maximum(share, 1e-12)), dtype=torch.float32, device=device)
    adjust = None
    if sc.popularity_correction:
        if counts is None:
            raise ValueError(f"{sc.section}.popularity_correction needs the training interactions per item")
        adjust = torch.as_tensor(popularity_bias(counts, sc.popularity_correction), dtype=torch.float32,
                                 device=device)
    return ContentSoftmax(ObjectiveName.CONTENT_SOFTMAX, False, dense=True, negatives=0 if full else sc.negatives,
                          full_catalogue=full, log_item_share=log_share, mask_history=sc.mask_history,
                          popularity_bias=adjust)
