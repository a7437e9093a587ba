"""The out-of-core history stage (data_shards/history_engine.py, the default) builds the same shards, to the byte, as
the in-memory reference (`--engine memory`): on the bundled datasets, on fuzzed logs with every kind of bad row,
repeat and awkward user id, under every dedup rule; and a log given as gzip'ed CSV, Parquet (text or typed columns)
or a folder of part files builds the same shards as the same log in one CSV."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
import tempfile
from pathlib import Path

import duckdb
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from transrec.data_shards.build import BuildOptions, build, main
from transrec.data_shards.tables import GenericColumns

REPO = Path(__file__).resolve().parents[1]


def folder_bytes(out: Path, drop_inputs: bool = False) -> dict[str, bytes]:
    """Every file of a shard folder; the manifest without its input file hashes when `drop_inputs`."""
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    if drop_inputs:
        m = json.loads(files["manifest.json"])
        m.pop("input_files")
        files["manifest.json"] = json.dumps(m, sort_keys=True).encode()
    return files


def assert_same_folders(a: Path, b: Path, drop_inputs: bool = False) -> None:
    fa, fb = folder_bytes(a, drop_inputs), folder_bytes(b, drop_inputs)
    assert sorted(fa) == sorted(fb)
    differ = [k for k in fa if fa[k] != fb[k]]
    assert not differ, f"files that differ: {differ}"


def both_engines(tmp: Path, **kw) -> tuple[Path, Path]:
    outs = []
    for engine in ("memory", "duckdb"):
        out = tmp / f"out-{engine}"
        build(BuildOptions(out=out, engine=engine, max_tokens=16, **kw))
        outs.append(out)
    return outs[0], outs[1]


def test_bundled_movielens_builds_the_same_shards_with_either_engine(tmp_path):
    a, b = both_engines(tmp_path, dataset="movielens-100k-mm", source=REPO / "data" / "movielens-100k-mm")
    assert_same_folders(a, b)


def test_hm_fixture_builds_the_same_shards_with_either_engine_under_each_dedup(tmp_path):
    for dedup in ("keep", "collapse", "first"):
        a, b = both_engines(tmp_path / dedup, dataset="hm-fashion", source=REPO / "data" / "hm-fashion-fixture",
                            dedup=dedup)
        assert_same_folders(a, b)


USER = st.sampled_from(["1", "01", "001", "2", "10", "9", "u1", "U1", "ü", "a b", "", " 7 "])
ITEM = st.sampled_from(["i0", "i1", "i2", "i3", "i4", "nocontent", "unknown", ""])
TIME = st.one_of(st.integers(0, 40).map(str), st.just(""), st.just("yesterday"), st.just("inf"),
                 st.just("2024-01-02"), st.just("2024-01-02T03:04:05+02:00"), st.just("7.5"))


@st.composite
def logs(draw):
    core = [(str(u), f"i{(u + k) % 5}", str(100 + k)) for u in range(3) for k in range(3)]  # always buildable
    noise = draw(st.lists(st.tuples(USER, ITEM, TIME), max_size=40))
    rows = draw(st.permutations(core + noise))
    short = draw(st.integers(0, 2))
    features = draw(st.sets(USER, max_size=4))
    return rows, short, sorted(features)


def write_generic(root: Path, rows, short: int = 0, features=()) -> None:
    root.mkdir(parents=True)
    with open(root / "interactions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        w.writerows(rows)
        for _ in range(short):
            w.writerow(["u9"])
    with open(root / "items.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title", "description", "genre"])
        w.writerows([(f"i{i}", f"title {i}", f"about {i}", f"g{i % 2}") for i in range(5)])
        w.writerow(["nocontent", "", "", ""])
    if features:
        with open(root / "users.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["user_id", "country"])
            w.writerows([(u, f"c{k % 2}") for k, u in enumerate(features)])


def generic_columns(users: bool = False, time_col: str | None = "timestamp", interactions: str = "interactions.csv"):
    return GenericColumns(interactions=interactions, image_col=None, item_feature_cols=("genre",),
                          users="users.csv" if users else None, user_feature_cols=("country",) if users else (),
                          time_col=time_col)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logs(), st.sampled_from(["keep", "collapse", "first"]), st.booleans())
def test_fuzzed_logs_build_the_same_shards_and_report_with_either_engine(case, dedup, with_time):
    rows, short, features = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "raw"
        write_generic(root, rows, short, features)
        cols = generic_columns(users=bool(features), time_col="timestamp" if with_time else None)
        a, b = both_engines(Path(tmp), dataset="generic", source=root, modality="text", dedup=dedup, generic=cols)
        assert_same_folders(a, b)


def clean_log(n_users: int = 40) -> list[tuple[str, str, str]]:
    return [(str(u), f"i{(u * 7 + k) % 5}", str(1000 + 13 * k + u)) for u in range(n_users) for k in range(3 + u % 4)]


def to_parquet(csv_path: Path, out: Path, typed: bool) -> None:
    cast = ("SELECT CAST(user_id AS BIGINT) AS user_id, item_id, CAST(timestamp AS BIGINT) AS timestamp" if typed
            else "SELECT *")
    duckdb.sql(f"COPY ({cast} FROM read_csv('{csv_path}', all_varchar=true, header=true)) TO '{out}' "
               "(FORMAT parquet)")


def test_gzip_parquet_and_part_files_build_what_one_csv_builds(tmp_path):
    base = tmp_path / "csv"
    write_generic(base, clean_log())
    ref = tmp_path / "out-csv"
    build(BuildOptions(dataset="generic", source=base, out=ref, modality="text", max_tokens=16,
                       generic=generic_columns()))
    variants = {}
    gz = tmp_path / "gz"
    shutil.copytree(base, gz)
    with open(base / "interactions.csv", "rb") as f, gzip.open(gz / "interactions.csv.gz", "wb") as g:
        g.write(f.read())
    variants["interactions.csv.gz"] = gz
    for typed in (False, True):
        d = tmp_path / f"parquet-{typed}"
        shutil.copytree(base, d)
        to_parquet(base / "interactions.csv", d / "interactions.parquet", typed)
        variants[("typed" if typed else "text") + ".parquet"] = d
    parts = tmp_path / "parts"
    shutil.copytree(base, parts)
    lines = (base / "interactions.csv").read_text().splitlines(keepends=True)
    (parts / "log").mkdir()
    half = len(lines) // 2
    (parts / "log" / "part-0.csv").write_text("".join(lines[:half]))
    (parts / "log" / "part-1.csv").write_text(lines[0] + "".join(lines[half:]))
    variants["log"] = parts
    for name, root in variants.items():
        inter = "interactions.parquet" if name.endswith("parquet") else name
        out = tmp_path / f"out-{name}"
        build(BuildOptions(dataset="generic", source=root, out=out, modality="text", max_tokens=16,
                           generic=generic_columns(interactions=inter)))
        assert_same_folders(ref, out, drop_inputs=True)
    manifest = json.loads((tmp_path / "out-log" / "manifest.json").read_text())
    assert sorted(manifest["input_files"]) == ["items.csv", "log/part-0.csv", "log/part-1.csv"]  # each part hashed


def test_bad_logs_are_one_line_naming_the_file(tmp_path, capsys):
    root = tmp_path / "raw"
    write_generic(root, clean_log(5))
    (root / "broken.csv.gz").write_bytes(b"not gzip at all")
    args = ["--dataset", "generic", "--source", str(root), "--modality", "text", "--image-col", "",
            "--text-fields", "title,description", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"broken\.csv\.gz.*cannot be read as csv\.gz"):
        main([*args, "--interactions-file", "broken.csv.gz"])
    to_parquet(root / "interactions.csv", root / "no_time.parquet", typed=False)
    duckdb.sql(f"COPY (SELECT user_id, item_id FROM '{root / 'no_time.parquet'}') TO '{root / 'two.parquet'}' "
               "(FORMAT parquet)")
    with pytest.raises(SystemExit, match=r"two\.parquet has no column 'timestamp'.*--time-col"):
        main([*args, "--interactions-file", "two.parquet"])
    mixed = root / "mixed"
    mixed.mkdir()
    shutil.copy(root / "interactions.csv", mixed / "a.csv")
    shutil.copy(root / "two.parquet", mixed / "b.parquet")
    with pytest.raises(SystemExit, match=r"mixed: a folder of part files must hold one format"):
        main([*args, "--interactions-file", "mixed"])
    with pytest.raises(SystemExit, match=r"--engine memory reads a single CSV log only"):
        main([*args, "--interactions-file", "two.parquet", "--time-col", "", "--engine", "memory"])
    assert not (tmp_path / "out").exists()


MESSY = ([("01", "i1", "5"), ("1", "i2", "5"), ("1", "i2", "5"), ("u1", "unknown", "3"), ("", "i1", "4"),
          ("2", "i1", "yesterday"), ("ü", "nocontent", "1"), ("01", "i1", "5"), ("10", "i3", "2024-01-02"),
          ("9", "i4", "inf"), ("a b", "i0", "7.5")] + [(str(u), f"i{(u + k) % 5}", str(100 + k)) for u in range(3)
                                                         for k in range(3)], 1, ["1", "ü"])


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logs(), st.sampled_from(["keep", "collapse", "first"]))
@example(MESSY, "collapse")
def test_the_dask_engine_builds_what_the_others_build_from_one_file_or_parts(case, dedup):
    rows, short, features = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "raw"
        write_generic(root, rows, short, features)
        lines = (root / "interactions.csv").read_text(encoding="utf-8").splitlines(keepends=True)
        (root / "log").mkdir()
        (root / "log" / "a.csv").write_text("".join(lines[: len(lines) // 2]), encoding="utf-8")
        (root / "log" / "b.csv").write_text(lines[0] + "".join(lines[len(lines) // 2:]), encoding="utf-8")
        for interactions in ("interactions.csv", "log"):
            outs = [build_with(root, Path(tmp) / f"{e}-{interactions}", e, interactions, bool(features), dedup)
                    for e in ("duckdb", "dask")]
            assert_same_folders(*outs)


def build_with(root: Path, out: Path, engine: str, interactions: str, users: bool, dedup: str) -> Path:
    build(BuildOptions(dataset="generic", source=root, out=out, modality="text", max_tokens=16, engine=engine,
                       workers=2, dedup=dedup, generic=generic_columns(users=users, interactions=interactions)))
    return out


def test_the_dask_engine_refuses_a_named_dataset_and_a_stray_scheduler(tmp_path):
    with pytest.raises(SystemExit, match="--engine dask reads a generic log"):
        main(["--dataset", "hm-fashion", "--source", str(REPO / "data" / "hm-fashion-fixture"), "--engine", "dask",
              "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit):
        main(["--dataset", "generic", "--source", str(tmp_path), "--dask-scheduler", "tcp://x:1",
              "--out", str(tmp_path / "out")])


def test_the_column_wise_check_of_clean_csv_rows_gives_the_row_by_row_result():
    from transrec.data_shards.bad_input import Problems
    from transrec.data_shards.log_reader import _chunk_of

    times = ["0.1", " 7 ", "1e-320", "9007199254740993", "1_0", "-0.0", ".5", "1600000000", "2.2250738585072011e-308"]
    raw = [[f" u{k} ", f"i{k % 3}", t] for k, t in enumerate(times)]
    lines = list(range(1, len(raw) + 1))
    fast = _chunk_of("f.csv", ["user_id", "item_id", "timestamp"], lines, raw, 0, 1, 2, Problems(), text_rows=True)
    slow = _chunk_of("f.csv", ["user_id", "item_id", "timestamp"], lines, raw, 0, 1, 2, Problems())
    assert fast.users == slow.users == [f"u{k}" for k in range(len(times))] and fast.items == slow.items
    assert fast.times.tobytes() == slow.times.tobytes() and fast.rows.tolist() == slow.rows.tolist()
    problems = Problems()  # one bad row: the whole chunk is checked row by row, the bad row reported
    bad = _chunk_of("f.csv", ["user_id", "item_id", "timestamp"], lines + [10], raw + [["u", "i", "nan"]], 0, 1, 2,
                    problems, text_rows=True)
    assert len(bad.users) == len(times) and problems.counts()["unparseable_row"] == 1


def test_an_out_folder_under_missing_folders_is_built_by_every_engine(tmp_path):
    root = tmp_path / "raw"
    write_generic(root, clean_log(4))
    for engine in ("duckdb", "dask", "memory"):
        out = tmp_path / engine / "not" / "there" / "shards"
        build(BuildOptions(dataset="generic", source=root, out=out, modality="text", max_tokens=16, engine=engine,
                           workers=1, generic=generic_columns()))
        assert (out / "manifest.json").exists()
        assert not list(out.parent.glob(".history-*"))  # the scratch folder is gone
