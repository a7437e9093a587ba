"""The command line's settings: `--set section.key=value`, read into a RunConfig. The one place in the package that
parses such strings (tests/test_setting_strings.py); inside the package a configuration changes through typed
functions (trainer/core/config.py: `changed`).
"""

from __future__ import annotations

import dataclasses

from transrec.trainer.core.config import RunConfig
from transrec.trainer.core.config_records import RENAMED
from transrec.trainer.core.modalities import legacy_model_keys

# A section's main setting named by the section alone on the command line.
SHORTHANDS = {"transfer": "transfer.mode"}


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """`section.key=value` overrides, e.g. `stage1.epochs=3 model.image_backbone=efficientnet-lite0`; a map setting
    takes `section.map.key=value` (`stage2.trainable.text=1`) or `section.map=key:value,key:value`."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        path, raw = item.split("=", 1)
        *parents, key = path.split(".")
        if not parents and key in SHORTHANDS:  # transfer=auto is transfer.mode=auto
            *parents, key = SHORTHANDS[key].split(".")
        if key in RENAMED:
            *more, key = RENAMED[key].split(".")
            parents += more
        legacy = legacy_model_keys() if parents == ["model"] else {}
        if key in legacy:  # model.image_size is model.image.size
            section, key = legacy[key]
            parents = ["model", section]
        section = _section(cfg, parents[:-1], item) if len(parents) >= 2 else None
        if section is not None and isinstance(getattr(section, parents[-1], None), dict):
            mapping = dict(getattr(section, parents[-1]))
            mapping[key] = _parse(raw, 0, item)
            setattr(section, parents[-1], mapping)
            section.__post_init__()
            continue
        target = _section(cfg, parents, item)
        fields = {f.name: f for f in dataclasses.fields(target)}
        if key not in fields:
            raise ValueError(
                f"override {item!r}: {type(target).__name__} has no field {key!r}; fields: {sorted(fields)}"
            )
        current = getattr(target, key)
        optional = "None" in str(fields[key].type)  # e.g. `str | None`: "none" clears it
        if isinstance(current, dict):
            value = {}
            for pair in filter(None, raw.split(",")):
                name, sep, v = pair.partition(":")
                if not sep:
                    raise ValueError(f"override {item!r}: write a map as key:value,key:value")
                value[name.strip()] = _parse(v, 0, item)
        else:
            value = _parse(raw, current, item, optional)
        setattr(target, key, value)
        if hasattr(target, "__post_init__"):
            target.__post_init__()
    cfg.__post_init__()
    return cfg


def _section(cfg: RunConfig, parents: list[str], item: str):
    target = cfg
    for p in parents:
        target = getattr(target, p, None)
        if target is None or not dataclasses.is_dataclass(target):
            raise ValueError(f"override {item!r}: no config section {p!r}")
    return target


def _parse(raw: str, current, item: str, optional: bool = False):
    try:
        if isinstance(current, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        if isinstance(current, tuple):
            return tuple(int(x) for x in raw.split(","))
    except ValueError:
        raise ValueError(f"override {item!r}: cannot parse {raw!r} as {type(current).__name__}") from None
    return None if optional and raw.lower() == "none" else raw  # a choice such as stages=none stays a string
