"""Shared fixtures. Real-data tests use ../shared/data beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder; a skip where it is absent, a failure where CI requires it."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("SCGPT_REQUIRE_SHARED") == "1":
            pytest.fail(f"{SHARED_DATA} is missing and SCGPT_REQUIRE_SHARED=1")
        pytest.skip(f"{SHARED_DATA} is absent: real-data tests need ../shared/data")
    return SHARED_DATA
