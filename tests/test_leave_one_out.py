"""The leave-one-catalogue-out study's bookkeeping: which catalogues may make a target's source, the nested smaller
sources, trained rows paired with the study's users, and the source-size curve's figures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from transrec.trainer.evaluation import ranking as ev
from transrec.trainer.experiments.leave_one_out import nested_sources, source_names, source_tag
from transrec.trainer.experiments.leave_one_out_curve import source_size_curves
from transrec.trainer.experiments.leave_one_out_report import AUTO_ROW, verdict_table
from transrec.trainer.experiments.leave_one_out_trained import check_same_popularity, ranks_in_order, trained_rows


def test_a_source_never_holds_the_target_or_a_catalogue_sharing_its_users():
    assert source_names("ml-new") == ["ml-old", "ml1m", "office", "hm-a", "hm-b"]
    assert source_names("hm-b") == ["ml100k", "ml1m", "office", "hm-a"]  # ml100k whole, never its halves
    assert source_names("ml100k") == ["ml1m", "office", "hm-a", "hm-b"]
    assert source_names("ml-new", ["ml1m", "ml-old"]) == ["ml-old", "ml1m"]  # in the catalogues' order
    for target, bad in (("ml-new", ["ml100k"]), ("ml-new", ["ml-new"]), ("hm-b", ["ml-old"]), ("ml-old", [])):
        with pytest.raises(ValueError, match="cannot make"):
            source_names(target, bad)


def test_nested_sources_are_prefixes_then_every_other_catalogue():
    assert nested_sources("ml-old, ml1m") == [["ml-old"], ["ml-old", "ml1m"], None]
    assert nested_sources("") == [None]
    assert source_tag(None) == "" and source_tag(["ml-old", "ml1m"]) == "-from-ml-old+ml1m"


def write_ranks(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("user\ttarget_item\trank\n" + "".join(f"{u}\t{t}\t{r}\n" for u, t, r in rows))


def test_trained_ranks_follow_the_study_users_order_and_refuse_another_split(tmp_path):
    write_ranks(tmp_path / "r.tsv", [(2, 20, 5), (0, 10, 1), (1, 11, 30)])
    assert ranks_in_order(tmp_path / "r.tsv", [0, 1, 2], [10, 11, 20]) == [1, 30, 5]
    with pytest.raises(ValueError, match="test targets differ"):
        ranks_in_order(tmp_path / "r.tsv", [0, 1, 2], [10, 12, 20])
    with pytest.raises(ValueError, match="not the same test split"):
        ranks_in_order(tmp_path / "r.tsv", [0, 1, 2, 3], [10, 11, 20, 30])


def test_trained_rows_read_each_candidate_and_the_choice(tmp_path):
    users, targets = [0, 1], [10, 11]
    ranks = {"scratch": (3, 40), "finetune": (1, 2), "towers": (7, 8), "popularity": (9, 9), "prior": (4, 4)}
    for cand, (a, b) in ranks.items():
        d = tmp_path / "candidates" / cand
        write_ranks(d / "test_ranks.tsv", [(1, 11, b), (0, 10, a)])
        (d / "metrics.json").write_text(json.dumps({"valid": {"ndcg@10": a / 100}, "test": {"ndcg@10": b / 100}}))
    (tmp_path / "metrics.json").write_text(json.dumps({"transfer": {"selected": "prior"}}))
    rows = trained_rows(tmp_path, users, targets)
    assert rows["scratch"]["test_ranks"] == [3, 40] and rows["fine-tuned"]["test_ranks"] == [1, 2]
    assert rows["towers + new user encoder"]["valid"] == {"ndcg@10": 0.07}
    assert rows[AUTO_ROW]["chose"] == "prior" and rows[AUTO_ROW]["test_ranks"] == [4, 4]
    with pytest.raises(ValueError, match="popularity ranks differ"):
        check_same_popularity(dict(rows), [9, 8], tmp_path)
    check_same_popularity(rows, [9, 9], tmp_path)
    assert "popularity (check)" not in rows


def result(source_set, n, seed, ranks):
    rows = {row: {"test_ranks": r} for row, r in ranks.items()}
    return {"target": "t", "user_state": "encoder", "seed": seed, "source_set": source_set,
            "source_interactions": n, "rows": rows, "source_run": f"s-{source_set}-{seed}",
            "source_valid": {"a": {"ndcg@10": 0.1 * (seed + 1)}, "b": {"ndcg@10": 0.3}},
            "source_valid_popularity": {"a": {"ndcg@10": 0.05}, "b": {"ndcg@10": 0.05}}}


def test_the_source_size_curve_gives_each_sources_mean_over_seeds(tmp_path):
    rng = np.random.default_rng(0)
    rows = ("popularity", "zero-shot", "zero-shot + prior", "content baseline", "content baseline + prior",
            "zero-shot + recent prior", "recent popularity")
    results = [result(s, n, seed, {row: rng.integers(1, 30, 50).tolist() for row in rows})
               for s, n in (("all", 5000), ("a", 100)) for seed in (0, 1)]
    got = source_size_curves(results, tmp_path)
    assert [d["source"] for d in got["data"]] == ["a", "all"]  # by the source's interactions
    small = [r for r in results if r["source_set"] == "a"]
    want = np.mean([ev.per_user_gain(np.asarray(r["rows"]["zero-shot"]["test_ranks"]), "ndcg@10") for r in small])
    assert got["data"][0]["test_ndcg@10"]["zero-shot"] == pytest.approx(want)
    assert got["data"][0]["seeds"] == [0, 1]
    assert got["data"][0]["source_valid_ndcg@10"] == pytest.approx((0.2 + 0.25) / 2)  # catalogues, then seeds
    assert (tmp_path / "leave_one_out_source_size.png").stat().st_size > 1000
    assert source_size_curves([r for r in results if r["source_set"] == "all"], tmp_path)["lines"] == []


def test_the_verdict_table_uses_the_pooled_seeds_when_there_are_several():
    iv = {"diff": 0.01, "low": 0.002, "high": 0.02, "excludes_zero": True}
    one = {"diff": -0.01, "low": -0.02, "high": 0.001, "excludes_zero": False}
    keys = ("zero-shot + prior - popularity", "zero-shot + prior - content baseline + prior",
            "zero-shot + recent prior - popularity", "zero-shot + recent prior - content baseline + recent prior")
    pooled = {"seeds": [0, 1, 2], "intervals": {k: {"ndcg@10": iv} for k in keys}}
    sm = [{"target": "a", "sources": [{"user_state": "encoder", "seed": 0, "intervals": {k: {"ndcg@10": one}
                                                                                          for k in keys}}],
           "over_seeds": {"encoder": pooled}},
          {"target": "b", "sources": [{"user_state": "encoder", "seed": 4, "intervals": {k: {"ndcg@10": one}
                                                                                          for k in keys}}]}]
    lines = verdict_table(sm)
    a, b = (next(x for x in lines if x.startswith(f"| {t} |")) for t in "ab")
    assert a.count("+0.0100 [+0.0020, +0.0200] win") == 4 and "| 0, 1, 2 |" in a
    assert b.count("-0.0100 [-0.0200, +0.0010] no clear difference") == 4 and "| 4 |" in b
