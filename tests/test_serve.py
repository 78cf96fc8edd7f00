"""`qprobe serve`: a real uvicorn server on 127.0.0.1, spoken to with the real openai client.

Fast tests run the fake back-end with a literal-weights probe on its features and check every
answer against the pick computed directly (the fake back-end, its embedder, the probe's scores,
softmax(Q/beta) with the documented seeds); one `smoke` test serves the default model.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Hashable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from helpers import hand_probe, run_cli  # noqa: E402

from qprobe.core.types import Prompt  # noqa: E402
from qprobe.features import FeatureRequest, make_embedder  # noqa: E402
from qprobe.features.spec import FeatureSpec  # noqa: E402
from qprobe.generation.base import Finished, GenRequest, Pool, SamplingConfig, sample_seed  # noqa: E402
from qprobe.generation.fake import FakeBackend  # noqa: E402
from qprobe.generation.server import free_port  # noqa: E402
from qprobe.metrics import selection_probs  # noqa: E402
from qprobe.probes.models import Probe  # noqa: E402
from qprobe.serve.app import ServeInfo, make_app, serve_in_thread  # noqa: E402
from qprobe.serve.engine import Engine  # noqa: E402
from qprobe.serve.protocol import ServeDefaults, defaults_from_probe  # noqa: E402

SPEC = FeatureSpec(backend="fake", model="fake", sha256="fake-16", layer=-1, pooling="mean", dim=16)
W = np.linspace(-1.0, 1.0, 16)
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add two numbers."}]
DEFAULTS = ServeDefaults(k=4, beta=0.0, max_samples=32)


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Probe:
    return Probe.from_pretrained(hand_probe(tmp_path_factory.mktemp("probe") / "p", W, SPEC))


@contextlib.contextmanager
def serving(probe: Probe, backend: Any = None, queue: int = 64, api_key: str | None = None,
            defaults: ServeDefaults = DEFAULTS) -> Iterator[tuple[str, Engine]]:
    engine = Engine(backend or FakeBackend(), probe, queue_size=queue)
    with serve_in_thread(make_app(engine, ServeInfo("fake-probe", defaults, api_key=api_key))) as url:
        yield url, engine


@pytest.fixture(scope="module")
def server(probe: Probe) -> Iterator[tuple[str, Engine]]:
    with serving(probe) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: tuple[str, Engine]) -> Any:
    return openai.OpenAI(base_url=server[0], api_key="unused", max_retries=0)


def direct_pick(probe: Probe, prompt: Prompt, seed: int, k: int, beta: float, pick: int = 0,
                sampling: SamplingConfig | None = None) -> tuple[int, list[Any], np.ndarray, np.ndarray]:
    """The pick made without the server: (index, the k completions, Q, probabilities)."""
    be = FakeBackend()
    text = be.render(prompt)
    pid = hashlib.sha256(text.encode()).hexdigest()[:16]
    sampling = sampling or SamplingConfig(seed=seed)
    comps = be.generate(text, sampling, [sample_seed(seed, pid, j) for j in range(pick * k, (pick + 1) * k)])
    req = FeatureRequest(SPEC.layer, SPEC.pooling)
    q = probe.score(make_embedder(be).embed(text, comps, [req])[req.key])
    p = selection_probs(q, beta)
    i = int(np.random.default_rng(sample_seed(seed, pid + "/pick", pick)).choice(k, p=p))
    return i, comps, q, p


def chat_prompt(messages: list[dict[str, str]]) -> Prompt:
    return Prompt(id="chat", text="\n\n".join(m["content"] for m in messages), messages=tuple(messages))


# ------------------------------------------------------------------------ answers
def test_chat_answer_is_the_policy_pick(client: Any, probe: Probe) -> None:
    r = client.chat.completions.create(model="any", messages=CHAT, seed=5,
                                       extra_body={"qprobe": {"k": 4, "beta": 2.0, "return_candidates": True}})
    i, comps, q, p = direct_pick(probe, chat_prompt(CHAT), 5, 4, 2.0)
    assert 0 < p.max() < 1  # a real draw, not an argmax
    assert r.choices[0].message.content == comps[i].text and r.choices[0].finish_reason == comps[i].finish_reason
    ext = r.model_extra["qprobe"]
    assert ext["seed"] == 5 and ext["k"] == 4 and ext["choices"][0]["pick"] == i
    cands = ext["choices"][0]["candidates"]
    assert [c["text"] for c in cands] == [c.text for c in comps]
    np.testing.assert_allclose([c["q"] for c in cands], q, rtol=1e-6)
    np.testing.assert_allclose([c["prob"] for c in cands], p, rtol=1e-6)
    assert r.model == "fake-probe" and r.object == "chat.completion"


def test_completion_answer_is_the_pick_and_the_same_on_a_fresh_server(client: Any, probe: Probe) -> None:
    r = client.completions.create(model="any", prompt="def add(a, b):", seed=11, max_tokens=4,
                                  extra_body={"qprobe": {"k": 6}})
    sampling = SamplingConfig(max_new_tokens=4, seed=11)
    i, comps, _, _ = direct_pick(probe, Prompt(id="x", text="def add(a, b):"), 11, 6, 0.0, sampling=sampling)
    assert r.choices[0].text == comps[i].text
    with serving(probe) as (url, _):
        fresh = openai.OpenAI(base_url=url, api_key="-", max_retries=0)
        again = fresh.completions.create(model="any", prompt="def add(a, b):", seed=11, max_tokens=4,
                                         extra_body={"qprobe": {"k": 6}})
    assert again.choices[0].text == r.choices[0].text
    other = client.completions.create(model="any", prompt="def add(a, b):", seed=12, max_tokens=4,
                                      extra_body={"qprobe": {"k": 6, "return_candidates": True}})
    texts = [c["text"] for c in other.model_extra["qprobe"]["choices"][0]["candidates"]]
    assert texts != [c.text for c in comps]  # another seed, other samples


def test_candidates_probabilities_are_softmax_of_q(client: Any) -> None:
    r = client.chat.completions.create(model="any", messages=CHAT, seed=1,
                                       extra_body={"qprobe": {"k": 8, "beta": 0.7, "return_candidates": True}})
    cands = r.model_extra["qprobe"]["choices"][0]["candidates"]
    q, p = np.array([c["q"] for c in cands]), np.array([c["prob"] for c in cands])
    assert len(cands) == 8 and p.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(p, np.exp(q / 0.7) / np.exp(q / 0.7).sum(), rtol=1e-9)


def test_n_picks_come_from_distinct_samples_and_usage_counts_them_all(client: Any, probe: Probe) -> None:
    r = client.chat.completions.create(model="any", messages=CHAT, seed=3, n=2,
                                       extra_body={"qprobe": {"k": 3, "return_candidates": True}})
    assert [c.index for c in r.choices] == [0, 1]
    ext = r.model_extra["qprobe"]["choices"]
    for pick in (0, 1):
        i, comps, _, _ = direct_pick(probe, chat_prompt(CHAT), 3, 3, 0.0, pick=pick)
        assert [c["text"] for c in ext[pick]["candidates"]] == [c.text for c in comps]
        assert r.choices[pick].message.content == comps[i].text
    sampled = sum(c["n_tokens"] for pick in ext for c in pick["candidates"])
    text = FakeBackend().render(chat_prompt(CHAT))
    assert r.usage.completion_tokens == sampled and r.usage.prompt_tokens == len(text.split())
    assert r.usage.total_tokens == sampled + len(text.split())


def test_a_list_of_prompts_gets_n_choices_each(client: Any, probe: Probe) -> None:
    r = client.completions.create(model="any", prompt=["a =", "b ="], n=2, seed=9, extra_body={"qprobe": {"k": 2}})
    assert len(r.choices) == 4
    for j, text in enumerate(["a =", "b ="]):
        for pick in (0, 1):
            i, comps, _, _ = direct_pick(probe, Prompt(id="x", text=text), 9, 2, 0.0, pick=pick)
            assert r.choices[2 * j + pick].text == comps[i].text


def test_streaming_reassembles_to_the_same_answer(client: Any) -> None:
    kw: dict[str, Any] = {"model": "any", "seed": 21, "extra_body": {"qprobe": {"k": 5}}}
    whole = client.chat.completions.create(messages=CHAT, n=2, **kw)
    parts: dict[int, str] = {0: "", 1: ""}
    finish, usage, ext = {}, None, None
    for chunk in client.chat.completions.create(messages=CHAT, n=2, stream=True,
                                                stream_options={"include_usage": True}, **kw):
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            parts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
        ext = (chunk.model_extra or {}).get("qprobe", ext)
    assert parts == {c.index: c.message.content for c in whole.choices} and len(parts[0].split()) > 1
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert ext is not None and [c["pick"] for c in ext["choices"]] == [c["pick"] for c in whole.model_extra["qprobe"]["choices"]]
    one = client.completions.create(prompt="x =", **kw)
    streamed = "".join(c.choices[0].text for c in client.completions.create(prompt="x =", stream=True, **kw))
    assert streamed == one.choices[0].text


def test_defaults_come_from_the_probe_card() -> None:
    shipped = Probe.from_pretrained("default-code")
    d = defaults_from_probe(shipped)
    assert (d.k, d.beta, d.stop) == (4, 0.0, ("\n```\n",))
    assert defaults_from_probe(shipped, k=8, beta=None).k == 8


def test_models_and_health(server: tuple[str, Engine], client: Any) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["fake-probe"]
    assert models.data[0].model_extra["qprobe"]["defaults"]["k"] == 4
    assert client.models.retrieve("fake-probe").id == "fake-probe"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    health = json.loads(urllib.request.urlopen(server[0][:-3] + "/health").read())
    assert health["status"] == "ok" and health["stats"]["failed"] == 0


# ------------------------------------------------------------------------ bad requests
def post(url: str, path: str, body: bytes | str | dict[str, Any], headers: dict[str, str] | None = None,
         method: str = "POST") -> tuple[int, dict[str, str], str]:
    host, port = url.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    data = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
    conn.request(method, path, body=data if method == "POST" else None,
                 headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    out = r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode()
    conn.close()
    return out


MSG = [{"role": "user", "content": "hi"}]
BAD = [  # (path, body, status, param)
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"\xff\xfe", 400, None),
    ("/v1/chat/completions", "[1, 2]", 400, None),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, None),
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": ["hi"]}, 400, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": MSG, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": MSG, "temperature": 3}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": MSG, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": MSG, "n": 0}, 400, "n"),
    ("/v1/chat/completions", {"messages": MSG, "n": True}, 400, "n"),
    ("/v1/chat/completions", {"messages": MSG, "n": 9, "qprobe": {"k": 4}}, 400, "n"),
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": 4, "max_completion_tokens": 4}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": MSG, "seed": 1.5}, 400, "seed"),
    ("/v1/chat/completions", {"messages": MSG, "stop": 7}, 400, "stop"),
    ("/v1/chat/completions", {"messages": MSG, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"messages": MSG, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/chat/completions", {"messages": MSG, "model": 3}, 400, "model"),
    ("/v1/chat/completions", {"messages": MSG, "qprobe": []}, 400, "qprobe"),
    ("/v1/chat/completions", {"messages": MSG, "qprobe": {"kk": 2}}, 400, "qprobe"),
    ("/v1/chat/completions", {"messages": MSG, "qprobe": {"k": 0}}, 400, "qprobe.k"),
    ("/v1/chat/completions", {"messages": MSG, "qprobe": {"beta": -1}}, 400, "qprobe.beta"),
    ("/v1/chat/completions", {"messages": MSG, "qprobe": {"return_candidates": 1}}, 400, "qprobe.return_candidates"),
    ("/v1/chat/completions", {"messages": MSG, "k": 4}, 400, "k"),
    ("/v1/chat/completions", {"messages": MSG, "logprobs": True}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("/v1/chat/completions", {"messages": MSG, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("/v1/chat/completions", {"messages": MSG, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": [1, 2, 3]}, 400, "prompt"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["x"] * 17}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": "x", "best_of": 4}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "messages": MSG}, 400, "messages"),
    ("/v1/embeddings", {"input": "x"}, 404, None),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_their_4xx_in_openai_shape(server: tuple[str, Engine], path: str, body: Any, status: int,
                                                     param: str | None) -> None:
    code, _, text = post(server[0], path, body)
    assert code == status, text
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert error["message"].startswith("expected") and "Traceback" not in text


def test_fields_that_ask_for_nothing_are_accepted_and_wrong_methods_refused(server: tuple[str, Engine]) -> None:
    body = {"messages": MSG, "logprobs": False, "tools": [], "response_format": {"type": "text"}, "user": "u",
            "frequency_penalty": 0, "qprobe": {"k": 2}}
    code, _, text = post(server[0], "/v1/chat/completions", body)
    assert code == 200, text
    code, headers, text = post(server[0], "/v1/chat/completions", b"", method="GET")
    assert code == 405 and json.loads(text)["error"]["code"] == "method_not_allowed" and "POST" in headers["allow"]
    code, _, text = post(server[0], "/v1/completions", b" " * (8 * 2**20 + 1))
    assert code == 413 and json.loads(text)["error"]["code"] == "body_too_large"


def test_the_openai_client_sees_a_bad_request_error(client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="any", messages=MSG, logprobs=True, top_logprobs=2)
    assert exc.value.status_code == 400 and "'logprobs', 'top_logprobs'" in exc.value.message


def test_api_key_is_required_when_set(probe: Probe) -> None:
    with serving(probe, api_key="sekret") as (url, _):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        code, _, text = post(url, "/v1/chat/completions", {"messages": MSG})
        assert code == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=url, api_key="sekret", max_retries=0)
        assert good.chat.completions.create(model="any", messages=MSG).choices[0].message.content
        assert urllib.request.urlopen(url[:-3] + "/health").status == 200  # open for load balancers


# ------------------------------------------------------------------------ load and cancellation
def wait_for(cond: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_full_queue_gets_429_with_retry_after(probe: Probe) -> None:
    with serving(probe, FakeBackend(delay=0.1), queue=1) as (url, engine):
        slow = {"messages": MSG, "qprobe": {"k": 8}}  # 8 x 0.1 s in the back-end
        results: list[int] = []
        first = threading.Thread(target=lambda: results.append(post(url, "/v1/chat/completions", slow)[0]))
        first.start()
        wait_for(lambda: engine.stats.in_flight == 1 and engine.queued() == 0)  # the worker runs it
        second = threading.Thread(target=lambda: results.append(post(url, "/v1/chat/completions", slow)[0]))
        second.start()
        wait_for(lambda: engine.queued() == 1)  # it waits: the queue is full
        with pytest.raises(openai.RateLimitError) as exc:
            openai.OpenAI(base_url=url, api_key="-", max_retries=0).chat.completions.create(model="any", messages=MSG)
        assert int(exc.value.response.headers["retry-after"]) >= 1
        assert exc.value.body["code"] == "queue_full"
        first.join()
        second.join()
        assert results == [200, 200] and engine.stats.rejected_full == 1


class _SteppedBackend(FakeBackend):
    """The fake back-end with a pool that samples one completion per step (as a batching pool
    advances its slots), so that a request spans many steps and can be cancelled inside the pool."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay=delay)
        self.cancelled: list[Hashable] = []
        self.generated = 0

    def pool(self) -> Pool:
        return _OneSamplePerStep(self)


class _OneSamplePerStep(Pool):
    def __init__(self, backend: _SteppedBackend) -> None:
        self.backend, self.running = backend, {}  # key -> (request, completions so far)

    def submit(self, request: GenRequest) -> None:
        self.running[request.key] = (request, [])

    def cancel(self, key: Hashable) -> None:
        self.backend.cancelled.append(key)
        self.running.pop(key, None)

    def has_room(self) -> bool:
        return len(self.running) < 2

    def busy(self) -> bool:
        return bool(self.running)

    def step(self) -> list[Finished]:
        done = []
        for key, (req, comps) in list(self.running.items()):
            comps += self.backend.generate(req.text, req.sampling, [req.seeds[len(comps)]])
            self.backend.generated += 1
            if len(comps) == len(req.seeds):
                done.append((req, comps))
                del self.running[key]
        return done


def _send_and_leave(url: str, body: dict[str, Any]) -> None:
    """Send a request, then close the connection before the answer comes."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    time.sleep(0.2)
    conn.close()


def test_a_client_that_disconnects_cancels_its_work(probe: Probe) -> None:
    be = _SteppedBackend(delay=0.05)
    with serving(probe, be) as (url, engine):
        _send_and_leave(url, {"messages": MSG, "qprobe": {"k": 16}})  # 16 steps of 0.05 s; gone after 0.2 s
        wait_for(lambda: engine.stats.cancelled_in_pool == 1)
        assert len(be.cancelled) == 1 and be.generated < 16  # the pool dropped it half-way
        time.sleep(0.1)
        assert be.generated < 16 and engine.stats.finished == 0 and engine.stats.in_flight == 0
    plain = FakeBackend(delay=0.05)  # SequentialPool: a queued request never reaches the back-end
    with serving(probe, plain, queue=4) as (url, engine):
        t = threading.Thread(target=post, args=(url, "/v1/chat/completions", {"messages": MSG, "qprobe": {"k": 20}}))
        t.start()
        wait_for(lambda: engine.stats.in_flight == 1)
        _send_and_leave(url, {"messages": MSG, "qprobe": {"k": 10}})
        t.join()
        wait_for(lambda: engine.stats.cancelled_queued == 1)
        assert engine.stats.finished == 1
        sampled = engine.stats.sampled_tokens
        time.sleep(0.6)
        assert engine.stats.sampled_tokens == sampled  # the cancelled one was never generated


class _BrokenOnBoom(FakeBackend):
    def generate(self, text: str, sampling: SamplingConfig, seeds: list[int]) -> list[Any]:
        if "boom" in text:
            raise RuntimeError("the model fell over")
        return super().generate(text, sampling, seeds)


def test_a_back_end_failure_is_a_500_in_openai_shape_and_the_server_goes_on(probe: Probe) -> None:
    with serving(probe, _BrokenOnBoom()) as (url, engine):
        code, _, text = post(url, "/v1/completions", {"prompt": "boom"})
        assert code == 500 and "Traceback" not in text
        error = json.loads(text)["error"]
        assert error["type"] == "server_error" and "RuntimeError: the model fell over" in error["message"]
        code, _, text = post(url, "/v1/completions", {"prompt": "fine"})
        assert code == 200 and engine.stats.failed == 1 and engine.stats.finished == 1


# ------------------------------------------------------------------------ the CLI
def _start_cli(args: list[str], port: int, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.Popen([sys.executable, "-c", "from qprobe.cli.main import main; main()", "serve", *args,
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_healthy(proc: subprocess.Popen[str], port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.1)


def test_cli_serves_the_probe(probe: Probe, tmp_path: Path) -> None:
    path = hand_probe(tmp_path / "p", W, SPEC)
    port = free_port()
    proc = _start_cli(["--probe", str(path), "--backend", "fake", "-k", "3", "--queue", "2"], port,
                      env={"QPROBE_API_KEY": "k1"})
    try:
        _wait_healthy(proc, port, 30)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k1", max_retries=0)
        r = c.chat.completions.create(model=str(path), messages=CHAT, seed=5, extra_body={"qprobe": {"return_candidates": True}})
        i, comps, _, _ = direct_pick(probe, chat_prompt(CHAT), 5, 3, 0.0)
        assert r.choices[0].message.content == comps[i].text and r.model == str(path)
        assert len(r.model_extra["qprobe"]["choices"][0]["candidates"]) == 3
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert "Traceback" not in out and f"http://127.0.0.1:{port}/v1" in out


def test_cli_refuses_bad_options_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(["serve", "--probe", str(tmp_path / "nope")], capsys)
    assert code == 2 and err.startswith("qprobe: error: expected a probe directory") and err.count("\n") == 1
    path = hand_probe(tmp_path / "p", W, SPEC)
    code, _, err = run_cli(["serve", "--probe", str(path), "--backend", "fakee"], capsys)
    assert code == 2 and "fake" in err and err.count("\n") == 1
    code, _, err = run_cli(["serve", "--probe", str(path), "--backend", "fake", "--queue", "0"], capsys)
    assert code == 2 and "queue" in err
    other = hand_probe(tmp_path / "other", W, FeatureSpec(**{**SPEC.to_dict(), "sha256": "other-weights"}))
    code, _, err = run_cli(["serve", "--probe", str(other), "--backend", "fake"], capsys)  # fails at warm-up
    assert code == 2 and err.startswith("qprobe: error: expected features") and err.count("\n") == 1


# ------------------------------------------------------------------------ the default model
@pytest.mark.smoke
def test_smoke_default_model() -> None:
    pytest.importorskip("llama_cpp")
    from qprobe.generation.models import default_model_path

    try:
        default_model_path()
    except Exception as exc:  # noqa: BLE001 - no model parts installed
        pytest.skip(f"default model unavailable: {exc}")
    port = free_port()
    proc = _start_cli(["--probe", "default-code", "--backend-option", "n_threads=2", "--max-tokens", "8"], port)
    try:
        _wait_healthy(proc, port, 120)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
        msg = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
        kw: dict[str, Any] = {"model": "default-code", "messages": msg, "seed": 0,
                              "extra_body": {"qprobe": {"k": 2, "return_candidates": True}}}
        r = c.chat.completions.create(**kw)
        cands = r.model_extra["qprobe"]["choices"][0]["candidates"]
        assert len(cands) == 2 and r.choices[0].message.content == cands[r.model_extra["qprobe"]["choices"][0]["pick"]]["text"]
        assert all(0 < x["n_tokens"] <= 8 for x in cands) and sum(x["prob"] for x in cands) == pytest.approx(1.0)
        assert r.usage.completion_tokens == sum(x["n_tokens"] for x in cands) and r.usage.prompt_tokens > 10
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **kw)
                           if ch.choices)
        assert streamed == r.choices[0].message.content  # same seed, same answer
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "Traceback" not in out
