"""The commands rank as the export's scoring says (trainer/evaluation/scoring.py): the Recommender (user vector,
popularity prior, popularity alone), the batch command, the service's /health and the standalone evaluator, with
`--scoring` and `--prior-beta` overriding the export's scoring.json, which is verified with the export's other files."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from test_serving import _histories

from transrec.data_shards.integrity import IntegrityError
from transrec.trainer.evaluation.ranking import NonFiniteScores
from transrec.trainer.evaluation.scoring import BETA_GRID, Scoring, write_scoring
from transrec.trainer.serving.recommender import Recommender


@pytest.fixture(scope="module")
def rec(export, catalogue) -> Recommender:
    return Recommender.from_export(export, catalogue, show_progress=False)


@pytest.fixture(scope="module")
def histories(rec) -> list[list[int]]:
    return [list(s["items"]) for s in rec.ranker.sequences]


def like(rec: Recommender, scoring: Scoring) -> Recommender:
    """A Recommender over `rec`'s model and item vectors, scoring as `scoring` says."""
    return Recommender(rec.ranker, rec.item_vectors, scoring)


def scored_export(export: Path, tmp_path: Path, scoring: Scoring) -> Path:
    copy = tmp_path / "export"
    shutil.copytree(export, copy)
    write_scoring(copy, scoring)
    return copy


# -- (a) the default is the model's user vector, unchanged -----------------------------------------------------------
def test_default_scoring_is_the_user_vector_dot_the_item_vector(rec, histories, export):
    assert rec.scoring == Scoring() and not (export / "scoring.json").exists()
    n = len(rec.item_ids)
    for explicit in (like(rec, Scoring()), like(rec, Scoring("model", 0.0))):
        for exclude in (True, False):
            s1, i1 = rec.top_k(histories, n - 4 if exclude else n, exclude)
            s2, i2 = explicit.top_k(histories, n - 4 if exclude else n, exclude)
            assert torch.equal(s1, s2) and torch.equal(i1, i2)
    # as before scoring existed: user . item, seen items removed, topk
    scores = rec.user_vectors(histories) @ rec.item_vectors.T
    for r, h in enumerate(histories):
        scores[r, h] = float("-inf")
    want = torch.topk(scores, 2, dim=1)
    got = rec.top_k(histories, 2, True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# -- (b) the prior ---------------------------------------------------------------------------------------------------
def test_a_huge_prior_ranks_the_most_popular_items_first(rec, histories):
    pop = rec.popularity
    assert len(set(pop.tolist())) > 1  # counts that differ: an order to check
    n = len(rec.item_ids)
    huge = like(rec, Scoring("model", 1e6))
    for h in histories:
        unseen = [i for i in range(n) if i not in h]
        _, items = huge.top_k([h], len(unseen), True)
        assert sorted(items[0].tolist()) == unseen
        assert [pop[i] for i in items[0].tolist()] == sorted((pop[i] for i in unseen), reverse=True)
        _, every = huge.top_k([h], n, False)  # the whole catalogue, seen items too
        assert [pop[i] for i in every[0].tolist()] == sorted(pop.tolist(), reverse=True)
    alone = like(rec, Scoring("none", 1.0))  # popularity alone: count ties in item order
    for h in histories:
        unseen = [i for i in range(n) if i not in h]
        scores, items = alone.top_k([h], len(unseen), True)
        assert items[0].tolist() == sorted(unseen, key=lambda i: (-pop[i], i))
        np.testing.assert_allclose(scores[0].numpy(), np.log1p(pop[items[0].numpy()]), rtol=1e-6)
    assert alone.recommend([], k=3)["items"] == rec.recommend([], k=3)["items"]  # an empty history: popularity
    assert len(alone.recommend([rec.item_ids[0]], k=3)["items"]) == 3


def test_a_prior_adds_beta_log_count_to_the_model_score(rec, histories):
    beta = 0.37
    with_prior = like(rec, Scoring("model", beta))
    n = len(rec.item_ids)
    scores, items = with_prior.top_k(histories, n, False)
    plain = rec.user_vectors(histories) @ rec.item_vectors.T + beta * torch.log1p(torch.as_tensor(rec.popularity,
                                                                                                   dtype=torch.float32))
    torch.testing.assert_close(scores, plain.gather(1, items), rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.sort(items, 1).values, torch.arange(n).expand(len(histories), -1))


# -- (c) the mean of the history's unit item vectors, by cosine ------------------------------------------------------
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_mean_scoring_is_the_cosine_to_the_mean_unit_history_vector(rec, histories, beta):
    mean = like(rec, Scoring("mean", beta))
    iv = rec.item_vectors.double()
    unit = iv / iv.norm(dim=1, keepdim=True)
    n = len(rec.item_ids)
    for h in histories:
        u = unit[h].mean(0)
        want = unit @ (u / u.norm()) + beta * torch.log1p(torch.as_tensor(rec.popularity, dtype=torch.float64))
        want[h] = float("-inf")
        scores, items = mean.top_k([h], n - len(set(h)), True)
        order = torch.argsort(want, descending=True)[: n - len(set(h))]
        assert items[0].tolist() == order.tolist()
        np.testing.assert_allclose(scores[0].numpy(), want[order].numpy(), rtol=1e-5, atol=1e-6)


def test_the_approximate_index_is_used_for_the_plain_scoring_only(rec, histories):
    class Index:
        ntotal = len(rec.item_ids)
        searched = 0

        def search(self, queries, k):
            Index.searched += 1
            return np.zeros((len(queries), k), np.float32), np.tile(np.arange(k), (len(queries), 1))

    for scoring, searched in ((Scoring("model", 0.5), 0), (Scoring("mean"), 0), (Scoring("none", 1.0), 0),
                              (Scoring(), 1)):
        r = like(rec, scoring)
        r.ann, Index.searched = Index(), 0
        r.top_k(histories[:1], 2, True)
        assert Index.searched == searched, scoring


def test_nonfinite_checks_hold_under_every_scoring(rec, histories):
    nan = rec.item_vectors.clone()
    nan[0, 0] = float("nan")
    for scoring in (Scoring("model", 0.5), Scoring("mean"), Scoring("mean", 1.0)):
        broken = Recommender(rec.ranker, nan, scoring)
        assert "1 of 6 catalogue items" in broken.unusable
        with pytest.raises(NonFiniteScores, match="1 of 6 catalogue items"):
            broken.top_k(histories[:1], 2, True)
    assert rec.popularity.max() == 2  # 3.4e38 x log(1 + 2) overflows float32: infinite scores
    overflow = like(rec, Scoring("model", 3.4e38))
    with pytest.raises(NonFiniteScores, match="NaN or infinite scores"):
        overflow.recommend([rec.item_ids[0]], k=2)
    assert overflow.nonfinite_requests == 1


# -- (d) scoring.json: read, verified, used by the batch command and the service ------------------------------------
def test_the_exports_scoring_json_is_verified_and_used(rec, export, catalogue, tmp_path, capsys):
    from transrec.trainer.commands.recommend import main as batch_main
    from transrec.trainer.commands.serve import parse_args
    from transrec.trainer.serving.app import open_service

    scoring = Scoring("mean", 0.7)
    copy = scored_export(export, tmp_path, scoring)
    loaded = Recommender.from_export(copy, catalogue, show_progress=False)
    assert loaded.scoring == scoring
    assert Recommender.from_export(copy, catalogue, show_progress=False, scoring=Scoring()).scoring == Scoring()
    histories = _histories(catalogue)
    expected = like(rec, scoring)
    runs = {"export": (scoring, []), "model": (Scoring(), ["--scoring", "model"]),
            "no prior": (Scoring("mean"), ["--prior-beta", "0"]),
            "popularity": (Scoring("none", 1.0), ["--scoring", "popularity"])}
    for name, (want, options) in runs.items():
        out = tmp_path / f"{name}.jsonl"
        assert batch_main(["--export", str(copy), "--shards", str(catalogue), "--k", "2", "--out", str(out),
                           *options]) == 4
        assert f"(scoring: {want.label})" in capsys.readouterr().err
        expected = like(rec, want)
        for line in map(json.loads, out.read_text().splitlines()):
            api = expected.recommend(histories[line["user"]], k=2)
            assert line["items"] == api["items"], name
            np.testing.assert_allclose(line["scores"], api["scores"], rtol=1e-5, atol=1e-6)
    # the service: /health says how it scores
    for options, want in (([], scoring), (["--scoring", "model", "--prior-beta", "2"], Scoring("model", 2.0))):
        svc = open_service(parse_args(["--export", str(copy), "--shards", str(catalogue), *options]),
                           show_progress=False)
        try:
            body = TestClient(svc.app).get("/health").json()
            assert svc.rec.scoring == want and body["scoring"] == want.label and body["search"] == "exact"
            assert any(want.label in line for line in svc.lines)
        finally:
            svc.close()
    # altered after it was written: the export's hashes name it
    (copy / "scoring.json").write_text(json.dumps({"user": "model", "prior_beta": 0.0}))
    with pytest.raises(IntegrityError, match="scoring.json differs"):
        Recommender.from_export(copy, catalogue, show_progress=False)
    with pytest.raises(SystemExit, match=r"^error: .*scoring.json differs"):
        batch_main(["--export", str(copy), "--shards", str(catalogue), "--out", str(tmp_path / "x.jsonl")])
    with pytest.raises(SystemExit, match=r"^error: .*scoring.json differs"):
        open_service(parse_args(["--export", str(copy), "--shards", str(catalogue)]), show_progress=False)


def test_health_of_an_export_without_scoring_json(export, catalogue):
    from transrec.trainer.commands.serve import parse_args
    from transrec.trainer.serving.app import open_service

    svc = open_service(parse_args(["--export", str(export), "--shards", str(catalogue)]), show_progress=False)
    try:
        body = TestClient(svc.app).get("/health").json()
    finally:
        svc.close()
    assert body["scoring"] == Scoring().label == "the model's user vector"


# -- (e) the evaluator -----------------------------------------------------------------------------------------------
def test_evaluator_chooses_the_prior_on_validation_and_scores_popularity_exactly(export, catalogue, tmp_path,
                                                                                capsys):
    from transrec.trainer.commands.evaluate import main as evaluate_main

    plain = evaluate_main(["--export", str(export), "--shards", str(catalogue)])
    assert plain["scoring"] == {"user": "model", "prior_beta": 0.0, "label": Scoring().label}
    out = tmp_path / "auto.json"
    auto = evaluate_main(["--export", str(export), "--shards", str(catalogue), "--prior-beta", "auto", "--out",
                          str(out)])
    printed = capsys.readouterr().out
    table = auto["prior_choice"]
    assert [row["g"] for row in table] == list(BETA_GRID)
    best = max(row["ndcg@10"] for row in table)
    chosen = next(row for row in table if row["ndcg@10"] == best)  # the first on a tie
    assert auto["scoring"]["user"] == "model" and auto["scoring"]["prior_beta"] == chosen["beta"]
    assert f"prior chosen on valid: beta {chosen['beta']:.4g}" in printed and f"{best:.4f}" in printed
    assert json.loads(out.read_text())["scoring"]["prior_beta"] == chosen["beta"]
    assert "test: " in printed.splitlines()[-1] and set(auto) >= {"content", "popularity", "vs_popularity"}
    if chosen["beta"] == 0:
        assert auto["content"] == plain["content"]
    popularity = evaluate_main(["--export", str(export), "--shards", str(catalogue), "--scoring", "popularity"])
    assert popularity["content"] == popularity["popularity"] == plain["popularity"]
    assert popularity["vs_popularity"]["ndcg@10"]["diff"] == 0
    mean = evaluate_main(["--export", str(export), "--shards", str(catalogue), "--scoring", "mean", "--split",
                          "valid", "--prior-beta", "0.25"])
    assert mean["scoring"]["user"] == "mean" and mean["scoring"]["prior_beta"] == 0.25
    assert mean["content"]["users"] == mean["popularity"]["users"] > 0
    # an export whose scoring.json says mean: evaluated so unless told otherwise
    copy = scored_export(export, tmp_path, Scoring("mean", 0.25))
    assert evaluate_main(["--export", str(copy), "--shards", str(catalogue), "--split", "valid"])["content"] \
        == mean["content"]


# -- (f) items added later have no interactions ----------------------------------------------------------------------
def test_an_item_added_later_scores_with_a_zero_count(export, catalogue):
    beta = 0.5
    rec = Recommender.from_export(export, catalogue, show_progress=False, scoring=Scoring("model", beta))
    history = [rec.item_ids[0], rec.item_ids[1]]
    rec.recommend(history, k=2)  # the item side made (and kept) before the item is added
    assert rec.add_item("new-item", text="A red leather shoe") == "text"
    assert rec.popularity[-1] == 0 and len(rec.popularity) == len(rec.item_vectors) == 7
    n = len(rec.item_ids)
    got = rec.recommend(history, k=n, exclude_seen=False)
    assert "new-item" in got["items"] and len(got["items"]) == n
    users = rec.user_vectors([[0, 1]])[0]
    for raw, score in zip(got["items"], got["scores"]):
        i = rec.index[raw]
        want = float(users @ rec.item_vectors[i]) + beta * math.log1p(rec.popularity[i])
        assert score == pytest.approx(want, rel=1e-5, abs=1e-5), raw
    rec.scoring = Scoring("none", 1.0)  # popularity alone: the new item (count 0, the last index) comes last
    assert rec.recommend(history, k=n, exclude_seen=False)["items"][-1] == "new-item"


# -- (g) bad options are usage errors -------------------------------------------------------------------------------
@pytest.mark.parametrize("options, says", [
    (["--prior-beta", "-1"], "--prior-beta: must be a number >= 0"),
    (["--prior-beta", "nan"], "--prior-beta: must be a number >= 0"),
    (["--prior-beta", "lots"], "--prior-beta: must be a number >= 0"),
    (["--prior-beta", "1e39"], "--prior-beta: must be a number >= 0"),
    (["--scoring", "bogus"], "argument --scoring: invalid choice: 'bogus'"),
    (["--scoring", "popularity", "--prior-beta", "0"], "ranks by the prior alone"),
])
@pytest.mark.parametrize("command", ["recommend", "serve", "evaluate"])
def test_bad_scoring_options_are_usage_errors(command, options, says, capsys, tmp_path):
    from transrec.trainer.commands import evaluate, recommend, serve

    run = {"recommend": recommend.main, "serve": serve.parse_args, "evaluate": evaluate.main}[command]
    with pytest.raises(SystemExit) as e:
        run(["--export", str(tmp_path), "--shards", str(tmp_path), *options])
    assert e.value.code == 2
    assert says in capsys.readouterr().err


def test_auto_is_for_the_evaluator_only(capsys, tmp_path):
    from transrec.trainer.commands import evaluate, recommend

    for run in (recommend.main, evaluate.main):
        with pytest.raises(SystemExit) as e:
            run(["--export", str(tmp_path), "--shards", str(tmp_path), "--prior-beta", "auto", "--scoring",
                 "popularity"])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "must be a number >= 0 (the popularity prior" in err and "not with --scoring popularity" in err
