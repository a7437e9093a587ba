"""The generic builder on a new user's own tables (issue 45): a column the flags name that the file lacks is one line
naming the file, the column and the flag to pass, with nothing written; repeats of a (user, item) pair are counted
with or without a time column."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from test_build_validation import GENERIC_FLAGS, GENERIC_ITEMS, write_generic

from transrec.data_shards.build import main


def _rewrite_without(path: Path, column: str) -> None:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
        header = [c for c in rows[0] if c != column] if rows else []
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, header, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


LOG = [["u1", "i1", "1"], ["u1", "i2", "2"], ["u1", "i5", "3"], ["u2", "i1", "4"], ["u2", "i2", "5"],
       ["u2", "i5", "6"]]


@pytest.mark.parametrize("file, column, flag, says", [
    ("catalog.csv", "picture", "--image-col", "or pass --image-col '' for a catalogue without images"),
    ("log.csv", "when", "--time-col", "or pass --time-col '' to take each user's interactions in file order"),
    ("log.csv", "uid", "--user-col", "name the right column with --user-col"),
    ("catalog.csv", "blurb", "--text-fields", "name the right column with --text-fields"),
])
def test_a_missing_column_is_one_line_with_the_flag_and_nothing_is_written(tmp_path, capsys, file, column, flag,
                                                                          says):
    src = write_generic(tmp_path / "src", GENERIC_ITEMS, LOG, [["u1", "SE"], ["u2", "NO"]])
    _rewrite_without(src / file, column)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["--dataset", "generic", "--source", str(src), "--out", str(out), *GENERIC_FLAGS])
    message = str(e.value)
    assert message.startswith(f"error: {src / file} has no column '{column}' (its columns: ") and says in message
    assert "\n" not in message and flag in message
    assert not out.exists() and not list(tmp_path.glob("out*"))  # nothing written, no partial folder
    assert "Traceback" not in capsys.readouterr().err


def test_the_forum_case_no_image_column_with_the_default_flag(tmp_path):
    """The issue's case: an items.csv without `image` and --image-col left at its default."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "items.csv").write_text("item_id,title,description\ni1,A,a post\ni2,B,another\n")
    (src / "interactions.csv").write_text("user_id,item_id,timestamp\nu1,i1,1\nu1,i2,2\nu1,i1,3\n")
    with pytest.raises(SystemExit) as e:
        main(["--dataset", "generic", "--source", str(src), "--out", str(tmp_path / "out")])
    assert str(e.value) == (f"error: {src / 'items.csv'} has no column 'image' (its columns: item_id, title, "
                            "description): name the image column with --image-col NAME, or pass --image-col '' for a "
                            "catalogue without images")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("time_flag, found", [("when", 1), ("", 3)])
def test_repeats_are_counted_with_and_without_a_time_column(tmp_path, capsys, time_flag, found):
    """u1 has i1 three times (two of them at the same time) and i2 twice: with times, one (user, item, time) repeat;
    in file order (--time-col ''), three (user, item) repeats. --dedup keep removes none of them."""
    log = [["u1", "i1", "1"], ["u1", "i2", "2"], ["u1", "i1", "1"], ["u1", "i1", "4"], ["u1", "i2", "5"],
           ["u1", "i5", "6"]]
    src = write_generic(tmp_path / "src", GENERIC_ITEMS, log, [["u1", "SE"]])
    flags = [*GENERIC_FLAGS[:GENERIC_FLAGS.index("--time-col")], "--time-col", time_flag,
             *GENERIC_FLAGS[GENERIC_FLAGS.index("--time-col") + 2:]]
    main(["--dataset", "generic", "--source", str(src), "--out", str(tmp_path / "out"), *flags, "--dedup", "keep"])
    policies = json.loads((tmp_path / "out" / "manifest.json").read_text())["policies"]
    assert (policies["duplicate_interactions"], policies["duplicates_removed"]) == (found, 0)
    assert f"duplicate interactions: {found} (--dedup keep, removed 0)" in capsys.readouterr().out
    main(["--dataset", "generic", "--source", str(src), "--out", str(tmp_path / "first"), *flags, "--dedup", "first"])
    policies = json.loads((tmp_path / "first" / "manifest.json").read_text())["policies"]
    assert (policies["duplicate_interactions"], policies["duplicates_removed"]) == (3, 3)  # one per (user, item)
