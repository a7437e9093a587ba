"""A mixture of catalogues (data_shards/mixture.py): the folder, the loader's one-catalogue batches, ranking within a
catalogue, the mixing rule and the losses over a catalogue's own items."""

from __future__ import annotations

import json

import numpy as np
import pytest

from transrec.data_shards.loader import LoaderConfig, make_train_loader
from transrec.data_shards.mixture import Catalogue, catalogue_bounds, main, mix, resplit
from transrec.data_shards.shard_io import ItemStore, read_id_maps, read_sequences
from transrec.trainer.evaluation import ranking as ev
from transrec.trainer.training.catalogue_mixture import across_catalogues, metrics_by_catalogue, mixing_weights


@pytest.fixture(scope="module")
def mixture(tmp_path_factory, ml_shards, hm_shards):
    out = tmp_path_factory.mktemp("mix") / "mix"
    mix([Catalogue(ml_shards, "ml"), Catalogue(hm_shards, "hm")], out)
    return out


def test_mixture_keeps_every_item_and_history_in_its_own_range(mixture, ml_shards, hm_shards):
    manifest = json.loads((mixture / "manifest.json").read_text())
    ml, hm = ItemStore(ml_shards), ItemStore(hm_shards)
    both = ml.num_items + hm.num_items
    assert [c["items"] for c in manifest["catalogues"]] == [[0, ml.num_items], [ml.num_items, both]]
    assert list(catalogue_bounds(manifest)) == [0, ml.num_items, ml.num_items + hm.num_items]
    store = ItemStore(mixture)
    for source, offset in ((ml, 0), (hm, ml.num_items)):
        for i in range(0, source.num_items, 7):  # every payload byte-identical, at its new index
            assert source.modality_names[source.modality[i]] == store.modality_names[store.modality[i + offset]]
            for name in source.modality_names:
                assert bool(source.has(i, name)) == bool(store.has(i + offset, name))
                if source.has(i, name):
                    assert bytes(source.payload(i, name)) == bytes(store.payload(i + offset, name))
    mixed = read_sequences(mixture)
    ml_seq, hm_seq = read_sequences(ml_shards), read_sequences(hm_shards)
    assert len(mixed) == len(ml_seq) + len(hm_seq) == manifest["num_users"]
    for s, src, offset in [(mixed[0], ml_seq[0], 0), (mixed[len(ml_seq) + 3], hm_seq[3], ml.num_items)]:
        assert s["items"] == [i + offset for i in src["items"]]
        assert (s["num_train"], s["evaluated"], s["timestamps"]) == (src["num_train"], src["evaluated"],
                                                                     src["timestamps"])
    ids = read_id_maps(mixture)
    assert ids["items"][ml.num_items] == "hm/" + read_id_maps(hm_shards)["items"][0]
    # each sequence tar holds one catalogue's users
    cats = manifest["catalogues"]
    assert set(cats[0]["sequence_shards"]).isdisjoint(cats[1]["sequence_shards"])
    assert manifest["num_interactions"] == sum(len(s["items"]) for s in ml_seq + hm_seq)


def test_drop_removes_items_and_splits_again(tmp_path, ml_shards, hm_shards):
    ml_ids = read_id_maps(ml_shards)["items"]
    dropped = set(ml_ids[:50])
    out = tmp_path / "mix"
    manifest = mix([Catalogue(ml_shards, "ml", dropped), Catalogue(hm_shards, "hm")], out)
    before = read_sequences(ml_shards)
    gone = sum(sum(1 for i in s["items"] if i < 50) for s in before)
    entry = manifest["catalogues"][0]
    assert entry["dropped"] == {"items": 50, "interactions": gone, "users": 0}
    assert entry["items"] == [0, len(ml_ids) - 50]
    after = read_sequences(out)[: entry["users"][1]]
    for s, src in zip(after, before):
        kept = [i - 50 for i in src["items"] if i >= 50]
        assert s["items"] == kept
        assert (s["num_train"], s["evaluated"]) == resplit(kept, [], 3)
    assert resplit([1, 2, 3], [], 3) == (1, True) and resplit([1, 2], [], 3) == (2, False)


def test_mixture_refuses_what_it_cannot_mix(tmp_path, ml_shards, hm_shards, mixture, capsys):
    with pytest.raises(ValueError, match="one or more"):
        mix([], tmp_path / "a")
    alone = mix([Catalogue(ml_shards, "ml", {read_id_maps(ml_shards)["items"][0]})], tmp_path / "alone")
    assert [c["name"] for c in alone["catalogues"]] == ["ml"] and alone["catalogues"][0]["dropped"]["items"] == 1
    with pytest.raises(ValueError, match="names must differ"):
        mix([Catalogue(ml_shards, "x"), Catalogue(hm_shards, "x")], tmp_path / "b")
    with pytest.raises(ValueError, match="a mixture already"):
        mix([Catalogue(mixture, "m"), Catalogue(hm_shards, "hm")], tmp_path / "c")
    with pytest.raises(ValueError, match="not in that catalogue"):
        mix([Catalogue(ml_shards, "ml", {"no-such-film"}), Catalogue(hm_shards, "hm")], tmp_path / "d")
    with pytest.raises(SystemExit):
        main([str(ml_shards), str(tmp_path), "--out", str(tmp_path / "e")])
    assert "no shard folder" in capsys.readouterr().err
    assert not (tmp_path / "e").exists() and not (tmp_path / "a").exists()


@pytest.mark.parametrize("world,split", [(1, "samples"), (2, "samples"), (2, "shards")])
def test_loader_batches_hold_one_catalogue_and_cover_every_window_once(mixture, world, split):
    cfg = LoaderConfig(window=9, batch_size=32, stride=8, load_content=False, num_negatives=16, split=split)
    bounds = catalogue_bounds(json.loads((mixture / "manifest.json").read_text()))
    seen, steps, windows = [], set(), None
    for rank in range(world):
        loader = make_train_loader(mixture, cfg, rank, world)
        loader.set_epoch(1)
        batches = list(loader)
        steps.add((len(batches), loader.steps_per_epoch))
        windows = loader.stream.catalogue_windows
        for b in batches:
            lo, hi = b.span
            assert (lo, hi) == (bounds[b.catalogue], bounds[b.catalogue + 1])
            items = b.items[b.items >= 0]
            assert ((items >= lo) & (items < hi)).all() and ((b.negatives >= lo) & (b.negatives < hi)).all()
            seen += [(int(u), int(e)) for u, e, w in zip(b.users, b.ends, b.weights) if w > 0]
    assert len(steps) == 1 and next(iter(steps))[0] == next(iter(steps))[1]  # every rank the same step count
    assert len(seen) == len(set(seen)) == sum(windows)  # each window once per epoch, over the ranks


def test_ranks_within_a_catalogue_equal_ranks_on_it_alone(mixture, ml_shards, hm_shards):
    """Popularity over the mixture, each user among its own catalogue's items, ranks every user exactly as
    popularity over that catalogue alone does."""
    manifest = json.loads((mixture / "manifest.json").read_text())
    bounds = catalogue_bounds(manifest)
    mixed = ev.eval_users(read_sequences(mixture), "test", 8)
    counts = ev.interaction_counts(read_sequences(mixture), manifest["num_items"], "test")
    ranks = ev.popularity_ranks(counts, mixed, True, bounds)
    alone = []
    for shards in (ml_shards, hm_shards):
        seqs = read_sequences(shards)
        c = ev.interaction_counts(seqs, ItemStore(shards).num_items, "test")
        alone.append(ev.popularity_ranks(c, ev.eval_users(seqs, "test", 8), True))
    assert np.array_equal(ranks, np.concatenate(alone))
    # without the ranges, the other catalogue's popular items push ranks down
    assert ev.popularity_ranks(counts, mixed, True).mean() > ranks.mean() + 10


def test_mixing_weights_and_selection_across_catalogues():
    assert mixing_weights([100, 900], 1.0) is None
    w = mixing_weights([100, 900], 0.0)  # every catalogue the same share: 0.5 / 0.1 and 0.5 / 0.9
    assert w == pytest.approx((5.0, 0.5 / 0.9))
    w = mixing_weights([100, 900], 0.5)
    assert w == pytest.approx((10 / 40 / 0.1, 30 / 40 / 0.9))
    with pytest.raises(ValueError, match="no training windows"):
        mixing_weights([0, 5], 0.5)
    ranks, targets = np.array([1, 20, 3, 1]), np.array([0, 1, 5, 6])
    by = metrics_by_catalogue(ranks, targets, np.array([0, 5, 10]), ["a", "b"], (10,))
    assert by["a"]["hr@10"] == 0.5 and by["b"]["hr@10"] == 1.0 and by["b"]["users"] == 2
    pooled = ev.metrics_from_ranks(ranks, (10,))
    assert across_catalogues(by, pooled, "macro")["hr@10"] == 0.75
    assert across_catalogues(by, pooled, "pooled") is pooled
