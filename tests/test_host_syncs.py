"""A training step reads nothing back from the device: the loader's host-side plan (routing rows, kept positions,
real-sequence count) replaces every `nonzero` / `.item()` of the forward and backward, for every objective, with
the towers' lower blocks cached or the towers running on the batch's content. The counter is shown to catch a
read-back (the same step without the plan), and the plan changes no value (same loss and gradients)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import content_options, image_content, small_model_config

from transrec.bench.op_counts import count_ops, host_syncs, step_counts
from transrec.data_shards.decode import ImageDecoder
from transrec.data_shards.loader import LoaderConfig, make_train_loader
from transrec.data_shards.shard_io import ItemStore
from transrec.trainer.core.config import Stage1Config, Stage2Config
from transrec.trainer.core.feature_cache import FeatureCache
from transrec.trainer.core.losses import build_objective, item_share
from transrec.trainer.core.model import TransRec

OBJECTIVES = {  # name -> (stage, stage config)
    "free_head": (1, Stage1Config(head="free")),
    "content_full": (1, Stage1Config(head="content", candidates="full")),
    "content_sampled": (1, Stage1Config(head="content", candidates="sampled", negatives=8)),
    "cpc": (2, Stage2Config(loss="cpc", negatives=8, n_history=5, n_continuation=2)),
}

REPO = Path(__file__).resolve().parents[1]


def _model(ml_shards, tiny_bert_dir, cached: bool):
    torch.manual_seed(0)
    store = ItemStore(ml_shards)
    cfg = small_model_config(tiny_bert_dir, dropout=0.0, kernels="torch")
    model = TransRec(cfg, store.num_items, store.modality,
                     {"text": 1 if cached else -1, "image": 1 if cached else -1}).eval()  # BatchNorm stats fixed
    if cached:
        model.cache = FeatureCache.build(model, store, store.modality,
                                         content_options(cfg.text.max_tokens, ImageDecoder(backend="pil", size=32)),
                                         torch.device("cpu"), show_progress=False)
    return model, store


def _batch(ml_shards, store, objective, dense: bool, cached: bool):
    lc = LoaderConfig(window=9 if dense else 7, batch_size=6, stride=5, min_len=2 if dense else 3,
                      num_negatives=objective.negatives, content=image_content(),
                      load_content=not cached)
    return next(iter(make_train_loader(ml_shards, lc, item_modality=store.modality)))


# Every objective with the lower blocks cached and with the towers on the batch's content, except the full-catalogue
# content softmax on content, which build_objective refuses (it needs every tower cached).
CASES = [(n, c) for n in OBJECTIVES for c in (True, False) if c or n != "content_full"]


@pytest.mark.parametrize(("name", "cached"), CASES, ids=[f"{n}-{'cached' if c else 'content'}" for n, c in CASES])
def test_training_step_has_no_host_read_back(ml_shards, tiny_bert_dir, name, cached):
    model, store = _model(ml_shards, tiny_bert_dir, cached)
    stage, sc = OBJECTIVES[name]
    share = item_share(np.ones(store.num_items))
    objective = build_objective(sc, store.num_items, cached, share, torch.device("cpu"))
    batch = _batch(ml_shards, store, objective, objective.dense, cached)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        loss = objective(model, batch)
        return loss, torch.autograd.grad(loss, params, allow_unused=True)

    counts = step_counts(step)
    assert counts["host_syncs"] == {}, f"{name}: the step reads the device back: {counts['host_syncs']}"
    with_plan = step()

    batch.routing, batch.keep = None, None  # the same batch without its host-side plan
    without = host_syncs(count_ops(step))
    assert without.get("aten::nonzero", 0) >= 1, f"{name}: the counter missed the device-side routing: {without}"
    loss, grads = step()
    torch.testing.assert_close(with_plan[0], loss, rtol=0, atol=0)
    for a, b in zip(with_plan[1], grads):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_plan_matches_the_device_side_rules(ml_shards, tiny_bert_dir):
    """The plan's numbers are the ones the device path computes: routing by modality, kept (position, next item)
    pairs, real sequences; also under a modality override (every item routed to text)."""
    store = ItemStore(ml_shards)
    lc = LoaderConfig(window=9, batch_size=6, stride=5, min_len=2, num_negatives=4, content=image_content())
    for modality in (store.modality, np.zeros_like(store.modality)):
        batch = next(iter(make_train_loader(ml_shards, lc, item_modality=modality)))
        mods = torch.as_tensor(modality)[batch.unique_items]
        for m, rows in enumerate(batch.routing):
            assert torch.equal(rows, (mods == m).nonzero(as_tuple=True)[0])
        assert torch.equal(batch.content.rows["text"], batch.routing[0])  # content grouped by the same routing
        real = batch.slots >= 0
        valid = real[:, :-1] & real[:, 1:] & (batch.weights[:, None] > 0)
        assert torch.equal(batch.keep, valid.flatten().nonzero().squeeze(1))
        assert batch.num_real == float(batch.weights.sum())
