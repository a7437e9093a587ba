"""The popularity-corrected content softmax (`stage.popularity_correction`, trainer/core/losses.py): the logit
adjustment tau * log(smoothed share), its place in the objective built from config, and the loss itself on a stub model
and batch against a cross-entropy written here one (user, position) at a time, gradients included."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from transrec.trainer.core import losses
from transrec.trainer.core.config import Stage1Config, Stage2Config
from transrec.trainer.core.overrides import apply_overrides
from transrec.trainer.core.presets import preset

V, D = 12, 5
# three windows of 6 slots (-1: padding): the first left-padded, with its item 2 consumed again as a later target
# (a repeat: the target must never be excluded); the third a zero-weight padding sample (no position enters)
ITEMS = [[-1, -1, 2, 5, 2, 7],
         [0, 1, 3, 4, 6, 8],
         [4, 3, 8, 1, 0, 5]]
WEIGHTS = [1.0, 1.0, 0.0]
NEGATIVES = [9, 11]  # shared negatives of the sampled case


def np_counts() -> np.ndarray:
    return np.array([40, 0, 7, 3, 100, 1, 0, 12, 5, 60, 2, 9])


# -- the adjustment --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_popularity_bias_is_tau_log_smoothed_share(tau):
    counts = np_counts()
    got = losses.popularity_bias(counts, tau)
    want = np.array([tau * math.log((c + 1) / (counts.sum() + len(counts))) for c in counts])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.isfinite(got).all()  # items no one trained on (count 0) keep a finite logit
    # the smoothed shares are a distribution, and the adjustment orders items by count
    assert np.exp(got / tau).sum() == pytest.approx(1.0, abs=1e-12)
    assert got[4] - got[1] == pytest.approx(tau * math.log(101 / 1))


def test_popularity_bias_of_uniform_counts_is_constant():
    got = losses.popularity_bias(np.full(8, 5), 1.0)
    np.testing.assert_allclose(got, np.full(8, math.log(1 / 8)), rtol=1e-12)


# -- the objective built from config ---------------------------------------------------------------------------------


def test_build_objective_without_correction_has_no_bias():
    sc = Stage1Config()
    assert sc.popularity_correction == 0.0
    for counts in (None, np_counts()):
        obj = losses.build_objective(sc, V, True, None, torch.device("cpu"), counts=counts)
        assert isinstance(obj, losses.ContentSoftmax) and obj.full_catalogue
        assert obj.popularity_bias is None
    sampled = losses.build_objective(Stage2Config(), V, False, np.full(V, 1 / V), torch.device("cpu"))
    assert not sampled.full_catalogue and sampled.popularity_bias is None and sampled.log_item_share is not None


@pytest.mark.parametrize("stage", [Stage1Config, Stage2Config])
def test_build_objective_with_correction(stage):
    counts = np_counts()
    sc = stage(popularity_correction=0.75)
    for cached in (True, False):  # full catalogue (stage 1 with cached towers) and sampled
        obj = losses.build_objective(sc, V, cached, np.full(V, 1 / V), torch.device("cpu"), counts=counts)
        assert obj.popularity_bias.dtype == torch.float32 and obj.popularity_bias.shape == (V,)
        want = 0.75 * np.log((counts + 1) / (counts.sum() + V))
        np.testing.assert_allclose(obj.popularity_bias.numpy(), want, rtol=1e-6)
    with pytest.raises(ValueError, match=f"{sc.section}.popularity_correction"):
        losses.build_objective(sc, V, True, None, torch.device("cpu"))


@pytest.mark.parametrize("value", [-0.1, -1, float("nan"), float("inf"), True, "1"])
@pytest.mark.parametrize("stage", [Stage1Config, Stage2Config])
def test_config_rejects_bad_values(stage, value):
    with pytest.raises(ValueError, match="popularity_correction"):
        stage(popularity_correction=value)


def test_config_override():
    cfg = apply_overrides(preset("tiny"), ["stage1.popularity_correction=1.0", "stage2.popularity_correction=0.5"])
    assert cfg.stage1.popularity_correction == 1.0 and cfg.stage2.popularity_correction == 0.5
    with pytest.raises(ValueError, match="popularity_correction"):
        apply_overrides(preset("tiny"), ["stage1.popularity_correction=-1"])


# -- the loss on a stub model ----------------------------------------------------------------------------------------


class StubModel:
    """What content_softmax_loss reads of a model: position states, the catalogue's vectors, the logit scale."""

    def __init__(self, h, item_vecs, catalogue, log_scale):
        self.h, self.item_vecs, self.catalogue, self.logit_scale = h, item_vecs, catalogue, log_scale
        self.num_items = V

    def position_states(self, batch):
        return self.item_vecs, self.h, batch.slots >= 0

    def encode_catalogue(self):
        return self.catalogue


def make_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    items = torch.tensor(ITEMS)
    real = items[items >= 0].unique()
    unique = torch.cat([real, torch.tensor(NEGATIVES)]).unique()  # sorted batch items + negatives
    slots = torch.where(items >= 0, torch.searchsorted(unique, items.clamp(min=0)), -1)
    batch = SimpleNamespace(items=items, slots=slots, weights=torch.tensor(WEIGHTS), unique_items=unique)
    h = torch.randn(len(ITEMS), len(ITEMS[0]) - 1, D, generator=g, requires_grad=True)
    catalogue = torch.randn(V, D, generator=g, requires_grad=True)
    log_scale = torch.tensor(math.log(1 / 0.7), requires_grad=True)
    return batch, h, catalogue, log_scale


def reference(h, weight, bias, scale, columns, weights, mask_history) -> torch.Tensor:
    """Mean over the kept (window, position) pairs of -log softmax(scale h . w + bias)[next], with the earlier
    columns of the window other than the target left out when `mask_history`: one row at a time."""
    terms = []
    cols = columns.tolist()
    for b, row in enumerate(cols):
        for t in range(len(row) - 1):
            target = row[t + 1]
            if weights[b] <= 0 or row[t] < 0 or target < 0:
                continue
            z = (h[b, t] * scale) @ weight.T
            if bias is not None:
                z = z + bias
            if mask_history:
                drop = [c for c in row[: t + 1] if c >= 0 and c != target]
                if drop:
                    keep = torch.ones(len(z), dtype=torch.bool)
                    keep[drop] = False
                    z = torch.where(keep, z, torch.full_like(z, float("-inf")))
            terms.append(-torch.log_softmax(z, 0)[target])
    assert len(terms) == 3 + 5  # window 0: 3 real pairs; window 1: 5; window 2: zero weight
    return torch.stack(terms).mean()


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("mask_history", [False, True])
@pytest.mark.parametrize("tau", [0.0, 1.0, 2.5])
def test_full_catalogue_loss(tau, mask_history):
    batch, h, catalogue, log_scale = make_case()
    bias = None if tau == 0 else torch.tensor(losses.popularity_bias(np_counts(), tau), dtype=torch.float32)
    obj = losses.ContentSoftmax("content_softmax", "item_vectors", dense=True, full_catalogue=True,
                                mask_history=mask_history, popularity_bias=bias)
    model = StubModel(h, None, catalogue, log_scale)
    loss = losses.content_softmax_loss(model, batch, obj)
    want = reference(h, catalogue, bias, log_scale.exp(), batch.items, WEIGHTS, mask_history)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    for got_g, want_g in zip(grads(loss, h, catalogue, log_scale), grads(want, h, catalogue, log_scale)):
        torch.testing.assert_close(got_g, want_g, rtol=1e-4, atol=1e-6)
    if not mask_history:  # the plain statement: F.cross_entropy over the kept pairs with the bias added
        keep = [(0, 2), (0, 3), (0, 4), (1, 0), (1, 1), (1, 2), (1, 3), (1, 4)]
        hk = torch.stack([h[b, t] for b, t in keep]) * log_scale.exp()
        target = torch.tensor([ITEMS[b][t + 1] for b, t in keep])
        logits = hk @ catalogue.T + (0 if bias is None else bias)
        torch.testing.assert_close(loss, F.cross_entropy(logits, target), rtol=1e-5, atol=1e-6)
    if tau:  # the adjustment changes the loss (it is not dropped on the way)
        plain = losses.ContentSoftmax("content_softmax", "item_vectors", dense=True, full_catalogue=True,
                                      mask_history=mask_history)
        assert abs(losses.content_softmax_loss(model, batch, plain).item() - loss.item()) > 1e-3


def np_log_q(share: np.ndarray, slots_filled: int, negatives: int, num_items: int) -> np.ndarray:
    """log P(item is a candidate) for `slots_filled` draws by share and `negatives` uniform draws."""
    return np.log(1 - (1 - share) ** slots_filled * (1 - 1 / num_items) ** negatives)


@pytest.mark.parametrize("mask_history", [False, True])
@pytest.mark.parametrize("logq", [False, True])
def test_sampled_loss(logq, mask_history):
    """Candidates = the batch's unique items + negatives: the adjustment of each candidate's own item id, added to
    -log q when log-q is on."""
    batch, h, catalogue, log_scale = make_case(1)
    item_vecs = catalogue[batch.unique_items].detach().requires_grad_()  # the candidates' vectors (position_states)
    counts = np_counts()
    tau = 1.5
    bias_all = torch.tensor(losses.popularity_bias(counts, tau), dtype=torch.float32)
    share = losses.item_share(counts)
    log_share = torch.tensor(np.log(np.maximum(share, 1e-12)), dtype=torch.float32) if logq else None
    obj = losses.ContentSoftmax("content_softmax", "item_vectors", dense=True, negatives=len(NEGATIVES),
                                full_catalogue=False, log_item_share=log_share, mask_history=mask_history,
                                popularity_bias=bias_all)
    loss = losses.content_softmax_loss(StubModel(h, item_vecs, None, log_scale), batch, obj)
    uniq = batch.unique_items.numpy()
    bias = tau * np.log((counts[uniq] + 1) / (counts.sum() + V))
    if logq:
        filled = int((torch.tensor(ITEMS) >= 0).sum())  # every real slot of the batch, the zero-weight one too
        bias = bias - np_log_q(share[uniq], filled, len(NEGATIVES), V)
    want = reference(h, item_vecs, torch.tensor(bias, dtype=torch.float32), log_scale.exp(), batch.slots, WEIGHTS,
                     mask_history)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    for got_g, want_g in zip(grads(loss, h, item_vecs, log_scale), grads(want, h, item_vecs, log_scale)):
        torch.testing.assert_close(got_g, want_g, rtol=1e-4, atol=1e-6)


def test_correction_needs_the_content_softmax():
    """The correction adjusts the content softmax's logits; with the free head or CPC it would be ignored, so the
    config refuses it."""
    from transrec.trainer.core.config import Stage1Config, Stage2Config

    with pytest.raises(ValueError, match="stage1.head=content"):
        Stage1Config(head="free", popularity_correction=1.0)
    with pytest.raises(ValueError, match="stage2.loss=sampled_softmax"):
        Stage2Config(loss="cpc", popularity_correction=1.0)
    assert Stage1Config(head="free").popularity_correction == 0.0
