"""What counts as bad input in raw tables, and the one parser of interaction times.

`Problems` collects every finding by category (BAD_INPUT), each with enough detail to find the row or file; the
builder counts, lists and reports them (data_shards/report.py) and stops on them under --strict. Nothing is dropped
silently: every reader of raw rows records here what it could not use.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field

# Problem categories that are bad input (counted, listed, fatal under --strict).
BAD_INPUT = (
    "unparseable_row",
    "unknown_item",
    "unknown_user_features",
    "missing_image",
    "corrupt_image",
    "empty_text",
    "item_without_content",
    "duplicate_item_row",
)


@dataclass
class Problems:
    """Every bad-input finding, by category, each with enough detail to find the row or file."""

    found: dict[str, list[dict]] = field(default_factory=lambda: {c: [] for c in BAD_INPUT})

    def add(self, category: str, **detail) -> None:
        if category not in self.found:
            raise KeyError(f"unknown problem category {category!r}")
        self.found[category].append(detail)

    def counts(self) -> dict[str, int]:
        return {c: len(v) for c, v in self.found.items()}

    def total(self) -> int:
        return sum(len(v) for v in self.found.values())


def parse_time(value: str) -> float:
    """A number (seconds) or an ISO date/time; naive times are UTC, explicit offsets are honoured."""
    value = value.strip()
    try:
        t = float(value)
    except ValueError:
        when = dt.datetime.fromisoformat(value)
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        t = when.timestamp()
    if not math.isfinite(t):
        raise ValueError(f"time {value!r} is not a finite number")
    return t
