"""Splitting a MovieLens-format folder by release year (data_shards/split_by_release.py): on a designed folder, the
exact users, films and ratings of each side, the report's counts, rows copied verbatim, the posters link, and the
errors for a folder that is not MovieLens-format or a --min-interactions too small for leave-one-out."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from transrec.data_shards import split_by_release as sbr

# film id -> year as MovieLens writes it ("" = unknown)
YEARS = {"1": "1980.0", "2": "1990.0", "3": "1995.0", "4": "1993.0", "5": "1985.0",  # source (<= 1995)
         "6": "1996.0", "7": "1998.0", "8": "2000.0", "9": "1997.0",  # target
         "10": "",  # no release year
         "11": "1970.0",  # a source film nobody rates
         "12": "1999.0"}  # a target film rated only by a user dropped for too few ratings
# user -> films rated (99: a film items.csv does not list)
RATED = {
    "1": ["1", "2", "3", "4", "6", "10"],  # mostly old: source, keeps 4, loses film 6 (other side) and 10 (no year)
    "2": ["6", "7", "8", "9", "1", "99"],  # mostly new: target, keeps 4, loses film 1 (other side) and 99 (unknown)
    "3": ["2", "3", "5", "7", "8", "9"],  # a 3-3 tie: source, keeps 3, loses 3 of the other side
    "4": ["1", "5", "6"],  # source 2 vs 1: left with 2 < 3 ratings: dropped
    "5": ["12", "7", "4"],  # target 2 vs 1: left with 2: dropped (and film 12 with them)
    "6": ["10"],  # only a film without a year: on no side
    "8": ["6", "7", "9", "10"],  # target, keeps 3
}
USERS = ["1", "2", "3", "4", "5", "6", "7", "8"]  # user 7 rated nothing
MIN = 3
WANT = {
    "source": {"users": {"1", "3"}, "films": {"1", "2", "3", "4", "5"},
               "ratings": {("1", f) for f in ["1", "2", "3", "4"]} | {("3", f) for f in ["2", "3", "5"]}},
    "target": {"users": {"2", "8"}, "films": {"6", "7", "8", "9"},
               "ratings": {("2", f) for f in ["6", "7", "8", "9"]} | {("8", f) for f in ["6", "7", "9"]}},
}


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


@pytest.fixture
def movielens(tmp_path) -> Path:
    src = tmp_path / "ml-src"
    (src / "posters").mkdir(parents=True)
    (src / "posters" / "1.jpg").write_bytes(b"\xff\xd8poster")
    items = [[m, f"Film {m} ({y[:4] or 'unknown'})", y, "Drama|Comedy",
              f'An overview of film {m}, with a comma and "quotes"'] for m, y in YEARS.items()]
    write_csv(src / "items.csv", ["movie_id", "title", "year", "genres", "overview"], items)
    ratings, t = [], 880000000
    for u, films in RATED.items():
        for k, m in enumerate(films):
            ratings.append([u, m, str(1 + (int(u) + k) % 5), str(t)])
            t += 17
    write_csv(src / "ratings.csv", ["user_id", "movie_id", "rating", "unix_timestamp"], ratings)
    write_csv(src / "users.csv", ["user_id", "age", "sex", "occupation"],
              [[u, str(20 + int(u)), "MF"[int(u) % 2], "writer"] for u in USERS])
    return src


def test_designed_split(movielens, tmp_path):
    out = tmp_path / "split"
    report = sbr.split_by_release(movielens, out, year=1995, min_interactions=MIN)
    assert sorted(p.name for p in out.iterdir()) == ["source", "split_report.json", "target"]
    assert not (tmp_path / "split.tmp").exists()
    assert json.loads((out / "split_report.json").read_text()) == report

    _, src_ratings = read_csv(movielens / "ratings.csv")
    _, src_items = read_csv(movielens / "items.csv")
    _, src_users = read_csv(movielens / "users.csv")
    seen_users, seen_films = {}, {}
    for side in sbr.SIDES:
        folder = out / side
        header, ratings = read_csv(folder / "ratings.csv")
        assert header == ["user_id", "movie_id", "rating", "unix_timestamp"]
        _, items = read_csv(folder / "items.csv")
        _, users = read_csv(folder / "users.csv")
        want = WANT[side]
        assert {(r[0], r[1]) for r in ratings} == want["ratings"] and len(ratings) == len(want["ratings"])
        assert {r[0] for r in items} == want["films"] and len(items) == len(want["films"])
        assert {r[0] for r in users} == want["users"] and len(users) == len(want["users"])
        assert {r[0] for r in ratings} == want["users"] and {r[1] for r in ratings} == want["films"]
        # rows verbatim, in the source's order
        assert ratings == [r for r in src_ratings if (r[0], r[1]) in want["ratings"]]
        assert items == [r for r in src_items if r[0] in want["films"]]
        assert users == [r for r in src_users if r[0] in want["users"]]
        # release years on the right side of the cut
        years = [float(r[2]) for r in items]
        assert all(y <= 1995 for y in years) if side == "source" else all(y > 1995 for y in years)
        assert (folder / "posters").is_symlink()
        assert (folder / "posters").resolve() == (movielens / "posters").resolve()
        assert (folder / "posters" / "1.jpg").read_bytes() == b"\xff\xd8poster"
        seen_users[side], seen_films[side] = {r[0] for r in ratings}, {r[1] for r in ratings}
    assert not seen_users["source"] & seen_users["target"]
    assert not seen_films["source"] & seen_films["target"]

    # the files' bytes too: the source was written with minimal quoting and "\n", so kept lines are its lines
    for side in sbr.SIDES:
        for name in sbr.FILES:
            src_lines = (movielens / name).read_text().splitlines()
            got_lines = (out / side / name).read_text().splitlines()
            assert got_lines[0] == src_lines[0]
            assert set(got_lines[1:]) <= set(src_lines[1:])

    assert report["year"] == 1995 and report["min_interactions"] == MIN and report["source"] == "ml-src"
    assert report["ratings_in_source"] == sum(len(v) for v in RATED.values()) == 29
    assert report["films_in_source"] == len(YEARS)
    assert report["films_without_year"] == 1
    assert report["ratings_dropped_film_without_year_or_unknown"] == 4  # film 10 three times, film 99 once
    assert report["ratings_dropped_film_on_the_other_side"] == 7  # users 1, 2, 4, 5: one each; user 3: three
    s, t = report["sides"]["source"], report["sides"]["target"]
    assert (s["users"], s["films"], s["ratings"]) == (2, 5, 7)
    assert (t["users"], t["films"], t["ratings"]) == (2, 4, 7)
    assert (s["users_dropped_too_few"], s["ratings_dropped_user_too_few"]) == (1, 2)  # user 4
    assert (t["users_dropped_too_few"], t["ratings_dropped_user_too_few"]) == (1, 2)  # user 5
    assert s["release_years"] == [1980, 1995] and t["release_years"] == [1996, 2000]
    # every rating accounted for
    assert (report["ratings_dropped_film_without_year_or_unknown"] + report["ratings_dropped_film_on_the_other_side"]
            + s["ratings"] + t["ratings"] + s["ratings_dropped_user_too_few"] + t["ratings_dropped_user_too_few"]
            == report["ratings_in_source"])


@pytest.mark.parametrize("year", [1984, 1992, 1996, 1998])
def test_sides_share_nothing_at_any_cut(movielens, tmp_path, year):
    out = tmp_path / f"split-{year}"
    report = sbr.split_by_release(movielens, out, year=year, min_interactions=MIN)
    films, users = {}, {}
    for side in sbr.SIDES:
        _, ratings = read_csv(out / side / "ratings.csv")
        _, items = read_csv(out / side / "items.csv")
        users[side], films[side] = {r[0] for r in ratings}, {r[1] for r in ratings}
        assert {r[0] for r in items} == films[side]
        for r in items:
            assert (float(r[2]) <= year) if side == "source" else (float(r[2]) > year)
        per_user = {u: sum(r[0] == u for r in ratings) for u in users[side]}
        assert all(n >= MIN for n in per_user.values())
        assert report["sides"][side]["ratings"] == len(ratings)
    assert not users["source"] & users["target"]
    assert not films["source"] & films["target"]


def test_rerun_replaces_the_output(movielens, tmp_path):
    out = tmp_path / "split"
    sbr.split_by_release(movielens, out, year=1995, min_interactions=MIN)
    (out / "stale.txt").write_text("old")
    sbr.split_by_release(movielens, out, year=1995, min_interactions=MIN)
    assert not (out / "stale.txt").exists()
    assert (out / "source" / "ratings.csv").exists()


def test_folder_without_items_csv(movielens, tmp_path):
    (movielens / "items.csv").unlink()
    with pytest.raises(SystemExit, match="items.csv") as e:
        sbr.split_by_release(movielens, tmp_path / "out")
    assert str(movielens) in str(e.value)
    assert not (tmp_path / "out").exists()


def test_items_without_year_column(movielens, tmp_path):
    header, rows = read_csv(movielens / "items.csv")
    write_csv(movielens / "items.csv", [c if c != "year" else "released" for c in header], rows)
    with pytest.raises(SystemExit, match="year"):
        sbr.split_by_release(movielens, tmp_path / "out")


@pytest.mark.parametrize("n", [2, 0, -1])
def test_min_interactions_below_three_rejected(movielens, tmp_path, n):
    with pytest.raises(SystemExit, match=f"--min-interactions {n}"):
        sbr.split_by_release(movielens, tmp_path / "out", min_interactions=n)
    with pytest.raises(SystemExit):
        sbr.main(["--source", str(movielens), "--out", str(tmp_path / "out"), "--min-interactions", str(n)])
    assert not (tmp_path / "out").exists()


def test_main(movielens, tmp_path, capsys):
    out = tmp_path / "cli"
    report = sbr.main(["--source", str(movielens), "--out", str(out), "--year", "1995", "--min-interactions", "3"])
    assert report == json.loads((out / "split_report.json").read_text())
    assert report["sides"]["source"]["ratings"] == 7 and report["sides"]["target"]["ratings"] == 7
    err = capsys.readouterr().err
    assert "source 2 users / 7 ratings / 5 films" in err and "7 ratings of the other side's films dropped" in err
    assert "2 users with too few left" in err
    # the defaults (year 1995, at least 5 ratings): every designed user has fewer than 5 on their side
    default = sbr.main(["--source", str(movielens), "--out", str(tmp_path / "cli5")])
    assert default["min_interactions"] == 5 and default["year"] == 1995
    assert default["sides"]["source"]["users"] == 0 and default["sides"]["target"]["users"] == 0
    assert default["sides"]["source"]["users_dropped_too_few"] == 3  # users 1, 3, 4
    assert default["sides"]["target"]["users_dropped_too_few"] == 3  # users 2, 5, 8
    assert default["sides"]["source"]["release_years"] is None


def test_release_year_reads_numbers_and_refuses_the_rest():
    from transrec.data_shards.split_by_release import release_year

    assert release_year("1995.0") == 1995 and release_year("1996") == 1996
    assert release_year("") is None and release_year("n/a") is None and release_year("inf") is None
