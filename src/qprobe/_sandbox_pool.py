"""The sandbox's warm worker processes (`_sandbox_worker.py`) and their pool; `qprobe.sandbox`
sends each job to one and reads its result. Standard library only."""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from qprobe._sandbox_cgroup import backstop
from qprobe.errors import SandboxError

WORKER_SCRIPT = Path(__file__).with_name("_sandbox_worker.py")
UID_BASE = 1_700_000  # root only: worker i runs its jobs as this uid + i (no such user exists)


class Worker:
    """One warm worker process; used by one thread at a time."""

    def __init__(self, index: int, limits: dict[str, Any] | None = None) -> None:
        cfg = {**(limits or {}), "timeout": 3.0, "uid": UID_BASE + index, "tmp": tempfile.gettempdir(),
               "minimal": os.environ.get("QPROBE_SANDBOX_MINIMAL", "") == "1"}
        err = tempfile.TemporaryFile()  # the worker's own stderr: only read if it fails to start
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", str(WORKER_SCRIPT), json.dumps(cfg)], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=err, env={}, close_fds=True, start_new_session=True, cwd="/",
            )
        except OSError as exc:
            raise SandboxError(f"expected the sandbox worker to start, got {exc}; check that {sys.executable} "
                               "can run") from exc
        hello = self._recv(60.0)
        self.base: str = (hello or {}).get("base", "")  # its job folder, removed here (its own view is read-only)
        if hello is None or "error" in hello:
            self.close()
            err.seek(0)
            lines = err.read()[-4000:].decode("utf-8", "replace").strip().splitlines()
            why = (hello or {}).get("error") or (lines[-1] if lines else "it exited without a word")
            raise SandboxError(f"expected the sandbox worker to start, got: {why}; set QPROBE_SANDBOX_MINIMAL=1 "
                               f"to try it without namespaces (code then needs --allow-unconfined too)")
        err.close()
        self.level: str = hello["level"]
        self.features: dict[str, Any] = hello["features"]

    def _recv(self, timeout: float) -> dict | None:
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        buf = b""
        need = 4
        size = None
        while len(buf) < need:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(fd, need - len(buf))
            if not chunk:
                return None
            buf += chunk
            if size is None and len(buf) == 4:
                size = struct.unpack("<I", buf)[0]
                need, buf = size, b""
        return json.loads(buf) if size is not None else None

    def run(self, program: str, tests: Any, timeout: float, limits: Any) -> dict | None:
        """One job over the pipe: the program, its `sandbox.TaskTests` (code, trusted setup, entry
        points) and `sandbox.Limits` (this module sits below `sandbox`, so they are not imported)."""
        data = json.dumps({"program": program, "tests": tests.code, "setup": tests.setup,
                           "entry_points": list(tests.entry_points),
                           "limits": {**asdict(limits), "timeout": timeout}}).encode()
        try:
            self.proc.stdin.write(struct.pack("<I", len(data)) + data)  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except OSError:
            return None
        return self._recv(backstop(timeout) + 30.0)  # the worker stops a job by then

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        for top in getattr(self, "features", {}).get("cgroup_dirs", []):  # the worker's, empty once its
            for _ in range(50):  # last job's processes are gone
                try:
                    os.rmdir(top)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)
        base = getattr(self, "base", "")
        if base and Path(base).name.startswith("qprobe-sandbox-"):
            import shutil

            shutil.rmtree(base, ignore_errors=True)


class Pool:
    """Idle warm workers, reused; `limits()` gives a new worker's default limits."""

    def __init__(self, limits: Callable[[], dict[str, Any]]) -> None:
        self.limits = limits
        self.lock = threading.Lock()
        self.idle: list[Worker] = []
        self.count = 0

    def acquire(self) -> Worker:
        with self.lock:
            if self.idle:
                return self.idle.pop()
            self.count += 1
            index = self.count
        return Worker(index, self.limits())

    def release(self, worker: Worker) -> None:
        if not worker.alive():
            worker.close()
            return
        with self.lock:
            self.idle.append(worker)

    def close(self) -> None:
        with self.lock:
            workers, self.idle = self.idle, []
        for w in workers:
            w.close()
