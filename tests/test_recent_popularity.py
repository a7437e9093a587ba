"""The recent-popularity prior of the leave-one-out study: exact counts per window, nothing of the target's own day."""

from __future__ import annotations

import numpy as np

from transrec.trainer.experiments.recent_popularity import DAY, RecentCounts, target_times


def seqs():
    # item 0 on days 0, 1, 2, 10; item 1 on day 9 (twice, two users); item 2 on day 10 (the first user's target day)
    return [{"user": 0, "items": [0, 0, 0, 1, 2], "timestamps": [0, DAY + 5, 2 * DAY, 9 * DAY + 1, 10 * DAY + 7],
             "num_train": 3, "evaluated": True},
            {"user": 1, "items": [1, 0, 2], "timestamps": [9 * DAY, 10 * DAY, 10 * DAY + 1], "num_train": 1,
             "evaluated": True}]


def test_recent_counts_count_the_window_before_the_day_only():
    recent = RecentCounts(seqs(), 3)
    t = np.array([10 * DAY + 7, 10 * DAY + 7, 3 * DAY, 11 * DAY])
    got = np.stack([recent(t[:1], 1)[0], recent(t[1:2], 30)[0], recent(t[2:3], 2)[0], recent(t[3:], 1)[0]])
    assert got.tolist() == [[0, 2, 0],  # day 9 only: item 1 twice; nothing of day 10 (the target's own day)
                            [3, 2, 0],  # days 0-9
                            [2, 0, 0],  # days 1-2
                            [1, 0, 2]]  # day 10: what happened on the target's day counts the day after
    assert recent(np.array([-5 * DAY]), 7).tolist() == [[0, 0, 0]]  # before the log: nothing


def test_target_times_are_each_splits_target():
    assert target_times(seqs(), "valid") == {0: 9 * DAY + 1, 1: 10 * DAY}
    assert target_times(seqs(), "test") == {0: 10 * DAY + 7, 1: 10 * DAY + 1}
