"""The prepared GPU check passes its dry run on the CPU (the same code, small sizes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "gpu_check.json"
    subprocess.run(["bash", "-n", str(ROOT / "tools" / "gpu_check.sh")], check=True)
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--dry-run", "--out", str(out)],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    report = json.loads(out.read_text())
    assert report["dry_run"] is True
    assert "CPUExecutionProvider" in report["machine"]["providers"]
    assert report["serving"]["execution_provider"] == "CPUExecutionProvider"
    assert report["serving"]["cells_per_s"] > 0
    assert report["serving_pytorch"]["cells_per_s"] > 0
    assert report["training"]["steps_per_s"] > 0
