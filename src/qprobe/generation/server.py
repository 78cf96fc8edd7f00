"""A local OpenAI-compatible server (llama-cpp-python's) on 127.0.0.1, as a context manager.

    with llama_server() as srv:            # the packaged default GGUF, a free port
        backend = OpenAIBackend(model=srv.model, base_url=srv.base_url)

The server runs as a child process (`python -m qprobe.generation.server ARGS`: llama-cpp-python's
`python -m llama_cpp.server` after `disable_extra_buffers()`, whose note says why; extra
"server"); entering
waits until `GET /v1/models` answers, leaving terminates it (then kills it after a grace
period). Used by the tests of the openai back-end, by the "API" setting experiment and by
`OpenAIBackend(serve=...)` (`qprobe collect --backend openai --backend-option serve=default`), which
starts and stops its own server.
Note that llama-cpp-python's server ignores the `n` parameter (one choice per request) and
honours `seed`, and that it applies samplers of its own by default (top_k 40, min_p 0.05, repeat
penalty 1.1; `llama_cpp/server/types.py`): `OpenAIBackend` switches them off per request and
records what the server applies (`OpenAIBackend.sampler`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from qprobe.errors import BackendError, require


@dataclass(frozen=True)
class ServerInfo:
    base_url: str  # e.g. http://127.0.0.1:40123/v1
    port: int
    model: str  # the alias the server answers to
    pid: int
    log: str  # path of the server's combined stdout/stderr


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _models_ready(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(base_url + "/models", timeout=2) as r:
            return r.status == 200 and "data" in json.loads(r.read().decode())
    except (urllib.error.URLError, OSError, ValueError):
        return False


@contextlib.contextmanager
def llama_server(
    model_path: str | os.PathLike[str] | None = None,
    *,
    alias: str = "local",
    host: str = "127.0.0.1",
    port: int | None = None,
    embedding: bool = False,
    n_ctx: int = 4096,
    n_threads: int | None = None,
    startup_timeout: float = 180.0,
    extra_args: tuple[str, ...] = (),
) -> Iterator[ServerInfo]:
    """Start llama-cpp-python's server for `model_path` (default: the packaged GGUF)."""
    require("llama_cpp.server", "server")
    if model_path is None:
        from qprobe.generation.models import default_model_path

        model_path = default_model_path()
    path = Path(model_path)
    if not path.is_file():
        raise BackendError(f"expected a GGUF file to serve, got '{path}' (not a file); check the path")
    port = port or free_port(host)
    threads = n_threads or max(1, (os.cpu_count() or 2))
    cmd = [
        sys.executable, "-m", "qprobe.generation.server", "--model", str(path), "--model_alias", alias,
        "--host", host, "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads),
        "--n_threads_batch", str(threads), "--embedding", str(bool(embedding)), *extra_args,
    ]  # fmt: skip
    log = tempfile.NamedTemporaryFile(prefix="qprobe-llama-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base_url = f"http://{host}:{port}/v1"
    try:
        deadline = time.monotonic() + startup_timeout
        while not _models_ready(base_url):
            if proc.poll() is not None:
                raise BackendError(
                    f"expected the llama.cpp server to start, got exit code {proc.returncode}; "
                    f"its log ends with: {_tail(log.name)}"
                )
            if time.monotonic() > deadline:
                raise BackendError(
                    f"expected the llama.cpp server on {base_url} within {startup_timeout:.0f} s, got no "
                    f"answer; its log ends with: {_tail(log.name)}"
                )
            time.sleep(0.25)
        yield ServerInfo(base_url=base_url, port=port, model=alias, pid=proc.pid, log=log.name)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _tail(path: str, n: int = 600) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:].replace("\n", " | ")
    except OSError:
        return "(no log)"


def _serve() -> None:
    """`python -m qprobe.generation.server ...`: llama_cpp.server with qprobe's safe CPU defaults."""
    from qprobe.generation.llamacpp_lib import disable_extra_buffers

    disable_extra_buffers()
    from llama_cpp.server.__main__ import main

    main()


if __name__ == "__main__":
    _serve()
