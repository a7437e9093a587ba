"""SequenceTable: the compact per-rank table of every user's sequence gives exactly what the sequence shards hold
(read_sequences), over one shard or several, with side features; damaged shards are refused."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from transrec.data_shards.build import BuildOptions, build
from transrec.data_shards.sequence_table import SequenceTable
from transrec.data_shards.shard_io import read_sequences

REPO = Path(__file__).resolve().parents[1]


def assert_same(table: SequenceTable, shards: Path) -> None:
    expected = read_sequences(shards)
    assert len(table) == len(expected)
    for got, want in zip(table, expected):
        assert set(got) == set(want)
        assert got["items"].dtype == np.int64 and got["items"].tolist() == want["items"]
        assert got["timestamps"].tolist() == want["timestamps"]
        assert {k: got[k] for k in ("user", "raw_id", "num_train", "evaluated", "features")} == \
            {k: want[k] for k in ("user", "raw_id", "num_train", "evaluated", "features")}


def test_one_shard_of_movielens(ml_shards):
    table = SequenceTable(ml_shards)
    assert_same(table, ml_shards)
    assert table.nbytes() < 13 * 100_000 + 64 * len(table)  # 12 bytes an interaction, a few per user


def test_many_shards_with_side_features(tmp_path):
    out = tmp_path / "hm"
    build(BuildOptions(dataset="hm-fashion", source=REPO / "data" / "hm-fashion-fixture", out=out, max_tokens=16,
                       users_per_shard=37))
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]["sequences"]) > 3 and manifest["feature_vocabularies"]["user"]
    table = SequenceTable(out)
    assert_same(table, out)
    assert any(s["features"] for s in table)
    with pytest.raises(IndexError):
        table[len(table)]


def test_a_missing_user_is_refused(ml_shards, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(ml_shards, damaged)
    manifest = json.loads((damaged / "manifest.json").read_text())
    del manifest["file_sha256"]  # shards without hashes (older builds): the table's own check is what finds it
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    shard = damaged / json.loads((damaged / "manifest.json").read_text())["shards"]["sequences"][0]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:  # the same shard without its first user
        for m, data in members[1:]:
            tar.addfile(m, io.BytesIO(data))
    with pytest.raises(ValueError, match="1 missing.*rebuild"):
        SequenceTable(damaged)


def test_evaluation_users_from_the_table_equal_those_from_the_dicts(ml_shards):
    from transrec.trainer.evaluation.ranking import Ragged, eval_users

    for split in ("valid", "test"):
        a, b = eval_users(SequenceTable(ml_shards), split, 8), eval_users(read_sequences(ml_shards), split, 8)
        assert np.array_equal(a.users, b.users) and np.array_equal(a.histories, b.histories)
        assert np.array_equal(a.targets, b.targets) and isinstance(a.seen, Ragged) and len(a.seen) == 943
        for u in (0, 17, 942):
            s = read_sequences(ml_shards)[u]
            cut = s["num_train"] + (split == "test")
            assert a.seen[u].tolist() == sorted(set(s["items"][:cut]))
        part = a.seen[10:13]
        assert isinstance(part, Ragged) and [r.tolist() for r in part] == [a.seen[u].tolist() for u in (10, 11, 12)]
