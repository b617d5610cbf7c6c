"""A CI subset of tools/fault_writes.py for the trainer's writers: pretraining killed at
three of its checkpoint-writing steps resumes to the uninterrupted weights; evaluate --record
killed or on a full disk leaves the bundle's evaluation.json old or new. (Export, 13 s a
run, is covered by the tool: docs/reliability.md.)"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from fault_writes import faults


def test_killed_pretraining_and_record_recover(shared_data, tmp_path):
    only = ["pretrain checkpoints", "evaluate --record"]
    report = faults(tmp_path, kills=3, timed=1, seed=0, only=only)
    assert report["failures"] == []
    assert sorted(r["scenario"] for r in report["scenarios"]) == sorted(only)
    for r in report["scenarios"]:
        assert r["faults"] == {"kill_at": 3, "after": 1, "fsize": 3}, r
