"""Config: the selection metric is a validated field, and run records written before a field was retired still load
(resume, evaluation of old runs)."""

from __future__ import annotations

import json

import pytest

from trainer.config import EvalConfig, apply_overrides, preset, to_dict
from trainer.experiments import drop_settings_that_change_nothing
from trainer.main import _config_from_dict


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
