"""`qprobe report`: a literal run of three prompts against numbers worked out by hand, the CLI end to
end on the fake back-end, hostile text, bad input, and the page in headless chromium (tests/browser.py)."""

from __future__ import annotations

import html
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from browser import Chromium, colour_count, read_pixels
from helpers import hand_probe, run_cli

from qprobe.evaluation.report import write_report
from qprobe.features.spec import FeatureSpec
from qprobe.probes.models import LinearProbe
from qprobe.store.run import RunWriter

HOSTILE = '</pre><script>alert(1)</script>"><img src=x onerror=alert(2)>&amp;'
SPEC = FeatureSpec(backend="fake", model="fake", sha256="fake-3", layer=2, pooling="mean", dim=3)
TOKENS = FeatureSpec(backend="fake", model="fake", sha256="fake-3", layer=2, pooling="tokens", dim=3)
W, B = np.array([1.0, -2.0, 0.5]), 0.25  # the hand probe: Q = W . x + B

# prompt id -> samples (completion, reward, mean feature x, details); Q by hand is noted per sample.
PROMPTS = {
    "a/0": [("return 1", 1.0, [1, 0, 0], {"status": "passed"}),  # Q = 1.25
            ("return 2", 0.0, [0, 1, 0], {"status": "failed", "error_type": "AssertionError",
                                          "failing_test": "assert f() == 1"}),  # Q = -1.75
            ("return  1 ", 1.0, [0, 0, 2], {"status": "passed"}),  # Q = 1.25: ties sample 0
            ("boom", None, [9, 9, 9], {"status": "error", "error_type": "SandboxError"})],  # unscored: left out
    "a/1": [("x", 0.0, [2, 0, 0], {"status": "timeout", "error_type": "TimeoutError", "message": "3 s"}),  # 2.25
            ("y", 0.0, [0, 0, 0], {"status": "failed"}),  # 0.25
            ("z", 0.0, [1, 1, 0], {"status": "failed"})],  # -0.75
    "a/2": [("p q", 0.0, [0, 0, 4], {"status": "failed"}),  # 2.25: the probe's pick, a wrong one
            ("r", 1.0, [1, 0, 0], {"status": "passed"}),  # 1.25
            ("s t u", 0.0, [0, 0, -2], {"status": "failed"})],  # -0.75
}
Q = {"a/0": [1.25, -1.75, 1.25], "a/1": [2.25, 0.25, -0.75], "a/2": [2.25, 1.25, -0.75]}


def _token_states(x: list[float], n: int, seed: int) -> np.ndarray:
    """n token states [n, 3] whose mean is x (so the pooled and the token states agree)."""
    jitter = np.random.default_rng(seed).standard_normal((n, 3))
    return (np.asarray(x, float) + jitter - jitter.mean(axis=0)).astype(np.float32)


def _literal_run(path: Path, prompts: dict = PROMPTS, tokens: bool = True, prompt_text: str = "def f():") -> Path:
    manifest = {"task": {"name": "literal", "split": "test"}, "backend": {"name": "fake", "options": {"dim": 3}},
                "model": {"model": "fake", "sha256": "fake-3", "dim": 3}}
    rows: dict[str, list] = {c: [] for c in ("prompt_id", "prompt_index", "sample_index", "prompt", "completion",
                                             "n_tokens", "finish_reason", "reward", "details", "seed")}
    means, states = [], []
    for p, (pid, samples) in enumerate(prompts.items()):
        for s, (text, reward, x, details) in enumerate(samples):
            n = len(text.split()) or 1
            for col, v in zip(rows, (pid, p, s, f"{prompt_text} # {pid}", text, n, "stop", reward,
                                     json.dumps(details), 10 * p + s), strict=True):
                rows[col].append(v)
            means.append(x)
            states.append(_token_states(x, n, 10 * p + s))
    specs = {"L2_mean": SPEC, **({"L2_tokens": TOKENS} if tokens else {})}
    with RunWriter.create_or_open(path, manifest) as w:
        w.set_features(specs)
        w.append(rows, {"L2_mean": np.array(means, np.float32), **({"L2_tokens": states} if tokens else {})})
    return path


def _probe(path: Path, w: np.ndarray = W, spec: FeatureSpec = SPEC, mlp: bool = False) -> Path:
    return hand_probe(path, w, spec, bias=B, mlp=mlp)


class _Page(HTMLParser):
    """The report's parts: method rows, prompt sections and their candidates, token spans, tags seen."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.methods: dict[str, dict] = {}
        self.prompts: dict[str, dict] = {}
        self.tags: list[str] = []
        self.root: dict = {}
        self._cand: dict | None = None
        self._into: list | None = None

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.tags.append(tag)
        cls = a.get("class", "").split()
        if tag == "html":
            self.root = a
        elif tag == "tr" and "method" in cls:
            self.methods[a["data-method"]] = a
        elif tag == "section" and "prompt" in cls:
            self.prompts[a["data-prompt-id"]] = {**a, "candidates": []}
            self._section = self.prompts[a["data-prompt-id"]]
        elif tag == "div" and "candidate" in cls:
            self._cand = {**a, "text": "", "verdict": "", "tokens": [], "titles": []}
            self._section["candidates"].append(self._cand)
        elif self._cand is not None and tag == "pre" and "completion" in cls:
            self._into = ["text"]
        elif self._cand is not None and tag == "div" and "verdict" in cls:
            self._into = ["verdict"]
        elif self._cand is not None and tag == "span" and "tok" in cls:
            self._cand["tokens"].append("")
            self._cand["titles"].append(a.get("title", ""))
            self._into = ["tok"]

    def handle_data(self, data):
        if self._into and self._cand is not None:
            if self._into[0] == "tok":
                self._cand["tokens"][-1] += data
            else:
                self._cand[self._into[0]] += data

    def handle_endtag(self, tag):
        if tag in ("pre", "div", "span"):
            self._into = None


def _parse(text: str) -> _Page:
    p = _Page()
    p.feed(text)
    return p


_cli = run_cli


# ------------------------------------------------------------------ the literal run, by hand
def test_literal_run_rows_q_and_probabilities(tmp_path: Path) -> None:
    run = _literal_run(tmp_path / "run")
    page = write_report(run, {"hand": _probe(tmp_path / "probe")}, tmp_path / "rep", k=2, beta=1.0)
    assert page == tmp_path / "rep" / "index.html"
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["index.html", "report.json", "return_vs_k.png"]
    dom = _parse(page.read_text())
    assert list(dom.prompts) == ["a/0", "a/1", "a/2"]
    for pid, q in Q.items():
        cands = dom.prompts[pid]["candidates"]
        by_hand = np.exp(np.array(q) - max(q)) / np.exp(np.array(q) - max(q)).sum()  # softmax(Q / 1)
        order = sorted(range(3), key=lambda s: (-q[s], s))  # best Q first, ties by sample
        assert [int(c["data-sample"]) for c in cands] == order  # the unscored 4th sample of a/0 is left out
        for c in cands:
            s = int(c["data-sample"])
            assert float(c["data-q0"]) == pytest.approx(q[s], abs=1e-6)
            assert float(c["data-p0"]) == pytest.approx(by_hand[s], rel=1e-6)
            assert float(c["data-reward"]) == PROMPTS[pid][s][1]
            assert "".join(c["tokens"]) == PROMPTS[pid][s][0]  # the text, as token-credit spans
    # a/0 ties at Q = 1.25: softmax gives them equal shares, e^0 / (2 + e^-3)
    p0 = [float(c["data-p0"]) for c in dom.prompts["a/0"]["candidates"]]
    assert p0[0] == p0[1] == pytest.approx(1 / (2 + math.exp(-3.0)))
    assert [dom.prompts[p]["data-mixed"] for p in Q] == ["1", "0", "1"]
    assert [dom.prompts[p]["data-wrong"] for p in Q] == ["", "", "0"]  # a/2: picks reward 0, best is 1
    v = dom.prompts["a/1"]["candidates"][0]["verdict"]
    assert v == "timeout \u00b7 TimeoutError \u00b7 3 s"
    assert dom.prompts["a/0"]["candidates"][2]["verdict"] == "failed \u00b7 AssertionError \u00b7 failing test: assert f() == 1"
    # The table, by hand at k = 2 (beta 1: the probe rows are checked at beta 0 below).
    assert float(dom.methods["pass@1"]["data-mean"]) == pytest.approx((2 / 3 + 0 + 1 / 3) / 3)
    assert float(dom.methods["pass@2"]["data-mean"]) == pytest.approx((1 + 0 + (1 - 1 / 3)) / 3)
    assert set(dom.methods) == {"pass@1", "hand (k=2)", "pass@2"}


def test_literal_run_table_at_argmax_and_ties(tmp_path: Path) -> None:
    run = _literal_run(tmp_path / "run", tokens=False)
    page = write_report(run, {"hand": _probe(tmp_path / "probe")}, tmp_path / "rep", k=2, beta=0.0)
    dom = _parse(page.read_text())
    # Best-of-2 by argmax over the 3 pairs of each prompt: a/0 {0,1}->1, {0,2} tie->1, {1,2}->1; a/1 0;
    # a/2 {0,1}->0, {0,2}->0, {1,2}->1.
    probe_mean = (1 + 0 + 1 / 3) / 3
    row = dom.methods["hand (k=2)"]
    assert float(row["data-mean"]) == pytest.approx(probe_mean)
    assert float(row["data-gain"]) == pytest.approx(probe_mean - 1 / 3)
    assert float(row["data-gain-low"]) <= float(row["data-gain"]) <= float(row["data-gain-high"])
    p0 = {int(c["data-sample"]): float(c["data-p0"]) for c in dom.prompts["a/0"]["candidates"]}
    assert p0 == {0: 0.5, 2: 0.5, 1: 0.0}  # beta 0: argmax, the tie split
    assert "the run stores no per-token states L2_tokens" in page.read_text()
    meta = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert meta["methods"]["hand (k=2)"][0] == pytest.approx(probe_mean)


def test_token_credits_are_the_stored_states_times_the_weights(tmp_path: Path) -> None:
    run = _literal_run(tmp_path / "run")
    page = write_report(run, {"hand": _probe(tmp_path / "probe")}, tmp_path / "rep", k=2)
    dom = _parse(page.read_text())
    for p, (pid, samples) in enumerate(PROMPTS.items()):
        for c in dom.prompts[pid]["candidates"]:
            s = int(c["data-sample"])
            text = samples[s][0]
            z = _token_states(samples[s][2], len(text.split()), 10 * p + s).astype(np.float64) @ W + B  # [t]
            assert "".join(c["tokens"]) == text and c["text"] == ""  # the tokens replace the plain text
            got = [float(t.split("Z = ")[1].split()[0]) for t in c["titles"]]
            np.testing.assert_allclose(got, z, atol=1e-4)
    assert "token credits Z_t from the stored feature L2_tokens" in page.read_text()


def test_no_probe_and_a_real_valued_reward(tmp_path: Path) -> None:
    prompts = {"j/0": [("a", 0.25, [0, 0, 0], {"status": "scored"}), ("b", 0.75, [1, 0, 0], {"status": "scored"})],
               "j/1": [("c", -1.5, [0, 1, 0], {"status": "scored"}), ("d", -1.5, [0, 0, 1], {"status": "scored"})]}
    run = _literal_run(tmp_path / "run", prompts)
    dom = _parse(write_report(run, [], tmp_path / "rep").read_text())
    assert set(dom.methods) == {"pass@1", "oracle best-of-4"}
    assert float(dom.methods["oracle best-of-4"]["data-mean"]) == pytest.approx((0.75 - 1.5) / 2)
    assert [c["data-reward"] for c in dom.prompts["j/0"]["candidates"]] == ["0.25", "0.75"]  # by sample
    assert [dom.prompts[p]["data-mixed"] for p in prompts] == ["1", "0"]
    w = np.array([1.0, 0.0, 0.0])  # picks b on j/0 (right), and on j/1 the tie c, d (both -1.5: not wrong)
    dom = _parse(write_report(run, {"w": _probe(tmp_path / "p", w)}, tmp_path / "rep").read_text())
    assert [dom.prompts[p]["data-wrong"] for p in prompts] == ["", ""]
    dom = _parse(write_report(run, {"w": _probe(tmp_path / "m", -w)}, tmp_path / "rep").read_text())
    assert [dom.prompts[p]["data-wrong"] for p in prompts] == ["0", ""]


# ------------------------------------------------------------------ the CLI on the fake back-end
def test_cli_end_to_end_matches_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for split, features in (("train", ["2:mean"]), ("test", ["2:mean", "2:tokens"])):
        code, _, err = _cli(["collect", "--task", "fake", "--backend", "fake", "--split", split, "--n", "6",
                             "--limit", "4", "--task-option", "size=10", "--out", str(tmp_path / split),
                             "--no-progress", *[a for f in features for a in ("--feature", f)]], capsys)
        assert code == 0, err
    code, _, err = _cli(["train", "--run", str(tmp_path / "train"), "--loss", "ce", "--feature", "L2_mean",
                         "--out", str(tmp_path / "ce")], capsys)
    assert code == 0, err
    ids = tmp_path / "ids.txt"
    ids.write_text("test/1\ntest/3\n")
    args = ["--probe", str(tmp_path / "ce"), "-k", "3", "--prompts", str(ids)]
    code, out, err = _cli(["report", str(tmp_path / "test"), *args, "--out", str(tmp_path / "rep")], capsys)
    assert code == 0, err
    assert out.strip() == str(tmp_path / "rep" / "index.html")
    code, _, err = _cli(["eval", "--run", str(tmp_path / "test"), *args, "--json", str(tmp_path / "e.json")], capsys)
    assert code == 0, err
    want = json.loads((tmp_path / "e.json").read_text())["methods"]
    dom = _parse((tmp_path / "rep" / "index.html").read_text())
    assert list(dom.methods) == list(want)  # the same rows, in the same order, with the same numbers
    for name, (mean, low, high) in want.items():
        got = dom.methods[name]
        assert [float(got["data-mean"]), float(got["data-low"]), float(got["data-high"])] == pytest.approx([mean, low, high])
    assert list(dom.prompts) == ["test/1", "test/3"]
    assert all(c["tokens"] for p in dom.prompts.values() for c in p["candidates"])  # credits from L2_tokens
    assert read_pixels(tmp_path / "rep" / "return_vs_k.png").shape[2] == 3


def test_cli_on_a_jsonl_task_with_a_real_valued_reward(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # A module name of its own (tests/test_rewards.py's `my_reward` differs, and imports stay cached).
    (tmp_path / "report_length_reward.py").write_text("def length(prompt, completion):\n    return len(completion) / 100\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"id": f"q{i}", "prompt": f"# problem {i}\ndef f():\n"}) for i in range(3)))
    code, _, err = _cli(["collect", "--task", "jsonl", "--task-option", f"data={data}", "--task-option",
                         "reward=report_length_reward:length", "--split", "all", "--backend", "fake", "--n", "5", "--feature", "2:mean",
                         "--out", str(tmp_path / "run"), "--no-progress"], capsys)
    assert code == 0, err
    w = np.random.default_rng(7).standard_normal(16)
    spec = FeatureSpec(backend="fake", model="fake", sha256="fake-16", layer=2, pooling="mean", dim=16)
    probe = LinearProbe()
    probe._set_learned({"layers.0.weight": w[None, :], "layers.0.bias": np.zeros(1)}, None, None, {})
    probe.feature_spec_, probe.source_ = spec, {}
    probe.save_pretrained(tmp_path / "probe")
    code, _, err = _cli(["report", str(tmp_path / "run"), "--probe", str(tmp_path / "probe"), "-k", "2",
                         "--out", str(tmp_path / "rep")], capsys)
    assert code == 0, err
    assert "records no training prompts" in err  # check_overlap's note, as eval prints it
    dom = _parse((tmp_path / "rep" / "index.html").read_text())
    assert set(dom.methods) == {"pass@1", "probe (k=2)", "oracle best-of-2"}
    from qprobe.store.run import Run

    run = Run.open(tmp_path / "run")
    rows = run.table().to_pylist()
    q = run.features("L2_mean").astype(np.float64) @ w  # [N]
    assert list(dom.prompts) == ["q0", "q1", "q2"]
    for pid in dom.prompts:
        mine = [(q[i], r["reward"], r["completion"]) for i, r in enumerate(rows) if r["prompt_id"] == pid]
        assert all(rw == pytest.approx(len(c) / 100) for _, rw, c in mine)
        cands = dom.prompts[pid]["candidates"]
        assert [float(c["data-reward"]) for c in cands] == pytest.approx([rw for _, rw, _ in sorted(mine, key=lambda m: -m[0])])
        picked = max(mine, key=lambda m: m[0])[1]
        assert dom.prompts[pid]["data-wrong"] == ("0" if picked < max(m[1] for m in mine) else "")
        assert dom.prompts[pid]["data-mixed"] == "1"


# ------------------------------------------------------------------ hostile text
def _hostile_run(path: Path) -> Path:
    prompts = {f"x/<b>{HOSTILE}": [(HOSTILE, 1.0, [1, 0, 0], {"status": "failed", "message": HOSTILE,
                                                              "failing_test": "<script>x()</script>"}),
                                   (f"ok {HOSTILE} two", 0.0, [0, 1, 0], {"status": HOSTILE})],
               "y": [("", 0.0, [0, 0, 0], "not json <i>"), ("fine", 1.0, [0, 0, 1], {})]}
    return _literal_run(path, prompts, prompt_text=f"<script>alert(3)</script>{HOSTILE}")


def test_hostile_text_is_escaped(tmp_path: Path) -> None:
    run = _hostile_run(tmp_path / "run")
    probe = _probe(tmp_path / "probe")
    raw = write_report(run, {f"<img src=y>{HOSTILE} $a^{{$": probe}, tmp_path / "rep").read_text()  # a lone $ breaks mathtext
    assert raw.count("<script") == 2 and raw.count("<img") == 1 and "<b>" not in raw and "<i>" not in raw
    dom = _parse(raw)
    assert dom.tags.count("script") == 2 and dom.tags.count("img") == 1
    cands = dom.prompts[f"x/<b>{HOSTILE}"]["candidates"]
    assert "".join(cands[0]["tokens"]) == HOSTILE and html.unescape(raw).count(HOSTILE) > 5
    # Self-contained: nothing from the network, only the folder's own figure.
    assert "http://" not in raw and "https://" not in raw and raw.count(" src=\"") == 1
    assert 'src="return_vs_k.png"' in raw
    assert ("default-src 'none'; img-src 'self' file:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
            in html.unescape(raw))


# ------------------------------------------------------------------ bad input: one line, exit 2, nothing written
@pytest.mark.parametrize("case", ["prompt-id", "other-model", "overlap", "not-a-report", "beta"])
def test_bad_input_exits_2_and_writes_nothing(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _literal_run(tmp_path / "run")
    spec = FeatureSpec(backend="fake", model="fake", sha256="other-weights", layer=2, pooling="mean", dim=3)
    probe = _probe(tmp_path / "probe", spec=spec if case == "other-model" else SPEC)
    if case == "overlap":
        from qprobe.probes.models import Probe
        from qprobe.store.run import prompt_hash

        p = Probe.from_pretrained(probe)
        p.source_ = {"train_prompts": {"hashes": [prompt_hash("def f(): # a/1")]}}
        p.save_pretrained(probe)
    ids = tmp_path / "ids.txt"
    ids.write_text("a/0\nnope/9\n" if case == "prompt-id" else "a/0\n")
    out = tmp_path / "rep"
    if case == "not-a-report":
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
    args = ["report", str(run), "--probe", str(probe), "--out", str(out)]
    args += ["--prompts", str(ids)] if case == "prompt-id" else []
    args += ["--beta", "-1"] if case == "beta" else []
    code, _, err = _cli(args, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    word = {"prompt-id": "nope/9", "other-model": "sha256 other-weigh", "overlap": "trained on 1 of the 3",
            "not-a-report": "holds other files", "beta": "-1"}[case]
    assert word in err
    if case == "not-a-report":
        assert [p.name for p in out.iterdir()] == ["mine.txt"]
    else:
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_an_earlier_report_is_replaced_whole(tmp_path: Path) -> None:
    run = _literal_run(tmp_path / "run")
    out = tmp_path / "rep"
    write_report(run, [], out)
    (out / "stale.txt").write_text("from before")
    write_report(run, {"hand": _probe(tmp_path / "probe")}, out)
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "report.json", "return_vs_k.png"]


def test_mlp_probe_scores_without_credits(tmp_path: Path) -> None:
    run = _literal_run(tmp_path / "run")
    page = write_report(run, {"mlp": _probe(tmp_path / "probe", mlp=True)}, tmp_path / "rep", k=2)
    dom = _parse(page.read_text())
    x = np.array([1.0, 0.0, 0.0])  # a/2 sample 1; Q = relu(W.x) + relu(-W.x) = |W.x|
    got = {int(c["data-sample"]): float(c["data-q0"]) for c in dom.prompts["a/2"]["candidates"]}
    assert got[1] == pytest.approx(abs(W @ x))
    assert "mlp: no token credits (they need a linear probe" in page.read_text()


def test_probes_of_the_same_name_are_numbered(tmp_path: Path) -> None:
    from qprobe.evaluation.report import load_probes

    a, b = _probe(tmp_path / "a" / "pg"), _probe(tmp_path / "b" / "pg", -W)
    loaded = load_probes([a, str(b)])
    assert list(loaded) == ["pg", "pg (2)"]
    assert float(loaded["pg (2)"].score(np.array([[1.0, 0.0, 0.0]]))[0]) == pytest.approx(-1.0 + B)


# ------------------------------------------------------------------ the page in chromium
@pytest.mark.browser
def test_page_in_chromium_loads_clean_and_filters(tmp_path: Path, chromium: Chromium) -> None:
    run = _literal_run(tmp_path / "run")
    probes = {"hand": _probe(tmp_path / "p1"), "flip": _probe(tmp_path / "p2", -W)}
    page = write_report(run, probes, tmp_path / "rep", k=2)
    dom_text, console = chromium.load(page)
    assert console == []  # no script error, no blocked load, nothing logged
    dom = _parse(dom_text)
    assert dom.root["data-errors"] == "0" and dom.root["data-ready"] == "1"
    assert int(dom.root["data-figure-width"]) > 100  # the figure loaded from the folder
    assert {"pass@1", "hand (k=2)", "flip (k=2)", "pass@2"} == set(dom.methods)
    assert not any("hidden" in p for p in dom.prompts.values())
    # flip picks the lowest W.x: a/0 sample 1 (reward 0, wrong), a/1 (all 0), a/2 sample 2 (reward 0, wrong).
    want = {"": ["a/0", "a/1", "a/2"], "#filter=wrong": ["a/2"], "#filter=mixed": ["a/0", "a/2"],
            "#filter=wrong&probe=1": ["a/0", "a/2"], "#filter=wrong,mixed&probe=0": ["a/2"],
            "#probe=1": ["a/0", "a/1", "a/2"]}
    for fragment, shown in want.items():
        text, console = chromium.load(page, fragment)
        dom = _parse(text)
        assert console == [] and dom.root["data-errors"] == "0", fragment
        assert [p for p, s in dom.prompts.items() if "hidden" not in s] == shown, fragment
        assert f"{len(shown)} of 3 prompts shown" in text, fragment
    pixels = read_pixels(chromium.screenshot(page, tmp_path / "shot.png", size=(1100, 1200)))
    assert colour_count(pixels) > 50


@pytest.mark.browser
def test_hostile_page_in_chromium(tmp_path: Path, chromium: Chromium) -> None:
    run = _hostile_run(tmp_path / "run")
    page = write_report(run, {"hand": _probe(tmp_path / "probe")}, tmp_path / "rep")
    text, console = chromium.load(page, "#filter=" + HOSTILE)
    dom = _parse(text)
    assert console == [] and dom.root["data-errors"] == "0"
    assert dom.tags.count("script") == 2 and dom.tags.count("img") == 1 and "b" not in dom.tags
    assert "".join(dom.prompts[f"x/<b>{HOSTILE}"]["candidates"][0]["tokens"]) == HOSTILE
