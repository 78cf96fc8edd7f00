from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def qprobe_cmd() -> list[str]:
    """The `qprobe` command of the interpreter running the tests."""
    return [sys.executable, "-c", "from qprobe.cli.main import main; main()"]


@pytest.fixture(autouse=True)
def _no_code_execution_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests opt in explicitly where they run code.
    if os.environ.get("QPROBE_ALLOW_CODE_EXECUTION") and not os.environ.get("QPROBE_TEST_KEEP_OPT_IN"):
        monkeypatch.delenv("QPROBE_ALLOW_CODE_EXECUTION")


@pytest.fixture
def chromium():
    """The system's headless chromium (tests/browser.py): skipped when absent, failed under CI."""
    from browser import chromium_or_skip

    return chromium_or_skip()
