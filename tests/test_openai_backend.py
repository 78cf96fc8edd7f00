"""The OpenAI-compatible back-end: fast tests on a tiny stdlib HTTP server (status codes, top-up),
and a smoke test against llama-cpp-python's real server on 127.0.0.1 with the default GGUF."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

pytest.importorskip("openai")

from openai_stub import completion, send_json  # noqa: E402

from qprobe.core.types import Prompt  # noqa: E402
from qprobe.errors import BackendError, ConfigError  # noqa: E402
from qprobe.features.spec import FeatureRequest  # noqa: E402
from qprobe.generation.base import SamplingConfig  # noqa: E402
from qprobe.generation.openai_api import OpenAIBackend, chat_json, parse_chat, plain_text  # noqa: E402
from qprobe.generation.server import free_port  # noqa: E402


def test_chat_json_round_trip() -> None:
    msgs = ({"role": "user", "content": "hi \u00e9"},)
    text = chat_json(msgs)
    assert text == '{"messages": [{"role": "user", "content": "hi \u00e9"}]}'
    assert parse_chat(text) == [{"role": "user", "content": "hi \u00e9"}]
    assert parse_chat("def f():") is None
    assert parse_chat('{"messages": 3, "x": 1}') is None
    assert plain_text(text) == "hi \u00e9"
    assert plain_text("def f():") == "def f():"


class _Handler(BaseHTTPRequestHandler):
    """Fails `fail` times with `status`, then answers one choice per request (ignores n)."""

    script: dict = {}

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        s = self.script
        s["bodies"].append(body)
        if s["fail"] > 0:
            s["fail"] -= 1
            send_json(self, s["status"], {"error": {"message": "busy"}})
            return
        text = f"seed{body['seed']} STOP tail"
        finish = "stop" if self.path.endswith("/chat/completions") else "length"
        usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
        send_json(self, 200, completion(self.path, body["model"], text, finish, usage))


@pytest.fixture
def stub_server():
    _Handler.script = {"fail": 0, "status": 503, "bodies": []}
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1", _Handler.script
    srv.shutdown()
    srv.server_close()


def _backend(url: str, **kw: object) -> OpenAIBackend:
    return OpenAIBackend(model="m", base_url=url, sleep=lambda s: None, **kw)  # type: ignore[arg-type]


def test_top_up_when_server_ignores_n(stub_server) -> None:
    url, script = stub_server
    b = _backend(url)
    comps = b.generate("def f():", SamplingConfig(stop=(" STOP",)), [11, 22, 33])
    # one request per missing choice, each seeded with the first sample it fills
    assert [body["n"] for body in script["bodies"]] == [3, 2, 1]
    assert [body["seed"] for body in script["bodies"]] == [11, 22, 33]
    assert [c.text for c in comps] == ["seed11", "seed22", "seed33"]  # stop cut locally too
    assert [c.seed for c in comps] == [11, 22, 33]
    assert comps[0].finish_reason == "stop" and comps[0].n_tokens == 5
    assert script["bodies"][0]["stop"] == [" STOP"] and "prompt" in script["bodies"][0]


def test_chat_prompt_goes_to_chat_endpoint(stub_server) -> None:
    url, script = stub_server
    b = _backend(url, n_per_request=1)
    text = b.render(Prompt(id="p", text="plain", messages=({"role": "user", "content": "hi"},)))
    assert parse_chat(text) == [{"role": "user", "content": "hi"}]
    comps = b.generate(text, SamplingConfig(), [5, 6])
    assert script["bodies"][0]["messages"] == [{"role": "user", "content": "hi"}]
    assert [c.text for c in comps] == ["seed5 STOP tail", "seed6 STOP tail"]
    assert (
        _backend(url, chat=False).render(
            Prompt(id="p", text="plain", messages=({"role": "u", "content": "x"},))
        )
        == "plain"
    )


@pytest.mark.parametrize("status", [429, 500, 503])
def test_transient_errors_are_retried(stub_server, status: int) -> None:
    url, script = stub_server
    script.update(fail=2, status=status)
    comps = _backend(url).generate("x", SamplingConfig(), [1])
    assert len(script["bodies"]) == 3 and comps[0].text.startswith("seed1")


def test_other_errors_raise_backend_error_at_once(stub_server) -> None:
    url, script = stub_server
    script.update(fail=5, status=404)
    with pytest.raises(BackendError, match="HTTP 404"):
        _backend(url).generate("x", SamplingConfig(), [1])
    assert len(script["bodies"]) == 1


def test_connection_errors_retry_then_fail() -> None:
    delays: list[float] = []
    b = OpenAIBackend(
        model="m", base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=3, sleep=delays.append
    )
    with pytest.raises(BackendError, match="APIConnectionError after 4 attempts"):
        b.generate("x", SamplingConfig(), [1])
    assert len(delays) == 3 and delays[0] < delays[2]  # exponential backoff


def test_model_name_required() -> None:
    with pytest.raises(ConfigError, match="model name"):
        OpenAIBackend(model="")


@pytest.fixture(scope="module")
def llama_server_info():
    pytest.importorskip("llama_cpp.server")
    from qprobe.generation.server import llama_server

    try:
        from qprobe.generation.models import default_model_path

        path = default_model_path()
    except Exception as exc:  # noqa: BLE001 - no model parts installed
        pytest.skip(f"default model unavailable: {exc}")
    with llama_server(path, embedding=True, n_threads=1) as info:
        yield info


@pytest.mark.smoke
def test_real_llama_server(llama_server_info, tmp_path) -> None:
    from qprobe.features import make_embedder

    srv = llama_server_info
    b = OpenAIBackend(model=srv.model, base_url=srv.base_url)
    sampling = SamplingConfig(temperature=0.8, max_new_tokens=12, stop=("\n\n",), seed=0)
    comps = b.generate("def add(a, b):", sampling, [7, 8])
    assert len(comps) == 2 and b.requests_sent == 2  # llama-cpp-python ignores n: topped up
    assert all(0 < c.n_tokens <= 12 and "\n\n" not in c.text for c in comps)
    again = b.generate("def add(a, b):", sampling, [7])
    assert again[0].text == comps[0].text  # the server honours the seed
    chat = b.generate(chat_json([{"role": "user", "content": "Say hi."}]), sampling, [1])
    assert chat[0].text
    # the neutral sampler values and more than 4 stop sequences are accepted by the real server
    neutral = OpenAIBackend(model=srv.model, base_url=srv.base_url, server="llama_cpp")
    many = SamplingConfig(temperature=0.8, max_new_tokens=12, stop=("\n\n", "zz1", "zz2", "zz3", "zz4"), seed=0)
    got = neutral.generate("def add(a, b):", many, [7])
    assert got[0].n_tokens > 0 and neutral.sampler(many)["top_k"] == 0
    neutral.close()
    emb = make_embedder(b)  # the back-end's own embedder: the server's /v1/embeddings
    feats = emb.embed("def add(a, b):", comps, [FeatureRequest(-1, "last"), FeatureRequest(-1, "mean")])
    assert feats["L-1_last"].shape == (2, 896) and np.isfinite(feats["L-1_mean"]).all()
    assert not np.allclose(feats["L-1_last"], feats["L-1_mean"])  # per-token vectors pooled here
    b.close()


@pytest.mark.slow
def test_collect_with_openai_backend(llama_server_info, tmp_path) -> None:
    from qprobe.collection.collect import CollectConfig, collect

    srv = llama_server_info
    cfg = CollectConfig(
        task="fake", split="train", out=tmp_path / "run", n=2, backend="openai", model=srv.model,
        features=("-1:last",), limit=2, sampling=SamplingConfig(max_new_tokens=8),
        task_options={"size": 4}, backend_options={"base_url": srv.base_url},
    )  # fmt: skip
    run = collect(cfg, progress=False)
    assert len(run) == 4 and run.features("L-1_last").shape == (4, 896)


def test_plain_api_gets_no_extras_and_refuses_more_than_4_stops(stub_server) -> None:
    """A server that is neither llama.cpp nor vLLM: only OpenAI fields; a 5th stop is refused, not cut."""
    url, script = stub_server
    b = _backend(url)
    assert b.server_kind == "openai"  # the stub has no GET /models
    b.generate("x", SamplingConfig(stop=("a", "b", "c", "d")), [1])
    assert script["bodies"][0]["stop"] == ["a", "b", "c", "d"] and "top_k" not in script["bodies"][0]
    with pytest.raises(ConfigError, match="at most 4 stop sequences"):
        b.generate("x", SamplingConfig(stop=("a", "b", "c", "d", "e")), [1])
    assert len(script["bodies"]) == 1


def test_llama_cpp_server_gets_neutral_samplers_and_every_stop(stub_server) -> None:
    url, script = stub_server
    b = _backend(url, server="llama_cpp")
    stops = ("a", "b", "c", "d", "e", "f")
    b.generate("x", SamplingConfig(stop=stops), [1])
    body = script["bodies"][0]
    assert body["stop"] == list(stops)
    assert (body["top_k"], body["min_p"], body["repeat_penalty"]) == (0, 0.0, 1.0)
    rec = b.sampler(SamplingConfig(stop=stops))
    assert rec["server"] == "llama_cpp" and rec["top_k"] == 0 and rec["min_p"] == 0.0 and rec["repeat_penalty"] == 1.0
    assert "top_p, min_p, temperature" in rec["chain"]  # llama-cpp-python's order, recorded


def test_neutral_values_are_fields_of_the_installed_llama_cpp_server() -> None:
    """The extra_body keys are request fields of llama-cpp-python's server (else ignored silently),
    the values pass its validation, and they switch the samplers off: top_k <= 0 keeps every token."""
    types = pytest.importorskip("llama_cpp.server.types")
    from qprobe.generation.openai_api import NEUTRAL

    for cls in (types.CreateCompletionRequest, types.CreateChatCompletionRequest):
        fields = cls.model_fields
        assert set(NEUTRAL["llama_cpp"]) <= set(fields)
        assert fields["top_k"].default == 40 and fields["min_p"].default == 0.05 and fields["repeat_penalty"].default == 1.1
        extra = {"messages": [{"role": "user", "content": "x"}]} if "messages" in fields else {"prompt": "x"}
        req = cls(**extra, **NEUTRAL["llama_cpp"])
        assert (req.top_k, req.min_p, req.repeat_penalty) == (0, 0.0, 1.0)
        # what the record says the server applies beside them: its defaults, already neutral
        assert (req.presence_penalty, req.frequency_penalty, req.mirostat_mode) == (0.0, 0.0, 0)
        assert "typical_p" not in fields  # left at llama_cpp.Llama's default
    import inspect

    from qprobe.generation.openai_api import APPLIED

    llama = pytest.importorskip("llama_cpp").Llama
    assert inspect.signature(llama.create_completion).parameters["typical_p"].default == APPLIED["llama_cpp"]["typical_p"]


class _VLLMHandler(_Handler):
    def do_GET(self) -> None:  # noqa: N802
        send_json(self, 200, {"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "vllm"}]})


def test_vllm_is_recognised_by_its_models_endpoint() -> None:
    _Handler.script = {"fail": 0, "status": 503, "bodies": []}
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _VLLMHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    try:
        b = _backend(url)
        assert b.server_kind == "vllm"
        b.generate("x", SamplingConfig(stop=tuple("abcdef")), [1])
        body = _Handler.script["bodies"][0]
        assert body["top_k"] == -1 and body["repetition_penalty"] == 1.0 and len(body["stop"]) == 6
        assert b.sampler(SamplingConfig())["server"] == "vllm"
    finally:
        srv.shutdown()
        srv.server_close()
