"""`evaluate` on a new user's catalogue (issue 45): the item vectors are encoded once per export and shards, kept
verified between calls (trainer/evaluation/item_vector_cache.py), never encoded for popularity alone, with progress
lines on any stream; popularity's per-user ranks are written beside the model's."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from transrec.trainer.evaluation.export_on_catalogue import evaluate_export
from transrec.trainer.evaluation.model_ranker import ModelRanker


@pytest.fixture
def encodes(monkeypatch) -> list[int]:
    """Each ModelRanker.item_vectors() call's catalogue size, in order."""
    calls: list[int] = []
    real = ModelRanker.item_vectors

    def counted(self, *args, **kwargs):
        calls.append(self.store.num_items)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ModelRanker, "item_vectors", counted)
    return calls


def test_a_second_evaluate_reads_the_stored_vectors_and_ranks_the_same(export, catalogue, tmp_path, encodes):
    store, lines = tmp_path / "store", []
    plain = evaluate_export(export, catalogue, vector_cache="none", log=lines.append)
    assert len(encodes) == 1 and not store.exists()
    first = evaluate_export(export, catalogue, vector_cache=str(store), log=lines.append)
    [stored] = store.glob("item-vectors-*.safetensors")
    assert len(encodes) == 2
    lines.clear()
    second = evaluate_export(export, catalogue, vector_cache=str(store), log=lines.append)
    assert len(encodes) == 2  # not encoded again
    assert any(line.startswith(f"item vectors of {plain.num_items} items read from {stored}") for line in lines)
    for done in (first, second):
        assert np.array_equal(done.ranks, plain.ranks) and done.result["content"] == plain.result["content"]
    # the same store serves the other scorings of this export and shards
    mean = evaluate_export(export, catalogue, scoring="mean", vector_cache=str(store), log=lines.append)
    assert len(encodes) == 2 and mean.result["scoring"]["user"] == "mean"


def test_an_altered_or_foreign_vector_file_is_refused_and_written_again(export, catalogue, tmp_path, encodes):
    from transrec.trainer.evaluation.item_vector_cache import read_vectors, vectors_key

    store, lines = tmp_path / "store", []
    want = evaluate_export(export, catalogue, vector_cache=str(store), log=lines.append)
    [stored] = store.glob("item-vectors-*.safetensors")
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF  # one bit of the last vector
    stored.write_bytes(bytes(data))
    lines.clear()
    again = evaluate_export(export, catalogue, vector_cache=str(store), log=lines.append)
    assert len(encodes) == 2 and np.array_equal(again.ranks, want.ranks)
    [warning] = [line for line in lines if line.startswith("warning:")]
    assert warning.startswith(f"warning: ignoring the item-vector cache {stored} (") and "differs" in warning
    assert "encoding the catalogue again and replacing it" in warning
    evaluate_export(export, catalogue, vector_cache=str(store), log=lines.append)
    assert len(encodes) == 2  # the file written again is read
    # the key follows the export's and the shards' hashes; a file under another key is not read
    manifest = json.loads((catalogue / "manifest.json").read_text())
    key = vectors_key(export, manifest, "cpu", 256)
    other = {**manifest, "file_sha256": {**manifest["file_sha256"], "id_maps.json": "0" * 64}}
    assert vectors_key(export, other, "cpu", 256) != key and vectors_key(export, manifest, "cuda", 256) != key
    copy = tmp_path / "export"
    shutil.copytree(export, copy)
    hashes = json.loads((copy / "files.sha256.json").read_text())
    (copy / "files.sha256.json").write_text(json.dumps({**hashes, "model.safetensors": "1" * 64}))
    assert vectors_key(copy, manifest, "cpu", 256) != key
    refused = []
    assert read_vectors(stored, "another-key", want.num_items, refused.append) is None
    assert "stored under key" in refused[0]


def test_popularity_alone_encodes_nothing(export, catalogue, tmp_path, monkeypatch, encodes):
    from transrec.trainer.core.feature_cache import FeatureCache

    def refuse(*args, **kwargs):
        raise AssertionError("popularity encoded the catalogue")

    monkeypatch.setattr(FeatureCache, "build", refuse)
    done = evaluate_export(export, catalogue, scoring="popularity", vector_cache=str(tmp_path / "store"))
    assert encodes == [] and not (tmp_path / "store").exists()
    assert np.array_equal(done.ranks, done.popularity_ranks)


def test_progress_lines_come_whether_or_not_stderr_is_a_terminal(export, catalogue, tmp_path, capsys):
    from transrec.trainer.commands import evaluate
    from transrec.trainer.core.feature_cache import ProgressLog
    from transrec.trainer.evaluation.item_vector_cache import encode_with_progress
    from transrec.trainer.evaluation.model_ranker import ranker_from_export

    evaluate.main(["--export", str(export), "--shards", str(catalogue), "--vector-cache", str(tmp_path / "s")])
    err = capsys.readouterr().err  # captured: not a terminal
    assert "encoding the catalogue's 6 items" in err and "encoded 6 items in " in err and " items/s)" in err
    lines = []
    ProgressLog("item vectors", 10_000, lines.append, every=0).update(2_500)
    assert len(lines) == 1 and lines[0].startswith("item vectors: 2500/10000 items, ")
    assert " items/s, about " in lines[0] and lines[0].endswith(" min left")
    ranker = ranker_from_export(export, catalogue, build_cache=False)
    lines.clear()
    encode_with_progress(ranker, lines.append, every=0)
    assert "item vectors: 6/6 items, " in "\n".join(lines)  # a line per chunk at every=0


def test_popularity_ranks_are_written_beside_the_models(export, catalogue, tmp_path, capsys):
    from transrec.trainer.commands import evaluate
    from transrec.trainer.evaluation.ranking import metrics_from_ranks
    from transrec.trainer.evaluation.run_stats import read_ranks

    out = tmp_path / "x.json"
    result = evaluate.main(["--export", str(export), "--shards", str(catalogue), "--out", str(out),
                            "--vector-cache", "none"])
    users, targets, model = read_ranks(tmp_path / "x.ranks.tsv")
    pop_users, pop_targets, pop = read_ranks(tmp_path / "x.popularity.ranks.tsv")
    assert np.array_equal(users, pop_users) and np.array_equal(targets, pop_targets) and len(pop) > 0
    assert metrics_from_ranks(pop) == result["popularity"] and metrics_from_ranks(model) == result["content"]
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    helped = " ".join(capsys.readouterr().out.split())
    assert ".ranks.tsv (the export's) and .popularity.ranks.tsv (popularity's)" in helped
