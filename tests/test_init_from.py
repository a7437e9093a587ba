"""--init-from: an export loaded into a new catalogue, whole or in parts (init_parts, init_reset), towers the
catalogue does not use skipped, a different architecture refused."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_trainer
from safetensors.torch import load_file


def test_export_loads_into_a_new_catalogue(source_run, hm_shards, tiny_bert_dir, tmp_path):
    exported = load_file(str(source_run / "export" / "model.safetensors"))
    transfer = tiny_trainer(hm_shards, tiny_bert_dir, tmp_path / "t", "seed=1", f"init_from={source_run / 'export'}")
    scratch = tiny_trainer(hm_shards, tiny_bert_dir, tmp_path / "s", "seed=1")
    t_state, s_state = transfer.model.state_dict(), scratch.model.state_dict()
    assert t_state["head.weight"].shape[0] == transfer.num_items != 1682  # a new catalogue with its own head
    for k, v in exported.items():
        torch.testing.assert_close(t_state[k], v, rtol=0, atol=0)
    differ = [
        k
        for k in exported
        if k.startswith(("user_encoder.", "towers.text.pool.", "towers.image.blocks."))
        and not torch.equal(s_state[k], exported[k])
    ]
    assert differ, "scratch and transfer models should start from different weights"


def test_init_from_parts(source_run, hm_shards, tiny_bert_dir, tmp_path):
    """init_parts=towers: the towers come from the export, the user encoder starts as in a run from scratch (same
    seed); user_encoder: the reverse."""
    exported = load_file(str(source_run / "export" / "model.safetensors"))
    export = f"init_from={source_run / 'export'}"
    scratch = tiny_trainer(hm_shards, tiny_bert_dir, tmp_path / "s", "seed=1").model.state_dict()
    for parts, taken in (("towers", "towers."), ("user_encoder", "user_encoder.")):
        state = tiny_trainer(hm_shards, tiny_bert_dir, tmp_path / parts, "seed=1", export,
                              f"init_parts={parts}").model.state_dict()
        assert all(torch.equal(state[k], exported[k]) for k in exported if k.startswith(taken))
        fresh = [k for k in exported if k.startswith(("towers.", "user_encoder.")) and not k.startswith(taken)]
        assert fresh and all(torch.equal(state[k], scratch[k]) for k in fresh)
        assert any(not torch.equal(scratch[k], exported[k]) for k in fresh)  # the two starts do differ there
    with pytest.raises(ValueError, match="init_parts must be"):
        tiny_trainer(hm_shards, tiny_bert_dir, tmp_path / "bad", export, "init_parts=head")


def test_init_reset_keeps_named_parts_new(source_run, hm_shards, tiny_bert_dir, tmp_path):
    """init_reset: the named parts start as in a run from scratch (same seed) although the export has them; the rest
    comes from the export. A prefix matches whole name components only, must name loaded tensors, and needs
    init_from."""
    exported = load_file(str(source_run / "export" / "model.safetensors"))
    export = f"init_from={source_run / 'export'}"
    scratch = tiny_trainer(hm_shards, tiny_bert_dir, tmp_path / "s", "seed=1").model.state_dict()
    reset = ("user_encoder.blocks.0", "user_encoder.pos")
    state = tiny_trainer(hm_shards, tiny_bert_dir, tmp_path / "r", "seed=1", export,
                          f"init_reset={reset[0]}, {reset[1]}.").model.state_dict()
    fresh = [k for k in exported if k.startswith(reset)]
    assert len(fresh) == 13  # the block's 12 tensors and the position table
    assert all(torch.equal(state[k], scratch[k]) for k in fresh)
    assert any(not torch.equal(scratch[k], exported[k]) for k in fresh)  # the two starts do differ there
    from transrec.trainer.core.checkpoint import DOMAIN_SPECIFIC

    kept = [k for k in exported if not k.startswith(reset) and not k.startswith(DOMAIN_SPECIFIC)]
    assert kept and all(torch.equal(state[k], exported[k]) for k in kept)
    with pytest.raises(ValueError, match="'user_encoder.block' names none of the tensors"):
        tiny_trainer(hm_shards, tiny_bert_dir, tmp_path / "partial", "seed=1", export, "init_reset=user_encoder.block")
    with pytest.raises(ValueError, match="names none of the tensors .* \\(towers\\)"):  # not loaded with these parts
        tiny_trainer(hm_shards, tiny_bert_dir, tmp_path / "parts", export, "init_parts=towers",
                      "init_reset=user_encoder.blocks.0")
    with pytest.raises(ValueError, match="give the export with --init-from"):
        tiny_trainer(hm_shards, tiny_bert_dir, tmp_path / "alone", "init_reset=user_encoder.blocks.0")


def test_only_the_towers_the_catalogue_uses(source_run, ml_shards, tiny_bert_dir, tmp_path, capsys):
    """Text-only shards build no image tower (nor cache one); a mixed export loads into them with its image tower
    skipped and said so, and their export loads into a mixed catalogue with the image tower from its backbone."""
    from conftest import REPO as ROOT
    from conftest import _build

    text_only = _build(tmp_path / "hm-text", "hm-fashion", ROOT / "data" / "hm-fashion-fixture", modality="text")
    trainer = tiny_trainer(text_only, tiny_bert_dir, tmp_path / "t", f"init_from={source_run / 'export'}",
                            "stages=1")
    assert list(trainer.model.towers) == ["text"]
    assert "towers this catalogue does not use, skipped: ['image']" in capsys.readouterr().out
    metrics = trainer.run()
    assert metrics["best"]["scoring"] == "content"
    assert "cached frozen lower blocks of ['text']" in capsys.readouterr().out
    exported = load_file(str(tmp_path / "t" / "export" / "model.safetensors"))
    assert not any(k.startswith("towers.image.") for k in exported)
    mixed = tiny_trainer(ml_shards, tiny_bert_dir, tmp_path / "m", f"init_from={tmp_path / 't' / 'export'}")
    assert set(mixed.model.towers) == {"text", "image"}
    assert "towers the export lacks, from their backbones: ['image']" in capsys.readouterr().out


def test_init_from_rejects_a_different_architecture(source_run, hm_shards, tiny_bert_dir, tmp_path):
    with pytest.raises(ValueError, match="architecture differs"):
        tiny_trainer(hm_shards, tiny_bert_dir, tmp_path, f"init_from={source_run / 'export'}", "model.d=48")


def test_sequence_input_scale_is_part_of_the_architecture(source_run, hm_shards, tiny_bert_dir, tmp_path):
    """An export loads only into the scale it was trained with; an export written before the setting existed
    counts as scale 1."""
    import json
    import shutil

    with pytest.raises(ValueError, match="sequence_input_scale"):
        tiny_trainer(hm_shards, tiny_bert_dir, tmp_path / "a", f"init_from={source_run / 'export'}",
                     "model.sequence_input_scale=4")
    older = tmp_path / "older_export"
    shutil.copytree(source_run / "export", older)
    meta = json.loads((older / "config.json").read_text())
    assert meta["model"].pop("sequence_input_scale") == 1.0
    (older / "config.json").write_text(json.dumps(meta))
    (older / "files.sha256.json").unlink()  # exports of that time carried no hashes either
    trainer = tiny_trainer(hm_shards, tiny_bert_dir, tmp_path / "b", f"init_from={older}")
    assert trainer.model.user_encoder.input_scale == 1.0
    with pytest.raises(ValueError, match="sequence_input_scale"):
        tiny_trainer(hm_shards, tiny_bert_dir, tmp_path / "c", f"init_from={older}", "model.sequence_input_scale=2")


def test_the_starting_model_is_a_candidate(source_run, hm_shards, tiny_bert_dir, tmp_path):
    """eval.initial_candidate: the export's model, scored before any training, is stage 0 of the fine-tuning run; its
    validation and test figures equal a zero-shot run's, and the selection takes the best of stages 0, 1 and 2."""
    import json

    export = f"init_from={source_run / 'export'}"
    zero_shot = tiny_trainer(hm_shards, tiny_bert_dir, tmp_path / "zs", "seed=1", export, "stages=none").run()
    tuned = tiny_trainer(hm_shards, tiny_bert_dir, tmp_path / "ft", "seed=1", export, "eval.initial_candidate=true",
                         "stage1.epochs=1", "stage2.epochs=1").run()
    assert set(tuned["stages"]) == {"0", "1", "2"}
    assert tuned["stages"]["0"]["valid"] == zero_shot["stages"]["0"]["valid"]
    assert tuned["stages"]["0"]["test"] == zero_shot["stages"]["0"]["test"]
    best = max(tuned["stages"], key=lambda s: tuned["stages"][s]["valid"]["ndcg@10"])
    assert str(tuned["best"]["stage"]) == best
    assert json.loads((tmp_path / "ft" / "metrics.json").read_text())["best"]["stage"] == tuned["best"]["stage"]
    with pytest.raises(ValueError, match="give the export to start from with --init-from"):
        tiny_trainer(hm_shards, tiny_bert_dir, tmp_path / "alone", "eval.initial_candidate=true")


def test_an_export_written_before_the_modality_sections_loads(source_run, hm_shards, tiny_bert_dir, tmp_path):
    """Exports whose config.json holds the flat model names of before the modalities' sections (model.image_size,
    model.text_encoder, ...) read into the sections, and initialise a run exactly as the same export does now."""
    import json
    import shutil

    from transrec.trainer.core.checkpoint import read_export_config, write_checkpoint_hashes

    old = tmp_path / "old_export"
    shutil.copytree(source_run / "export", old)
    meta = json.loads((old / "config.json").read_text())
    model = meta["model"]
    text, image = model.pop("text"), model.pop("image")
    model.update(text_encoder=text["encoder"], max_tokens=text["max_tokens"], text_attention=text["attention"],
                 image_backbone=image["backbone"], image_size=image["size"], image_weights=image["weights"],
                 channels_last=image["channels_last"], cudnn_benchmark=image["cudnn_benchmark"])
    (old / "config.json").write_text(json.dumps(meta, indent=1))
    write_checkpoint_hashes(old)
    assert read_export_config(old)[1] == read_export_config(source_run / "export")[1]
    now = tiny_trainer(hm_shards, tiny_bert_dir, tmp_path / "now", "seed=1", f"init_from={source_run / 'export'}")
    then = tiny_trainer(hm_shards, tiny_bert_dir, tmp_path / "then", "seed=1", f"init_from={old}")
    for k, v in now.model.state_dict().items():
        assert torch.equal(then.model.state_dict()[k], v), k
