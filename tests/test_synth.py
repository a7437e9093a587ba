"""`python -m transrec.data_shards.synth`: synthetic shards in the normal format, declared synthetic, with skewed
popularity."""

from __future__ import annotations

import json

import numpy as np

from transrec.data_shards.shard_io import ItemStore, read_sequences
from transrec.data_shards.synth import main


def test_synthetic_shards(tmp_path, tiny_bert_dir):
    out = tmp_path / "synth"
    manifest = main(["--users", "300", "--items", "200", "--mean-length", "12", "--images", "5", "--seed", "3",
                     "--out", str(out), "--tokenizer", str(tiny_bert_dir)])
    assert json.loads((out / "manifest.json").read_text()) == manifest
    prov = manifest["provenance"]
    assert prov["kind"] == "synthetic" and (prov["users"], prov["items"], prov["seed"]) == (300, 200, 3)
    assert (manifest["num_users"], manifest["num_items"]) == (300, 200)
    assert manifest["num_interactions"] == prov["interactions_drawn"]
    assert sum(manifest["validation"].values()) == 0  # clean input: no findings
    assert not (tmp_path / "synth.raw").exists()  # the raw tables are removed unless --keep-raw
    seqs = read_sequences(out)
    lengths = np.array([len(s["items"]) for s in seqs])
    assert lengths.min() >= 3 and 9 < lengths.mean() < 15  # mean 12
    counts = np.bincount(np.concatenate([s["items"] for s in seqs]), minlength=200)
    assert counts.max() > 10 * np.median(counts)  # Zipf: a few items take a large share
    store = ItemStore(out)
    first_image = int(np.flatnonzero(store.modality == 1)[0])
    assert set(np.unique(store.modality)) == {0, 1} and bytes(store.payload(first_image, "image")[:2]) == b"\xff\xd8"
    again = main(["--users", "300", "--items", "200", "--mean-length", "12", "--images", "5", "--seed", "3",
                  "--out", str(tmp_path / "again"), "--tokenizer", str(tiny_bert_dir)])
    assert again["statistics"] == manifest["statistics"]  # seeded: the same data
