"""CI lints and type-checks: `.ci/run` runs ruff and mypy, configured in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_ci_runs_ruff_and_mypy_after_installing() -> None:
    lines = [line.split("#")[0].strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    install = next(i for i, line in enumerate(lines) if line.startswith("pip install") and ".[" in line)
    tests = next(i for i, line in enumerate(lines) if "pytest" in line and not line.startswith("if"))
    assert install < lines.index("ruff check") < tests
    assert install < lines.index("mypy src/") < tests


def test_ci_installs_chromium_before_the_tests_and_requires_it() -> None:
    """The browser tests (tests/browser.py) must run in CI, never skip there."""
    lines = [line.split("#")[0].strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    tests = next(i for i, line in enumerate(lines) if "pytest" in line and not line.startswith("if"))
    install = next(i for i, line in enumerate(lines) if "apt-get install" in line and "chromium" in line)
    assert install < lines.index("export QPROBE_REQUIRE_BROWSER=1") < tests


def test_the_test_extra_installs_the_tools_and_pyproject_configures_them() -> None:
    cfg = pyproject()
    extra = " ".join(cfg["project"]["optional-dependencies"]["test"])
    assert "ruff" in extra and "mypy" in extra
    assert cfg["tool"]["mypy"]["files"] == ["src"]
    for override in cfg["tool"]["mypy"].get("overrides", []):
        assert set(override) <= {"module", "ignore_missing_imports"}, "no per-module error silencing"
        assert not any(m.startswith("qprobe") for m in override["module"])


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed (the test extra has it)")
def test_ruff_passes() -> None:
    p = subprocess.run(["ruff", "check", str(REPO)], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr

