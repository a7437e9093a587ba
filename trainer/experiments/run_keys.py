"""What a cached run's key covers (trainer/experiments/suite.py: Suite.key): the settings that change the run. A
setting added after runs were cached stays out of the key at the value that reproduces the behaviour from before it
existed, a retired one keeps its old value in the key, and a run with the paper's objectives leaves out the settings
it never reads, so runs keep the keys (and the cached results) they had.
"""

from __future__ import annotations

from dataclasses import asdict

from transrec.trainer.core.config import TransferConfig
from transrec.trainer.core.modalities import MODALITIES, legacy_model_keys

CONTENT_SOFTMAX_SETTINGS = ("candidates", "full_catalogue_max", "logq_correction", "mask_history",
                            "popularity_correction")
# Settings added after runs were cached, with the value that reproduces the behaviour from before they existed:
# at that value they change nothing, so they stay out of the key. (section or None for top level, name, value)
ADDED_AT_OLD_BEHAVIOUR = ((None, "init_parts", "all"), ("model", "text_attention", "sdpa"),
                          ("model", "channels_last", False), (None, "optimizer", "auto"), ("eval", "select", "ndcg@10"),
                          ("data", "split", "auto"), ("model", "compile", "none"), ("model", "compile_mode", "default"),
                          ("model", "compile_backend", "inductor"), ("eval", "precision", "fp32"),
                          ("model", "cudnn_benchmark", False), ("data", "device_prefetch", -1),
                          (None, "init_reset", ""), ("model", "sequence_input_scale", 1.0),
                          ("eval", "initial_candidate", False), ("stage1", "popularity_correction", 0.0),
                          ("stage2", "popularity_correction", 0.0), ("eval", "max_users", 0))


# Settings removed after runs were cached that never changed a run: their old value stays in the key.
RETIRED_IN_KEY = (("stage1", "eval_every", 1), ("stage2", "eval_every", 1))
# Settings renamed after runs were cached: keyed under their former names while they hold what those could.
# (stage.trainable, a map over text and image only, is keyed as text_trainable / image_trainable.)


def default_transfer_settings() -> dict:
    return asdict(TransferConfig())


def flat_model_settings(cfg: dict) -> dict:
    """A run configuration (to_dict's form, or an older record's) with each modality section's fields under the flat
    model names they had before the sections existed (model.image_size, ...): the form run keys hash, so cached runs
    keep their keys, and the form the reports read. A field with no flat name stays in its section."""
    model = dict(cfg["model"])
    flat = {}
    for old, (name, key) in legacy_model_keys().items():
        if isinstance(model.get(name), dict) and key in model[name]:
            flat[old] = model[name][key]
    for name in MODALITIES:
        if isinstance(model.get(name), dict):
            rest = {k: v for k, v in model.pop(name).items() if k not in MODALITIES[name].legacy_keys.values()}
            if rest:
                model[name] = rest
    return {**cfg, "model": {**model, **flat}}


def drop_settings_that_change_nothing(cfg: dict) -> dict:
    """A run key covers the settings that change the run, so runs keep the keys (and cached results) they had
    before a setting existed when it changes nothing for them: a setting of ADDED_AT_OLD_BEHAVIOUR at its old
    behaviour; for a run with the paper's objectives (free stage-1 head, CPC), the content-softmax settings, which it
    never reads, and the objective choices themselves. The modalities' sections are keyed under their flat names
    (flat_model_settings)."""
    cfg = flat_model_settings(cfg)
    for section, name, old in ADDED_AT_OLD_BEHAVIOUR:
        where = cfg if section is None else cfg[section]
        if name in where and where[name] == old:
            where.pop(name)
    cfg.pop("monitor", None)  # what a run records for watching it: never what it trains
    if cfg.get("transfer") == default_transfer_settings():  # plain fine-tuning: what every run did before transfer=auto
        cfg.pop("transfer")
    for section, name, old in RETIRED_IN_KEY:
        cfg[section].setdefault(name, old)
    for stage in ("stage1", "stage2"):
        if "trainable" not in cfg[stage]:  # a record of before the map: already text_trainable / image_trainable
            continue
        trainable = cfg[stage]["trainable"]
        if set(trainable) <= {"text", "image"}:
            cfg[stage].pop("trainable", None)
            cfg[stage].update(text_trainable=trainable.get("text", 0), image_trainable=trainable.get("image", 0))
    if cfg["stage1"].get("head") != "free" or cfg["stage2"].get("loss") != "cpc":
        return cfg
    for stage in ("stage1", "stage2"):
        for key in (*CONTENT_SOFTMAX_SETTINGS, "head", "loss"):
            cfg[stage].pop(key, None)
    if cfg["model"]["temperature"] == 1.0 and not cfg["model"]["learn_temperature"]:
        cfg["model"].pop("temperature")
        cfg["model"].pop("learn_temperature")
    return cfg
