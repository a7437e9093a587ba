"""Checks shared by the configuration's sections (trainer/config.py) and the modalities' own sections
(trainer/modalities.py): a value among the allowed ones, every field of its declared type, bounds. Each error is one
line naming the setting as it is written on the command line (`section.field`).
"""

from __future__ import annotations

import dataclasses
import math


def one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """ValueError "NAME must be a, b or c, not 'value'" unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"{name} must be {', '.join(allowed[:-1])} or {allowed[-1]}, not {value!r}")


def type_ok(value, declared: str) -> bool:
    """Whether `value` has the type a field declares (as written under `from __future__ import annotations`): an int is
    not a bool, a float is finite and may be written as an int, `X | None` allows None."""
    options = [t.strip() for t in declared.split("|")]
    if value is None:
        return "None" in options
    for t in options:
        if t == "bool" and isinstance(value, bool):
            return True
        if t == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return math.isfinite(value)
        if t == "str" and isinstance(value, str):
            return True
        if t.startswith("dict[") and isinstance(value, dict):
            return True
        if t.startswith("tuple[int") and isinstance(value, (tuple, list)):
            return all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return False


def check_values(obj, section: str, at_least: dict[str, float] | None = None) -> None:
    """Every field of the config dataclass `obj` has its declared type (finite where it is a float), and each field
    named in `at_least` is >= its bound: ValueError in one line naming `section.field`. Fields holding other config
    sections are checked by their own class."""
    prefix = f"{section}." if section else ""
    for f in dataclasses.fields(obj):
        declared = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if declared.endswith("Config"):
            continue
        value = getattr(obj, f.name)
        if not type_ok(value, declared):
            article = "a finite" if "float" in declared else "an" if declared[0] in "aeiou" else "a"
            raise ValueError(f"{prefix}{f.name} must be {article} {declared}, not {value!r}")
    for name, bound in (at_least or {}).items():
        value = getattr(obj, name)
        if value is not None and value < bound:
            raise ValueError(f"{prefix}{name} must be >= {bound}, not {value!r}")
