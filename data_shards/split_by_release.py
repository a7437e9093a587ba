"""Split a MovieLens-format folder into an older and a newer catalogue that share no film and no user.

    python -m transrec.data_shards.split_by_release --source data/movielens-100k-mm --out reports/raw/ml-release-1995 \
        [--year 1995] [--min-interactions 5]

A cross-catalogue benchmark from one dataset: the source keeps the films released up to `--year`, the target the
films released after it (later films, as a new platform's catalogue would be). Each user goes to the side where most
of their ratings fall (a tie: the source) and keeps only their ratings of that side's films; a user left with fewer
than `--min-interactions` ratings is dropped (leave-one-out needs a history, a validation and a test item). Films
without a release year are dropped. Every rating lost, and why, is counted in `split_report.json`; rows kept are
copied verbatim. Each side is a folder in the MovieLens layout (ratings.csv, items.csv with the films its ratings
name, users.csv, posters/ linked to the source's), which `python -m transrec.data_shards.build --dataset
movielens-100k-mm` reads.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from pathlib import Path

from transrec.data_shards.split_files import publish, staging, write_side

FILES = ("ratings.csv", "items.csv", "users.csv")
SIDES = ("source", "target")


def _read(path: Path, needed: tuple[str, ...]) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        missing = [c for c in needed if header is None or c not in header]
        if missing:
            raise SystemExit(f"error: {path} lacks the column(s) {', '.join(missing)}: is --source a MovieLens-format "
                             f"folder ({', '.join(FILES)}, posters/)?")
        return header, list(reader)


def release_year(text: str) -> int | None:
    try:
        return int(float(text))
    except (ValueError, OverflowError):  # empty, not a number, or inf
        return None


def split_by_release(source: Path, out: Path, *, year: int = 1995, min_interactions: int = 5) -> dict:
    """Write out/source and out/target (MovieLens layout) and out/split_report.json; returns the report."""
    missing = [n for n in (*FILES, "posters") if not (source / n).exists()]
    if missing:
        raise SystemExit(f"error: {source} lacks {', '.join(missing)}: pass a MovieLens-format folder as --source")
    if min_interactions < 3:
        raise SystemExit(f"error: --min-interactions {min_interactions}: leave-one-out needs at least 3 per user")
    item_header, items = _read(source / "items.csv", ("movie_id", "year"))
    id_col, year_col = item_header.index("movie_id"), item_header.index("year")
    side_of_item: dict[str, str] = {}
    no_year = []
    for r in items:
        y = release_year(r[year_col])
        if y is None:
            no_year.append(r[id_col])
        else:
            side_of_item[r[id_col]] = "source" if y <= year else "target"
    rating_header, ratings = _read(source / "ratings.csv", ("user_id", "movie_id"))
    user_col, movie_col = rating_header.index("user_id"), rating_header.index("movie_id")
    unknown_film = [r for r in ratings if r[movie_col] not in side_of_item]
    dated = [r for r in ratings if r[movie_col] in side_of_item]
    per_user: dict[str, Counter] = {}
    for r in dated:
        per_user.setdefault(r[user_col], Counter())[side_of_item[r[movie_col]]] += 1
    side_of_user = {u: "source" if c["source"] >= c["target"] else "target" for u, c in per_user.items()}
    kept_by_side = {s: [r for r in dated if side_of_user[r[user_col]] == s == side_of_item[r[movie_col]]]
                    for s in SIDES}
    other_side = len(dated) - sum(len(v) for v in kept_by_side.values())
    report = {"source": source.name, "year": year, "min_interactions": min_interactions,
              "rule": f"film -> source iff its release year <= {year}, else target; user -> the side holding most of "
                      "their ratings (a tie: source), keeping only that side's ratings; users with fewer than "
                      f"{min_interactions} ratings left are dropped",
              "ratings_in_source": len(ratings), "films_in_source": len(items),
              "films_without_year": len(no_year),
              "ratings_dropped_film_without_year_or_unknown": len(unknown_film),
              "ratings_dropped_film_on_the_other_side": other_side, "sides": {}}
    tmp = staging(out)
    user_header, users = _read(source / "users.csv", ("user_id",))
    user_key = user_header.index("user_id")
    for side in SIDES:
        counts = Counter(r[user_col] for r in kept_by_side[side])
        enough = {u for u, n in counts.items() if n >= min_interactions}
        rows = [r for r in kept_by_side[side] if r[user_col] in enough]
        films = {r[movie_col] for r in rows}
        write_side(tmp / side, (("ratings.csv", rating_header, rows, None, None),
                                ("items.csv", item_header, items, id_col, films),
                                ("users.csv", user_header, users, user_key, enough)), source / "posters")
        years = [release_year(r[year_col]) for r in items if r[id_col] in films]
        report["sides"][side] = {
            "users": len(enough), "films": len(films), "ratings": len(rows),
            "users_dropped_too_few": len(counts) - len(enough),
            "ratings_dropped_user_too_few": len(kept_by_side[side]) - len(rows),
            "release_years": [min(years), max(years)] if years else None}
    shared_users = {r[user_col] for r in kept_by_side["source"]} & {r[user_col] for r in kept_by_side["target"]}
    if shared_users:  # the rule makes this impossible; the check keeps it that way
        raise AssertionError(f"{len(shared_users)} users on both sides")
    publish(tmp, out, report)
    return report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m transrec.data_shards.split_by_release", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="MovieLens-format folder (ratings.csv, items.csv with a year, ...)")
    p.add_argument("--out", required=True, help="folder to create, with source/, target/ and split_report.json")
    p.add_argument("--year", type=int, default=1995, help="the source keeps films released up to this year")
    p.add_argument("--min-interactions", type=int, default=5, help="fewest ratings a kept user has on their side")
    a = p.parse_args(argv)
    report = split_by_release(Path(a.source), Path(a.out), year=a.year, min_interactions=a.min_interactions)
    s, t = report["sides"]["source"], report["sides"]["target"]
    print(f"wrote {a.out}: source {s['users']} users / {s['ratings']} ratings / {s['films']} films "
          f"({s['release_years']}); target {t['users']} / {t['ratings']} / {t['films']} ({t['release_years']}); "
          f"{report['ratings_dropped_film_on_the_other_side']} ratings of the other side's films dropped, "
          f"{s['users_dropped_too_few'] + t['users_dropped_too_few']} users with too few left",
          file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
