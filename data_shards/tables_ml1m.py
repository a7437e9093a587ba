"""MovieLens-1M's .dat files -> one RawDomain (`--dataset movielens-1m`), and the declared join of its films to the
MovieLens-100k set's posters and overviews (`--posters-from`).

`ratings.dat.gz` (or an uncompressed `ratings.dat`): `UserID::MovieID::Rating::Timestamp`, every rating one
interaction; `movies.dat`: `MovieID::Title (Year)::Genres`, ISO-8859-1, genres separated by `|`. Neither file has a
header: line 1 is the first line. Item text uses the bundled MovieLens template (title with its year, genres, and an
overview when the join gives one). Bad lines are recorded in `Problems` with their file and line, like the other
adapters (data_shards/tables.py); unknown movies in the ratings are left to the builder, which reports them.

`movielens_film_key(title, year)` is the join rule (FILM_KEY_RULE, in words): experiments reuse it to find the films
two MovieLens catalogues share.
"""

from __future__ import annotations

import csv
import gzip
import math
import re
import unicodedata
from pathlib import Path

from transrec.data_shards.bad_input import Problems
from transrec.data_shards.tables import (
    MOVIELENS_TEMPLATE,
    Interaction,
    ItemRecord,
    RawDomain,
)

RATINGS_FILES = ("ratings.dat.gz", "ratings.dat")  # the first that exists is read
MOVIES_FILE = "movies.dat"
ARTICLES = ("the", "a", "an", "la", "le", "les", "l'", "el", "il", "lo", "los", "las", "der", "die", "das", "un",
            "une")
FILM_KEY_RULE = (
    "film key = normalised title + year. The year is the last '(YYYY)' in the title, which is cut there (with what "
    "follows it, e.g. ' (V)'); the year argument counts only when the title has none (the 100k set's year column is "
    "its release date's year, 190 films disagree with their title). The title: accents removed (NFKD), lower case; "
    "parenthesised parts (alternative titles, a.k.a.) removed; '&' read as 'and'; a trailing article after a comma "
    f"({', '.join(ARTICLES)}) moved to the front ('Usual Suspects, The' -> 'the usual suspects'); every run of "
    "characters other than a-z and 0-9 one space. Key: 'words (year)', e.g. 'the usual suspects (1995)'. An ML-1M "
    "film takes the 100k film with its key; a key several 100k films share (the 100k set lists 18 films twice) takes "
    "the first in items.csv (the lowest movie_id)."
)
_YEAR = re.compile(r"\((\d{4})\)")
_PARENS = re.compile(r"\([^)]*\)")
_TRAILING_ARTICLE = re.compile(r",\s*(" + "|".join(re.escape(a) for a in ARTICLES) + r")$")
_NOT_WORD = re.compile(r"[^0-9a-z]+")


def movielens_film_key(title: str, year: int | float | str | None = None) -> str:
    """The join key of a MovieLens film (FILM_KEY_RULE): 'Usual Suspects, The (1995)' -> 'the usual suspects (1995)',
    the same for ML-100k's and ML-1M's spelling of a film. `year` is used only when the title carries no '(YYYY)'."""
    text = unicodedata.normalize("NFKD", title)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    years = list(_YEAR.finditer(text))
    if years:
        text, year_text = text[: years[-1].start()], years[-1].group(1)
    else:
        year_text = _year_text(year)
    text = _PARENS.sub(" ", text).replace("&", " and ").strip()
    article = _TRAILING_ARTICLE.search(text)
    if article:
        text = f"{article.group(1)} {text[: article.start()]}"
    return f"{_NOT_WORD.sub(' ', text).strip()} ({year_text})"


def _year_text(year: int | float | str | None) -> str:
    """'1995' from 1995, 1995.0 or '1995.0'; '' when there is no year."""
    try:
        return str(int(float(year))) if year is not None and str(year).strip() else ""
    except ValueError:
        return ""


def load_movielens_1m(source: Path, posters_from: Path | None = None) -> RawDomain:
    """ML-1M as a text catalogue; with `posters_from` (a movielens-100k-mm folder: items.csv and posters/), the films
    the join matches also get that set's poster and overview, and the others no image (so under --modality mixed
    they are text items, counted as fallbacks when the rule picks image)."""
    problems = Problems()
    ratings = next((source / n for n in RATINGS_FILES if (source / n).exists()), source / RATINGS_FILES[0])
    interactions = read_ratings(ratings, problems)
    items = read_movies(source / MOVIES_FILE, problems)
    files = {ratings.name: ratings, MOVIES_FILE: source / MOVIES_FILE}
    domain = RawDomain("movielens-1m", interactions, items, {}, MOVIELENS_TEMPLATE, files, problems,
                       has_image_column=posters_from is not None)
    if posters_from is not None:
        join_posters(domain, posters_from)
    return domain


def _seconds(value: str) -> float:
    """A unix time in seconds (a finite number); anything else is a ValueError (the row is unparseable)."""
    try:
        t = float(value)
    except ValueError:
        raise ValueError(f"time {value!r} is not a number of seconds") from None
    if not math.isfinite(t):
        raise ValueError(f"time {value!r} is not a finite number")
    return t


def _dat_lines(path: Path, encoding: str):
    """Yield (line number, line without its newline); line 1 is the first line (.dat files have no header)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: check --source (the MovieLens-1M layout is in data_shards/README)")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding=encoding, newline="") as f:
            for line, text in enumerate(f, start=1):
                yield line, text.rstrip("\r\n")
    except (OSError, EOFError) as e:  # a damaged or truncated .gz
        raise SystemExit(f"error: {path} cannot be read ({e}): restore a complete copy of the file") from None


def read_ratings(path: Path, problems: Problems) -> list[Interaction]:
    """`UserID::MovieID::Rating::Timestamp` lines -> interactions (the rating is not used: implicit feedback)."""
    out = []
    for line, text in _dat_lines(path, "latin-1"):
        parts = [p.strip() for p in text.split("::")]
        try:
            if len(parts) != 4:
                raise ValueError(f"{len(parts)} fields, expected UserID::MovieID::Rating::Timestamp")
            if not parts[0] or not parts[1]:
                raise ValueError("empty user or movie id")
            time = _seconds(parts[3])
        except ValueError as e:
            problems.add("unparseable_row", file=path.name, line=line, reason=str(e), row=text)
            continue
        out.append(Interaction(parts[0], parts[1], time, line))
    return out


def read_movies(path: Path, problems: Problems) -> dict[str, ItemRecord]:
    """`MovieID::Title (Year)::Genres` lines -> items; the title is the description (an empty one is `empty_text`)."""
    items: dict[str, ItemRecord] = {}
    for line, text in _dat_lines(path, "iso-8859-1"):
        raw, _, rest = text.partition("::")
        title, sep, genre_text = rest.rpartition("::")
        raw = raw.strip()
        if not raw or not sep:
            reason = "empty MovieID" if sep else "expected MovieID::Title (Year)::Genres"
            problems.add("unparseable_row", file=path.name, line=line, reason=reason, row=text)
            continue
        if raw in items:
            problems.add("duplicate_item_row", file=path.name, line=line, item=raw)
            continue
        genres = [g.strip() for g in genre_text.split("|") if g.strip()]
        items[raw] = ItemRecord(
            raw_id=raw,
            fields={"title": title, "genres": ", ".join(genres), "overview": ""},
            description=title,
            image_path=None,
            features={"genres": genres},
        )
    return items


def join_posters(domain: RawDomain, folder: Path) -> None:
    """Give each film the join matches its 100k film's poster path and overview (the builder checks the poster and
    reports a missing one), record the rule and counts in the domain's notes and hash the 100k item table."""
    table = folder / "items.csv"
    if not table.exists():
        raise FileNotFoundError(f"{table} not found: --posters-from takes a movielens-100k-mm folder "
                                "(items.csv, posters/)")
    by_key: dict[str, dict] = {}
    with open(table, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        movie_id = (row.get("movie_id") or "").strip()
        key = movielens_film_key(row.get("title") or "", row.get("year"))
        if movie_id and key not in by_key:  # the first row with a key wins
            by_key[key] = {**row, "movie_id": movie_id}
    matched = with_poster = with_overview = 0
    for rec in domain.items.values():
        film = by_key.get(movielens_film_key(rec.fields["title"]))
        if film is None:
            continue
        rec.image_path = folder / "posters" / f"{film['movie_id']}.jpg"
        rec.fields["overview"] = film.get("overview") or ""
        matched += 1
        with_poster += rec.image_path.exists()
        with_overview += bool(rec.fields["overview"].strip())
    domain.input_files[f"{folder.name}/items.csv"] = table
    domain.notes["poster_join"] = {
        "posters_from": folder.name,
        "films": len(domain.items),
        "matched": matched,
        "matched_with_poster_file": with_poster,
        "matched_with_overview": with_overview,
        "unmatched": len(domain.items) - matched,
        "findings": "every unmatched film, and a matched one whose poster file is absent, is a missing_image finding "
        "(no poster): under --modality mixed it is a text item, a fallback when the rule picks image",
        "rule": FILM_KEY_RULE,
    }
