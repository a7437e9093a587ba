"""A configuration as plain data and back: run_config.json's "config" and an export's config.json, records of every
earlier version included (flat model names of before the modality sections, renamed and retired settings).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from transrec.data_shards.shard_io import BUILT_IN_MODALITIES
from transrec.trainer.core.config import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    MonitorConfig,
    RunConfig,
    Stage1Config,
    Stage2Config,
    TransferConfig,
)
from transrec.trainer.core.modalities import MODALITIES, default_sections, legacy_model_keys

# Former names of settings, still accepted on the command line: the built-in modalities' trainable depth, stage
# fields (<modality>_trainable) before it became a map.
RENAMED = {f"{name}_trainable": f"trainable.{name}" for name in BUILT_IN_MODALITIES}



def to_dict(cfg: RunConfig) -> dict:
    """The configuration as plain data (run_config.json's "config"); from_dict reads it back. Each modality's section
    is written under the model as "<modality>": {...}."""
    d = dataclasses.asdict(cfg)
    d["model"] = model_to_dict(d["model"])
    return d


def model_to_dict(model: dict | ModelConfig) -> dict:
    """A ModelConfig (or asdict's dict of one) as plain data, its modality sections under their names."""
    d = dataclasses.asdict(model) if isinstance(model, ModelConfig) else dict(model)
    d.update(d.pop("sections"))
    return d


def model_from_dict(d: dict) -> ModelConfig:
    """A ModelConfig from model_to_dict's output, or from a record of before the modality sections (a run config or an
    export's config.json), whose flat names (model.image_size, ...) are moved into their sections. A section of a
    modality that is not registered: ValueError naming it."""
    d, sections = dict(d), {}
    for old, (name, key) in legacy_model_keys().items():
        if old in d:
            sections.setdefault(name, {})[key] = d.pop(old)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for name in [k for k in d if k not in fields]:
        if name not in MODALITIES or not isinstance(d[name], dict):
            raise ValueError(f"model.{name}: not a setting of the model nor a registered modality's section "
                             f"(modalities: {', '.join(MODALITIES)}); register the modality before loading its runs")
        sections.setdefault(name, {}).update(d.pop(name))
    built = default_sections()
    for name, values in sections.items():
        try:
            built[name] = type(built[name])(**values)
        except TypeError as e:
            raise ValueError(f"model.{name}: {e}") from None
    return ModelConfig(**d, sections=built)


RETIRED_STAGE_FIELDS = ("eval_every",)  # in older run records; never read (validation runs every epoch)


def from_dict(d: dict) -> RunConfig:
    """A RunConfig from to_dict's output, records of older versions included: retired stage fields dropped, renamed
    ones (RENAMED) moved to their new place, a missing transfer section at its defaults. Every value is checked as an
    override's would be (ValueError naming the setting)."""
    ev = dict(d["eval"])
    ev["ks"] = tuple(ev["ks"])
    stage = {s: {k: v for k, v in d[s].items() if k not in RETIRED_STAGE_FIELDS} for s in ("stage1", "stage2")}
    for fields in stage.values():  # records written before a setting was renamed (RENAMED)
        for old, new in RENAMED.items():
            if old in fields:
                section, key = new.split(".")
                fields.setdefault(section, {})[key] = fields.pop(old)
    return RunConfig(
        model=model_from_dict(d["model"]),
        stage1=Stage1Config(**stage["stage1"]),
        stage2=Stage2Config(**stage["stage2"]),
        eval=EvalConfig(**ev),
        data=DataConfig(**d["data"]),
        transfer=TransferConfig(**d.get("transfer", {})),  # records from before transfer=auto have none
        monitor=MonitorConfig(**d.get("monitor", {})),  # records from before the monitor section have none
        **{k: v for k, v in d.items() if k not in ("model", "stage1", "stage2", "eval", "data", "transfer", "monitor")},
    )


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The configuration a run recorded in RUN_DIR/run_config.json, set to continue that run (--resume)."""
    cfg = from_dict(json.loads((Path(run_dir) / "run_config.json").read_text())["config"])
    cfg.run_dir = cfg.resume = str(run_dir)
    return cfg
