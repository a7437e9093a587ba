"""The generic builder, fuzzed: random interaction and item tables with broken rows (missing fields, bad times,
unknown and empty ids, duplicate item rows, odd characters, huge fields, blank or missing images) never crash or
hang the build, and every interaction row is accounted for: kept in the shards, or dropped under a named reason."""

from __future__ import annotations

import csv
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transrec.data_shards.build import BuildOptions, build
from transrec.data_shards.tables import GenericColumns

ODD_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
FIELD = st.one_of(ODD_TEXT, st.just(""), st.builds(lambda n: "long " * n, st.integers(1000, 5000)))
TIME = st.one_of(st.integers(0, 2_000_000_000).map(str), st.just(""), st.just("yesterday"), st.just("1e99"),
                 st.just("2024-02-30"))
USER = st.one_of(st.sampled_from([f"u{i}" for i in range(6)]), st.just(""), st.just(" u1 "))
ITEM = st.one_of(st.sampled_from([f"i{i}" for i in range(8)]), st.just("unknown-item"), st.just(""))


@st.composite
def tables(draw):
    core = [(f"u{u}", f"i{(u + k) % 5}", str(1000 + 10 * k)) for u in range(3) for k in range(3)]  # always buildable
    noise = draw(st.lists(st.tuples(USER, ITEM, TIME), max_size=25))
    rows = draw(st.permutations(core + noise))
    # The core items have a title, whatever else is broken about them (items with no content at all: the next test).
    items = [(f"i{i}", "t" + draw(FIELD), draw(FIELD), draw(st.sampled_from(["", "img/ok.jpg", "img/missing.jpg",
                                                                               "img/broken.jpg"])))
             for i in range(5)]
    items += draw(st.lists(st.tuples(st.sampled_from(["i1", "i6", "i7", ""]), FIELD, FIELD, st.just("")),
                           max_size=5))  # duplicates, extra items, empty ids
    short_rows = draw(st.integers(0, 3))  # rows with fewer cells than the header
    return rows, items, short_rows


def _write(root: Path, rows, items, short_rows) -> int:
    (root / "img").mkdir(parents=True)
    shutil.copy(Path(__file__).resolve().parents[1] / "data" / "movielens-100k-mm" / "posters" / "1.jpg",
                root / "img" / "ok.jpg")
    (root / "img" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with open(root / "interactions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        w.writerows(rows)
        for _ in range(short_rows):
            w.writerow(["u9"])
    with open(root / "items.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title", "description", "image"])
        w.writerows(items)
    return len(rows) + short_rows


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(tables())
def test_every_interaction_row_is_kept_or_dropped_with_a_reason(case):
    rows, items, short_rows = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "raw"
        n_rows = _write(root, rows, items, short_rows)
        for dedup in ("keep", "first"):
            manifest = build(BuildOptions(dataset="generic", source=root, out=Path(tmp) / f"out-{dedup}",
                                          max_tokens=16, dedup=dedup, generic=GenericColumns()))
            dropped = manifest["dropped_interactions"]
            accounted = (manifest["num_interactions"] + dropped["unknown_item"] + dropped["item_without_content"]
                         + dropped["unparseable_row"] + manifest["policies"]["duplicates_removed"])
            assert accounted == n_rows, (manifest["num_interactions"], dropped, manifest["policies"], n_rows)
            assert manifest["num_interactions"] >= 9  # the core rows survive whatever the noise


def test_a_build_with_nothing_usable_fails_and_writes_nothing(tmp_path):
    import pytest

    root = tmp_path / "raw"
    _write(root, [("u0", "i0", "1"), ("u0", "i1", "2"), ("u1", "i9", "3"), ("u1", "", "4")],
           [("i0", "", "", ""), ("i1", "", "", "img/missing.jpg"), ("", "x", "y", "")], 0)
    with pytest.raises(SystemExit, match=r"no interaction is left.*4 rows in interactions.csv, of which unparseable 1, "
                                         r"naming unknown items 1, naming items without usable content .* 2"):
        build(BuildOptions(dataset="generic", source=root, out=tmp_path / "out", max_tokens=16,
                           generic=GenericColumns()))
    assert not (tmp_path / "out").exists()
