"""`python -m transrec.data_shards.split_disjoint` (two H&M domains with no shared customer or article) and the runner's
half-B targets, transferred from half A."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from transrec.data_shards.split_disjoint import half_of, main, split_disjoint

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "data" / "hm-fashion-fixture"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    out = tmp_path_factory.mktemp("split") / "hm-split"
    return out, split_disjoint(FIXTURE, out, seed=0)


def test_halves_share_no_customer_or_article_and_count_every_purchase(split):
    out, report = split
    source = _rows(FIXTURE / "transactions.csv")
    a, b = _rows(out / "a" / "transactions.csv"), _rows(out / "b" / "transactions.csv")
    assert {r["customer_id"] for r in a}.isdisjoint({r["customer_id"] for r in b})
    assert {r["article_id"] for r in a}.isdisjoint({r["article_id"] for r in b})
    # A keeps every purchase of its customers, verbatim and in order
    assert a == [r for r in source if half_of(r["customer_id"], 0, 0.5) == "a"]
    b_all = [r for r in source if half_of(r["customer_id"], 0, 0.5) == "b"]
    bought_by_a = {r["article_id"] for r in a}
    assert b == [r for r in b_all if r["article_id"] not in bought_by_a]
    dropped = len(b_all) - len(b)
    assert dropped > 0 and report["b_purchases_dropped_article_bought_by_a"] == dropped
    assert len(a) + len(b) + dropped == len(source) == report["purchases_in_source"]
    assert report["b_customers_with_every_purchase_dropped"] == \
        len({r["customer_id"] for r in b_all}) - len({r["customer_id"] for r in b})
    product = {r["article_id"]: r["product_code"] for r in _rows(FIXTURE / "articles.csv")}
    products_a = {product[x] for x in bought_by_a}
    assert report["b_purchases_kept_whose_product_a_bought"] == sum(product[r["article_id"]] in products_a for r in b)
    for half, rows in (("a", a), ("b", b)):
        articles = _rows(out / half / "articles.csv")
        customers = _rows(out / half / "customers.csv")
        assert sorted(r["article_id"] for r in articles) == sorted({r["article_id"] for r in rows})
        assert {r["customer_id"] for r in customers} == {r["customer_id"] for r in rows}
        assert report["halves"][half] == {"customers": len(customers), "articles": len(articles),
                                          "purchases": len(rows)}
        assert (out / half / "images").resolve() == (FIXTURE / "images").resolve()
    assert json.loads((out / "split_report.json").read_text()) == report


def test_split_is_seeded_and_rejects_bad_input(split, tmp_path):
    out, report = split
    again = split_disjoint(FIXTURE, tmp_path / "again", seed=0)
    assert again == report
    assert (tmp_path / "again" / "b" / "transactions.csv").read_bytes() == (out / "b" / "transactions.csv").read_bytes()
    other = split_disjoint(FIXTURE, tmp_path / "other", seed=1)
    assert other["halves"]["a"] != report["halves"]["a"]
    with pytest.raises(SystemExit, match="strictly between 0 and 1"):
        main(["--source", str(FIXTURE), "--out", str(tmp_path / "x"), "--fraction-a", "1"])
    with pytest.raises(SystemExit, match="lacks transactions.csv"):
        main(["--source", str(tmp_path), "--out", str(tmp_path / "y")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_runner_transfers_half_b_from_half_a(tmp_path):
    """--targets hm-b-*: the split is cut once under OUT/raw/, each half built into its own shards, and every transfer
    row of half B starts from the half-A source run; image-only ID rows reuse half B mixed."""
    from transrec.trainer.experiments.runner import RunSpec, Suite, parse_args, table_plan

    data = REPO / "data"
    argv = ["table4", "--quick", "--out", str(tmp_path), "--movielens", str(data / "movielens-100k-mm"),
            "--hm", str(FIXTURE), "--targets", "hm-b-mixed,hm-b-image", "--seeds", "1"]
    suite = Suite(parse_args(argv))
    plan = table_plan(suite, "table4")
    specs = {s for r in plan.rows for s in r.specs}
    assert {s.domain for s in specs} == {"hm-b-mixed", "hm-b-image"}
    assert {s.domain for s in specs if s.model.startswith("id")} == {"hm-b-mixed"}
    assert suite.source_spec(RunSpec("hm-b-image", "transfer")) == RunSpec("hm-a-mixed", "scratch")
    manifests = {d: suite.manifest(d) for d in ("hm-a-mixed", "hm-b-mixed", "hm-b-image")}  # builds the shards
    [split_dir] = (tmp_path / "raw").iterdir()
    report = json.loads((split_dir / "split_report.json").read_text())
    for domain, half in (("hm-a-mixed", "a"), ("hm-b-mixed", "b"), ("hm-b-image", "b")):
        m = manifests[domain]
        assert m["num_users"] == report["halves"][half]["customers"]
        assert m["num_items"] == report["halves"][half]["articles"]
    assert suite.shards("hm-b-mixed") != suite.shards("hm-mixed")
    assert suite.key(RunSpec("hm-b-mixed", "scratch")) != suite.key(RunSpec("hm-mixed", "scratch"))
    # half B image only from an image-only half A: hm-b-image's shards and scratch runs, its own source and transfers
    other, image = "hm-b-image-from-a-image", "hm-b-image"
    assert suite.source_spec(RunSpec(other, "transfer")) == RunSpec("hm-a-image", "scratch")
    assert suite.shards(other) == suite.shards(image)
    assert suite.key(RunSpec(other, "scratch")) == suite.key(RunSpec(image, "scratch"))
    assert suite.key(RunSpec(other, "transfer")) != suite.key(RunSpec(image, "transfer"))
    assert suite.manifest("hm-a-image")["num_users"] == report["halves"]["a"]["customers"]
    # and half B text + side features from a text-only half A
    text_other, text = "hm-b-text-side-from-a-text", "hm-b-text-side"
    assert suite.source_spec(RunSpec(text_other, "transfer")) == RunSpec("hm-a-text", "scratch")
    assert suite.key(RunSpec(text_other, "scratch")) == suite.key(RunSpec(text, "scratch"))
    assert suite.key(RunSpec(text_other, "transfer")) != suite.key(RunSpec(text, "transfer"))
    with pytest.raises(SystemExit, match="unknown"):
        Suite(parse_args([*argv[:-3], "hm-c-mixed"]))

    # table 6 on a split target: half B's training users sampled, every row transferring from the half-A source
    scaling = Suite(parse_args(["table6", *argv[1:-4], "--scaling-target", "hm-b-mixed", "--seeds", "1"]))
    specs = {s for r in table_plan(scaling, "table6").rows for s in r.specs}
    assert {(s.domain, s.fraction) for s in specs} == {("hm-b-mixed", f) for f in (0.2, 0.6, 1.0)}
    assert {scaling.source_spec(s) for s in specs if s.model == "transfer"} == {RunSpec("hm-a-mixed", "scratch")}
