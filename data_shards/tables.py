"""Raw tables -> one in-memory domain: interactions, item content, side features, and every problem found.

Three adapters read the raw files: `movielens-100k-mm`, `hm-fashion` (the layouts of the real datasets
bundled under data/) and `generic` (column names given by flags); `movielens-1m` and `amazon-office` have modules of
their own (tables_ml1m.py, tables_amazon.py). Nothing is dropped here: rows that cannot
be parsed are recorded in `Problems` with their file and line, and the builder decides what to do with
them (and reports them).
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from transrec.data_shards.bad_input import Problems
from transrec.data_shards.log_reader import read_log


@dataclass
class Interaction:
    user: str
    item: str
    time: float
    row: int  # data line number in the interactions file (1 = first line after the header)


@dataclass
class ItemRecord:
    raw_id: str
    fields: dict[str, str]  # text fields used by the template
    description: str  # the field whose emptiness is reported as `empty_text`
    image_path: Path | None
    features: dict[str, list[str]]  # categorical item features (several values for multi-valued ones)


@dataclass
class RawDomain:
    name: str
    interactions: list[Interaction]
    items: dict[str, ItemRecord]
    user_features: dict[str, dict[str, list[str]]]
    text_template: str
    input_files: dict[str, Path]
    problems: Problems
    has_image_column: bool = True  # False: a text-only catalogue by declaration (no image is a finding)
    has_time_column: bool = True  # False: file order is the order (time = line number)
    notes: dict = field(default_factory=dict)  # what an adapter declares (a join's counts): manifest source_notes
    log_path: Path | None = None  # an interactions log still to be read (streamed), `interactions` then empty


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def render_text(template: str, fields: dict[str, str]) -> str:
    """Fill the template; parts whose field is empty are dropped with their separator."""
    parts = []
    for part in template.split(" | "):
        names = [n for n in fields if "{" + n + "}" in part]
        if names and all(not fields.get(n, "").strip() for n in names):
            continue
        parts.append(part.format(**{k: v.strip() for k, v in fields.items()}))
    return " ".join(p.strip() for p in parts if p.strip())


def age_bucket(value: str) -> str:
    """Ages become decades ('20s'); a missing or unparseable age becomes '' (the unknown feature value)."""
    try:
        age = int(float(value))
    except (TypeError, ValueError):
        return ""
    return f"{(age // 10) * 10}s"


def _read_csv(path: Path):
    """Yield (line number of the data row, row dict); the header is line 0."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: check --source (and the dataset layout in data_shards/README)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        yield from enumerate(reader, start=1)


def read_interactions(
    path: Path, user_col: str, item_col: str, time_col: str | None, problems: Problems
) -> list[Interaction]:
    """Interactions with parsed times; `time_col=None` means file order is the order (time = row). The rows are the
    log reader's (data_shards/log_reader.py: the one parser and checker of interaction rows), held in memory."""
    out = []
    for chunk in read_log(path, user_col, item_col, time_col, problems, fmt="csv"):
        out.extend(Interaction(user, item, float(time), int(line))
                   for line, user, item, time in zip(chunk.rows, chunk.users, chunk.items, chunk.times))
    return out


MOVIELENS_TEMPLATE = "{title}. | Genres: {genres}. | {overview}"
HM_TEMPLATE = "{prod_name}. | {product_type_name}, {colour_group_name}. | {detail_desc}"


def load_movielens(source: Path) -> RawDomain:
    problems = Problems()
    interactions = read_interactions(source / "ratings.csv", "user_id", "movie_id", "unix_timestamp", problems)
    items: dict[str, ItemRecord] = {}
    for line, row in _read_csv(source / "items.csv"):
        raw = (row.get("movie_id") or "").strip()
        if not raw:
            problems.add("unparseable_row", file="items.csv", line=line, reason="empty movie_id", row=dict(row))
            continue
        if raw in items:
            problems.add("duplicate_item_row", file="items.csv", line=line, item=raw)
            continue
        genres = [g for g in (row.get("genres") or "").split("|") if g]
        items[raw] = ItemRecord(
            raw_id=raw,
            fields={
                "title": row.get("title") or "",
                "genres": ", ".join(genres),
                "overview": row.get("overview") or "",
            },
            description=row.get("overview") or "",
            image_path=source / "posters" / f"{raw}.jpg",
            features={"genres": genres},
        )
    users = {}
    for _line, row in _read_csv(source / "users.csv"):
        users[row["user_id"].strip()] = {
            "age": [age_bucket(row.get("age", ""))],
            "sex": [row.get("sex") or ""],
            "occupation": [row.get("occupation") or ""],
        }
    files = {n: source / n for n in ("ratings.csv", "items.csv", "users.csv")}
    return RawDomain("movielens-100k-mm", interactions, items, users, MOVIELENS_TEMPLATE, files, problems)


def load_hm(source: Path) -> RawDomain:
    problems = Problems()
    interactions = read_interactions(source / "transactions.csv", "customer_id", "article_id", "t_dat", problems)
    items: dict[str, ItemRecord] = {}
    text_cols = ("prod_name", "product_type_name", "colour_group_name", "detail_desc")
    for line, row in _read_csv(source / "articles.csv"):
        raw = (row.get("article_id") or "").strip()
        if not raw:
            problems.add("unparseable_row", file="articles.csv", line=line, reason="empty article_id", row=dict(row))
            continue
        if raw in items:
            problems.add("duplicate_item_row", file="articles.csv", line=line, item=raw)
            continue
        items[raw] = ItemRecord(
            raw_id=raw,
            fields={c: row.get(c) or "" for c in text_cols},
            description=row.get("detail_desc") or "",
            image_path=source / "images" / raw[:3] / f"{raw}.jpg",
            features={"product_type": [row.get("product_type_name") or ""]},
        )
    users = {}
    for _line, row in _read_csv(source / "customers.csv"):
        users[row["customer_id"].strip()] = {
            "age": [age_bucket(row.get("age", ""))],
            "club_member_status": [row.get("club_member_status") or ""],
            "fashion_news_frequency": [row.get("fashion_news_frequency") or ""],
        }
    files = {n: source / n for n in ("transactions.csv", "articles.csv", "customers.csv")}
    return RawDomain("hm-fashion", interactions, items, users, HM_TEMPLATE, files, problems)


@dataclass
class GenericColumns:
    """Column names of a generic domain (flags of `data_shards.build --dataset generic`)."""

    interactions: str = "interactions.csv"
    items: str = "items.csv"
    users: str | None = None
    user_col: str = "user_id"
    item_col: str = "item_id"
    time_col: str | None = "timestamp"  # None: file order is the order
    item_id_col: str = "item_id"
    text_fields: tuple[str, ...] = ("title", "description")  # "column" or "column:Label" (rendered "Label: ...")
    description_field: str | None = None  # default: the last text field
    image_col: str | None = "image"  # path relative to the source folder
    item_feature_cols: tuple[str, ...] = ()
    user_id_col: str = "user_id"
    user_feature_cols: tuple[str, ...] = ()


class MissingColumn(ValueError):
    """A column named by a flag (or its default) is not in the table's header: the build stops before reading rows."""


def csv_columns(path: Path) -> list[str]:
    """The header of a CSV file (FileNotFoundError as _read_csv words it)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: check --source (and the dataset layout in data_shards/README)")
    with open(path, newline="", encoding="utf-8") as f:
        return next(csv.reader(f), [])


def check_generic_columns(source: Path, cols: GenericColumns, log_header: list[str] | None = None) -> None:
    """Every column the flags name is in its file's header: MissingColumn in one line naming the file, the column
    and the flag to pass, before a row is read (a missing image or time column would otherwise read as one bad row or
    one missing image per line). `log_header`: the interactions log's columns when it is read by
    data_shards/log_reader.py (gzip'ed CSV, Parquet, a folder of parts) rather than as one CSV file here."""
    fields = [text_field(f)[0] for f in cols.text_fields]
    wanted = {cols.interactions: [(cols.user_col, "--user-col"), (cols.item_col, "--item-col")]
              + ([(cols.time_col, "--time-col")] if cols.time_col else []),
              cols.items: [(cols.item_id_col, "--item-id-col"), *((f, "--text-fields") for f in fields)]
              + ([(cols.image_col, "--image-col")] if cols.image_col else [])
              + [(c, "--item-feature-cols") for c in cols.item_feature_cols]
              + ([(cols.description_field, "the description field")] if cols.description_field else [])}
    if cols.users:
        wanted[cols.users] = [(cols.user_id_col, "--user-id-col"), *((c, "--user-feature-cols")
                                                                      for c in cols.user_feature_cols)]
    for name, needed in wanted.items():
        have = log_header if name == cols.interactions and log_header is not None else csv_columns(source / name)
        for column, flag in needed:
            if column in have:
                continue
            fix = {"--time-col": "name the time column with --time-col NAME, or pass --time-col '' to take each "
                                 "user's interactions in file order",
                   "--image-col": "name the image column with --image-col NAME, or pass --image-col '' for a "
                                  "catalogue without images"}.get(flag, f"name the right column with {flag}")
            raise MissingColumn(f"{source / name} has no column {column!r} (its columns: "
                                f"{', '.join(have) or 'none, the file is empty'}): {fix}")


def load_generic(source: Path, cols: GenericColumns, log_header: list[str] | None = None) -> RawDomain:
    """The generic tables. With `log_header` (the interactions log's columns) the log is not read here: the domain
    names it in `log_path` and data_shards/build_histories.py streams it (any size, CSV / gzip'ed CSV / Parquet)."""
    check_generic_columns(source, cols, log_header)
    problems = Problems()
    interactions = [] if log_header is not None else read_interactions(
        source / cols.interactions, cols.user_col, cols.item_col, cols.time_col, problems)
    fields = [text_field(f) for f in cols.text_fields]
    names = [n for n, _ in fields]
    description = cols.description_field or names[-1]
    items: dict[str, ItemRecord] = {}
    for line, row in _read_csv(source / cols.items):
        raw = (row.get(cols.item_id_col) or "").strip()
        if not raw:
            problems.add(
                "unparseable_row", file=cols.items, line=line, reason=f"empty {cols.item_id_col}", row=dict(row)
            )
            continue
        if raw in items:
            problems.add("duplicate_item_row", file=cols.items, line=line, item=raw)
            continue
        image = (row.get(cols.image_col) or "").strip() if cols.image_col else ""
        items[raw] = ItemRecord(
            raw_id=raw,
            fields={c: list_text(row.get(c) or "") for c in names},
            description=row.get(description) or "",
            image_path=(source / image) if image else None,
            features={c: [v for v in (row.get(c) or "").split("|") if v] for c in cols.item_feature_cols},
        )
    users: dict[str, dict[str, list[str]]] = {}
    files = {cols.interactions: source / cols.interactions, cols.items: source / cols.items}
    if cols.users:
        files[cols.users] = source / cols.users
        for _line, row in _read_csv(source / cols.users):
            users[(row.get(cols.user_id_col) or "").strip()] = {c: [row.get(c) or ""] for c in cols.user_feature_cols}
    template = " | ".join((f"{label}: " if label else "") + "{" + c + "}." for c, label in fields)
    return RawDomain("generic", interactions, items, users, template, files, problems,
                     has_image_column=cols.image_col is not None, has_time_column=cols.time_col is not None,
                     log_path=source / cols.interactions if log_header is not None else None)


def text_field(spec: str) -> tuple[str, str]:
    """'genres:Genres' -> ('genres', 'Genres'); 'title' -> ('title', '')."""
    name, _, label = spec.partition(":")
    if not name.strip():
        raise ValueError(f"--text-fields: {spec!r} has no column name (use column or column:Label)")
    return name.strip(), label.strip()


def list_text(value: str) -> str:
    """A text cell with several values separated by '|' (as in feature columns) reads as a list: 'a, b, c'."""
    return ", ".join(v.strip() for v in value.split("|") if v.strip()) if "|" in value else value
