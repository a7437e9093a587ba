"""Amazon review logs as processed for sequential recommendation (ysh-1998/LRD's data/<Category> folders) -> one
RawDomain (`--dataset amazon-office`).

`train.csv`, `dev.csv`, `test.csv` (tab-separated, header `user_id item_id time [neg_items]`; neg_items ignored) are
together every interaction, read as one log in that order: the builder's (time, row) order then keeps dev's and test's
item after a user's training items of the same day. `<Category>.item2index` (`ASIN<TAB>item_id`, no header) maps
the logs' item ids to ASINs, the raw item ids of the shards; `<Category>.text` (header `id<TAB>text`) holds one line of
product text per ASIN, the item's whole text. Bad lines are recorded in `Problems` with their file and line (line 1
is the first line after a header): an interaction naming an item id the index lacks is an `unknown_item` here, with
its own file (the builder would name train.csv for every log row); a text line whose ASIN the index lacks cannot be
joined and is an `unparseable_row`.
"""

from __future__ import annotations

import math
from pathlib import Path

from transrec.data_shards.bad_input import Problems
from transrec.data_shards.tables import Interaction, ItemRecord, RawDomain

LOG_FILES = ("train.csv", "dev.csv", "test.csv")
AMAZON_TEMPLATE = "{text}"


def _seconds(value: str) -> float:
    """A unix time in seconds (a finite number); anything else is a ValueError (the row is unparseable)."""
    try:
        t = float(value)
    except ValueError:
        raise ValueError(f"time {value!r} is not a number of seconds") from None
    if not math.isfinite(t):
        raise ValueError(f"time {value!r} is not a finite number")
    return t


def load_amazon(source: Path, category: str = "Office", name: str = "amazon-office") -> RawDomain:
    problems = Problems()
    index_file, text_file = f"{category}.item2index", f"{category}.text"
    asin_of = read_item_index(source / index_file, problems)
    texts = read_texts(source / text_file, set(asin_of.values()), problems)
    interactions: list[Interaction] = []
    for file in LOG_FILES:
        interactions += read_log(source / file, asin_of, len(interactions), problems)
    items = {
        asin: ItemRecord(raw_id=asin, fields={"text": texts.get(asin, "")}, description=texts.get(asin, ""),
                         image_path=None, features={})
        for asin in asin_of.values()
    }
    files = {n: source / n for n in (*LOG_FILES, index_file, text_file)}  # the first one is the builder's log
    notes = {"interactions": f"{', '.join(LOG_FILES)} read as one log in this order (ties in time keep it); "
             "neg_items ignored; item ids mapped to ASINs by " + index_file}
    return RawDomain(name, interactions, items, {}, AMAZON_TEMPLATE, files, problems, has_image_column=False,
                     notes=notes)


def _lines(path: Path):
    """Yield (line number, line without its newline), line 1 being the file's first line."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: check --source (the Amazon layout is in data_shards/README)")
    with open(path, encoding="utf-8", newline="") as f:
        for line, text in enumerate(f, start=1):
            yield line, text.rstrip("\r\n")


def read_item_index(path: Path, problems: Problems) -> dict[str, str]:
    """`ASIN<TAB>item_id` lines -> {item_id: ASIN}; a second line for an ASIN or an item id is a duplicate."""
    asin_of: dict[str, str] = {}
    seen_asins: set[str] = set()
    for line, text in _lines(path):
        parts = [p.strip() for p in text.split("\t")]
        if len(parts) != 2 or not all(parts):
            problems.add("unparseable_row", file=path.name, line=line, reason="expected ASIN<TAB>item_id", row=text)
            continue
        asin, item_id = parts
        if asin in seen_asins or item_id in asin_of:
            problems.add("duplicate_item_row", file=path.name, line=line, item=asin, item_id=item_id)
            continue
        seen_asins.add(asin)
        asin_of[item_id] = asin
    return asin_of


def _header(path: Path, lines, required: tuple[str, ...]) -> list[str]:
    """The header's column names; a header without the required ones ends the build (one line saying what to do)."""
    _, text = next(lines, (0, ""))
    names = [c.strip() for c in text.split("\t")]
    if not set(required) <= set(names):
        raise SystemExit(f"error: {path}: header {text!r} lacks the tab-separated column(s) "
                         f"{', '.join(c for c in required if c not in names)}: check --source (data_shards/README)")
    return names


def read_texts(path: Path, asins: set[str], problems: Problems) -> dict[str, str]:
    """`id<TAB>text` lines -> {ASIN: text}; the first line for an ASIN wins."""
    lines = _lines(path)
    names = _header(path, lines, ("id", "text"))
    col_id, col_text = names.index("id"), names.index("text")
    texts: dict[str, str] = {}
    for line, text in lines:
        parts = text.split("\t", len(names) - 1)  # a tab inside the text stays in it
        asin = parts[col_id].strip() if len(parts) == len(names) else ""
        if not asin or asin not in asins:
            reason = f"ASIN {asin} not in the item index {path.stem}.item2index" if asin else "expected id<TAB>text"
            problems.add("unparseable_row", file=path.name, line=line - 1, reason=reason, row=text)
            continue
        if asin in texts:
            problems.add("duplicate_item_row", file=path.name, line=line - 1, item=asin)
            continue
        texts[asin] = parts[col_text]
    return texts


def read_log(path: Path, asin_of: dict[str, str], first_row: int, problems: Problems) -> list[Interaction]:
    """A `user_id<TAB>item_id<TAB>time[...]` file -> interactions with item = ASIN; their rows continue the
    previous files' (`first_row` rows before), so that the builder's (time, row) order follows the file order."""
    lines = _lines(path)
    names = _header(path, lines, ("user_id", "item_id", "time"))
    cols = [names.index(c) for c in ("user_id", "item_id", "time")]
    out = []
    for line, text in lines:
        parts = text.split("\t")
        try:
            if len(parts) <= max(cols):
                raise ValueError(f"{len(parts)} fields, expected user_id, item_id and time")
            user, item_id, raw_time = (parts[c].strip() for c in cols)
            if not user or not item_id:
                raise ValueError("empty user_id or item_id")
            time = _seconds(raw_time)
        except ValueError as e:
            problems.add("unparseable_row", file=path.name, line=line - 1, reason=str(e), row=text)
            continue
        if item_id not in asin_of:
            problems.add("unknown_item", file=path.name, line=line - 1, item=item_id, user=user)
            continue
        out.append(Interaction(user, asin_of[item_id], time, first_row + len(out) + 1))
    return out
