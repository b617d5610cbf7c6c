"""A CI subset of tools/fault_writes.py for the runtime's writers: each command killed
(SIGKILL) at three of its write steps and at one random moment, and run against a full disk
three times; the target is always the old output or the whole new one, a full disk one error
line with exit 6, and the next run leaves no temporary file."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from fault_writes import TRAIN_SCENARIOS, faults, scenarios


def test_killed_and_full_disk_writes_leave_the_old_or_the_new_output(shared_data, tmp_path):
    names = [s.name for s in scenarios(tmp_path / "names", train=False)]
    report = faults(tmp_path / "work", kills=3, timed=1, seed=0, only=names)
    assert report["failures"] == []
    assert [r["scenario"] for r in report["scenarios"]] == names
    assert not set(names) & set(TRAIN_SCENARIOS)
    for r in report["scenarios"]:
        assert r["faults"] == {"kill_at": 3, "after": 1, "fsize": 3}, r
        assert r["write_steps"] >= 5, r  # the hooks saw the writes
