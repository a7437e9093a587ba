"""The content softmax (trainer/core/losses.py): against a materialised reference written independently, every gradient
(tower weights included); log-q; accidental hits; the full-catalogue case; objectives chosen by config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import content_options, image_content, small_model_config

from transrec.data_shards.batch import attach_step_plan
from transrec.data_shards.decode import ImageDecoder
from transrec.data_shards.loader import LoaderConfig, make_train_loader
from transrec.data_shards.shard_io import ItemStore
from transrec.kernels import ops as kernels
from transrec.trainer.core import losses
from transrec.trainer.core.config import Stage1Config, Stage2Config
from transrec.trainer.core.feature_cache import FeatureCache
from transrec.trainer.core.model import TransRec

NEGATIVES = 12


@pytest.fixture(scope="module")
def setup(ml_shards, tiny_bert_dir):
    """Tiny TransRec whose top text layer and top image block train from the feature cache (as in stage 2)."""
    torch.manual_seed(0)
    store = ItemStore(ml_shards)
    cfg = small_model_config(tiny_bert_dir, dropout=0.0, temperature=0.5)
    model = TransRec(cfg, store.num_items, store.modality, {"text": 1, "image": 1}).eval()
    for tower in model.towers.values():  # item vectors of a trained scale, so that logits spread
        torch.nn.init.normal_(tower.proj[-1].weight, std=0.5)
    model.cache = FeatureCache.build(model, store, store.modality,
                                     content_options(cfg.text.max_tokens, ImageDecoder(backend="pil", size=32)),
                                     torch.device("cpu"), show_progress=False)
    lc = LoaderConfig(window=9, batch_size=5, stride=9, min_len=2, num_negatives=NEGATIVES, content=image_content())
    batch = next(iter(make_train_loader(ml_shards, lc)))
    batch.slots[0, :3], batch.items[0, :3] = -1, -1  # left padding in the first window
    batch.weights[4] = 0.0  # a zero-weight padding sample
    # A repeat: window 1 consumes its position-2 item again at position 5 (the target must still count).
    batch.slots[1, 5], batch.items[1, 5] = batch.slots[1, 2], batch.items[1, 2]
    attach_step_plan(batch, store.modality, len(store.modality_names))  # the host-side plan of the changed batch
    share = np.random.default_rng(0).dirichlet(np.ones(store.num_items))
    return model, batch, share


def reference_loss(model, batch, share: np.ndarray | None, full: bool, mask_history: bool) -> torch.Tensor:
    """The specification, one (user, position) at a time with materialised logits."""
    vecs_u = model.encode_items(batch.unique_items, batch.content)
    vecs, mask = model.slot_vectors(batch, vecs_u)
    h = model.encode_sequence(vecs[:, :-1], mask[:, :-1]) / model.cfg.temperature
    if full:
        cand_ids, cand_vecs = torch.arange(model.num_items), model.encode_items(torch.arange(model.num_items))
        log_q = torch.zeros(model.num_items)
    else:
        cand_ids, cand_vecs = batch.unique_items, vecs_u
        T, V = int(mask.sum()), model.num_items
        log_q = torch.zeros(len(cand_ids))
        if share is not None:  # P(candidate) = 1 - (1 - p_i)^T (1 - 1/V)^j: T slots drawn by share, j uniform
            p = torch.as_tensor(share, dtype=torch.float64)[cand_ids]
            log_q = torch.log(1 - (1 - p) ** T * (1 - 1 / V) ** NEGATIVES).float()
    terms = []
    B, L = batch.items.shape[0], batch.items.shape[1] - 1
    for b in range(B):
        for t in range(L):
            if not (mask[b, t] and mask[b, t + 1] and batch.weights[b] > 0):
                continue
            target = int(batch.items[b, t + 1])
            earlier = {int(i) for i in batch.items[b, : t + 1] if i >= 0}
            logits = cand_vecs @ h[b, t] - log_q
            keep = torch.tensor([int(c) == target or not (mask_history and int(c) in earlier) for c in cand_ids])
            col = int((cand_ids == target).nonzero()[0, 0])
            assert keep[col]  # a candidate equal to the target is the positive, never a negative
            terms.append(torch.logsumexp(logits[keep], 0) - logits[col])
    return torch.stack(terms).mean()


def _objective(share, full: bool, mask_history: bool = True) -> losses.ContentSoftmax:
    log_share = None if share is None else torch.as_tensor(np.log(np.maximum(share, 1e-12)), dtype=torch.float32)
    return losses.ContentSoftmax("content_softmax", "item_vectors", dense=True, negatives=0 if full else NEGATIVES,
                                 full_catalogue=full, log_item_share=log_share, mask_history=mask_history)


def _value_and_grads(model, fn):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = fn()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), {n: g for (n, p), g in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad],
                                                      grads) if g is not None}


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("case", ["sampled_logq", "sampled_plain", "sampled_no_history_mask", "full"])
def test_content_softmax_equals_materialised_reference(setup, impl, case):
    model, batch, share = setup
    full = case == "full"
    use_share = share if case == "sampled_logq" else None
    mask_history = case != "sampled_no_history_mask"
    kernels.set_default_impl(impl)
    try:
        got = _value_and_grads(model, lambda: losses.content_softmax_loss(
            model, batch, _objective(use_share, full, mask_history)))
    finally:
        kernels.set_default_impl(None)
    want = _value_and_grads(model, lambda: reference_loss(model, batch, use_share, full, mask_history))
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert set(got[1]) == set(want[1])
    tower_grads = [n for n in want[1] if n.startswith("towers.") and (".bert." in n or ".blocks." in n)]
    assert tower_grads and any(want[1][n].abs().sum() > 0 for n in tower_grads)  # gradients reach the towers
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_full_catalogue_without_masks_is_the_catalogue_cross_entropy(setup):
    """Candidates = the whole catalogue, no history mask, temperature 1: exactly F.cross_entropy over every item."""
    model, batch, _ = setup
    model.logit_scale.data.zero_()
    try:
        got = losses.content_softmax_loss(model, batch, _objective(None, full=True, mask_history=False))
        vecs, mask = model.slot_vectors(batch, model.encode_items(batch.unique_items, batch.content))
        h = model.encode_sequence(vecs[:, :-1], mask[:, :-1]).flatten(0, 1)
        target = batch.items[:, 1:].clone()
        target[~(mask[:, :-1] & mask[:, 1:] & (batch.weights[:, None] > 0))] = -100
        want = F.cross_entropy(h @ model.encode_items(torch.arange(model.num_items)).T, target.flatten())
    finally:
        model.logit_scale.data.fill_(-math.log(model.cfg.temperature))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_log_inclusion_probability():
    share = torch.tensor([0.0, 1e-4, 0.3, 1.0 - 1e-9])
    got = losses.log_inclusion_probability(share.clamp(min=1e-12).log(), torch.tensor(50), 7, 1000).double()
    p = share.double()
    want = torch.log(1 - (1 - p) ** 50 * (1 - 1 / 1000) ** 7)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_history_exclusions():
    ids = torch.tensor([[-1, 4, 7, 4]])
    got = losses.history_exclusions(ids)[0]
    assert got.tolist() == [[-1, -1, -1, -1], [-1, 4, -1, -1], [-1, 4, 7, -1], [-1, 4, 7, 4]]


def test_objectives_from_config():
    share = np.full(50, 1 / 50)
    free = losses.build_objective(Stage1Config(head="free"), 50, True, share, torch.device("cpu"))
    assert isinstance(free, losses.FreeHeadSoftmax) and free.scorer("content") == "free_head" and free.dense
    cpc = losses.build_objective(Stage2Config(loss="cpc", negatives=9), 50, True, share,
                                 torch.device("cpu"))
    assert isinstance(cpc, losses.CPC) and not cpc.dense and cpc.negatives == 9
    auto_full = losses.build_objective(Stage1Config(), 50, True, share, torch.device("cpu"))
    assert auto_full.full_catalogue and auto_full.negatives == 0 and auto_full.log_item_share is None
    too_big = losses.build_objective(Stage1Config(full_catalogue_max=10, negatives=5), 50, True, share,
                                     torch.device("cpu"))
    assert not too_big.full_catalogue and too_big.negatives == 5 and too_big.log_item_share is not None
    not_cached = losses.build_objective(Stage2Config(), 50, False, share, torch.device("cpu"))
    assert not not_cached.full_catalogue
    with pytest.raises(ValueError, match="candidates=sampled"):
        losses.build_objective(Stage2Config(candidates="full"), 50, False, share, torch.device("cpu"))
    with pytest.raises(ValueError, match="stage2.loss must be"):
        Stage2Config(loss="bce")
    with pytest.raises(ValueError, match="stage1.head must be"):
        Stage1Config(head="id")
    assert not_cached.scorer("content") == "content" and not_cached.scorer("id") == "id"
    assert cpc.scorer("content") == "content" and free.scorer("id") == "free_head"
