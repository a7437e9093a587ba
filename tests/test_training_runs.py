"""Whole training runs on the bundled data at a tiny size: stages, export, transfer, 2 ranks, resume, errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_trainer
from safetensors.torch import load_file

from transrec.trainer.core.run_setup import SHM_DIR, SHM_PREFIX

REPO = Path(__file__).resolve().parent.parent

TINY = ["--preset", "tiny"]


def _env() -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"),
    )
    env.pop("TRITON_INTERPRET", None)
    # An in-process run in this pytest process set these for its own single rank: a subprocess must pick its own.
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_main(args: list[str], ranks: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    if ranks == 1:
        cmd = [sys.executable, str(REPO / "trainer" / "main.py"), *args]
    else:
        cmd = [
            str(Path(sys.executable).parent / "deepspeed"),
            "--num_gpus",
            str(ranks),
            "--master_port",
            str(_free_port()),
            str(REPO / "trainer" / "main.py"),
            *args,
        ]
    out = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"run failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


def _losses(run_dir: Path, stage: int) -> list[tuple[int, float]]:
    rows = (run_dir / f"loss_stage{stage}.csv").read_text().split()[1:]
    return [(int(r.split(",")[0]), float(r.split(",")[1])) for r in rows]


def naive_popularity_test_ranks(run_dir: Path) -> np.ndarray:
    """Popularity's test ranks computed the plain way, user by user: counts of every item over the training portions
    and the evaluated users' validation items, the seeded tie-breaking jitter below 1, the user's earlier items left
    out, the target's rank = 1 + the items scoring at least as high."""
    from transrec.data_shards.shard_io import read_sequences

    shards = json.loads((run_dir / "run_config.json").read_text())["config"]["data"]["shards"]
    sequences = read_sequences(shards)
    num_items = json.loads((Path(shards) / "manifest.json").read_text())["num_items"]
    counts = np.zeros(num_items)
    for s in sequences:
        for item in s["items"][: s["num_train"] + (1 if s["evaluated"] else 0)]:
            counts[item] += 1
    scores = counts + np.random.default_rng(0).random(num_items) * 0.5
    ranks = []
    for s in sequences:
        if s["evaluated"]:
            target = s["items"][s["num_train"] + 1]
            candidate = np.ones(num_items, dtype=bool)
            candidate[s["items"][: s["num_train"] + 1]] = False  # the user's earlier items
            candidate[target] = False
            ranks.append(1 + int((scores[candidate] >= scores[target]).sum()))
    return np.asarray(ranks)


def test_two_stage_run_writes_metrics_events_ranks_and_export(source_run):
    metrics = json.loads((source_run / "metrics.json").read_text())
    for key in ("valid", "test", "popularity_test", "best", "stages", "vs_popularity"):
        assert key in metrics
    assert set(metrics["stages"]) == {"1", "2"}
    from transrec.trainer.evaluation.ranking import metrics_from_ranks
    from transrec.trainer.evaluation.run_stats import read_ranks

    assert metrics["test"] == metrics_from_ranks(read_ranks(source_run / "test_ranks.tsv")[2])
    assert metrics["test"]["users"] == 943
    assert metrics["popularity_test"] == metrics_from_ranks(naive_popularity_test_ranks(source_run))
    assert any((source_run / "tensorboard").iterdir())
    rows = (source_run / "test_ranks.tsv").read_text().splitlines()
    assert rows[0] == "user\ttarget_item\trank" and len(rows) == 944
    assert (source_run / "export" / "model.safetensors").exists()
    exported = load_file(str(source_run / "export" / "model.safetensors"))
    assert not any(k.startswith("head.") for k in exported)  # catalogue-specific head never exported
    assert any(k.startswith("towers.text.") for k in exported) and any(k.startswith("user_encoder.") for k in exported)
    assert "after stage 2, content" in (source_run / "results.md").read_text()


def test_content_models_are_labelled_and_selected(source_run):
    """Defaults (stage1.head=content, stage2.loss=sampled_softmax): both stages score by content, and the run
    selects, exports and reports the better of them on validation."""
    metrics = json.loads((source_run / "metrics.json").read_text())
    stages = metrics["stages"]
    assert {s: stages[s]["scoring"] for s in stages} == {"1": "content", "2": "content"}
    best = max(stages, key=lambda s: stages[s]["valid"]["ndcg@10"])
    assert metrics["best"]["stage"] == int(best) and metrics["best"]["scoring"] == "content"
    assert metrics["test"] == stages[best]["test"]
    table = (source_run / "results.md").read_text()
    assert f"| **after stage {best}, content (selected)** |" in table
    assert all(f"after stage {s}, content" in table for s in stages)  # whichever of them wins on validation
    cold = metrics["cold_test"]
    assert cold["users"] == 3  # MovieLens: 3 test targets never occur in training
    assert "cold test targets (items in no user's training portion): 3 of 943" in table
    assert f"NDCG@10 {cold['ndcg@10']:.4f}" in table
    log = (source_run / "valid_curve.csv").read_text().splitlines()
    assert log[0].startswith("stage,epoch,") and len(log) >= 3


def test_free_head_run_still_selects_the_content_model(ml_shards, tiny_bert_dir, tmp_path, capsys):
    """stage1.head=free, stage2.loss=cpc (the paper's objectives): stage 1 is labelled free_head and is never the
    selected model, whatever its validation score; the CPC stage-2 model is."""
    trainer = tiny_trainer(ml_shards, tiny_bert_dir, tmp_path / "run", "stage1.head=free", "stage2.loss=cpc")
    metrics = trainer.run()
    assert metrics["stages"]["1"]["scoring"] == "free_head" and metrics["stages"]["2"]["scoring"] == "content"
    assert metrics["best"] == {**metrics["best"], "stage": 2, "scoring": "content"}
    assert "after stage 1, free_head |" in (tmp_path / "run" / "results.md").read_text()
    printed = capsys.readouterr().out  # an estimate of the epoch time after the first steps of each stage
    assert "stage 1: " in printed and "s/step over the first 5 steps: about" in printed and "min per epoch" in printed


def test_zero_shot_ranks_never_trained_items_by_content(source_run, ml_shards, tiny_bert_dir, tmp_path, capsys):
    """`--stage none` with --init-from: no training, content scoring. Items that were never a training interaction
    get finite ranks, equal to a recount from user . item content vectors."""
    from transrec.trainer.evaluation import ranking as ev

    trainer = tiny_trainer(ml_shards, tiny_bert_dir, tmp_path / "zs", "stages=none",
                            f"init_from={source_run / 'export'}")
    printed = capsys.readouterr().out
    for name in ("text", "image"):  # the start-up lines say where each tower's weights finally came from
        assert f"{name} tower weights: " in printed
        assert f"tensors from --init-from {source_run / 'export'}" in printed.split(f"{name} tower weights: ")[1]
    metrics = trainer.run()
    assert set(metrics["stages"]) == {"0"} and metrics["best"]["scoring"] == "content"
    data = trainer.test_users.in_memory()
    cold = np.flatnonzero(trainer.item_share[data.targets] == 0)
    assert len(cold) >= 1  # MovieLens has test targets never seen in training
    ranks = np.load(tmp_path / "zs" / "test_ranks_stage0.npy")
    with torch.no_grad():
        trainer.model.eval()
        iv = trainer.item_vectors()
        hist = torch.as_tensor(data.histories[cold])
        mask = hist >= 0
        users = trainer.model.user_vector(iv[hist.clamp(min=0)] * mask[..., None], mask)
        scores = (users @ iv.T).numpy()
    for row, u in enumerate(cold):
        target = data.targets[u]
        s = scores[row].copy()
        s[np.setdiff1d(data.seen[u], [target])] = -np.inf  # seen items are excluded from the ranking
        assert ranks[u] == 1 + int((np.delete(s, target) >= s[target]).sum()) <= trainer.num_items
    assert metrics["test"] == ev.metrics_from_ranks(ranks, trainer.cfg.eval.ks)


def test_standalone_evaluator_reproduces_the_run_and_scores_another_catalogue(source_run, ml_shards, hm_shards,
                                                                          tmp_path):
    """`python -m transrec.trainer.commands.evaluate` rebuilds the model from the export alone: the run's own test
    ranks, exactly;
    and a catalogue it never saw (zero-shot), with clear errors for what is not an export."""
    from transrec.trainer.commands.evaluate import main as evaluate_main
    from transrec.trainer.core.checkpoint import write_checkpoint_hashes

    metrics = json.loads((source_run / "metrics.json").read_text())
    out = tmp_path / "eval.json"
    result = evaluate_main(["--export", str(source_run / "export"), "--shards", str(ml_shards), "--out", str(out)])
    assert result["content"] == metrics["test"] and result["popularity"] == metrics["popularity_test"]
    assert (out.with_suffix(".ranks.tsv")).read_text() == (source_run / "test_ranks.tsv").read_text()
    config = json.loads((source_run / "export" / "config.json").read_text())
    selected = str(metrics["best"]["stage"])
    trainable = {name: config["trainable"].get(name, 0) for name in ("text", "image")}  # absent: 0 (stage 1's)
    assert trainable == ({"text": 1, "image": 1} if selected == "2" else {"text": 0, "image": 0})
    manifest = json.loads((ml_shards / "manifest.json").read_text())
    assert config["text"]["tokenizer"] == manifest["text"]["tokenizer"]  # the export describes its preprocessing
    assert config["image"]["size"] == 32 and config["modality_rule"] == manifest["modality_rule"]
    other = evaluate_main(["--export", str(source_run / "export"), "--shards", str(hm_shards), "--split", "valid"])
    assert other["content"]["users"] == json.loads((hm_shards / "manifest.json").read_text())["num_users_evaluated"]
    # the export stands alone: its text backbone's shape and tokenizer travel with it
    moved = tmp_path / "moved-export"
    shutil.copytree(source_run / "export", moved)
    meta = json.loads((moved / "config.json").read_text())
    assert (moved / "text_encoder" / "config.json").exists() and (moved / "text_encoder" / "vocab.txt").exists()
    meta["model"]["text_encoder"] = str(tmp_path / "no-such-folder")  # the training machine's path is gone
    (moved / "config.json").write_text(json.dumps(meta))
    write_checkpoint_hashes(moved)  # as an export written on that machine would be
    alone = evaluate_main(["--export", str(moved), "--shards", str(ml_shards)])
    assert alone["content"] == metrics["test"]
    with pytest.raises(SystemExit, match="is not an export"):
        evaluate_main(["--export", str(tmp_path), "--shards", str(ml_shards)])
    with pytest.raises(SystemExit, match="no shards at"):
        evaluate_main(["--export", str(source_run / "export"), "--shards", str(tmp_path)])


def test_a_sample_of_users_ranks_as_they_rank_among_all(source_run, ml_shards, tiny_bert_dir, tmp_path):
    """eval.max_users / --max-users: the sampled users' ranks are exactly their ranks when every user is evaluated
    (a user's rank depends on no other user), and what was sampled is recorded."""
    from transrec.trainer.commands.evaluate import main as evaluate_main
    from transrec.trainer.evaluation.run_stats import read_ranks

    all_users, all_targets, all_ranks = read_ranks(source_run / "test_ranks.tsv")
    out = tmp_path / "sampled.json"
    result = evaluate_main(["--export", str(source_run / "export"), "--shards", str(ml_shards), "--out", str(out),
                            "--max-users", "25", "--sample-seed", "7"])
    users, targets, ranks = read_ranks(out.with_suffix(".ranks.tsv"))
    assert len(users) == 25 and result["content"]["users"] == 25
    assert result["evaluated_users"] == {"evaluated": 25, "of": len(all_users), "sampled": True, "seed": 7}
    at = np.searchsorted(all_users, users)
    assert np.array_equal(all_users[at], users) and np.array_equal(all_targets[at], targets)
    assert np.array_equal(all_ranks[at], ranks)
    with pytest.raises(SystemExit):
        evaluate_main(["--export", str(source_run / "export"), "--shards", str(ml_shards), "--max-users", "-1"])
    # the trainer: a sample of 30 in validation and test, recorded in metrics.json and results.md
    metrics = tiny_trainer(ml_shards, tiny_bert_dir, tmp_path / "run", "eval.max_users=30", "stage1.max_steps=3",
                           "stage2.max_steps=2").run()
    assert metrics["evaluated_users"] == {"evaluated": 30, "of": len(all_users), "sampled": True, "seed": 0}
    assert metrics["test"]["users"] == 30 and metrics["popularity_valid"]["users"] == 30
    run_users = read_ranks(tmp_path / "run" / "test_ranks.tsv")[0]
    assert np.array_equal(run_users, np.sort(np.random.default_rng(0).choice(all_users, 30, replace=False)))
    assert "seeded sample of 30 of the" in (tmp_path / "run" / "results.md").read_text()


def test_existing_run_dir_is_refused_unless_overwrite(ml_shards, tiny_bert_dir, tmp_path):
    from transrec.trainer.main import main

    run = tmp_path / "old"
    run.mkdir()
    (run / "resume.json").write_text("{}")  # a killed run's leftovers
    argv = [*TINY, "--shards", str(ml_shards), "--text-encoder", str(tiny_bert_dir), "--run-dir", str(run),
            "--stage", "none"]
    with pytest.raises(SystemExit, match=f"--run-dir {run} exists and is not empty.*--resume.*--overwrite"):
        main(argv)
    metrics = main([*argv, "--overwrite"]).metrics
    assert not (run / "resume.json").exists() and set(metrics["stages"]) == {"0"}


def test_stage2_changes_trainable_tower_parameters(source_run):
    s1 = load_file(str(source_run / "best_stage1.safetensors"))
    s2 = load_file(str(source_run / "best_stage2.safetensors"))
    top_text = [k for k in s1 if k.startswith("towers.text.bert.encoder.layer.1.")]  # tiny BERT: 2 layers, top 1 trains
    low_text = [k for k in s1 if k.startswith("towers.text.bert.encoder.layer.0.")]
    top_image = [
        k for k in s1 if k.startswith("towers.image.blocks.4.") and "running" not in k and "num_batches" not in k
    ]
    assert top_text and low_text and top_image
    assert any(not torch.equal(s1[k], s2[k]) for k in top_text)
    assert any(not torch.equal(s1[k], s2[k]) for k in top_image)
    assert any(not torch.equal(s1[k], s2[k]) for k in s1 if k.startswith("towers.text.pool."))
    assert all(torch.equal(s1[k], s2[k]) for k in low_text)  # frozen lower blocks stay as they were


COMPARE = [
    "--stage",
    "1",
    "--set",
    "stage1.max_steps=4",
    "stage1.min_window=9",
    "stage1.stride=100",
    "stage1.epochs=1",
    "save_every_steps=1000",
    "eval.patience=0",
]


def test_two_ranks_zero2_match_one_rank(ml_shards, tiny_bert_dir, tmp_path):
    common = [
        *TINY,
        "--shards",
        str(ml_shards),
        "--text-encoder",
        str(tiny_bert_dir),
        "--ds_config",
        str(REPO / "ds_configs" / "zero2.json"),
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    # log_every counts optimizer steps: one rank accumulating 2 micro-batches logs once per step, as 2 ranks do.
    _run_main([*common, "--run-dir", str(one), *COMPARE, "stage1.micro_batch=8", "stage1.grad_accum=2", "log_every=1"])
    segments_before = set(SHM_DIR.glob(f"{SHM_PREFIX}_{os.getuid()}_*"))
    _run_main(
        [*common, "--run-dir", str(two), *COMPARE, "stage1.micro_batch=8", "stage1.grad_accum=1", "log_every=1"],
        ranks=2,
    )
    # DeepSpeed's CPU all-reduce made one shared-memory segment per rank; the trainer unlinked both at exit
    assert set(SHM_DIR.glob(f"{SHM_PREFIX}_{os.getuid()}_*")) - segments_before == set()
    a, b = _losses(one, 1), _losses(two, 1)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    for (_, la), (_, lb) in zip(a, b):
        assert abs(la - lb) <= 1e-4 * abs(la), (a, b)
    assert abs(a[0][1] - a[-1][1]) > 1e-3  # the trajectory really moves
    m1 = json.loads((one / "metrics.json").read_text())["test"]
    m2 = json.loads((two / "metrics.json").read_text())["test"]
    assert m1["users"] == m2["users"] == 943  # evaluation split across 2 ranks and gathered exactly
    assert m1["hr@10"] == pytest.approx(m2["hr@10"], abs=2 / 943)
    # popularity comes from the per-item counts, which each rank counts over its own users and all-reduces
    p1, p2 = (json.loads((d / "metrics.json").read_text())["popularity_test"] for d in (one, two))
    assert p1 == p2 and p1["users"] == 943
    # the parts' gradient norms: two ranks hold half of ZeRO-2's gradient partitions each, and the norms gathered from
    # them are those of one rank's whole gradient (trainer/monitoring/grad_norms.py)
    norms = [grad_norms(d) for d in (one, two)]
    assert set(norms[0]) == set(norms[1]) >= {"grad_norm/user_encoder", "grad_norm/towers.text"}
    for tag, points in norms[0].items():
        assert [s for s, _ in points] == [s for s, _ in norms[1][tag]] == [1, 2, 3, 4]
        assert [v for _, v in norms[1][tag]] == pytest.approx([v for _, v in points], rel=1e-3), tag


def grad_norms(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{grad_norm/<part>: [(step, norm)]} of the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
            if tag.startswith("grad_norm/")}


def test_two_nodes_match_one_node_with_two_ranks(ml_shards, tiny_bert_dir, tmp_path):
    """Multi-node: two launchers on this machine (deepspeed --no_ssh, node ranks 0 and 1, one rank each, over the
    loopback address) train and evaluate exactly as one node with two ranks."""
    def args(run_dir: Path) -> list[str]:
        return [*TINY, "--shards", str(ml_shards), "--text-encoder", str(tiny_bert_dir), "--ds_config",
                str(REPO / "ds_configs" / "zero2.json"), "--run-dir", str(run_dir), *COMPARE, "stage1.micro_batch=8",
                "log_every=1"]

    one_node, two_nodes = tmp_path / "one-node", tmp_path / "two-nodes"
    _run_main(args(one_node), ranks=2)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = _free_port()
    launchers = [
        subprocess.Popen([str(Path(sys.executable).parent / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh",
                          "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
                          str(REPO / "trainer" / "main.py"), *args(two_nodes)],
                         cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    for proc in launchers:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    a, b = _losses(one_node, 1), _losses(two_nodes, 1)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    for (_, la), (_, lb) in zip(a, b):
        assert abs(la - lb) <= 1e-5 * abs(la), (a, b)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one_node, two_nodes))
    assert m1["test"] == m2["test"] and m1["valid"] == m2["valid"]


@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3.json"])
def test_resume_after_sigkill_reaches_the_same_metrics(ml_shards, tiny_bert_dir, tmp_path, ds_config):
    """Killed mid-epoch and resumed, the run trains on from its DeepSpeed checkpoint (ZeRO-2, and ZeRO-3 with its
    partitioned parameters) and ends with the metrics of the run that was never interrupted."""
    common = [
        *TINY,
        "--shards",
        str(ml_shards),
        "--text-encoder",
        str(tiny_bert_dir),
        "--ds_config",
        str(REPO / "ds_configs" / ds_config),
        "--set",
        "save_every_steps=2",
        "stage1.max_steps=8",
        "stage2.max_steps=4",
    ]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run_main([*common, "--run-dir", str(straight)])
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "trainer" / "main.py"), *common, "--run-dir", str(killed)],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    point = killed / "resume.json"
    while time.time() < deadline:
        if point.exists() and json.loads(point.read_text())["batches_done"] >= 4:
            break
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed mid-epoch")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(point.read_text())["batches_done"] > 0  # killed mid-epoch
    assert not (killed / "metrics.json").exists()
    resumed = _run_main(["--resume", str(killed)])
    # it went on from the checkpoint (a restart from step 0 would also reach the same metrics; a resume that did not
    # load the checkpoint's weights and optimizer state would not)
    assert re.search(r"resumed stage \d at epoch \d+, batch [1-9]", resumed.stdout), resumed.stdout[-2000:]
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    assert a["test"] == b["test"] and a["valid"] == b["valid"] and a["best"] == b["best"]
    assert (killed / "export" / "model.safetensors").exists()


def test_clear_errors_for_bad_config_ds_config_and_missing_shards(tmp_path, ml_shards):
    from transrec.trainer.core.overrides import apply_overrides
    from transrec.trainer.core.presets import preset
    from transrec.trainer.core.run_setup import load_ds_config

    with pytest.raises(ValueError, match="stage1 has no field|has no field"):
        apply_overrides(preset("tiny"), ["stage1.epoch=3"])
    with pytest.raises(ValueError, match="cannot parse"):
        apply_overrides(preset("tiny"), ["stage1.epochs=three"])
    with pytest.raises(ValueError, match="micro_batch must be >= 1"):
        apply_overrides(preset("tiny"), ["stage1.micro_batch=0"])
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ValueError, match="train_batch_size.*come from the trainer"):
        load_ds_config(str(bad))
    out = subprocess.run(
        [sys.executable, str(REPO / "trainer" / "main.py"), "--shards", str(tmp_path / "none")],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "no shards at" in out.stderr and "data_shards.build" in out.stderr
    out = subprocess.run(
        [sys.executable, str(REPO / "trainer" / "main.py"), "--shards", str(ml_shards), "--set", "model.kernels=fast"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "kernels must be auto, triton or torch" in out.stderr


@pytest.mark.parametrize("lever", ["model.channels_last=true", "model.compile=user_encoder",
                                   "model.cudnn_benchmark=true"])
def test_speed_levers_train_under_deepspeed(ml_shards, tiny_bert_dir, tmp_path, lever):
    """Each lever through a real DeepSpeed engine (parameter broadcast, flattening, a step, evaluation): a
    channels-last weight once broke the engine's broadcast of parameters as byte views."""
    trainer = tiny_trainer(ml_shards, tiny_bert_dir, tmp_path, "stages=1", "stage1.max_steps=2", lever,
                            "model.compile_backend=aot_eager")
    assert torch.backends.cudnn.benchmark is lever.endswith("cudnn_benchmark=true")
    metrics = trainer.run()
    assert metrics["best"]["scoring"] == "content" and metrics["test"]["users"] == 943
    torch.backends.cudnn.benchmark = False


def test_nan_loss_stops_with_a_clear_message(ml_shards, tiny_bert_dir, tmp_path, monkeypatch):
    from transrec.trainer.monitoring.metric_log import TrainingDiverged

    trainer = tiny_trainer(ml_shards, tiny_bert_dir, tmp_path, "stages=1", "log_every=1")
    original = trainer.model.forward
    monkeypatch.setattr(trainer.model, "forward", lambda batch, objective: original(batch, objective) * float("nan"))
    with pytest.raises(TrainingDiverged, match="loss is nan; the run saved no checkpoint before it diverged: start "
                                              "a new run with a lower stage1.lr"):
        trainer.run()


@pytest.mark.parametrize("ds_config", ["zero3.json", "zero3_offload.json"])
def test_zero3_one_step_save_and_load(ds_config, ml_shards, tiny_bert_dir, tmp_path):
    """ZeRO-3 (and ZeRO-3 with CPU offload): one training step writes a partitioned checkpoint that a resume loads
    (the run has nothing left to train, so its metrics come from the saved best model; that a resumed ZeRO-3 run
    trains on exactly is test_resume_after_sigkill_reaches_the_same_metrics[zero3.json])."""
    run = tmp_path / "z3"
    first_out = _run_main(
        [
            *TINY,
            "--shards",
            str(ml_shards),
            "--text-encoder",
            str(tiny_bert_dir),
            "--run-dir",
            str(run),
            "--ds_config",
            str(REPO / "ds_configs" / ds_config),
            "--stage",
            "1",
            "--set",
            "stage1.max_steps=1",
            "save_every_steps=1",
        ]
    )
    first = json.loads((run / "metrics.json").read_text())
    log = first_out.stdout + first_out.stderr  # not a terminal: no progress-bar carriage returns, no known noise
    assert "\r" not in log and "UNEXPECTED" not in log and "No CUDA runtime" not in log
    assert "stage 1 epoch 0 validation" in log
    point = json.loads((run / "resume.json").read_text())
    assert any((run / "checkpoints" / point["tag"]).glob("zero_pp_rank_0_*model_states.pt"))
    (run / "metrics.json").unlink()
    out = _run_main(["--resume", str(run)])
    assert "resumed stage 1" in out.stdout
    assert json.loads((run / "metrics.json").read_text())["test"] == first["test"]


@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3_offload.json"])
def test_resume_reads_deepspeed_checkpoints_weights_only(ds_config, ml_shards, tiny_bert_dir, tmp_path, monkeypatch):
    """A resume loads every checkpoint file with torch.load(weights_only=True): DeepSpeed's own engine would unpickle
    arbitrary objects."""
    import torch

    from transrec.trainer.main import main

    run = tmp_path / "run"
    main([*TINY, "--shards", str(ml_shards), "--text-encoder", str(tiny_bert_dir), "--run-dir", str(run),
          "--ds_config", str(REPO / "ds_configs" / ds_config), "--stage", "1", "--set", "stage1.max_steps=2",
          "save_every_steps=1"])
    (run / "metrics.json").unlink()
    flags, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: flags.append(k.get("weights_only")) or real_load(*a, **k))
    main(["--resume", str(run)])
    assert len(flags) >= 3 and all(flag is True for flag in flags)  # model states, optimizer states, RNG
    assert (run / "metrics.json").exists()


def test_device_prefetch_trains_the_same(ml_shards, tiny_bert_dir, tmp_path):
    """Batches prepared two ahead (the order a side CUDA stream uses; inline here) give the same losses, step for
    step, and the same model as each batch prepared in its turn."""
    losses, metrics = {}, {}
    for ahead in (0, 2):
        run_dir = tmp_path / f"ahead{ahead}"
        trainer = tiny_trainer(ml_shards, tiny_bert_dir, run_dir, "stages=1", "stage1.max_steps=4", "log_every=1",
                                f"data.device_prefetch={ahead}")
        metrics[ahead] = trainer.run()
        losses[ahead] = (run_dir / "loss_stage1.csv").read_text()
    assert len(losses[0].splitlines()) == 5  # a header and one row per step
    assert losses[2] == losses[0]
    assert metrics[2]["test"] == metrics[0]["test"]


def test_validation_curves_sit_at_the_optimizer_step_they_were_taken(source_run):
    """TensorBoard: each stage's validation under eval/stageN/, at the run's optimizer step when it ran (the x of the
    loss logged at that step), not at the finished stages' steps plus the epoch."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(source_run / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    loss_steps = {s: [e.step for e in acc.Scalars(f"train/stage{s}_loss")] for s in (1, 2)}
    valid_steps = {s: [e.step for e in acc.Scalars(f"eval/stage{s}/ndcg@10")] for s in (1, 2)}
    assert not any(t.startswith("eval/") and t.count("/") == 1 for t in tags)  # no stage-less eval tags
    curve = (source_run / "valid_curve.csv").read_text().splitlines()[1:]
    for s in (1, 2):
        assert len(valid_steps[s]) == sum(row.startswith(f"{s},") for row in curve) >= 1
        assert valid_steps[s] == sorted(valid_steps[s])
        # after the stage's last logged loss, before the next stage's first
        assert loss_steps[s][-1] <= valid_steps[s][-1] and valid_steps[s][0] >= loss_steps[s][0]
    assert valid_steps[1][-1] < loss_steps[2][0]
    assert valid_steps[2][-1] == loss_steps[2][-1]  # the run's last step: stage 2 ends on a logging step here
