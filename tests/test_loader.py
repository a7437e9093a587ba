"""The training loader: exact split over ranks and workers, resume, batch-unique items, corrupt images."""

from __future__ import annotations

import collections
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import content_options, image_content

from transrec.data_shards.batch import load_item_content
from transrec.data_shards.decode import CorruptImageError, ImageDecoder
from transrec.data_shards.loader import LoaderConfig, make_train_loader, window_ends
from transrec.data_shards.shard_io import ItemStore, read_sequences


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
    cfg = LoaderConfig(window=9, batch_size=16, num_negatives=12, content=image_content())
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
    text = c.inputs["text"]
    for k, r in enumerate(c.rows["text"].tolist()):  # content rows equal a per-item load
        item = int(batch.unique_items[r])
        tok = np.frombuffer(store.payload(item, "text"), dtype="<i4")[:16]
        assert text["token_ids"][k, : len(tok)].tolist() == tok.tolist()
        assert int(text["token_mask"][k].sum()) == len(tok)
    first_images = batch.unique_items[c.rows["image"][:3]].numpy()
    single = load_item_content(store, first_images, content_options(16, ImageDecoder("pil", 32)))
    torch.testing.assert_close(c.inputs["image"]["pixels"][:3], single.inputs["image"]["pixels"])
    assert set(store.modality[batch.unique_items.numpy()]) == {0, 1}


def test_corrupt_jpeg_inside_a_shard_names_the_item(ml_shards, tmp_path):
    bad = tmp_path / "shards"
    shutil.copytree(ml_shards, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    del manifest["file_sha256"]  # shards without hashes (older builds): the decoder's check is what finds it
    (bad / "manifest.json").write_text(json.dumps(manifest))
    store = ItemStore(bad)
    image_items = np.flatnonzero((store.modality == 1) & (store.index["image_size"] > 0))
    victim = int(image_items[0])
    rec = store.index[victim]
    shard = bad / store.manifest["shards"]["items"][int(rec["shard"])]
    with open(shard, "r+b") as f:  # overwrite the JPEG's bytes in place: the tar stays valid
        f.seek(int(rec["image_offset"]) + 200)
        f.write(b"\x00" * (int(rec["image_size"]) - 200))
    with tarfile.open(shard) as tar:  # still a readable WebDataset shard
        assert any(m.name.endswith(".jpg") for m in tar)
    with pytest.raises(CorruptImageError, match=str(victim)):
        load_item_content(ItemStore(bad), np.array([victim]), content_options(16, ImageDecoder("pil", 32)))


def test_short_histories_and_bad_config_are_clear(ml_shards):
    with pytest.raises(ValueError, match="min_len"):
        LoaderConfig(window=5, min_len=6)
    with pytest.raises(ValueError, match="no training windows"):
        make_train_loader(ml_shards, LoaderConfig(window=900, min_len=900, load_content=False))
    with pytest.raises(FileNotFoundError, match="data_shards.build"):
        make_train_loader(Path("/nonexistent/shards"), LoaderConfig())


@pytest.fixture(scope="module")
def ml_many_shards(build_in_shards):
    """The bundled MovieLens in 10 sequence shards of 100 users (enough for the per-rank shard split)."""
    return build_in_shards("movielens-100k-mm", 100)


def test_shard_split_reads_only_own_shards_and_sees_every_window_once(ml_many_shards, monkeypatch):
    """split="shards" over 2 ranks x 2 workers: disjoint shard sets covering all, each rank streams only its own,
    every window exactly once, equal steps, batches full (zero-weight padding), features from the stream."""
    import transrec.data_shards.loader as loader_mod

    opened: dict[int, set] = collections.defaultdict(set)
    real_list = loader_mod.wds.SimpleShardList
    cfg = LoaderConfig(window=9, batch_size=64, stride=7, num_workers=0, load_content=False, shuffle_buffer=500)
    seen: collections.Counter = collections.Counter()
    steps, owned = [], []
    for rank in range(2):
        monkeypatch.setattr(loader_mod.wds, "SimpleShardList",
                            lambda urls, _r=rank: opened[_r].update(urls) or real_list(urls))
        loader = make_train_loader(ml_many_shards, cfg, rank=rank, world_size=2)
        assert loader.stream.split == "shards"  # auto: 10 shards >= 4 per rank
        loader.set_epoch(2)
        batches = list(loader)
        steps.append(len(batches))
        assert len(batches) == loader.steps_per_epoch and all(len(b.users) == 64 for b in batches)
        seen.update(_ids(batches))
        owned.append(set(loader.stream.own_urls))
    sequences = read_sequences(ml_many_shards)
    expected = {(s["user"], e) for s in sequences for e in window_ends(s["num_train"], cfg)}
    assert steps[0] == steps[1]
    assert set(seen) == expected and set(seen.values()) == {1}
    assert not owned[0] & owned[1] and len(owned[0] | owned[1]) == 10
    assert opened[0] == owned[0] and opened[1] == owned[1]  # a rank never opens the other's shards
    # Shares are balanced by window count: they differ by at most one shard's windows.
    per_shard = make_train_loader(ml_many_shards, cfg).stream._windows_per_shard(
        [Path(u).name for u in sorted(owned[0] | owned[1])])
    share = [sum(per_shard[Path(u).name] for u in o) for o in owned]
    assert abs(share[0] - share[1]) <= max(per_shard.values())


def test_window_counts_from_the_manifest_equal_a_scan_and_one_rank_keeps_its_order(ml_many_shards):
    import json

    cfg = LoaderConfig(window=9, batch_size=32, stride=5, load_content=False)
    stream = make_train_loader(ml_many_shards, cfg).stream
    names = list(stream.manifest["shards"]["sequences"])
    from_manifest = stream._windows_per_shard(names)
    stream.manifest = {k: v for k, v in stream.manifest.items() if k != "sequence_shard_train_lengths"}
    assert stream._windows_per_shard(names) == from_manifest  # older builds: one scan, same counts
    assert sum(from_manifest.values()) == sum(len(window_ends(s["num_train"], cfg))
                                              for s in read_sequences(ml_many_shards))
    manifest = json.loads((ml_many_shards / "manifest.json").read_text())
    assert set(manifest["sequence_shard_train_lengths"]) == set(names)

    def order(split):
        loader = make_train_loader(ml_many_shards, LoaderConfig(window=9, batch_size=32, stride=5, split=split,
                                                                 load_content=False))
        loader.set_epoch(1)
        return [(b.users.tolist(), b.ends.tolist()) for b in loader]

    assert order("shards") == order("samples")  # one rank: the same order either way
    with pytest.raises(ValueError, match="split"):
        LoaderConfig(split="users")


def test_a_loader_stopped_early_stops_its_thread_and_workers(ml_shards):
    import threading
    import time

    for workers in (0, 2):
        before = {t.ident for t in threading.enumerate()}
        loader = make_train_loader(ml_shards, LoaderConfig(window=9, batch_size=16, num_workers=workers,
                                                           load_content=False))
        it = iter(loader)
        next(it), next(it)
        it.close()  # what a `break` out of a for loop does once the iterator is dropped
        deadline = time.time() + 10  # worker queues' feeder threads end once flushed, within moments
        while True:
            left = [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()]
            if not left or time.time() > deadline:
                break
            time.sleep(0.1)
        assert not left, f"threads left running after the loader stopped: {left}"
        assert not torch.multiprocessing.active_children()


def test_a_process_that_stops_a_loader_early_exits_cleanly(ml_shards, tmp_path):
    """At interpreter shutdown no prefetch thread may still be inside torch (it aborted with exit 134)."""
    import subprocess
    import sys

    script = tmp_path / "early.py"
    script.write_text(
        "from transrec.data_shards.loader import LoaderConfig, make_train_loader\n"
        "from transrec.data_shards.modalities import ContentSettings, ImageSettings\n"
        f"loader = make_train_loader({str(ml_shards)!r}, LoaderConfig(window=9, batch_size=16, load_content=True,"
        " content=ContentSettings({'image': ImageSettings(size=32, backend='pil')})))\n"
        "for k, batch in enumerate(loader):\n"
        "    if k == 1:\n"
        "        break\n")
    for _ in range(3):
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
