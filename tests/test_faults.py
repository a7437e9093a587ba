"""The fault suite, model side: a wrong model never scores well and a changed export never loads silently.

NaN scores are errors (evaluation) or the worst rank (validation in training), never hits; an export is verified
against the hashes written with it, and a damaged, truncated, empty or invalid one is one line naming the file;
bad settings are one line naming the setting. Shards: tests/test_shard_integrity.py; the run directory's lock and
resumed logs: tests/test_run_dir_lock.py, tests/test_resume_logs.py; the service: tests/test_serve_limits.py.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_trainer
from safetensors.torch import load_file, save_file

from transrec.data_shards.integrity import IntegrityError
from transrec.trainer.commands.evaluate import main as evaluate_main
from transrec.trainer.core.checkpoint import CHECKPOINT_HASHES, ExportError, read_export_config, write_checkpoint_hashes
from transrec.trainer.evaluation import ranking as ev


# -- non-finite scores ------------------------------------------------------------------------------------------
def _data(n_users: int, num_items: int, seed: int = 0) -> ev.EvalUsers:
    rng = np.random.default_rng(seed)
    hist = rng.integers(0, num_items, size=(n_users, 4))
    return ev.EvalUsers(users=np.arange(n_users), histories=hist, targets=rng.integers(0, num_items, n_users),
                        seen=[h for h in hist], features={})


def test_a_nan_target_score_is_the_worst_rank_not_rank_one():
    scores = torch.tensor([[0.1, 0.5, 0.2], [0.1, float("nan"), 0.2], [0.3, 0.2, 0.1], [float("inf"), 0.2, 0.1]])
    targets = torch.tensor([1, 1, 0, 0])
    pairs = ev.excluded_pairs(targets, [np.array([], dtype=np.int64)] * 4, exclude_seen=False)
    ranks = ev.ranks_from_scores(lambda sl: scores[:, sl], 3, scores.gather(1, targets[:, None])[:, 0], pairs, chunk=2)
    # user 0: 0.5 is the best (rank 1); user 1: its target is NaN; user 2: rank 1; user 3: an infinite score
    assert ranks.tolist() == [1, 4, 1, 4]


def test_a_nan_item_score_makes_the_user_unrankable_even_when_the_target_is_finite():
    scores = torch.tensor([[float("nan"), 0.5, 0.2]])
    ranks = ev.ranks_from_scores(lambda sl: scores[:, sl], 3, torch.tensor([0.5]),
                                 ev.excluded_pairs(torch.tensor([1]), [], exclude_seen=False))
    assert ranks.tolist() == [4]


def test_nan_user_vectors_stop_the_evaluation_with_a_count():
    items, data = torch.randn(50, 8), _data(20, 50)
    users = torch.randn(20, 8)
    users[[3, 7, 11]] = float("nan")
    with pytest.raises(ev.NonFiniteScores, match=r"export X gives NaN or infinite scores for 3 of 20 users"):
        ev.rank_with_vectors(lambda hist, c: users[torch.as_tensor(c.users)], items, data, True, user_batch=6,
                             what="the export X")


def test_nan_item_vectors_are_counted_in_the_message():
    items, data = torch.randn(50, 8), _data(20, 50)
    items[5] = float("nan")
    with pytest.raises(ev.NonFiniteScores, match=r"\(1 of 50 item vectors NaN or infinite\) gives NaN or infinite "
                                                 r"scores for 20 of 20 users"):
        ev.rank_with_vectors(lambda hist, c: torch.ones(len(hist), 8), items, data, True)


def test_in_training_nan_users_get_the_worst_rank_so_they_count_as_misses(caplog):
    items, data = torch.randn(50, 8), _data(20, 50)
    users = torch.randn(20, 8)
    finite = ev.rank_with_vectors(lambda hist, c: users[torch.as_tensor(c.users)], items, data, True)
    users[:5] = float("nan")
    with caplog.at_level(logging.WARNING, logger="transrec"):
        ranks = ev.rank_with_vectors(lambda hist, c: users[torch.as_tensor(c.users)], items, data, True,
                                     nonfinite="worst")
    assert ranks[:5].tolist() == [50] * 5 and np.array_equal(ranks[5:], finite[5:])
    assert "NaN or infinite scores for 5 of 20 users, recorded as rank 50" in caplog.text
    scores = torch.full((20, 50), float("nan"))
    worst = ev.rank_with_scores(lambda hist, c: scores[torch.as_tensor(c.users)], 50, data, True, nonfinite="worst")
    assert ev.metrics_from_ranks(worst)["ndcg@10"] == 0.0 and ev.metrics_from_ranks(worst)["hr@20"] == 0.0


def test_a_trainer_whose_model_diverged_ranks_every_validation_user_last(hm_shards, tiny_bert_dir, tmp_path):
    trainer = tiny_trainer(hm_shards, tiny_bert_dir, tmp_path / "run")
    with torch.no_grad():
        next(trainer.model.user_encoder.parameters()).fill_(float("nan"))
    trainer.set_stage(1)
    ranks = trainer.evaluate("valid", "content")
    assert len(ranks) and (ranks == trainer.num_items).all()
    assert ev.metrics_from_ranks(ranks)["ndcg@10"] == 0.0


# -- exports ----------------------------------------------------------------------------------------------------
@pytest.fixture()
def export(source_run, tmp_path):
    """A copy of the source run's export, free to damage."""
    return shutil.copytree(source_run / "export", tmp_path / "export")


def _evaluate(export, shards, *extra) -> str:
    """The standalone evaluator's error line (it must exit with one)."""
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--export", str(export), "--shards", str(shards), "--device", "cpu", *extra])
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def _flip(path, offset: int | None = None, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_an_export_lists_the_hash_of_every_file(export):
    listed = json.loads((export / CHECKPOINT_HASHES).read_text())
    files = sorted(str(f.relative_to(export)) for f in export.rglob("*") if f.is_file() and f.name != CHECKPOINT_HASHES)
    assert sorted(listed) == files and {"model.safetensors", "config.json"} <= set(listed)
    read_export_config(export)  # intact: verified, no error


def test_a_flipped_low_bit_in_an_export_weight_is_named_by_the_evaluator(export, ml_shards):
    """A subprocess, as a user runs it: exit 1, one line on stderr naming model.safetensors."""
    _flip(export / "model.safetensors")
    out = subprocess.run([sys.executable, "-m", "transrec.trainer.commands.evaluate", "--export", str(export),
                          "--shards", str(ml_shards), "--device", "cpu"], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: export file ") and "model.safetensors differs" in lines[0]


@pytest.mark.parametrize("damage", ["truncate", "empty", "delete", "config"])
def test_a_truncated_empty_missing_or_altered_export_file_is_one_line(export, ml_shards, damage):
    weights = export / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "delete":
        (export / "text_encoder" / "vocab.txt").unlink()
    else:
        (export / "config.json").write_text((export / "config.json").read_text().replace('"d": 32', '"d": 64'))
    message = _evaluate(export, ml_shards)
    name = {"delete": "vocab.txt is missing", "config": "config.json differs"}.get(damage, "model.safetensors differs")
    assert name in message


def test_an_export_written_before_hashes_loads_with_a_notice_and_a_truncated_one_is_named(export, caplog):
    (export / CHECKPOINT_HASHES).unlink()
    with caplog.at_level(logging.WARNING, logger="transrec"):
        read_export_config(export)
    assert f"{export} has no {CHECKPOINT_HASHES} (exported by an older version): loading it unverified" in caplog.text
    from transrec.trainer.core.checkpoint import read_weights

    (export / "model.safetensors").write_bytes(b"")
    with pytest.raises(IntegrityError, match=r"model.safetensors cannot be read as safetensors .*truncated or damaged"):
        read_weights(export / "model.safetensors")


@pytest.mark.parametrize("model, expected", [
    ({"d": 0}, "invalid model settings: model.d must be >= 1, not 0"),
    ({"d": "32"}, "invalid model settings: model.d must be an int, not '32'"),
    ({"temperature": float("nan")}, "model.temperature must be a finite float"),
    ({"dimension": 32}, "unknown model settings ['dimension']"),
    (None, "has no 'model' section"),
])
def test_an_export_config_with_invalid_values_is_one_line_naming_it(export, model, expected):
    meta = json.loads((export / "config.json").read_text())
    if model is None:
        del meta["model"]
    else:
        meta["model"].update(model)
    (export / "config.json").write_text(json.dumps(meta))
    write_checkpoint_hashes(export)  # a consistent export whose settings are wrong, not a damaged file
    with pytest.raises(ExportError) as e:
        read_export_config(export)
    assert str(e.value).startswith(f"{export / 'config.json'}") and expected in str(e.value)
    assert "\n" not in str(e.value)


def test_nan_weights_never_score_better_than_popularity(export, ml_shards):
    """An export whose weights diverged into NaN, hashed as written (a consistent file): the evaluator stops and says
    how many users; no metric is reported. Before: HR@10 0.60 from NaN ranks counted as hits."""
    state = load_file(str(export / "model.safetensors"))
    name = next(k for k in state if k.startswith("user_encoder.") and state[k].is_floating_point())
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(export / "model.safetensors"))
    write_checkpoint_hashes(export)
    message = _evaluate(export, ml_shards, "--split", "valid")
    assert f"the export {export} gives NaN or infinite scores for" in message and "users: it cannot rank" in message


# -- settings and commands --------------------------------------------------------------------------------------
def _main_error(capsys, *argv: str) -> str:
    from transrec.trainer.main import main

    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = capsys.readouterr().err.strip() if e.value.code == 2 else str(e.value.code)
    assert "\n" not in err, err
    return err


@pytest.mark.parametrize("setting, expected", [
    ("stage1.max_steps=-5", "stage1.max_steps must be >= 0, not -5"),
    ("stage2.lr=nan", "stage2.lr must be a finite float, not nan"),
    ("stage1.lr=-1", "stage1.lr must be > 0, not -1.0"),
    ("model.d=-4", "model.d must be >= 1, not -4"),
    ("model.user_heads=0", "model.user_heads must be >= 1, not 0"),
    ("eval.user_batch=0", "eval.user_batch must be >= 1, not 0"),
    ("save_every_steps=0", "save_every_steps must be >= 1, not 0"),
    ("data.num_workers=-1", "data.num_workers must be >= 0, not -1"),
])
def test_a_bad_setting_is_one_line_naming_it(capsys, ml_shards, tmp_path, setting, expected):
    err = _main_error(capsys, "--preset", "tiny", "--shards", str(ml_shards), "--run-dir", str(tmp_path / "r"),
                      "--set", setting)
    assert err == f"error: {expected}"
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_init_from_a_folder_that_is_not_an_export_is_one_line(capsys, ml_shards, tmp_path):
    (tmp_path / "notes").mkdir()
    err = _main_error(capsys, "--preset", "tiny", "--shards", str(ml_shards), "--run-dir", str(tmp_path / "r"),
                      "--init-from", str(tmp_path / "notes"))
    assert err == (f"error: {tmp_path / 'notes'} is not an export: config.json and model.safetensors missing (a run "
                   "writes its export to RUN_DIR/export; give that folder)")


def test_a_best_model_file_carries_its_hash_and_a_flipped_bit_is_named(tmp_path):
    """best_stageN.safetensors (selection, resume, stage 2's start): the hash of its tensors is stored inside the
    file, written in the same rename, so a kill can never leave a file and its hash disagreeing."""
    from transrec.trainer.core.checkpoint import load_model_state, save_model_state

    torch.manual_seed(0)
    model, path = torch.nn.Linear(64, 32), tmp_path / "best_stage1.safetensors"
    save_model_state(model, path)
    twin = torch.nn.Linear(64, 32)
    load_model_state(twin, path)
    assert torch.equal(twin.weight, model.weight)
    _flip(path, offset=path.stat().st_size - 100, bit=0)  # a low bit of a weight near the end of the data
    with pytest.raises(IntegrityError, match=r"best_stage1.safetensors differs from the hash of its tensors"):
        load_model_state(twin, path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))  # written before the hash
    load_model_state(twin, path)  # still loads
