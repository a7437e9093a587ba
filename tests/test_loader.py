"""The training loader: exact split over ranks and workers, resume, batch-unique items, corrupt images."""

from __future__ import annotations

import collections
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from data_shards.decode import CorruptImageError, ImageDecoder
from data_shards.loader import LoaderConfig, load_item_content, make_train_loader, window_ends
from data_shards.shard_io import ItemStore, read_sequences


def _ids(batches) -> list[tuple[int, int]]:
    return [(u, e) for b in batches for u, e, w in zip(b.users.tolist(), b.ends.tolist(), b.weights.tolist()) if w > 0]


def test_every_window_once_per_epoch_with_equal_steps_over_2_ranks_x_2_workers(ml_shards):
    cfg = LoaderConfig(window=9, batch_size=64, stride=7, num_workers=2, load_content=False, shuffle_buffer=500)
    seen: collections.Counter = collections.Counter()
    steps = []
    for rank in range(2):
        loader = make_train_loader(ml_shards, cfg, rank=rank, world_size=2)
        loader.set_epoch(3)
        batches = list(loader)
        steps.append(len(batches))
        assert len(batches) == loader.steps_per_epoch
        assert all(len(b.users) == 64 for b in batches)
        seen.update(_ids(batches))
    expected = {(s["user"], e) for s in read_sequences(ml_shards) for e in window_ends(s["num_train"], cfg)}
    assert steps[0] == steps[1]
    assert set(seen) == expected and set(seen.values()) == {1}  # exactly once; padding (weight 0) excluded


def test_worker_count_does_not_change_the_batches(ml_shards):
    def batches(workers: int):
        cfg = LoaderConfig(window=9, batch_size=32, stride=11, num_workers=workers, load_content=False)
        loader = make_train_loader(ml_shards, cfg)
        loader.set_epoch(1)
        return [(b.users.tolist(), b.ends.tolist()) for b in loader]

    assert batches(0) == batches(2)


def test_epochs_reshuffle_and_resume_continues_with_the_next_unseen_batches(ml_shards):
    cfg = LoaderConfig(window=9, batch_size=32, stride=11, load_content=False)
    loader = make_train_loader(ml_shards, cfg)
    loader.set_epoch(0)
    full = [(b.users.tolist(), b.ends.tolist()) for b in loader]
    loader.set_epoch(1)
    assert [(b.users.tolist(), b.ends.tolist()) for b in loader] != full
    resumed = make_train_loader(ml_shards, cfg)  # a new process after a crash at batch 5 of epoch 0
    resumed.set_epoch(0)
    resumed.skip_batches(5)
    rest = [(b.users.tolist(), b.ends.tolist()) for b in resumed]
    assert rest == full[5:]


def test_unique_item_batch_reconstructs_the_per_position_batch(ml_shards):
    cfg = LoaderConfig(window=9, batch_size=16, num_negatives=12, decoder="pil", image_size=32, max_tokens=16)
    batch = next(iter(make_train_loader(ml_shards, cfg)))
    store = ItemStore(ml_shards)
    sequences = {s["user"]: s for s in read_sequences(ml_shards)}
    for row, (u, e) in enumerate(zip(batch.users.tolist(), batch.ends.tolist())):  # the naive per-position batch
        naive = sequences[u]["items"][max(0, e - 9) : e]
        assert batch.items[row, 9 - len(naive) :].tolist() == naive
        assert (batch.items[row, : 9 - len(naive)] == -1).all()
    present = batch.slots >= 0
    assert torch.equal(batch.unique_items[batch.slots[present]], batch.items[present])
    assert torch.equal(batch.unique_items[batch.negative_slots], batch.negatives)
    assert len(set(batch.unique_items.tolist())) == len(batch.unique_items)
    c = batch.content
    for k, r in enumerate(c.text_rows.tolist()):  # content rows equal a per-item load
        item = int(batch.unique_items[r])
        tok = store.tokens(item)[:16]
        assert c.token_ids[k, : len(tok)].tolist() == tok.tolist() and int(c.token_mask[k].sum()) == len(tok)
    single = load_item_content(store, batch.unique_items[c.image_rows[:3]].numpy(), 16, ImageDecoder("pil", 32))
    torch.testing.assert_close(c.pixels[:3], single.pixels)
    assert set(store.modality[batch.unique_items.numpy()]) == {0, 1}


def test_corrupt_jpeg_inside_a_shard_names_the_item(ml_shards, tmp_path):
    bad = tmp_path / "shards"
    shutil.copytree(ml_shards, bad)
    store = ItemStore(bad)
    image_items = np.flatnonzero((store.modality == 1) & (store.index["jpg_size"] > 0))
    victim = int(image_items[0])
    rec = store.index[victim]
    shard = bad / store.manifest["shards"]["items"][int(rec["shard"])]
    with open(shard, "r+b") as f:  # overwrite the JPEG's bytes in place: the tar stays valid
        f.seek(int(rec["jpg_offset"]) + 200)
        f.write(b"\x00" * (int(rec["jpg_size"]) - 200))
    with tarfile.open(shard) as tar:  # still a readable WebDataset shard
        assert any(m.name.endswith(".jpg") for m in tar)
    with pytest.raises(CorruptImageError, match=str(victim)):
        load_item_content(ItemStore(bad), np.array([victim]), 16, ImageDecoder("pil", 32))


def test_short_histories_and_bad_config_are_clear(ml_shards):
    with pytest.raises(ValueError, match="min_len"):
        LoaderConfig(window=5, min_len=6)
    with pytest.raises(ValueError, match="no training windows"):
        make_train_loader(ml_shards, LoaderConfig(window=900, min_len=900, load_content=False))
    with pytest.raises(FileNotFoundError, match="data_shards.build"):
        make_train_loader(Path("/nonexistent/shards"), LoaderConfig())
