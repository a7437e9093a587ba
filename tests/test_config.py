"""Config: choices are validated literals, the trainable depth is a map over modalities, and run records written
before a field was retired or renamed still load (resume, evaluation of old runs) and keep their run keys."""

from __future__ import annotations

import copy
import json

import pytest

from transrec.trainer.core.config import EvalConfig
from transrec.trainer.core.config_records import from_dict as _config_from_dict
from transrec.trainer.core.config_records import to_dict
from transrec.trainer.core.overrides import apply_overrides
from transrec.trainer.core.presets import preset
from transrec.trainer.experiments.run_keys import drop_settings_that_change_nothing


def test_select_must_name_a_computed_metric():
    assert EvalConfig().select == "ndcg@10"
    assert apply_overrides(preset("tiny"), ["eval.select=hr@20"]).eval.select == "hr@20"
    for bad in ("ndcg@30", "mrr@10", "ndcg10", "ndcg@x"):
        with pytest.raises(ValueError, match="eval.select"):
            EvalConfig(select=bad)


def test_old_run_records_with_retired_fields_load():
    record = to_dict(preset("cpu-small"))
    for stage in ("stage1", "stage2"):
        record[stage]["eval_every"] = 1  # what runs recorded before the field was retired
    record["eval"].pop("select")  # nor did they know the selection metric
    cfg = _config_from_dict(json.loads(json.dumps(record)))
    assert cfg.eval.select == "ndcg@10" and not hasattr(cfg.stage1, "eval_every")


def test_run_keys_keep_the_retired_field_and_drop_the_new_one_at_its_default():
    keyed = drop_settings_that_change_nothing(to_dict(preset("cpu-small")))
    assert keyed["stage1"]["eval_every"] == 1 and keyed["stage2"]["eval_every"] == 1
    assert "select" not in keyed["eval"]
    changed = drop_settings_that_change_nothing(to_dict(apply_overrides(preset("cpu-small"), ["eval.select=hr@10"])))
    assert changed["eval"]["select"] == "hr@10"


def test_choices_are_validated_literals():
    for override, name in (("model.image_backbone=vgg", "model.image.backbone"),
                           ("model.image.backbone=vgg", "model.image.backbone"),
                           ("data.decoder=nvjpeg", "data.decoder"), ("stage2.loss=bpr", "stage2.loss"),
                           ("stage1.head=id", "stage1.head"), ("model.user_encoder=lstm", "user_encoder")):
        with pytest.raises(ValueError, match=name):
            apply_overrides(preset("tiny"), [override])


def test_trainable_depth_is_a_map_over_modalities():
    cfg = apply_overrides(preset("cpu-small"), ["stage2.trainable.text=2", "stage1.trainable=image:-1"])
    assert cfg.stage2.trainable == {"text": 2, "image": 1} and cfg.stage1.trainable == {"image": -1}
    renamed = apply_overrides(preset("cpu-small"), ["stage2.image_trainable=0"])  # the former name still works
    assert renamed.stage2.trainable == {"text": 1, "image": 0}
    with pytest.raises(ValueError, match="block count >= -1"):
        apply_overrides(preset("tiny"), ["stage2.trainable.text=-2"])
    with pytest.raises(ValueError, match="key:value"):
        apply_overrides(preset("tiny"), ["stage2.trainable=text"])


def test_run_records_with_the_former_trainable_fields_load_and_keep_their_keys():
    record = to_dict(preset("cpu-small"))
    for stage in ("stage1", "stage2"):  # what runs recorded before the per-modality map
        depth = record[stage].pop("trainable")
        record[stage].update(text_trainable=depth.get("text", 0), image_trainable=depth.get("image", 0))
    cfg = _config_from_dict(json.loads(json.dumps(record)))
    assert cfg.stage2.trainable == {"text": 1, "image": 1} and cfg.stage1.trainable == {"text": 0, "image": 0}
    keyed = drop_settings_that_change_nothing(to_dict(preset("cpu-small")))
    assert keyed["stage2"]["text_trainable"] == 1 and keyed["stage2"]["image_trainable"] == 1
    assert "trainable" not in keyed["stage2"]
    third = apply_overrides(preset("cpu-small"), ["stage2.trainable.signal=1"])
    third = drop_settings_that_change_nothing(to_dict(third))
    assert third["stage2"]["trainable"] == {"text": 1, "image": 1, "signal": 1}


def test_modality_settings_live_in_their_sections_and_the_flat_names_still_read():
    """model.text.* / model.image.* (each modality's own section, trainer/core/modalities.py); the flat names of before
    the sections are still read from the command line and from old run configs and exports, and keyed as before."""
    cfg = apply_overrides(preset("tiny"), ["model.image.size=48", "model.text_encoder=local-bert",
                                           "model.image_backbone=efficientnet-lite0"])
    assert (cfg.model.image.size, cfg.model.text.encoder, cfg.model.image.backbone) == (48, "local-bert",
                                                                                         "efficientnet-lite0")
    record = to_dict(cfg)
    assert record["model"]["image"]["size"] == 48 and "image_size" not in record["model"]
    assert _config_from_dict(json.loads(json.dumps(record))) == cfg
    flat = copy.deepcopy(record)  # a record written before the sections
    text, image = flat["model"].pop("text"), flat["model"].pop("image")
    flat["model"].update(text_encoder=text["encoder"], max_tokens=text["max_tokens"], text_attention=text["attention"],
                         image_backbone=image["backbone"], image_size=image["size"], image_weights=image["weights"],
                         channels_last=image["channels_last"], cudnn_benchmark=image["cudnn_benchmark"])
    assert _config_from_dict(flat) == cfg
    assert drop_settings_that_change_nothing(copy.deepcopy(record)) == drop_settings_that_change_nothing(flat)
    assert drop_settings_that_change_nothing(record)["model"]["image_size"] == 48  # keyed under the flat name
    with pytest.raises(AttributeError, match="modality's settings live in its section"):
        cfg.model.image_size = 64  # would otherwise set nothing the model reads
    with pytest.raises(ValueError, match="model.sound: not a setting of the model nor a registered modality"):
        _config_from_dict({**record, "model": {**record["model"], "sound": {"rate": 8000}}})
    with pytest.raises(ValueError, match="model.image.size must be >= 32"):
        apply_overrides(preset("tiny"), ["model.image_size=16"])
