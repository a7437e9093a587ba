"""The experiments runner on the bundled data (--quick), the ID baselines' sequence encoders, and the statistics.

One module-scoped quick run of table4 and table7 on the H&M fixture target (source: the bundled MovieLens) is
shared by the runner tests: report, CSV and PNG; transfer wiring; frozen towers; the ID baselines; the cache.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from transrec.trainer.core.id_encoders import GRUEncoder, NextItNetEncoder
from transrec.trainer.experiments.report import claim_lines, cold_mask, compare, seed_metrics

REPO = Path(__file__).resolve().parent.parent
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
ENCODERS = [GRUEncoder, NextItNetEncoder]


# -- the baselines' encoders ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ENCODERS)
@pytest.mark.parametrize("layers", [1, 2])
def test_encoder_is_causal(cls, layers):
    torch.manual_seed(0)
    enc = cls(16, layers, dropout=0.1).eval()
    x = torch.randn(3, 9, 16)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, :4] = False
    mask[2, :7] = False
    h = enc(x, mask)
    assert h.shape == (3, 9, 16)
    for t in range(8):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :])  # change every future item
        h2 = enc(x2, mask)
        torch.testing.assert_close(h2[:, : t + 1], h[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(h2[:, -1], h[:, -1])  # the change is visible where it may be


@pytest.mark.parametrize("cls", ENCODERS)
def test_encoder_ignores_left_padding(cls):
    torch.manual_seed(0)
    enc = cls(16, 2, dropout=0.1).eval()
    seq = torch.randn(1, 5, 16)
    alone = enc(seq, torch.ones(1, 5, dtype=torch.bool))
    for pads in (1, 4, 11):
        garbage = torch.randn(1, pads, 16) * 50  # whatever sits at padded positions must not matter
        x = torch.cat([garbage, seq], 1)
        mask = torch.cat([torch.zeros(1, pads, dtype=torch.bool), torch.ones(1, 5, dtype=torch.bool)], 1)
        h = enc(x, mask)
        torch.testing.assert_close(h[:, pads:], alone, rtol=1e-5, atol=1e-5)
        assert torch.all(h[:, :pads] == 0)
    # rows of one batch with different paddings are independent
    batch = torch.cat([torch.cat([torch.randn(1, 3, 16), seq], 1), torch.randn(1, 8, 16)])
    bmask = torch.ones(2, 8, dtype=torch.bool)
    bmask[0, :3] = False
    torch.testing.assert_close(enc(batch, bmask)[:1, 3:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", ENCODERS)
def test_encoder_trains(cls):
    torch.manual_seed(0)
    enc = cls(8, 1, dropout=0.0)
    x = torch.randn(4, 6, 8, requires_grad=True)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, :2] = False
    enc(x, mask)[:, -1].sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters() if p.requires_grad)
    assert torch.all(x.grad[0, :2] == 0)  # no gradient reaches padded inputs


# -- statistics ----------------------------------------------------------------------------------------------
def test_warm_cold_split_and_paired_bootstrap_by_hand():
    targets = np.array([10, 11, 12, 13])
    cold = cold_mask(targets, train_items=np.array([10, 12, 99]))
    assert cold.tolist() == [False, True, False, True]
    a = np.array([[1, 3, 11, 1]])
    b = np.array([[3, 3, 1, 20]])
    m = seed_metrics(a[0], cold)
    # HR@10 per user [1, 1, 0, 1]; NDCG@10 per user [1, 1/log2(4) = 0.5, 0, 1]
    assert m["all"]["hr@10"] == 0.75 and m["warm"]["hr@10"] == 0.5 and m["cold"]["hr@10"] == 1.0
    assert m["all"]["ndcg@10"] == pytest.approx(0.625) and m["warm"]["ndcg@10"] == pytest.approx(0.5)
    assert m["cold"]["ndcg@10"] == pytest.approx(0.75)
    assert (m["all"]["users"], m["warm"]["users"], m["cold"]["users"]) == (4, 2, 2)
    # warm users 10, 12: NDCG a [1, 0], b [0.5, 1] -> differences [0.5, -1], mean -0.25; resamples of 2 users
    # give means in {0.5, -0.25, -1}, so the interval spans zero
    r = compare(a, b, cold, "ndcg@10", "warm", n=2000, min_users=1)
    assert r["diff"] == pytest.approx(-0.25) and r["users"] == 2
    assert r["low"] == pytest.approx(-1.0) and r["high"] == pytest.approx(0.5) and r["verdict"] == "no clear difference"
    # cold users: HR a [1, 1], b [1, 0] -> differences [0, 1]: mean 0.5, interval [0, 1], not a win
    r = compare(a, b, cold, "hr@10", "cold", n=2000, min_users=1)
    assert r["diff"] == 0.5 and (r["low"], r["high"]) == (0.0, 1.0) and r["verdict"] == "no clear difference"
    # a constant difference: the interval collapses onto it and decides
    top, out = np.ones((1, 4), dtype=np.int64), np.full((1, 4), 50)
    r = compare(top, out, cold, "hr@10", "all", min_users=1)
    assert (r["diff"], r["low"], r["high"], r["verdict"]) == (1.0, 1.0, 1.0, "win")
    assert compare(out, top, cold, "ndcg@10", "cold", min_users=1)["verdict"] == "loss"
    # seeds are averaged per user before the bootstrap: a hit in one of two seeds counts 0.5
    two_seeds = np.array([[1, 1, 1, 1], [50, 50, 50, 50]])
    assert compare(two_seeds, out, cold, "hr@10", "all", min_users=1)["diff"] == 0.5
    # an empty subset is reported, not divided by zero; a subset under min_users is not judged
    assert compare(top, out, np.zeros(4, dtype=bool), "hr@10", "cold", min_users=1)["verdict"] == "not judged"
    r = compare(top, out, cold, "hr@10", "all", min_users=5)
    assert (r["verdict"], r["users"]) == ("not judged", 4) and np.isnan(r["diff"])
    assert compare(top, out, cold, "hr@10", "all")["verdict"] == "not judged"  # the report's default: 30 users


def test_claims_leave_out_groups_with_too_few_users():
    """A claim is judged on the groups with enough test users only; with none it is NOT JUDGED, never HOLDS."""
    from types import SimpleNamespace

    big = np.zeros(200, dtype=bool)  # 200 warm users
    tiny = np.r_[np.zeros(197, dtype=bool), np.ones(3, dtype=bool)]  # 3 cold users
    a, b = np.ones((1, 200), dtype=np.int64), np.full((1, 200), 50)  # a ranks every target first, b never hits
    heads = {("big", "a", "b"): {("ndcg@10", "cold"): compare(a, b, big, "ndcg@10", "cold"),
                                 ("ndcg@10", "all"): compare(a, b, big, "ndcg@10", "all")},
             ("tiny", "a", "b"): {("ndcg@10", "cold"): compare(a, b, tiny, "ndcg@10", "cold"),
                                  ("ndcg@10", "all"): compare(a, b, tiny, "ndcg@10", "all")}}
    pairs = [("big", "a", "b"), ("tiny", "a", "b")]
    plan = SimpleNamespace(claims=[{"claim": "wins overall", "pairs": pairs, "kind": "win"},
                                   {"claim": "wins on cold", "pairs": pairs, "kind": "win", "subset": "cold"}])
    overall, cold = claim_lines(plan, {}, heads)[2:]
    assert overall.endswith("**HOLDS** |") and "not judged" not in overall  # both groups judged, both win
    assert "**NOT JUDGED" in cold and "HOLDS" not in cold  # big has no cold users, tiny only 3
    assert "tiny (3 users)" in cold and "big (0 users)" in cold


# -- the runner, end to end ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, list[str]]:
    from transrec.trainer.experiments.runner import main

    out = tmp_path_factory.mktemp("experiments")
    data = REPO / "data"
    common = ["--quick", "--seeds", "1", "--out", str(out), "--targets", "hm-mixed",
              "--movielens", str(data / "movielens-100k-mm"), "--hm", str(data / "hm-fashion-fixture")]
    saved = {k: os.environ.get(k) for k in DIST_ENV}
    main(["table4", *common])
    main(["table7", *common])
    for k, v in saved.items():  # in-process runs set the rendezvous variables: keep them out of later subprocesses
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return out, common


def _runs(out: Path) -> dict[tuple, Path]:
    """(domain, model, frozen, fraction, source_fraction) -> run dir, from each run's runner.json."""
    found = {}
    for rec in (out / "runs").glob("*/runner.json"):
        s = json.loads(rec.read_text())["spec"]
        found[(s["domain"], s["model"], s["frozen"], s["fraction"])] = rec.parent
    return found


def _fresh_model_state(run_dir: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The initial weights of a run: a Trainer built from its run_config.json (same seed), before training."""
    from transrec.trainer.core.config_records import from_dict as _config_from_dict
    from transrec.trainer.training.loop import Trainer

    cfg = _config_from_dict(json.loads((run_dir / "run_config.json").read_text())["config"])
    cfg.run_dir = str(tmp_path / f"init-{run_dir.name}")
    return {k: v.clone() for k, v in Trainer(cfg, str(REPO / "ds_configs" / "zero2.json")).model.state_dict().items()}


def test_quick_table4_writes_report_csv_and_png(quick):
    out, _ = quick
    md = (out / "table4.md").read_text()
    for needle in ("## Settings", "## Data", "input files (sha256)", "warm", "cold", "## Headline differences",
                   "## Runs used", "## The paper's claims and this run", "IDGru", "IDNext", "train-from-scratch",
                   "TransRec (transfer)", "tiny random 2-layer BERT", "TransRec (zero-shot)",
                   "report the best content-scoring model on validation"):
        assert needle in md, needle
    assert md.rstrip().splitlines()[-1].startswith("| ")  # ends with the claims table
    with open(out / "table4_runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["row"] for r in rows] == ["popularity", "IDRec", "IDGru", "IDNext", "train-from-scratch",
                                        "TransRec (transfer)", "TransRec (zero-shot)", "transfer, towers only",
                                        "scratch, paper objectives: free head", "scratch, paper objectives: CPC model",
                                        "transfer, paper objectives: free head",
                                        "transfer, paper objectives: CPC model"]
    # the paper-objective rows read one set of runs, each row its stage's ranks
    assert rows[-1]["run"] == rows[-2]["run"] != rows[5]["run"]
    assert (rows[-2]["kind"], rows[-1]["kind"]) == ("stage1", "stage2")
    (manifest,) = (out / "shards").glob("hm-fashion-mixed-*/manifest.json")
    manifest = json.loads(manifest.read_text())
    assert manifest["policies"]["dedup"] == "collapse"  # same-day repeats of an article are one interaction
    evaluated = manifest["num_users_evaluated"]
    assert all(int(r["users_all"]) == evaluated == int(r["users_warm"]) + int(r["users_cold"]) for r in rows)
    assert int(rows[0]["users_cold"]) > evaluated / 2  # the H&M fixture: most test items never occur in training
    for name in ("table4_bars.png", "table4_curves.png", "table7_bars.png", "table7_curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "table7.md").exists() and "frozen" in (out / "table7.md").read_text()


def test_transfer_runs_start_from_the_source_export(quick):
    out, _ = quick
    runs = _runs(out)
    source = runs[("ml-mixed", "scratch", False, 1.0)]
    export = load_file(str(source / "export" / "model.safetensors"))
    for frozen in (False, True):
        run = runs[("hm-mixed", "transfer", frozen, 1.0)]
        cfg = json.loads((run / "run_config.json").read_text())["config"]
        assert Path(cfg["init_from"]) == source / "export"
        assert json.loads((run / "runner.json").read_text())["source_run"] == source.name
    zero_shot = runs[("hm-mixed", "zeroshot", False, 1.0)]
    assert json.loads((zero_shot / "runner.json").read_text())["source_run"] == source.name
    zs_metrics = json.loads((zero_shot / "metrics.json").read_text())
    assert set(zs_metrics["stages"]) == {"0"} and zs_metrics["best"]["scoring"] == "content"
    paper = runs[("hm-mixed", "transfer-paper", False, 1.0)]
    paper_source = json.loads((paper / "runner.json").read_text())["source_run"]
    assert paper_source == runs[("ml-mixed", "scratch-paper", False, 1.0)].name != source.name
    # frozen transfer: the towers never train, so they still equal the source's export bit for bit; the source
    # trained their pooling and projections, so a scratch run's towers differ from them
    def best_state(run: Path) -> dict[str, torch.Tensor]:
        best = json.loads((run / "metrics.json").read_text())["best"]["stage"]
        return load_file(str(run / f"best_stage{best}.safetensors"))

    transfer = best_state(runs[("hm-mixed", "transfer", True, 1.0)])
    scratch = best_state(runs[("hm-mixed", "scratch", True, 1.0)])
    towers = [k for k in export if k.startswith("towers.")]
    assert towers and all(torch.equal(transfer[k], export[k]) for k in towers)
    assert any(not torch.equal(scratch[k], export[k]) for k in towers if ".proj." in k or ".pool." in k)


def test_frozen_towers_never_update(quick, tmp_path):
    out, _ = quick
    runs = _runs(out)
    frozen, e2e = runs[("hm-mixed", "scratch", True, 1.0)], runs[("hm-mixed", "scratch", False, 1.0)]
    init = _fresh_model_state(frozen, tmp_path)
    towers = [k for k in init if k.startswith("towers.")]
    best = json.loads((frozen / "metrics.json").read_text())["best"]["stage"]
    for state in (load_file(str(frozen / f"best_stage{best}.safetensors")),
                  load_file(str(frozen / "export" / "model.safetensors"))):
        assert all(torch.equal(state[k], init[k]) for k in towers)
        assert any(not torch.equal(state[k], init[k]) for k in state if k.startswith("user_encoder."))
    # the same check sees end-to-end training move the towers' trainable top block, when stage 2 won
    if json.loads((e2e / "metrics.json").read_text())["best"]["stage"] == 2:
        state = load_file(str(e2e / "export" / "model.safetensors"))
        top = [k for k in towers if k.startswith("towers.text.bert.encoder.layer.1.")]
        assert top and any(not torch.equal(state[k], init[k]) for k in top)


def test_id_baselines_train_and_share_the_evaluator(quick, tmp_path):
    from transrec.trainer.evaluation.ranking import metrics_from_ranks

    out, _ = quick
    runs = _runs(out)
    reference = (runs[("hm-mixed", "scratch", False, 1.0)] / "test_ranks.tsv").read_text().splitlines()
    popularity = (runs[("hm-mixed", "scratch", False, 1.0)] / "test_ranks_popularity.tsv").read_text()
    for model, encoder in (("idrec", "transformer"), ("idgru", "gru"), ("idnext", "nextitnet")):
        run = runs[("hm-mixed", model, False, 1.0)]
        cfg = json.loads((run / "run_config.json").read_text())["config"]
        assert (cfg["model"]["item_encoder"], cfg["model"]["user_encoder"], cfg["stages"]) == ("id", encoder, "all")
        for stage in (1, 2):
            losses = [float(r.split(",")[1]) for r in (run / f"loss_stage{stage}.csv").read_text().split()[1:]]
            assert losses and all(math.isfinite(v) for v in losses)
        init = _fresh_model_state(run, tmp_path)
        best_stage = json.loads((run / "metrics.json").read_text())["best"]["stage"]
        assert not (run / f"best_stage{3 - best_stage}.safetensors").exists()  # pruned: only the best is kept
        best = load_file(str(run / f"best_stage{best_stage}.safetensors"))
        assert not torch.equal(best["id_embedding.weight"], init["id_embedding.weight"])
        assert any(not torch.equal(best[k], init[k]) for k in best if k.startswith("user_encoder."))
        ranks = (run / "test_ranks.tsv").read_text().splitlines()
        # same users and targets, in the same order, as the content model; the same popularity baseline
        assert [r.split("\t")[:2] for r in ranks] == [r.split("\t")[:2] for r in reference]
        assert (run / "test_ranks_popularity.tsv").read_text() == popularity
        metrics = json.loads((run / "metrics.json").read_text())["test"]
        values = np.array([int(r.split("\t")[2]) for r in ranks[1:]])
        assert metrics == pytest.approx(metrics_from_ranks(values))


def test_views_reproduce_the_run_and_route_every_item(quick):
    from transrec.data_shards.build import BuildOptions, build
    from transrec.trainer.experiments.report import read_ranks
    from transrec.trainer.experiments.views import check_same_split, evaluate_view

    out, _ = quick
    run = _runs(out)[("hm-mixed", "scratch", False, 1.0)]
    shards = Path(json.loads((run / "run_config.json").read_text())["config"]["data"]["shards"])
    same = evaluate_view(run, shards, out / "view-same")  # the eval-only path on the run's own shards
    assert np.array_equal(read_ranks(out / "view-same" / "test_ranks.tsv")[2], read_ranks(run / "test_ranks.tsv")[2])
    evaluated = json.loads((shards / "manifest.json").read_text())["num_users_evaluated"]
    assert same["test"]["users"] == evaluated
    text_shards = out / "hm-text-shards"
    build(BuildOptions(dataset="hm-fashion", source=REPO / "data" / "hm-fashion-fixture", out=text_shards,
                       modality="text", dedup="collapse"))
    check_same_split(shards, text_shards)
    evaluate_view(run, text_shards, out / "view-text")
    assert len(read_ranks(out / "view-text" / "test_ranks.tsv")[2]) == evaluated
    ml = next(p for p in (out / "shards").iterdir() if p.name.startswith("movielens"))
    with pytest.raises(ValueError, match="differ in users, items or splits"):
        check_same_split(shards, ml)


def test_cached_runs_are_skipped(quick):
    from transrec.trainer.experiments.runner import main

    out, common = quick
    stamps = {p: p.stat().st_mtime for p in (out / "runs").glob("*/runner.json")}
    main(["table4", *common, "--report-suffix", "_again"])
    assert {p: p.stat().st_mtime for p in (out / "runs").glob("*/runner.json")} == stamps
    assert "(0 trained in this invocation" in (out / "table4_again.md").read_text()
    assert (out / "table4_again_runs.csv").exists() and (out / "table4_again_bars.png").exists()
    with pytest.raises(SystemExit):
        main(["table4", *common, "--report-suffix", "../elsewhere"])
    main(["table4", *common, "--study", "a_study", "--report-suffix", "_variant"])  # a study's folder, same runs
    assert {p: p.stat().st_mtime for p in (out / "runs").glob("*/runner.json")} == stamps
    study = out / "a_study"
    assert sorted(p.name for p in study.iterdir()) == [
        "table4_variant.md", "table4_variant_bars.png", "table4_variant_curves.png", "table4_variant_runs.csv"]
    assert "--study a_study" in (study / "table4_variant.md").read_text()
    for bad in ("../elsewhere", "runs"):
        with pytest.raises(SystemExit):
            main(["table4", *common, "--study", bad])


def test_run_key_follows_the_resolved_preset(monkeypatch, tmp_path):
    """A changed preset default (not only an override) must give a new run key: no stale cache hit."""
    from transrec.trainer.experiments import suite
    from transrec.trainer.experiments.runner import RunSpec, Suite, parse_args

    data = REPO / "data"
    argv = ["table2", "--quick", "--out", str(tmp_path), "--movielens", str(data / "movielens-100k-mm"),
            "--hm", str(data / "hm-fashion-fixture")]
    spec = RunSpec("ml-mixed", "scratch")
    before = Suite(parse_args(argv)).key(spec)
    original = suite.preset  # the suite's preset reader (trainer/core/presets.py)

    def changed(name):
        cfg = original(name)
        cfg.stage1.epochs += 1
        return cfg

    monkeypatch.setattr(suite, "preset", changed)
    assert Suite(parse_args(argv)).key(spec) != before
    monkeypatch.setattr(suite, "preset", original)
    assert Suite(parse_args(argv)).key(spec) == before


def test_target_overrides_and_model_rows(tmp_path):
    """--set-target changes the target runs' keys but not their source's; --models keeps only those rows and the
    comparisons between them."""
    from transrec.trainer.experiments.runner import RunSpec, Suite, parse_args, table_plan

    data = REPO / "data"
    argv = ["table4", "--quick", "--out", str(tmp_path), "--movielens", str(data / "movielens-100k-mm"),
            "--hm", str(data / "hm-fashion-fixture"), "--targets", "hm-mixed"]
    plain = Suite(parse_args(argv))
    targeted = Suite(parse_args([*argv, "--set-target", "eval.patience=0",
                                 "--models", "scratch,transfer,transfer-towers"]))
    target, source = RunSpec("hm-mixed", "transfer"), plain.source_spec(RunSpec("hm-mixed", "transfer"))
    assert targeted.key(source) == plain.key(source)
    assert targeted.key(target) != plain.key(target)
    assert targeted.command_line_settings(target) == ["eval.patience=0"]
    assert targeted.command_line_settings(source) == []
    assert targeted.resolved_config(target)["eval"]["patience"] == 0
    assert targeted.resolved_config(source)["eval"]["patience"] == plain.resolved_config(source)["eval"]["patience"] > 0

    plan = table_plan(targeted, "table4")
    assert {s.model for r in plan.rows for s in r.specs} == {"scratch", "transfer", "transfer-towers"}
    labels = {r.label for r in plan.rows}
    assert all(h[1] in labels and h[2] in labels for h in plan.headlines)
    assert any(h[1:] == ("TransRec (transfer)", "train-from-scratch") for h in plan.headlines)
    assert all(p[1] in labels and p[2] in labels for c in plan.claims for p in c["pairs"])
    with pytest.raises(SystemExit, match="unknown"):
        table_plan(Suite(parse_args([*argv, "--models", "scratch,nonsense"])), "table4")
    with pytest.raises(SystemExit, match="both targets"):
        Suite(parse_args([*argv[:-1], "hm-mixed,ml-mixed", "--set-target", "eval.patience=0"]))


def test_table6_has_a_towers_only_row_per_target_fraction(tmp_path):
    """Table 6 on an H&M target carries the towers-only transfer at every target fraction, with its own claims
    against scratch; --models scratch,transfer-towers keeps those two rows and the claims between them."""
    from transrec.trainer.experiments.plans import TARGET_FRACTIONS
    from transrec.trainer.experiments.runner import Suite, parse_args, table_plan

    data = REPO / "data"
    argv = ["table6", "--quick", "--out", str(tmp_path), "--movielens", str(data / "movielens-100k-mm"),
            "--hm", str(data / "hm-fashion-fixture")]
    plan = table_plan(Suite(parse_args(argv)), "table6")
    towers = [r for r in plan.rows if r.label == "transfer, towers only"]
    assert [r.specs[0].fraction for r in towers] == list(TARGET_FRACTIONS)
    assert all(s.model == "transfer-towers" for r in towers for s in r.specs)
    towers_claims = [c for c in plan.claims if "towers-only" in c["claim"] or "towers only" in c["claim"]]
    assert len(towers_claims) == 2
    assert all(p[1:] == ("transfer, towers only", "train-from-scratch") for c in towers_claims for p in c["pairs"])
    cut = table_plan(Suite(parse_args([*argv, "--models", "scratch,transfer-towers"])), "table6")
    assert {r.label for r in cut.rows} == {"train-from-scratch", "transfer, towers only"}
    assert len(cut.claims) == 2 and all(len(c["pairs"]) == len(TARGET_FRACTIONS) for c in cut.claims)


def test_tables_keep_the_settings_they_were_run_with(tmp_path):
    """The cpu-small preset now learns the temperature and takes 128-px images; the tables' runs keep the fixed
    temperature and the 64 px they were run with (table_settings), and --set gives them the new default, with its own
    key."""
    from transrec.trainer.core.config import changed
    from transrec.trainer.core.presets import preset
    from transrec.trainer.experiments.plans import table_settings
    from transrec.trainer.experiments.runner import RunSpec, Suite, parse_args

    assert preset("cpu-small").model.learn_temperature is True and preset("cpu-small").model.image.size == 128
    table_cfg = changed(preset("cpu-small"), table_settings)
    assert table_cfg.model.learn_temperature is False and table_cfg.model.image.size == 64
    data = REPO / "data"
    argv = ["table2", "--out", str(tmp_path), "--movielens", str(data / "movielens-100k-mm"),
            "--hm", str(data / "hm-fashion-fixture")]
    spec = RunSpec("ml-mixed", "scratch")
    table, learned = Suite(parse_args(argv)), Suite(parse_args([*argv, "--set", "model.learn_temperature=true"]))
    assert table.resolved_config(spec)["model"]["learn_temperature"] is False
    assert learned.resolved_config(spec)["model"]["learn_temperature"] is True
    assert table.key(spec) != learned.key(spec)
    larger = Suite(parse_args([*argv, "--set", "model.image_size=128"]))
    assert table.resolved_config(spec)["model"]["image_size"] == 64
    assert larger.resolved_config(spec)["model"]["image_size"] == 128 and larger.key(spec) != table.key(spec)


def test_opt_in_rows_only_when_named(tmp_path):
    """transfer-initial (the start kept as a candidate) and transfer-lowlr (gentle fine-tuning) are table-4 rows only
    when --models names them, so a table without them keeps its runs; their runs start from the source with their
    settings (eval.initial_candidate; the lower learning rates)."""
    from transrec.trainer.experiments.plans import OPT_IN_MODELS
    from transrec.trainer.experiments.runner import RunSpec, Suite, parse_args, table_plan

    data = REPO / "data"
    argv = ["table4", "--quick", "--out", str(tmp_path), "--movielens", str(data / "movielens-100k-mm"),
            "--hm", str(data / "hm-fashion-fixture"), "--targets", "hm-mixed", "--seeds", "1"]
    assert {"transfer-initial", "transfer-lowlr"} <= set(OPT_IN_MODELS)
    plain = table_plan(Suite(parse_args(argv)), "table4")
    assert all(s.model not in OPT_IN_MODELS for r in plain.rows for s in r.specs)
    named = Suite(parse_args([*argv, "--models", "scratch,transfer,zeroshot,transfer-initial"]))
    plan = table_plan(named, "table4")
    [row] = [r for r in plan.rows if r.label == "transfer, start kept as a candidate"]
    spec = row.specs[0]
    assert named.config(spec).eval.initial_candidate is True
    assert named.config(named.source_spec(spec)).eval.initial_candidate is False
    assert named.source_spec(spec) == named.source_spec(RunSpec("hm-mixed", "transfer"))
    assert ("H&M mixed (from MovieLens mixed)", row.label, "TransRec (zero-shot)") in plan.headlines
    assert all(r.label != "transfer, low learning rate" for r in plan.rows)  # named rows only

    gentle = Suite(parse_args([*argv, "--models", "transfer,transfer-lowlr"]))
    [row] = [r for r in table_plan(gentle, "table4").rows if r.label == "transfer, low learning rate"]
    spec, plain_spec = row.specs[0], RunSpec("hm-mixed", "transfer")
    cfg, plain_cfg = gentle.resolved_config(spec), gentle.resolved_config(plain_spec)
    assert (cfg["stage1"]["lr"], cfg["stage2"]["lr"]) == (1e-4, 1e-4)
    assert plain_cfg["stage1"]["lr"] != 1e-4 and gentle.key(spec) != gentle.key(plain_spec)
    assert gentle.source_spec(spec) == gentle.source_spec(plain_spec)
    assert gentle.config(spec).init_from == str(gentle.run_dir(gentle.source_spec(spec)) / "export")
