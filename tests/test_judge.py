"""The judge protocol: strict parsing, both orders, ties, scripted fake judges, a stub chat server,
and (slow) the real local llama.cpp server as a judge."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from openai_stub import completion, send_json

from qprobe.cli.main import cli
from qprobe.collection.collect import CollectConfig, collect
from qprobe.errors import ConfigError
from qprobe.evaluation.judge import (
    ChatJudge,
    JudgeItem,
    combine,
    conversation_text,
    judge_item,
    parse_verdict,
    rejected_items,
    sample_items,
    win_rate,
)
from qprobe.probes import LinearProbe, TrainConfig
from qprobe.tasks.pairs import load_pairs

DATA = Path(__file__).parent / "data" / "pairs"


@pytest.mark.parametrize("reply, verdict", [
    ("[[A]]", "A"), (" [[B]]\n", "B"), ("After thinking, [[B]] is better.", "B"), ("A", "A"), ("b", "B"),
    ("B.", "B"), ("**A**", "A"), ("Response A", "A"), ('"B"', "B"),
    ("[[A]] [[B]]", None), ("[[A]] or [[A]]", None), ("A and B", None), ("Both are fine", None), ("", None),
    ("[[C]]", None), ("I prefer A", None), ("tie", None), ("AB", None),
])
def test_parse_verdict_is_strict(reply: str, verdict: str | None) -> None:
    assert parse_verdict(reply) == verdict


@pytest.mark.parametrize("first, second, outcome, kind", [
    ("A", "B", 1.0, "win"), ("B", "A", 0.0, "loss"), ("A", "A", 0.5, "disagree"), ("B", "B", 0.5, "disagree"),
    (None, "B", 0.5, "unparseable"), ("A", None, 0.5, "unparseable"),
])
def test_combine_orders(first: str | None, second: str | None, outcome: float, kind: str) -> None:
    assert combine(first, second) == (outcome, kind)


def _responses(messages: list[dict[str, str]]) -> tuple[str, str]:
    text = messages[-1]["content"]
    a = text.split("[Response A]\n", 1)[1].split("\n[End of Response A]", 1)[0]
    b = text.split("[Response B]\n", 1)[1].split("\n[End of Response B]", 1)[0]
    return a, b


def longer_judge(messages: list[dict[str, str]]) -> str:
    """Prefers the longer response (ties go to A): consistent across orders."""
    a, b = _responses(messages)
    return "[[A]]" if len(a) >= len(b) else "[[B]]"


ITEMS = [JudgeItem("1", "User: q", "a long candidate answer", "short"),
         JudgeItem("2", "User: q", "tiny", "a long reference answer"),
         JudgeItem("3", "User: q", "same", "same")]


def test_both_orders_are_asked_and_combined() -> None:
    seen: list[tuple[str, str]] = []

    def recording(messages: list[dict[str, str]]) -> str:
        seen.append(_responses(messages))
        return longer_judge(messages)

    v = judge_item(recording, ITEMS[0])
    assert seen == [("a long candidate answer", "short"), ("short", "a long candidate answer")]
    assert (v.outcome, v.kind, v.first, v.second, v.replies) == (1.0, "win", "A", "B", ("[[A]]", "[[B]]"))


def test_win_rate_with_scripted_judges() -> None:
    r = win_rate(longer_judge, ITEMS)
    assert [v.kind for v in r.verdicts] == ["win", "loss", "disagree"]  # equal lengths: A both times
    assert r.mean == 0.5 and r.summary()["disagree"] == 1 and r.low <= 0.5 <= r.high
    biased = win_rate(lambda m: "[[A]]", ITEMS)  # pure position bias cancels out: all ties
    assert biased.mean == 0.5 and biased.count("disagree") == 3
    garbage = win_rate(lambda m: "I cannot decide.", ITEMS)
    assert garbage.mean == 0.5 and garbage.count("unparseable") == 3
    assert "3 unparseable" in str(garbage)
    with pytest.raises(ConfigError):
        win_rate(longer_judge, [])


def test_items_from_pairs_and_samples(tmp_path: Path) -> None:
    pairs = load_pairs(DATA / "hh.jsonl")
    items = rejected_items(pairs)
    assert (items[0].candidate, items[0].reference) == ("Buy some.", pairs[0].chosen)
    assert items[0].conversation == "User: How do I bake bread?"
    assert conversation_text(None, "  plain ") == "plain"
    run = collect(CollectConfig(task="pairs", backend="fake", split="all", out=tmp_path / "s", n=3,
                                task_options={"data": str(DATA / "hh.jsonl")}), progress=False)
    first = sample_items(pairs, run)
    t = run.table(["prompt_id", "sample_index", "completion"]).to_pylist()
    assert [i.candidate for i in first] == [r["completion"] for r in t if r["sample_index"] == 0]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 16)).astype(np.float32)
    probe = LinearProbe(loss="bt", train=TrainConfig(k=2, max_iter=5)).fit(
        pairs=(x[:10], x[10:]), spec=run.feature_spec("L-1_last"))
    scores = probe.score(run.features("L-1_last"))
    picked = sample_items(pairs, run, probe, k=2)
    for item, pid in zip(picked, ["0", "1", "2"], strict=True):
        rows = [i for i, r in enumerate(t) if r["prompt_id"] == pid and r["sample_index"] < 2]
        assert item.candidate == t[max(rows, key=lambda i: scores[i])]["completion"]
    with pytest.raises(ConfigError, match="samples"):
        sample_items(load_pairs(DATA / "columns.jsonl"), run)


class _JudgeHandler(BaseHTTPRequestHandler):
    bodies: list = []

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append(body)
        reply = longer_judge(body["messages"])
        send_json(self, 200, completion(self.path, body["model"], reply))


@pytest.fixture
def judge_url():
    pytest.importorskip("openai")
    _JudgeHandler.bodies = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _JudgeHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def test_chat_judge_against_a_stub_server(judge_url: str) -> None:
    judge = ChatJudge("stub", base_url=judge_url)
    r = win_rate(judge, ITEMS[:2])
    judge.close()
    assert [v.kind for v in r.verdicts] == ["win", "loss"] and judge.calls == 4
    body = _JudgeHandler.bodies[0]
    assert body["temperature"] == 0.0 and body["model"] == "stub" and body["messages"][0]["role"] == "system"


def test_cli_judge_rejected_vs_chosen(judge_url: str, tmp_path: Path) -> None:
    out = tmp_path / "j.json"
    r = CliRunner().invoke(cli, ["pairs", "judge", "--pairs", str(DATA / "hh.jsonl"), "--judge-model", "stub",
                                 "--base-url", judge_url, "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    # chosen responses 0 and 1 are longer, pair 2's rejected one is longer
    assert [v["kind"] for v in res["verdicts"]] == ["loss", "loss", "win"] and res["summary"]["items"] == 3
    r = CliRunner().invoke(cli, ["pairs", "judge", "--pairs", str(DATA / "hh.jsonl")])
    assert r.exit_code != 0 and "--judge-model" in str(r.exception)


@pytest.mark.slow
def test_real_local_judge_answers_in_the_strict_form() -> None:
    """The packaged 0.5B model served by llama-cpp-python as the judge (weak: only the protocol is checked)."""
    pytest.importorskip("llama_cpp.server")
    from qprobe.generation.server import llama_server

    with llama_server(n_ctx=4096) as srv:
        judge = ChatJudge(srv.model, base_url=srv.base_url)
        r = win_rate(judge, rejected_items(load_pairs(DATA / "hh.jsonl")))
        judge.close()
    assert len(r.verdicts) == 3 and all(v.replies[0] and v.replies[1] for v in r.verdicts)
