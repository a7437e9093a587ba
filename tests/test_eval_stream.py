"""Streamed evaluation (what the trainer does): each rank reads its own evaluated users from the shards in batches,
and the ranks it gathers equal those of the users held in memory; one streaming pass gives the counts popularity
and the samplers need."""

import numpy as np
import pytest
import torch

from transrec.data_shards.shard_io import load_manifest, read_sequences
from transrec.trainer.evaluation import ranking as ev


@pytest.fixture(scope="module")
def hm_many_shards(build_in_shards):
    """The bundled H&M fixture (200 customers, user side features) in 5 sequence shards of 45 users."""
    return build_in_shards("hm-fashion", 45)


def _stream(shards, split, summary, rank=0, world=1, features=()):
    return ev.EvalStream(shards, split, 6, summary.users[split], summary.targets[split], features, rank, world)


@pytest.mark.parametrize("split", ["valid", "test"])
def test_summary_equals_the_counts_and_users_of_the_whole_table(hm_shards, split):
    sequences = read_sequences(hm_shards)
    summary = ev.SplitSummary.read(hm_shards)
    num_items = load_manifest(hm_shards)["num_items"]
    for name in ("train", split):  # the rule written out: training portions, plus the validation item for "test"
        plain = np.zeros(num_items)
        for s in sequences:
            for item in s["items"][: s["num_train"] + (name == "test" and s["evaluated"])]:
                plain[item] += 1
        assert np.array_equal(summary.counts[name], plain)
        assert np.array_equal(ev.interaction_counts(sequences, num_items, name), plain)
    held = ev.eval_users(sequences, split, 6)
    assert np.array_equal(summary.users[split], held.users) and np.array_equal(summary.targets[split], held.targets)
    assert summary.counts["test"].sum() == summary.counts["train"].sum() + len(held.users)


@pytest.mark.parametrize("world", [2, 5, 6])
def test_ranks_summaries_merge_into_the_whole(hm_many_shards, world):
    """Each rank summarises only the users it owns (its own shards with 5 shards for 2 or 5 ranks; user % world
    with 6): merged, they equal one rank's summary of everything, and no user is in two ranks' parts."""
    whole = ev.SplitSummary.read(hm_many_shards)
    parts = [ev.SplitSummary.read(hm_many_shards, rank, world) for rank in range(world)]
    sizes = [len(p.users["test"]) for p in parts]
    assert sum(sizes) == len(whole.users["test"]) and min(sizes) > 0
    merged = ev.SplitSummary.merge(parts)
    for split in ("valid", "test"):
        assert np.array_equal(merged.users[split], whole.users[split])
        assert np.array_equal(merged.targets[split], whole.targets[split])
    for name, counts in whole.counts.items():
        assert np.array_equal(merged.counts[name], counts)
        assert not np.array_equal(parts[0].counts[name], counts)  # a part alone is not the whole
    # counts added up elsewhere (the trainer's all-reduce) are taken as given
    given = ev.SplitSummary.merge([ev.SplitSummary({}, p.users, p.targets) for p in parts], counts=whole.counts)
    assert given.counts is whole.counts and np.array_equal(given.users["test"], whole.users["test"])


def test_ranks_split_over_ranks_equal_the_users_held_in_memory(hm_many_shards):
    hm_shards = hm_many_shards
    summary = ev.SplitSummary.read(hm_shards)
    features = list(load_manifest(hm_shards)["feature_vocabularies"]["user"])
    assert features, "the H&M fixture carries user side features"
    held = ev.eval_users(read_sequences(hm_shards), "test", 6, features)
    items = torch.randn(load_manifest(hm_shards)["num_items"], 8, generator=torch.Generator().manual_seed(0))

    def user_vec(hist, chunk):  # depends on the history and on the users' side features
        mask = (hist >= 0)[..., None]
        side = torch.tensor([float(chunk.features[features[0]][i].sum()) for i in range(len(chunk))])
        return (items[hist.clamp(min=0)] * mask).sum(1) + side[:, None]

    expected = ev.rank_with_vectors(user_vec, items, held, True, user_batch=7)
    assert np.array_equal(ev.rank_with_vectors(user_vec, items, _stream(hm_shards, "test", summary,
                                                                        features=features), True, 7), expected)
    # ranks: together every evaluated user exactly once; with as many shards as ranks, each opens only its own
    n_shards = len(load_manifest(hm_shards)["shards"]["sequences"])
    assert n_shards == 5
    for world in (2, n_shards, n_shards + 1):
        _check_split(hm_shards, summary, features, held, world, by_shard=n_shards >= world)
    pop = ev.popularity_ranks(summary.counts["test"], _stream(hm_shards, "test", summary), True)
    assert np.array_equal(pop, ev.popularity_ranks(summary.counts["test"], held, True))


def _check_split(shards, summary, features, held, world, by_shard):
    from transrec.data_shards import shard_io

    names = load_manifest(shards)["shards"]["sequences"]
    seen = np.zeros(len(held.users), dtype=int)
    original = shard_io.sequence_records
    for rank in range(world):
        opened = []
        shard_io.sequence_records = lambda path: (opened.append(path.name), original(path))[1]
        try:
            chunks = list(ev._local_chunks(_stream(shards, "test", summary, rank, world, features), 5))
        finally:
            shard_io.sequence_records = original
        want = [n for i, n in enumerate(names) if i % world == rank] if by_shard else names
        assert opened == want, (world, rank, opened)
        for pos, chunk in chunks:
            assert len(chunk) <= 5 and (by_shard or (chunk.users % world == rank).all())
            assert np.array_equal(held.users[pos], chunk.users) and np.array_equal(held.histories[pos], chunk.histories)
            for i, p in enumerate(pos):
                assert chunk.seen[i].tolist() == held.seen[int(p)].tolist()
                assert chunk.features[features[0]][i].tolist() == held.features[features[0]][int(p)].tolist()
            seen[pos] += 1
    assert (seen == 1).all(), world


def test_a_stream_whose_shards_changed_is_refused(hm_shards):
    summary = ev.SplitSummary.read(hm_shards)
    stale = ev.EvalStream(hm_shards, "test", 6, summary.users["test"][1:], summary.targets["test"][1:])
    with pytest.raises(ValueError, match="changed since this run read them"):
        ev.rank_with_scores(lambda hist, chunk: torch.zeros(len(hist), 3), 3, stale, True)


def test_ragged_rows_gathered_without_a_loop_equal_row_by_row():
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 50, size=rng.integers(0, 6)) for _ in range(30)]  # empty rows included
    r = ev.Ragged.from_rows(rows)
    idx = np.array([5, 0, 29, 5, 17, 3])
    for part, picked in ((r[idx], idx), (r[4:20:3], np.arange(4, 20, 3))):
        assert len(part) == len(picked)
        assert [part[k].tolist() for k in range(len(part))] == [rows[j].tolist() for j in picked]
    rows_of, values = r[idx].flat()
    assert rows_of.tolist() == [k for k, j in enumerate(idx) for _ in rows[j]]
    assert values.tolist() == [v for j in idx for v in rows[j].tolist()]
    t = torch.as_tensor([int(rows[j][0]) if len(rows[j]) else 0 for j in idx])
    as_list = ev.excluded_pairs(t, [rows[j] for j in idx], True)
    as_ragged = ev.excluded_pairs(t, r[idx], True)
    assert all(torch.equal(a, b) for a, b in zip(as_list, as_ragged))


def test_precision_is_checked_and_fp32_elsewhere_than_cuda(hm_shards):
    """eval.precision: "tf32" changes nothing off CUDA (the ranks are fp32's, exactly); anything else is refused."""
    from transrec.trainer.core.overrides import apply_overrides
    from transrec.trainer.core.presets import preset

    summary = ev.SplitSummary.read(hm_shards)
    held = ev.eval_users(read_sequences(hm_shards), "test", 6)
    items = torch.randn(load_manifest(hm_shards)["num_items"], 8, generator=torch.Generator().manual_seed(0))

    def user_vec(hist, _chunk):
        return items[hist.clamp(min=0)].sum(1)

    fp32 = ev.rank_with_vectors(user_vec, items, held, True, 16)
    assert np.array_equal(ev.rank_with_vectors(user_vec, items, held, True, 16, precision="tf32"), fp32)
    assert len(fp32) == len(summary.users["test"])
    with pytest.raises(ValueError, match="fp32 or tf32"):
        ev.rank_with_vectors(user_vec, items, held, True, 16, precision="bf16")
    with pytest.raises(ValueError, match="eval.precision"):
        apply_overrides(preset("tiny"), ["eval.precision=fp16"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 is a CUDA tensor-core format; no CUDA device here")
def test_tf32_scores_on_cuda_stay_near_fp32():
    matmul = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    before = getattr(matmul, name)
    with ev.matmul_precision("tf32", torch.device("cuda")):
        assert getattr(matmul, name) in ("tf32", True)
    assert getattr(matmul, name) == before
    g = torch.Generator().manual_seed(0)
    items = torch.randn(20000, 64, generator=g).cuda()
    n = 512
    data = ev.EvalUsers(np.arange(n), np.random.default_rng(0).integers(0, 20000, (n, 5)),
                        np.random.default_rng(1).integers(0, 20000, n), ev.Ragged.from_rows([[]] * n))

    def user_vec(hist, _chunk):
        return items[hist].mean(1)

    fp32 = ev.rank_with_vectors(user_vec, items, data, False, 128)
    tf32 = ev.rank_with_vectors(user_vec, items, data, False, 128, precision="tf32")
    assert np.abs(tf32 - fp32).max() <= 0.01 * 20000 and (tf32 == fp32).mean() > 0.2


def test_a_sample_of_users_streams_exactly_those_users_in_both_splits(hm_many_shards):
    """eval.max_users: a seeded uniform sample of the evaluated users, the same in validation and test; the stream
    yields exactly those users' records (over any split of ranks), equal to the sample held in memory."""
    shards = hm_many_shards
    summary = ev.SplitSummary.read(shards)
    n = len(summary.users["test"])
    sample = ev.UserSample(17, seed=3)
    users, targets = sample.of(summary.users["test"], summary.targets["test"])
    assert len(users) == 17 and np.all(np.diff(users) > 0) and set(users) <= set(summary.users["test"])
    assert np.array_equal(targets, summary.targets["test"][np.searchsorted(summary.users["test"], users)])
    assert np.array_equal(sample.of(summary.users["valid"], summary.targets["valid"])[0], users)  # both splits
    assert not np.array_equal(ev.UserSample(17, seed=4).of(summary.users["test"], summary.targets["test"])[0], users)
    everyone = ev.UserSample(n, seed=3).of(summary.users["test"], summary.targets["test"])
    assert everyone[0] is summary.users["test"]  # a sample as large as the split is the split
    held = ev.eval_users(read_sequences(shards), "test", 6, sample=sample)
    assert np.array_equal(held.users, users) and np.array_equal(held.targets, targets)
    for world in (1, 2, 6):
        got = []
        for rank in range(world):
            stream = ev.EvalStream(shards, "test", 6, summary.users["test"], summary.targets["test"], (), rank, world,
                                   sample)
            assert np.array_equal(stream.users, users) and len(stream) == 17
            got += [c.users for c in stream.chunks(5)]
        assert np.array_equal(np.sort(np.concatenate(got)), users), world
    assert sample.record(17, n) == {"evaluated": 17, "of": n, "sampled": True, "seed": 3}


def test_a_sample_is_read_from_the_shards_once_for_both_splits(hm_many_shards, monkeypatch):
    """The sampled users' records are read in one pass and held: both splits, evaluated again and again, open each
    shard once; a stream given another sample's held records is refused."""
    from transrec.data_shards import shard_io

    summary = ev.SplitSummary.read(hm_many_shards)
    sample = ev.UserSample(11, seed=5)
    valid = ev.EvalStream(hm_many_shards, "valid", 6, summary.users["valid"], summary.targets["valid"], (), 0, 1,
                          sample)
    test = ev.EvalStream(hm_many_shards, "test", 6, summary.users["test"], summary.targets["test"], (), 0, 1, sample,
                         held=valid.held)
    opened, original = [], shard_io.sequence_records
    monkeypatch.setattr(shard_io, "sequence_records", lambda path: (opened.append(path.name), original(path))[1])
    sequences = read_sequences(hm_many_shards)
    held = {split: ev.eval_users(sequences, split, 6, sample=sample) for split in ("valid", "test")}
    opened.clear()
    for _ in range(2):
        for split, stream in (("valid", valid), ("test", test)):
            got = list(stream.chunks(4))
            assert np.array_equal(np.concatenate([c.users for c in got]), held[split].users)
            assert np.array_equal(np.concatenate([c.targets for c in got]), held[split].targets)
            assert np.array_equal(np.concatenate([c.histories for c in got]), held[split].histories)
    assert sorted(opened) == sorted(load_manifest(hm_many_shards)["shards"]["sequences"])  # each shard once
    with pytest.raises(ValueError, match="another sample's users"):
        ev.EvalStream(hm_many_shards, "test", 6, summary.users["test"], summary.targets["test"], (), 0, 1,
                      ev.UserSample(11, seed=6), held=valid.held)
