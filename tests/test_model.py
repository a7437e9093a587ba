"""Model-level checks: metrics, routing, the shared user vector, causality, the feature cache, checkpointing."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from conftest import content_options, image_content, small_model_config

from transrec.data_shards.batch import load_item_content
from transrec.data_shards.shard_io import ItemStore
from transrec.trainer.core import losses
from transrec.trainer.core.config import ModelConfig
from transrec.trainer.core.feature_cache import FeatureCache
from transrec.trainer.core.model import TransRec
from transrec.trainer.evaluation import ranking as ev


def brute_force_rank(scores: np.ndarray, target: int, seen: np.ndarray, exclude_seen: bool) -> int:
    """Rank by a full sort: position of the target when ties are placed before it (pessimistic)."""
    keep = np.ones(len(scores), dtype=bool)
    if exclude_seen:
        keep[seen] = False
        keep[target] = True
    cand = np.flatnonzero(keep)
    order = sorted(cand, key=lambda v: (-scores[v], 0 if v != target else 1))  # ties: others first
    return order.index(target) + 1


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_ranks_and_metrics_match_brute_force(exclude_seen):
    rng = np.random.default_rng(0)
    n_users, n_items = 40, 57
    scores = rng.integers(0, 12, size=(n_users, n_items)).astype(np.float32)  # many ties on purpose
    targets = rng.integers(0, n_items, size=n_users)
    seen = [np.unique(rng.integers(0, n_items, size=rng.integers(1, 10))) for _ in range(n_users)]
    data = ev.EvalUsers(np.arange(n_users), np.zeros((n_users, 3), dtype=np.int64), targets, seen)
    table = torch.as_tensor(scores)
    ranks = ev.rank_with_scores(
        lambda hist, chunk: table[torch.as_tensor(chunk.users)], n_items, data, exclude_seen, user_batch=7
    )
    expected = np.array([brute_force_rank(scores[u], targets[u], seen[u], exclude_seen) for u in range(n_users)])
    np.testing.assert_array_equal(ranks, expected)
    m = ev.metrics_from_ranks(ranks, ks=(5, 10))
    assert m["hr@10"] == pytest.approx(np.mean(expected <= 10))
    assert m["ndcg@5"] == pytest.approx(np.mean([1 / np.log2(r + 1) if r <= 5 else 0 for r in expected]))


def test_vector_ranking_matches_score_ranking():
    torch.manual_seed(0)
    items = torch.randn(300, 8)
    users = torch.randn(20, 8)
    targets = np.random.default_rng(1).integers(0, 300, size=20)
    seen = [np.array([1, 2, int(targets[i])]) for i in range(20)]
    data = ev.EvalUsers(np.arange(20), np.zeros((20, 2), dtype=np.int64), targets, seen)
    by_vec = ev.rank_with_vectors(lambda hist, c: users[torch.as_tensor(c.users)], items, data, True, user_batch=6)
    full = users @ items.T
    by_score = ev.rank_with_scores(lambda hist, c: full[torch.as_tensor(c.users)], 300, data, True)
    np.testing.assert_array_equal(by_vec, by_score)


def test_paired_bootstrap_hand_case():
    a = np.array([1.0, 1.0, 0.0, 1.0])
    b = np.array([0.0, 1.0, 0.0, 0.0])
    out = ev.paired_bootstrap(a, b, n=2000, seed=0)
    assert out["diff"] == pytest.approx(0.5)
    # Each resample's mean difference is k/4 for k ones drawn from {1, 0, 0, 1}: values in [0, 1].
    assert 0.0 <= out["low"] <= 0.25 and 0.75 <= out["high"] <= 1.0
    same = ev.paired_bootstrap(b, b, n=100)
    assert same["diff"] == 0 and not same["excludes_zero"]


@pytest.fixture(scope="module")
def small_model(ml_shards, tiny_bert_dir):
    torch.manual_seed(0)
    store = ItemStore(ml_shards)
    cfg = small_model_config(tiny_bert_dir, dropout=0.0)
    model = TransRec(cfg, store.num_items, store.modality, {"text": -1, "image": -1}).eval()
    from transrec.data_shards.decode import ImageDecoder

    return model, store, ImageDecoder(backend="pil", size=32)


def test_routing_equals_per_item_loop(small_model):
    model, store, decoder = small_model
    rng = np.random.default_rng(0)
    unique = np.unique(rng.integers(0, store.num_items, size=40))
    content = load_item_content(store, unique, content_options(16, decoder))
    with torch.no_grad():
        routed = model.encode_items(torch.as_tensor(unique), content)
        for row, item in enumerate(unique):  # the naive way: one item at a time through its own tower
            single = load_item_content(store, np.array([item]), content_options(16, decoder))
            name = store.modality_names[store.modality[item]]
            vec = model.towers[name](single.inputs[name])
            torch.testing.assert_close(routed[row], vec[0], rtol=1e-4, atol=1e-5)
    assert set(store.modality[unique]) == {0, 1}


def test_cached_lower_blocks_change_nothing(small_model):
    model, store, decoder = small_model
    items = np.arange(0, 60)
    content = load_item_content(store, items, content_options(16, decoder))
    with torch.no_grad():
        full = model.encode_items(torch.as_tensor(items), content)
        for tower in model.towers.values():
            tower.set_trainable(1)
        model.cache = FeatureCache.build(
            model, store, store.modality, content_options(16, decoder), torch.device("cpu"), show_progress=False
        )
        cached = model.encode_items(torch.as_tensor(items), None)
    model.cache = None
    for tower in model.towers.values():
        tower.set_trainable(-1)
    torch.testing.assert_close(cached, full, rtol=2e-3, atol=2e-3)  # the cache is stored in fp16


def test_feature_store_reuses_equal_frozen_blocks_only(small_model, tmp_path):
    """The on-disk store returns the same tables for the same frozen weights and misses after any change."""
    model, store, decoder = small_model
    messages = []

    def build():
        return FeatureCache.build(model, store, store.modality, content_options(16, decoder), torch.device("cpu"),
                                  show_progress=False, store_dir=tmp_path, log=messages.append)

    for tower in model.towers.values():
        tower.set_trainable(1)
    try:
        first = build()
        assert sum("stored" in m for m in messages) == 2 and len(list(tmp_path.glob("*.pt"))) == 2
        second = build()
        assert sum("reused" in m for m in messages) == 2
        items = torch.arange(0, 60)
        torch.testing.assert_close(second.features("text", items[store.modality[:60] == 0]),
                                   first.features("text", items[store.modality[:60] == 0]))
        torch.testing.assert_close(second.features("image", items[store.modality[:60] == 1]),
                                   first.features("image", items[store.modality[:60] == 1]))
        weight = model.towers["text"].bert.encoder.layer[0].intermediate.dense.weight
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.add_(torch.randn_like(weight) * 1e-2)  # a frozen weight changes: the text table is recomputed
        third = build()
        with torch.no_grad():
            weight.copy_(saved)
        assert len(list(tmp_path.glob("text-*.pt"))) == 2 and len(list(tmp_path.glob("image-*.pt"))) == 1
        text_items = items[store.modality[:60] == 0]
        assert not torch.equal(third.features("text", text_items)["hidden"],
                               first.features("text", text_items)["hidden"])
        model.towers["text"].set_trainable(0)  # other blocks frozen: another key
        build()
        assert len(list(tmp_path.glob("text-*.pt"))) == 3
    finally:
        for tower in model.towers.values():
            tower.set_trainable(-1)


def test_user_encoder_is_causal_and_user_vector_is_the_last_state(small_model):
    model, _, _ = small_model
    torch.manual_seed(0)
    vecs = torch.randn(3, 8, 16)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    with torch.no_grad():
        h = model.encode_sequence(vecs, mask)
        changed = vecs.clone()
        changed[:, 5:] = torch.randn(3, 3, 16)
        h2 = model.encode_sequence(changed, mask)
        torch.testing.assert_close(h[:, :5], h2[:, :5])  # positions before 5 do not see later items
        assert not torch.allclose(h[:, 5:], h2[:, 5:])
        torch.testing.assert_close(model.user_vector(vecs, mask), h[:, -1])
        padded = vecs.clone()
        padded[0, :3] = 99.0  # padding content must not matter
        torch.testing.assert_close(model.user_vector(padded, mask)[0], h[0, -1])


def test_stage2_loss_uses_the_user_vector_function(small_model, monkeypatch, ml_shards):
    from transrec.data_shards.loader import LoaderConfig, make_train_loader

    model, store, decoder = small_model
    calls = []
    original = model.user_vector
    monkeypatch.setattr(model, "user_vector", lambda *a, **k: calls.append(1) or original(*a, **k))
    cfg = LoaderConfig(window=6, batch_size=4, min_len=3, num_negatives=8, content=image_content())
    batch = next(iter(make_train_loader(ml_shards, cfg)))
    loss = losses.cpc_loss(model, batch, n_continuation=2)
    assert torch.isfinite(loss) and calls == [1]


def test_stage1_loss_equals_masked_full_softmax(small_model, ml_shards):
    """Stage 1 feeds only real (position, next item) pairs to the catalogue softmax: same loss and gradients as
    the naive cross-entropy over every position with padding and zero-weight samples ignored."""
    from transrec.data_shards.batch import attach_step_plan
    from transrec.data_shards.loader import LoaderConfig, make_train_loader

    model, _, _ = small_model
    cfg = LoaderConfig(window=9, batch_size=4, min_len=2, content=image_content())
    batch = next(iter(make_train_loader(ml_shards, cfg)))
    batch.slots[0, :4] = -1  # left padding in the first window
    batch.items[0, :4] = -1
    batch.weights[2] = 0.0  # a zero-weight padding sample
    attach_step_plan(batch, model.item_modality.numpy(), len(model.modality_names))  # the changed batch's plan
    torch.manual_seed(0)
    model.head.weight.data.normal_(0, 0.1)

    def naive():
        vecs, mask = model.slot_vectors(batch, model.encode_items(batch.unique_items, batch.content))
        h = model.encode_sequence(vecs[:, :-1], mask[:, :-1]).flatten(0, 1)
        target = batch.items[:, 1:].clone()
        target[~(mask[:, :-1] & mask[:, 1:] & (batch.weights[:, None] > 0))] = -100
        logits = h @ model.head.weight.T + model.head.bias
        return torch.nn.functional.cross_entropy(logits, target.flatten(), ignore_index=-100)

    def without_plan():  # positions compacted on the device (a batch made without a plan)
        keep, routing = batch.keep, batch.routing
        batch.keep = batch.routing = None
        try:
            return losses.free_head_loss(model, batch)
        finally:
            batch.keep, batch.routing = keep, routing

    params = [model.head.weight, *model.user_encoder.parameters()]
    results = []
    for fn in (lambda: losses.free_head_loss(model, batch), naive, without_plan):
        loss = fn()
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    for other in results[1:]:
        torch.testing.assert_close(results[0][0], other[0], rtol=1e-5, atol=1e-6)
        for a, b in zip(results[0][1], other[1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    batch.weights[:] = 0.0  # every sample padding: a zero loss, zero gradients, no NaN
    attach_step_plan(batch, model.item_modality.numpy(), len(model.modality_names))
    loss = losses.free_head_loss(model, batch)
    assert loss.item() == 0.0 and torch.autograd.grad(loss, model.head.weight)[0].abs().sum() == 0


def _saved_activation_bytes(fn) -> int:
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_activation_checkpointing_lowers_saved_memory_at_equal_loss(small_model):
    model, _, _ = small_model
    torch.manual_seed(0)
    vecs = torch.randn(16, 8, 16, requires_grad=True)
    mask = torch.ones(16, 8, dtype=torch.bool)
    model.train()
    results = {}
    for flag in (False, True):
        model.user_encoder.checkpointing = flag
        out = {}
        out["bytes"] = _saved_activation_bytes(
            lambda: out.setdefault("loss", model.encode_sequence(vecs, mask).pow(2).mean())
        )
        out["loss"].backward()
        out["grad"] = vecs.grad.clone()
        vecs.grad = None
        results[flag] = out
    model.user_encoder.checkpointing = False
    model.eval()
    assert results[True]["bytes"] < 0.5 * results[False]["bytes"]
    torch.testing.assert_close(results[True]["loss"], results[False]["loss"])
    torch.testing.assert_close(results[True]["grad"], results[False]["grad"])


def test_feature_store_auto_is_beside_the_shards_and_off_when_not_writable(tmp_path):
    from transrec.trainer.core.feature_cache import resolve_store

    shards = tmp_path / "data" / "my-shards"
    shards.mkdir(parents=True)
    assert resolve_store("auto", shards) == (tmp_path / "data" / ".feature_cache").resolve()
    assert (tmp_path / "data" / ".feature_cache").is_dir()
    assert resolve_store(None, shards) is None and resolve_store("none", shards) is None
    assert resolve_store(str(tmp_path / "elsewhere"), shards) == tmp_path / "elsewhere"
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")  # the shard folder's parent is a file: no store can be made there (even as root)
    assert resolve_store("auto", blocked / "shards") is None


def test_backbone_parameters_get_the_tower_learning_rate(ml_shards, tiny_bert_dir):
    """Each tower names its backbone; the optimizer's lower-rate group is exactly the trainable backbone weights."""
    from transrec.trainer.core.model import optimizer_param_groups

    store = ItemStore(ml_shards)
    cfg = small_model_config(tiny_bert_dir)
    model = TransRec(cfg, store.num_items, store.modality, {"text": 1, "image": 1})
    groups = optimizer_param_groups(model, lr=1e-3, tower_lr=1e-5)
    names = {id(p): n for n, p in model.named_parameters()}
    low = {names[id(p)] for p in groups[1]["params"]}
    assert groups[1]["lr"] == 1e-5 and groups[0]["lr"] == 1e-3
    assert low and all(n.startswith(("towers.text.bert.encoder.layer.1.", "towers.image.blocks.")) for n in low)
    assert not any(".proj." in n or ".pool." in n for n in low)  # pooling and projections train at the full rate
    every = {names[id(p)] for g in groups for p in g["params"]}
    assert every == {n for n, p in model.named_parameters() if p.requires_grad}


def test_sequence_input_scale_multiplies_the_item_vectors_before_positions():
    from transrec.trainer.core.model import UserEncoder

    torch.manual_seed(0)
    plain = UserEncoder(16, 1, 2, 6, 0.0)
    scaled = UserEncoder(16, 1, 2, 6, 0.0, input_scale=4.0)
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(3, 5, 16)
    mask = torch.tensor([[False, True, True, True, True]] * 3)
    torch.testing.assert_close(scaled(x, mask), plain(4.0 * x, mask))
    assert not torch.allclose(scaled(x, mask), plain(x, mask))
    with pytest.raises(ValueError, match="sequence_input_scale must be > 0"):
        ModelConfig(sequence_input_scale=0.0)
    with pytest.raises(ValueError, match="transformer user encoder only"):
        ModelConfig(user_encoder="gru", sequence_input_scale=2.0)


def test_spans_hook_times_each_part_and_changes_nothing(small_model):
    """TransRec.spans (trainer/core/timing_hook.py) opens one span per tower call, the user encoder and each tower's
    lower blocks while the feature cache builds, with the names the benches print; the outputs are unchanged."""
    model, store, decoder = small_model
    items = np.arange(0, 40)
    content = load_item_content(store, items, content_options(16, decoder))
    opened = []

    @contextlib.contextmanager
    def record(name):
        opened.append(name)
        yield

    with torch.no_grad():
        plain = model.encode_items(torch.as_tensor(items), content)
        model.spans = record
        try:
            hooked = model.encode_items(torch.as_tensor(items), content)
            mask = torch.ones(2, 5, dtype=torch.bool)
            model.encode_sequence(hooked[:10].view(2, 5, -1), mask)
            for tower in model.towers.values():
                tower.set_trainable(1)
            model.cache = FeatureCache.build(model, store, store.modality, content_options(16, decoder),
                                             torch.device("cpu"), show_progress=False)
        finally:
            model.spans, model.cache = None, None
            for tower in model.towers.values():
                tower.set_trainable(-1)
    assert torch.equal(plain, hooked)
    assert opened[:3] == ["text tower", "image tower", "user encoder"] or \
        opened[:3] == ["image tower", "text tower", "user encoder"]
    assert set(opened[3:]) == {"text lower blocks", "image lower blocks"}
