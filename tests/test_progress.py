"""Progress lines of long passes (trainer/core/progress.py): what they say, and that counting passes things through."""

from transrec.trainer.core.progress import ProgressLog


def test_counted_passes_everything_through_with_progress_and_a_last_line():
    lines = []
    things = list(ProgressLog("reading", 3000, lines.append, every=0, unit="users").counted(range(3000)))
    assert things == list(range(3000))
    assert [line.split(",")[0] for line in lines[:-1]] == ["reading: 1024/3000 users", "reading: 2048/3000 users"]
    assert " users/s, about " in lines[0] and lines[0].endswith(" min left")
    assert lines[-1].startswith("reading: 3000 users in ")
    quiet = []
    assert list(ProgressLog("reading", 10, quiet.append, every=30).counted(iter("abc"))) == ["a", "b", "c"]
    assert quiet == []  # a pass shorter than `every` says nothing
    assert list(ProgressLog("reading", 10, None, every=0).counted([])) == []
