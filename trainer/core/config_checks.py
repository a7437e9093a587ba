"""Checks shared by the configuration's sections (trainer/core/config.py) and the modalities' own sections
(trainer/core/modalities.py): a value among the allowed ones, every field of its declared type, bounds. Each error is
one line naming the setting as it is written on the command line (`section.field`).
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
    """Every field of the config dataclass `obj` has its declared type (finite where it is a float), each field
    named in `at_least` is >= its bound, and each setting of RANGES is within its range: ValueError in one line naming
    `section.field`. Fields holding other config sections are checked by their own class."""
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
    for f in dataclasses.fields(obj):
        bounds = RANGES.get(f"{prefix}{f.name}") or RANGES.get(f"*.{f.name}" if prefix else "")
        if bounds is not None and getattr(obj, f.name) is not None:
            in_range(f"{prefix}{f.name}", getattr(obj, f.name), *bounds)


def in_range(name: str, value: float, low: float | None, high: float | None, why: str) -> None:
    """ValueError in one line naming the setting, its range and why, unless low <= value <= high (None: no bound)."""
    if (low is None or value >= low) and (high is None or value <= high):
        return

    def shown(x: float) -> str:
        return str(x) if isinstance(x, int) else f"{x:g}"

    if low is not None and high is not None:
        expected = f"from {shown(low)} to {shown(high)}"
    else:
        expected = f">= {shown(low)}" if low is not None else f"<= {shown(high)}"
    raise ValueError(f"{name} must be {expected}, not {value!r} ({why})")


# Ranges no run can use beyond, by setting: `section.field`, or `*.field` for that field of every section (the two
# stages). Typed as the fields are (ints for counts, floats for rates); checked by check_values with the types.
RANGES: dict[str, tuple[float | None, float | None, str]] = {
    "*.lr": (None, 1.0, "AdamW moves each weight by about the rate at every step: above 1 every run diverges; "
                        "typical rates are 1e-5 to 1e-3"),
    "*.tower_lr": (None, 1.0, "AdamW moves each weight by about the rate at every step: above 1 every run diverges"),
    "transfer.low_lr": (None, 1.0, "AdamW moves each weight by about the rate at every step: above 1 every run "
                                   "diverges"),
    "seed": (None, 2**32 - 1, "numpy's generator takes seeds below 2**32: give a smaller seed"),
    "model.max_len": (None, 10_000, "positions of the user encoder, whose attention grows with the square of the "
                                    "length: histories are cut to their last max_len items"),
    "model.temperature": (1e-4, 1e4, "the scores are divided by it: beyond this range they overflow or all tie"),
    "eval.bootstrap": (None, 100_000, "resamples of the users for each interval: 1000 are plenty, each costs a pass "
                                      "over the users"),
    "data.num_workers": (None, 512, "loader processes per rank: more than the machine's cores only costs memory"),
    "data.user_fraction": (1e-6, None, "a millionth of the users: below it no catalogue keeps a user"),
}
