"""A headless-browser harness for tests: render a local HTML file in the system chromium.

Debian's `chromium` package (/usr/bin/chromium), driven by its command line; no playwright, no
driver, no network. Tests take the `chromium` fixture (tests/conftest.py), which skips when no
browser is installed here and fails instead under CI (`CI=true` or `QPROBE_REQUIRE_BROWSER=1`;
.ci/run installs the package before pytest). Pages must be self-contained files: each call is a
fresh browser with its own throw-away profile.

    def test_page(chromium: Chromium, tmp_path: Path) -> None:
        dom = chromium.dump_dom(page)                     # the DOM after parsing, as HTML text
        dom, console = chromium.load(page, "#filter=x")   # the DOM after scripts ran, and console lines
        png = chromium.screenshot(page, tmp_path / "shot.png", size=(1200, 900))
        pixels = read_pixels(png)                         # [H, W, 3] uint8
        assert has_colour(pixels, (33, 102, 172))
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL = "apt-get update && apt-get install -y --no-install-recommends chromium"
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
    "--force-device-scale-factor=1", "--force-color-profile=srgb",
)


def find_chromium() -> str | None:
    """The browser's path: $QPROBE_CHROMIUM, else the first of NAMES on PATH, else None."""
    env = os.environ.get("QPROBE_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def browser_required() -> bool:
    """True under CI, where a missing browser is a failure, not a skip."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes") or bool(os.environ.get("QPROBE_REQUIRE_BROWSER"))


class BrowserError(RuntimeError):
    """The browser failed, timed out, or wrote nothing."""


class Chromium:
    """One chromium executable; every call starts a fresh headless browser and waits for it."""

    def __init__(self, path: str, timeout: float = 60.0) -> None:
        self.path = path
        self.timeout = timeout

    def _run(self, args: list[str], page: Path, size: tuple[int, int], fragment: str = "") -> tuple[str, str]:
        page = Path(page).resolve()
        if not page.is_file():
            raise BrowserError(f"no such page: {page}")
        with tempfile.TemporaryDirectory(prefix="qprobe-chromium-") as profile:
            cmd = [self.path, *FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
                   *args, page.as_uri() + fragment]
            # Its own session, so a timeout kills the renderer and GPU processes too.
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True, env={**os.environ, "HOME": profile})
            try:
                out, err = proc.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                raise BrowserError(f"chromium took over {self.timeout:g} s on {page}") from None
        if proc.returncode != 0:
            tail = "\n".join(line for line in err.splitlines() if "dbus" not in line)[-2000:]
            raise BrowserError(f"chromium exited with {proc.returncode} on {page}:\n{tail}")
        return out, err

    def dump_dom(self, page: Path, size: tuple[int, int] = (1200, 900)) -> str:
        """The page's DOM after parsing and styling, serialised as HTML (`--dump-dom`)."""
        return self.load(page, size=size)[0]

    def load(self, page: Path, fragment: str = "", size: tuple[int, int] = (1200, 900)) -> tuple[str, list[str]]:
        """(DOM after the load event, as HTML text; every console message the page logged, errors
        included: uncaught exceptions, blocked loads). `fragment`: e.g. "#filter=wrong", read by the
        page's script through `location.hash`."""
        dom, err = self._run(["--dump-dom", "--enable-logging=stderr", "--v=0"], page, size, fragment)
        if "<html" not in dom.lower():
            raise BrowserError(f"chromium dumped no DOM for {page}")
        return dom, [line.split(":CONSOLE", 1)[1] for line in err.splitlines() if ":CONSOLE" in line]

    def screenshot(self, page: Path, out: Path, size: tuple[int, int] = (1200, 900)) -> Path:
        """A PNG of the page's first `size` = (width, height) CSS pixels."""
        out = Path(out).resolve()
        out.unlink(missing_ok=True)
        self._run([f"--screenshot={out}"], page, size)
        if not out.is_file() or out.stat().st_size == 0:
            raise BrowserError(f"chromium wrote no screenshot of {page} to {out}")
        return out


def chromium_or_skip(timeout: float = 60.0) -> Chromium:
    """The system chromium; pytest.skip when absent here, pytest.fail when absent under CI."""
    path = find_chromium()
    if path is None:
        message = f"chromium not found (looked for $QPROBE_CHROMIUM and {', '.join(NAMES)}); install it: {INSTALL}"
        if browser_required():
            pytest.fail(f"CI needs the browser tests: {message}")
        pytest.skip(message)
    return Chromium(path, timeout)


def read_pixels(png: Path) -> np.ndarray:
    """The screenshot's pixels [H, W, 3], uint8 RGB."""
    from PIL import Image

    with Image.open(png) as img:
        return np.asarray(img.convert("RGB"))


def has_colour(pixels: np.ndarray, rgb: tuple[int, int, int], tol: int = 6, min_pixels: int = 20) -> bool:
    """Whether at least `min_pixels` pixels are within `tol` of `rgb` in every channel."""
    close = np.all(np.abs(pixels.astype(np.int16) - np.array(rgb, dtype=np.int16)) <= tol, axis=-1)  # [H, W]
    return int(close.sum()) >= min_pixels


def colour_count(pixels: np.ndarray) -> int:
    """How many distinct colours the image holds (1 for a blank page)."""
    return len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0))
