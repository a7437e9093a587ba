"""The fault suite, second pass (issue 44): a confirmed item is never dropped, an empty hash list is not "verified",
an export reads only what it lists, raw token ids are checked, settings no run could use are refused, --resume
ignores nothing, and every error is one line, through the deepspeed launcher too. The first pass:
tests/test_faults.py; what each test holds: docs/reliability.md.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from fastapi.testclient import TestClient

from transrec.data_shards.integrity import IntegrityError
from transrec.trainer.core.checkpoint import (
    CHECKPOINT_HASHES,
    read_export_config,
    verify_checkpoint,
    write_checkpoint_hashes,
)
from transrec.trainer.serving.app import create_app
from transrec.trainer.serving.recommender import Recommender


# -- 1. the items journal: every confirmed item kept, compaction moves lines, never deletes them -------------------
def _service(export: Path, catalogue: Path, journal: Path, *extra: str):
    from transrec.trainer.commands.serve import parse_args
    from transrec.trainer.serving.app import open_service

    argv = ["--export", str(export), "--shards", str(catalogue), "--items-journal", str(journal), "--no-batching"]
    return open_service(parse_args([*argv, *extra]), show_progress=False)


def _start_error(export: Path, catalogue: Path, journal: Path) -> str:
    with pytest.raises(SystemExit) as e:
        _service(export, catalogue, journal)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def _five_items(export: Path, catalogue: Path, journal: Path) -> bytes:
    service = _service(export, catalogue, journal)
    client = TestClient(service.app)
    for i in range(5):
        r = client.post("/items", json={"id": f"new-{i}", "text": f"A film about the number {i}"})
        assert r.status_code == 200 and r.json()["persisted"] is True
    service.close()
    return journal.read_bytes()


def _added(service) -> list[str]:
    return [i for i in service.rec.item_ids if i.startswith("new-")]


@pytest.mark.parametrize("damage", ["cut last line", "flipped byte inside", "not an object", "not an item"])
def test_a_damaged_journal_line_stops_the_start_and_no_byte_is_cut(export, catalogue, tmp_path, capsys, damage):
    """Before: the last line of 5 confirmed items, cut half-way, was dropped with a warning and cut from the file."""
    journal = tmp_path / "items.jsonl"
    lines = _five_items(export, catalogue, journal).split(b"\n")[:5]
    number = 5 if damage == "cut last line" else 3
    bad = {"cut last line": lines[4][: len(lines[4]) // 2], "flipped byte inside": lines[2].replace(b'"', b"'", 1),
           "not an object": b"[1, 2]", "not an item": b'{"idx": "new-2"}'}[damage]
    lines[number - 1] = bad
    damaged = b"\n".join(lines) + (b"" if damage == "cut last line" else b"\n")
    journal.write_bytes(damaged)
    message = _start_error(export, catalogue, journal)
    assert message.startswith(f"error: {journal} line {number} ") and "journal is unchanged" in message
    assert "repair that line" in message and "--items-journal-set-aside" in message
    assert journal.read_bytes() == damaged  # nothing cut away: the line can be repaired
    capsys.readouterr()
    service = _service(export, catalogue, journal, "--items-journal-set-aside")
    assert _added(service) == [f"new-{i}" for i in range(5) if i != number - 1]
    assert Path(f"{journal}.damaged").read_bytes() == bad + b"\n"  # byte for byte
    assert journal.read_bytes() == b"".join(x + b"\n" for i, x in enumerate(lines) if i != number - 1)
    assert f"1 damaged lines of {journal} moved to items.jsonl.damaged" in capsys.readouterr().err
    assert TestClient(service.app).post("/items", json={"id": "new-9", "text": "A western"}).status_code == 200
    service.close()
    again = _service(export, catalogue, journal)  # a clean journal: starts without the flag
    assert _added(again)[-1] == "new-9" and len(_added(again)) == 5
    again.close()


def test_the_journal_is_compacted_at_start_and_no_line_is_lost(export, catalogue, tmp_path, capsys, monkeypatch):
    """Lines of items the catalogue holds now (shards rebuilt with them) move to FILE.archived; a kill before the
    journal is replaced leaves every line in one of the two (here: in both)."""
    journal = tmp_path / "items.jsonl"
    lines = [json.dumps({"id": "a", "text": "Red shoe, added before the rebuild"}),
             json.dumps({"id": "new-1", "text": "A western"}), json.dumps({"id": "new-1", "text": "A western, again"})]
    journal.write_text("\n".join(lines) + "\n")
    archived = Path(f"{journal}.archived")
    from transrec.trainer.serving.journal import ItemJournal

    def killed(*_):  # the journal is not replaced: as a kill (or a full disk) there
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ItemJournal, "_replace", killed)
    assert "could not be compacted" in _start_error(export, catalogue, journal)
    assert journal.read_text().splitlines() == lines and archived.read_text().splitlines() == [lines[0], lines[2]]
    monkeypatch.undo()
    capsys.readouterr()
    service = _service(export, catalogue, journal)
    assert _added(service) == ["new-1"] and service.rec.item_ids.count("a") == 1
    assert journal.read_text().splitlines() == [lines[1]]
    assert archived.read_text().splitlines() == [lines[0], lines[2]] * 2  # moved, never deleted
    assert "2 items of" in capsys.readouterr().err
    service.close()
    again = _service(export, catalogue, journal)
    assert _added(again) == ["new-1"] and archived.read_text().splitlines() == [lines[0], lines[2]] * 2
    again.close()


# -- 4. raw token ids; /health re-checks the user encoder ------------------------------------------------------------
@pytest.fixture(scope="module")
def service_rec(export, catalogue) -> Recommender:
    return Recommender.from_export(export, catalogue, show_progress=False)


@pytest.mark.parametrize("tokens", [[10**5], [-5], [2**31], [2**40], [1.5], [], [True], "101 102", [[101]], None])
def test_token_ids_sent_as_content_text_are_checked_422_never_500(service_rec, tokens):
    """Before: 99999 or -5 gave 500 (IndexError), 2**31 500 (OverflowError), 1.5 and [] were added."""
    client = TestClient(create_app(service_rec, batching=False))
    r = client.post("/items", json={"id": f"tokens-{tokens!r}", "content": {"text": tokens}})
    assert r.status_code == 422, r.text
    vocab = service_rec.model.towers["text"].bert.config.vocab_size
    assert f"content.text must be a non-empty list of token ids, whole numbers from 0 to {vocab - 1}" in r.json()[
        "detail"]
    assert client.post("/items", json={"id": f"ok-{tokens!r}", "content": {"text": [1, 2, vocab - 1]}}).status_code \
        == 200


def test_health_rechecks_the_user_encoder(export, catalogue):
    rec = Recommender.from_export(export, catalogue, show_progress=False)
    client = TestClient(create_app(rec, batching=False))
    assert client.get("/health").status_code == 200
    with torch.no_grad():
        for p in rec.model.user_encoder.parameters():
            p.fill_(float("nan"))
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["model_usable"] is False
    assert "NaN or infinite user vector" in health.json()["reason"]


# -- 2, 3. hash lists: an empty one is not "verified"; an unlisted file is never read ------------------------------
@pytest.fixture()
def own_export(export, tmp_path) -> Path:
    return shutil.copytree(export, tmp_path / "export")


def _evaluate_error(export: Path, catalogue: Path) -> str:
    from transrec.trainer.commands.evaluate import main as evaluate_main

    with pytest.raises(SystemExit) as e:
        evaluate_main(["--export", str(export), "--shards", str(catalogue), "--device", "cpu"])
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.mark.parametrize("listing, expected", [
    ("{}", "lists no file"), ("[]", "lists no file"), ("null", "lists no file"),
    ('["config.json"]', "is not a map of file names to sha256"),
    ('{"config.json": 5}', "is not a map of file names to sha256")])
def test_an_empty_or_malformed_hash_list_is_one_line_not_verified(own_export, catalogue, listing, expected):
    """Before: {} loaded an altered export with no notice; [] and null gave a 22-line traceback."""
    (own_export / "config.json").write_text((own_export / "config.json").read_text() + " ")  # altered
    (own_export / CHECKPOINT_HASHES).write_text(listing)
    message = _evaluate_error(own_export, catalogue)
    assert f"{own_export / CHECKPOINT_HASHES} {expected}, so nothing could be verified" in message


def test_a_file_the_hash_list_does_not_cover_is_refused_naming_it(own_export, catalogue, tmp_path):
    """Before: an added text_encoder/added_tokens.json changed the tokenizer, caught only by the vocabulary check."""
    added = own_export / "text_encoder" / "added_tokens.json"
    added.parent.mkdir(exist_ok=True)
    added.write_text('{"[NEW]": 99999}')
    message = _evaluate_error(own_export, catalogue)
    assert message.startswith(f"error: export file {added} is not listed in {own_export / CHECKPOINT_HASHES}")
    with pytest.raises(IntegrityError, match="added_tokens.json is not listed"):
        read_export_config(own_export)
    added.unlink()
    read_export_config(own_export)  # as written: verified
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "model_states.pt").write_bytes(b"state")
    write_checkpoint_hashes(checkpoint)
    (checkpoint / "extra.pt").write_bytes(b"pickle")
    with pytest.raises(IntegrityError, match=r"checkpoint file .*extra.pt is not listed"):
        verify_checkpoint(checkpoint)


# -- 5, 6, 7. settings and commands: one line, nothing ignored, bounds ------------------------------------------------
def _main_error(capsys, *argv: str) -> str:
    from transrec.trainer.main import main

    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = capsys.readouterr().err.strip() if e.value.code == 2 else str(e.value.code)
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("setting, expected", [
    ("stage1.lr=1e300", "stage1.lr must be <= 1, not 1e+300"),
    ("stage2.lr=1e30", "stage2.lr must be <= 1, not 1e+30"),
    ("model.temperature=1e-45", "model.temperature must be from 0.0001 to 10000, not 1e-45"),
    ("seed=100000000000000000000", "seed must be <= 4294967295, not 100000000000000000000"),
    ("data.user_fraction=1e-300", "data.user_fraction must be >= 1e-06, not 1e-300"),
    ("model.max_len=1000000000", "model.max_len must be <= 10000, not 1000000000"),
    ("eval.bootstrap=1000000000", "eval.bootstrap must be <= 100000, not 1000000000"),
    ("data.num_workers=1000000", "data.num_workers must be <= 512, not 1000000"),
])
def test_a_setting_no_run_could_use_is_one_line(capsys, tmp_path, setting, expected):
    err = _main_error(capsys, "--preset", "tiny", "--run-dir", str(tmp_path / "r"), "--set", setting)
    assert err.startswith(f"error: {expected} (") and not (tmp_path / "r").exists()


def test_a_seed_out_of_range_is_one_line(capsys, tmp_path):
    err = _main_error(capsys, "--preset", "tiny", "--run-dir", str(tmp_path / "r"), "--seed", "99999999999999999999")
    assert err.startswith("error: seed must be <= 4294967295, not 99999999999999999999")


@pytest.fixture()
def recorded_run(tmp_path) -> Path:
    from transrec.trainer.core.config_records import to_dict
    from transrec.trainer.core.presets import preset

    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"config": to_dict(preset("tiny"))}, default=str))
    return run


@pytest.mark.parametrize("extra, named", [(["--set", "stage1.lr=inf"], "--set"), (["--set", "bogus.x=1"], "--set"),
                                          (["--seed", "3"], "--seed"), (["--preset", "tiny"], "--preset"),
                                          (["--stage", "2", "--overwrite"], "--stage, --overwrite")])
def test_settings_given_with_resume_are_refused_not_ignored(capsys, recorded_run, extra, named):
    from transrec.trainer.main import parse_args

    err = _main_error(capsys, "--resume", str(recorded_run), *extra)
    assert err.startswith(f"error: --resume {recorded_run} continues the run with the settings it recorded: {named} "
                          "would be ignored; drop it")
    cfg, _ = parse_args(["--resume", str(recorded_run), "--ds_config", "ds_configs/zero2.json"])  # the engine: allowed
    assert cfg.resume == str(recorded_run)


@pytest.mark.parametrize("change, expected", [({"model": {"d": 0}}, "model.d must be >= 1, not 0"),
                                              (None, "Expecting value")])
def test_resume_of_a_run_whose_record_is_invalid_is_one_line(capsys, recorded_run, change, expected):
    record = recorded_run / "run_config.json"
    if change is None:
        record.write_text("")
    else:
        data = json.loads(record.read_text())
        data["config"]["model"].update(change["model"])
        record.write_text(json.dumps(data))
    err = _main_error(capsys, "--resume", str(recorded_run))
    assert err.startswith(f"error: --resume {recorded_run}: {record} cannot be used (") and expected in err


@pytest.mark.parametrize("content, expected", [
    ('{"zero_optimization": {"stage": 7}}', "zero_optimization.stage must be 0, 1, 2 or 3, not 7"),
    ('{"zero_optimization": {"stage": 2},', "is not valid JSON (Expecting property name"),
    ("[2]", "must hold a JSON object, not list"),
    (None, "not found: pick one of ds_configs/*.json"),
])
def test_a_bad_ds_config_is_one_line_before_the_run_directory_is_touched(capsys, catalogue, tmp_path, content,
                                                                         expected):
    """Before: 31 to 61 lines of traceback, with .lock, ds_config.json, run_config.json and tensorboard/ left."""
    ds = tmp_path / "ds.json"
    if content is not None:
        ds.write_text(content)
    err = _main_error(capsys, "--preset", "tiny", "--shards", str(catalogue), "--run-dir", str(tmp_path / "r"),
                      "--ds_config", str(ds))
    assert err.startswith(f"error: DeepSpeed config {ds}") and expected in err
    assert not (tmp_path / "r").exists()


def test_a_diverged_run_is_one_line_that_says_whether_it_has_a_checkpoint(capsys, catalogue, tmp_path, monkeypatch):
    import transrec.trainer.main as main_module
    from transrec.trainer.monitoring.metric_log import TrainingDiverged, diverged_remedy

    assert diverged_remedy(tmp_path, 1) == ("the run saved no checkpoint before it diverged: start a new run with a "
                                            "lower stage1.lr, or check the input data")
    (tmp_path / "resume.json").write_text("{}")
    assert diverged_remedy(tmp_path, 2).startswith(f"the last good checkpoint in {tmp_path / 'checkpoints'} is intact")

    def diverges(*_, **__):
        raise TrainingDiverged("stage 1 epoch 0 step 3: loss is nan; " + diverged_remedy(tmp_path / "x", 1))

    monkeypatch.setattr(main_module, "train", diverges)
    err = _main_error(capsys, "--preset", "tiny", "--shards", str(catalogue), "--run-dir", str(tmp_path / "r"))
    assert err == ("error: stage 1 epoch 0 step 3: loss is nan; the run saved no checkpoint before it diverged: start "
                   "a new run with a lower stage1.lr, or check the input data")


def test_evaluate_prior_beta_that_overflows_float32_scores_is_a_usage_error(capsys, export, catalogue):
    """Before: 1e38 was accepted, the scores overflowed and the error blamed the export."""
    from transrec.trainer.commands.evaluate import main as evaluate_main

    with pytest.raises(SystemExit) as e:
        evaluate_main(["--export", str(export), "--shards", str(catalogue), "--prior-beta", "1e38"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--prior-beta: must be a number >= 0 or auto" in err and "at most 1e+06" in err


# -- 8. through the deepspeed launcher, the trainer's error line is the last line -------------------------------------
def test_through_the_deepspeed_launcher_the_error_line_is_printed_last(catalogue, tmp_path):
    """Before: the launcher's `[ERROR] ... exits with return code = 1` and its kill lines came after the trainer's
    line. A real launcher, one rank, on CPU."""
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 7}}')
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--master_port", str(port),
                          str(REPO / "trainer" / "main.py"), "--preset", "tiny", "--shards", str(catalogue),
                          "--run-dir", str(tmp_path / "r"), "--ds_config", str(ds)],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert out.returncode == 1, out.stdout
    assert any("exits with return code = 1" in line for line in lines), out.stdout  # the launcher's line, before
    assert lines[-1] == f"error: DeepSpeed config {ds}: zero_optimization.stage must be 0, 1, 2 or 3, not 7 " \
                        "(ds_configs/zero*.json hold one of each)", out.stdout
    assert not (tmp_path / "r").exists()
