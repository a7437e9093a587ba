"""transfer=auto (trainer/training/transfer_auto.py): the candidates trained from one export, the choice on validation,
the reports, the cost estimate, a failing candidate, and --resume in the middle of the candidates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

DS = str(REPO / "ds_configs" / "zero2.json")


# transfer=auto's default candidates with include_scratch, in plan order (the training-free ones first)
EVERY_CANDIDATE = ["start", "popularity", "content", "prior", "finetune", "lowlr", "towers", "scratch"]

def auto_argv(source_run: Path, shards: Path, text: Path, run_dir: Path, *sets: str) -> list[str]:
    return ["--preset", "tiny", "--shards", str(shards), "--text-encoder", str(text), "--run-dir", str(run_dir),
            "--ds_config", DS, "--init-from", str(source_run / "export"), "--set", "transfer=auto", *sets]


@pytest.fixture(scope="module")
def auto_run(source_run, hm_shards, tiny_bert_dir, tmp_path_factory):
    """Every candidate, scratch included, on the H&M fixture from the MovieLens source run."""
    import contextlib
    import io

    from transrec.trainer.main import main

    run_dir = tmp_path_factory.mktemp("auto") / "run"
    out = io.StringIO()  # the trainer's log handler writes to the stdout of the moment it is set up
    with contextlib.redirect_stdout(out):
        result = main(auto_argv(source_run, hm_shards, tiny_bert_dir, run_dir, "transfer.include_scratch=true"))
    metrics = result.metrics
    records = out.getvalue().splitlines()
    return run_dir, metrics, records


def test_the_config_reads_transfer_auto_and_checks_it():
    from transrec.trainer.core.overrides import apply_overrides
    from transrec.trainer.core.presets import preset

    cfg = apply_overrides(preset("tiny"), ["init_from=x", "transfer=auto", "transfer.include_scratch=true"])
    assert cfg.transfer.mode == "auto"
    assert cfg.transfer.candidate_names() == EVERY_CANDIDATE
    assert apply_overrides(preset("tiny"), ["transfer.low_lr=0.0001"]).transfer.low_lr == 1e-4
    with pytest.raises(ValueError, match="give it with --init-from"):
        apply_overrides(preset("tiny"), ["transfer=auto"])
    with pytest.raises(ValueError, match="transfer.candidates="):
        apply_overrides(preset("tiny"), ["init_from=x", "transfer.candidates=start,bogus"])
    with pytest.raises(ValueError, match="transfer.mode must be"):
        apply_overrides(preset("tiny"), ["init_from=x", "transfer=sometimes"])


def test_candidate_configs():
    from transrec.trainer.core.overrides import apply_overrides
    from transrec.trainer.core.presets import preset
    from transrec.trainer.transfer.candidates import candidate_config, candidate_plan

    cfg = apply_overrides(preset("cpu-small"), ["init_from=EXPORT", "transfer=auto", "transfer.include_scratch=true",
                                                 "eval.initial_candidate=true"])
    made = {c.name: candidate_config(cfg, c, Path("RUN")) for c in candidate_plan(cfg)}
    assert list(made) == EVERY_CANDIDATE
    assert made["start"].stages == "none" and made["finetune"].stages == "all"
    assert all(made[n].init_from == "EXPORT" for n in ("popularity", "content", "prior"))  # scored from the export
    assert made["lowlr"].stage1.lr == pytest.approx(cfg.stage1.lr / 10)
    assert made["lowlr"].stage2.lr == pytest.approx(cfg.stage2.lr / 10)
    assert made["towers"].init_parts == "towers" and made["towers"].init_from == "EXPORT"
    assert made["scratch"].init_from is None
    for name, c in made.items():
        assert c.transfer.mode == "plain" and not c.eval.initial_candidate
        assert c.run_dir == str(Path("RUN") / "candidates" / name)


def test_auto_trains_every_candidate_and_keeps_the_best_on_validation(auto_run):
    run_dir, metrics, _ = auto_run
    cands = metrics["candidates"]
    assert list(cands) == EVERY_CANDIDATE
    assert all(c["status"] == "done" for c in cands.values())
    # the choice, recomputed from each candidate's own recorded validation
    valid = {n: json.loads((run_dir / "candidates" / n / "metrics.json").read_text())["valid"]["ndcg@10"]
             for n in cands}
    best = max(valid.values())
    chosen = metrics["transfer"]["selected"]
    assert valid[chosen] == best and chosen == next(n for n in cands if valid[n] == best)
    # the run directory reads as the chosen candidate's run
    src = run_dir / "candidates" / chosen
    assert (run_dir / "test_ranks.tsv").read_text() == (src / "test_ranks.tsv").read_text()
    exported = "export/model.safetensors"
    assert (run_dir / exported).read_bytes() == (src / exported).read_bytes()
    assert metrics["test"] == json.loads((src / "metrics.json").read_text())["test"]
    for n in cands:  # every candidate's test figures are reported beside the choice
        assert cands[n]["test"] == json.loads((run_dir / "candidates" / n / "metrics.json").read_text())["test"]


def test_auto_reports_the_verdict_and_intervals(auto_run):
    run_dir, metrics, _ = auto_run
    t = metrics["transfer"]
    assert t["verdict"]["verdict"] in ("helped", "level", "hurt")
    v = t["verdict"]
    assert (v["verdict"] == "helped") == (v["low"] > 0) and (v["verdict"] == "hurt") == (v["high"] < 0)
    assert set(t["test_vs"]) >= {"popularity"}
    assert ("scratch" in t["test_vs"]) == (t["selected"] != "scratch")
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk["transfer"]["selected"] == t["selected"]
    page = (run_dir / "results.md").read_text()
    assert f"**{t['selected']} (selected)**" in page and v["line"] in page
    for n in metrics["candidates"]:
        assert f"| {n} |" in page or f"**{n} (selected)**" in page


def test_auto_prints_a_cost_estimate_and_progress(auto_run):
    _, _, records = auto_run
    estimate = [m for m in records if "cost estimate" in m]
    assert len(estimate) == 1 and "timed on start's model" in estimate[0]
    assert "still to run: popularity, content, prior, finetune, lowlr, towers, scratch" in estimate[0]
    assert sum("[transfer] candidate" in m and "estimated" in m and "at most" in m for m in records) == 7
    # after the first candidate that trains (finetune), the later ones are expected to take as long as it did
    assert sum("min as finetune took, at most" in m for m in records) == 3
    summary = [m for m in records if "training-free candidates, validation ndcg@10" in m]
    assert len(summary) == 1 and all(n in summary[0] for n in ("start", "popularity", "content", "prior"))


def test_compare_and_evaluate_read_the_auto_run(auto_run, hm_shards):
    from transrec.trainer.commands import compare, evaluate

    run_dir, metrics, _ = auto_run
    out = compare.main([str(run_dir), f"{run_dir}:popularity"])
    assert "popularity" in out
    again = evaluate.main(["--export", str(run_dir / "export"), "--shards", str(hm_shards), "--split", "test"])
    assert again["content"]["ndcg@10"] == pytest.approx(metrics["test"]["ndcg@10"], abs=1e-9)


def test_a_failing_candidate_is_reported_and_the_others_finish(source_run, hm_shards, tiny_bert_dir, tmp_path):
    """init_reset names a user-encoder block: the towers candidate loads no user encoder, so it fails; start and
    finetune still run and one of them is chosen."""
    from transrec.trainer.main import main

    run_dir = tmp_path / "run"
    metrics = main(auto_argv(source_run, hm_shards, tiny_bert_dir, run_dir, "transfer.candidates=start,towers,finetune",
                             "init_reset=user_encoder.blocks.0")).metrics
    cands = metrics["candidates"]
    assert cands["towers"]["status"] == "failed" and "names none of the tensors" in cands["towers"]["error"]
    assert cands["start"]["status"] == cands["finetune"]["status"] == "done"
    assert metrics["transfer"]["selected"] in ("start", "finetune")
    assert "FAILED" in (run_dir / "results.md").read_text()


def test_resume_in_the_middle_of_the_candidates_continues(source_run, hm_shards, tiny_bert_dir, tmp_path,
                                                          monkeypatch):
    """Stopped while the second candidate trains: --resume keeps the first (not trained again) and finishes the rest."""
    from transrec.trainer.main import main
    from transrec.trainer.training import transfer_auto as transfer

    run_dir = tmp_path / "run"
    started = []
    real = transfer.run_candidate

    def stop_at_finetune(cfg, ds_config, rank):
        started.append(Path(cfg.run_dir).name)
        if Path(cfg.run_dir).name == "finetune" and started.count("finetune") == 1:
            raise KeyboardInterrupt  # as a kill would: not a candidate failure, the run stops
        return real(cfg, ds_config, rank)

    monkeypatch.setattr(transfer, "run_candidate", stop_at_finetune)
    with pytest.raises(KeyboardInterrupt):
        main(auto_argv(source_run, hm_shards, tiny_bert_dir, run_dir, "transfer.candidates=start,finetune"))
    first = (run_dir / "candidates" / "start" / "metrics.json").stat().st_mtime_ns
    assert not (run_dir / "metrics.json").exists()
    trained = []
    monkeypatch.setattr(transfer, "run_candidate",
                        lambda cfg, ds, rank: (trained.append(Path(cfg.run_dir).name), real(cfg, ds, rank))[1])
    metrics = main(["--resume", str(run_dir)]).metrics
    assert (run_dir / "candidates" / "start" / "metrics.json").stat().st_mtime_ns == first  # kept, not re-run
    assert all(c["status"] == "done" for c in metrics["candidates"].values())
    assert metrics["candidates"]["start"]["test"] == json.loads(
        (run_dir / "candidates" / "start" / "metrics.json").read_text())["test"]
    assert trained == ["start", "finetune"]  # start is looked at and skipped (its run returns None)


def test_an_interrupted_candidate_resumes_from_its_checkpoint(source_run, hm_shards, tiny_bert_dir, tmp_path):
    """A candidate killed after a checkpoint (resume.json, no metrics.json) continues from it on --resume."""
    from transrec.trainer.core.overrides import apply_overrides
    from transrec.trainer.core.presets import preset
    from transrec.trainer.main import main
    from transrec.trainer.training.loop import Trainer
    from transrec.trainer.transfer import candidates as transfer_plan

    run_dir = tmp_path / "run"
    argv = auto_argv(source_run, hm_shards, tiny_bert_dir, run_dir, "transfer.candidates=finetune")
    cfg = apply_overrides(preset("tiny"), [f"data.shards={hm_shards}", f"model.text_encoder={tiny_bert_dir}",
                                           f"run_dir={run_dir}", f"init_from={source_run / 'export'}",
                                           "transfer=auto", "transfer.candidates=finetune"])
    cand = transfer_plan.candidate_config(cfg, transfer_plan.candidate_plan(cfg)[0], run_dir)
    trainer = Trainer(cand, DS)
    trainer.run_stage(1)  # stage 1 done and checkpointed; stage 2 never started: as if killed there
    del trainer
    point = json.loads((run_dir / "candidates" / "finetune" / "resume.json").read_text())
    assert point["stage"] == 1 and not (run_dir / "candidates" / "finetune" / "metrics.json").exists()
    from transrec.trainer.core.run_setup import write_run_record

    write_run_record(run_dir, cfg, json.loads(Path(DS).read_text()), {})
    assert argv  # the same command would start it; --resume continues it
    metrics = main(["--resume", str(run_dir)]).metrics
    assert metrics["candidates"]["finetune"]["status"] == "done"
    assert "1" in json.loads((run_dir / "candidates" / "finetune" / "metrics.json").read_text())["stages"]


def test_the_table4_auto_row_chooses_on_validation(tmp_path):
    """trainer/experiments/auto_row.py: per seed, the cached candidate run with the best validation NDCG@10 (not the
    best test), compared with scratch over the same users."""
    from transrec.trainer.core.config import changed
    from transrec.trainer.core.config_records import to_dict
    from transrec.trainer.core.presets import preset
    from transrec.trainer.experiments.auto_row import auto_rows, grouped_runs, shown_settings
    from transrec.trainer.experiments.auto_row import main as auto_main
    from transrec.trainer.experiments.plans import MODEL_CHANGES, table_settings

    def no_early_stopping(c):
        c.eval.patience = 0

    def run(key: str, model: str, seed: int, valid: float, ranks: list[int], content_head: bool = True) -> None:
        d = tmp_path / key
        d.mkdir()
        config = to_dict(changed(preset("cpu-small"), table_settings, *MODEL_CHANGES[model], no_early_stopping))
        config["seed"] = seed
        if not content_head:  # a record of before the content softmax: no objective settings at all
            del config["stage1"]["head"], config["stage2"]["loss"]
        (d / "run_config.json").write_text(json.dumps({"config": config}))
        (d / "runner.json").write_text(json.dumps({"spec": {"domain": "hm-b-mixed", "model": model, "seed": seed}}))
        (d / "metrics.json").write_text(json.dumps({"valid": {"ndcg@10": valid}}))
        (d / "test_ranks.tsv").write_text("user\ttarget_item\trank\n" +
                                          "".join(f"{u}\t{u}\t{r}\n" for u, r in enumerate(ranks)))

    users = 40
    for seed in (0, 1, 2):
        # fine-tuned validates best in seeds 0 and 2 but ranks worse on test; the start validates best in seed 1
        run(f"t{seed}", "transfer", seed, 0.30 if seed != 1 else 0.10, [50] * users)
        run(f"s{seed}", "scratch", seed, 0.20, [5] * users)
    run("z0", "zeroshot", 0, 0.20, [1] * users)
    # a run made while the paper's objectives were the default: recorded as 'transfer', no content head; ignored
    run("old", "transfer", 1, 0.99, [1] * users, content_head=False)
    (row,) = auto_rows(grouped_runs(tmp_path))
    assert row["chosen"] == ["transfer", "zeroshot", "transfer"]
    assert row["best_row"] == "zeroshot"  # best on test, which auto does not see
    assert row["auto"][0] == row["auto"][2] == 0.0 and row["auto"][1] == 1.0  # rank 1: NDCG@10 = 1
    assert row["vs_scratch"]["diff"] == pytest.approx(np.mean(row["auto"]) - row["scratch"].mean())
    assert row["finetuned_vs_scratch"]["diff"] == pytest.approx(0.0 - row["scratch"].mean())
    text = auto_main(["--runs", str(tmp_path), "--out", str(tmp_path / "auto.md"),
                      "--figure", str(tmp_path / "auto.png")])
    assert (tmp_path / "auto.png").read_bytes()[:4] == b"\x89PNG" and "![transfer minus scratch]" in text
    run("t0-again", "transfer", 0, 0.30, [50] * users)  # two runs of one row, seed and settings: which one is meant?
    with pytest.raises(SystemExit, match=r"t0 and t0-again are both transfer on hm-b-mixed, seed 0, with the same "
                                         r"settings \(eval.patience: 0\)"):
        grouped_runs(tmp_path)
    # a run whose configuration differs beyond the rows' own settings is a group of its own
    (tmp_path / "t0-again").rename(tmp_path / "t0-128px")
    config = json.loads((tmp_path / "t0-128px" / "run_config.json").read_text())
    config["config"]["model"]["image"]["size"] = 128
    (tmp_path / "t0-128px" / "run_config.json").write_text(json.dumps(config))
    groups = grouped_runs(tmp_path)
    assert sorted(map(shown_settings, (settings for _, settings in groups))) == [
        [("eval", "patience", 0)], [("eval", "patience", 0), ("model", "image_size", 128)]]


def test_every_candidate_is_a_run_of_the_hparams_tab(auto_run):
    """tensorboard --logdir RUN_DIR: each finished candidate's folder holds an HParams row named by the candidate
    (the trained ones from their own runs, the training-free ones written at the selection) with its figures."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard_server import hparams_summaries

    run_dir, metrics, _ = auto_run
    assert {r["status"] for r in metrics["candidates"].values()} == {"done"}
    for name, record in metrics["candidates"].items():
        board = run_dir / "candidates" / name / "tensorboard"
        start = hparams_summaries(board)["session_start_info"].session_start_info.hparams
        assert start["run"].string_value == name
        acc = EventAccumulator(str(board))
        acc.Reload()
        assert acc.Scalars("hparams/valid_ndcg@10")[-1].value == pytest.approx(record["valid"]["ndcg@10"])
