"""`qprobe credits`: the colour scale on literal numbers, the page's scores against the probe's pooled
score, the fake's aligned tokens, bad input, and the page itself in headless chromium (tests/browser.py)."""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from browser import Chromium, colour_count, has_colour, read_pixels
from helpers import hand_probe, run_cli

from qprobe.evaluation.credits import (
    NEGATIVE,
    NEUTRAL,
    POSITIVE,
    CandidateCredits,
    CreditMap,
    colour,
    credit_html,
    rgb,
)
from qprobe.features.spec import FeatureSpec
from qprobe.probes.models import LinearProbe
from qprobe.store.run import Run, RunWriter

HOSTILE = '</span><script>alert(1)</script>"><img src=x onerror=alert(2)>&amp;'
FAKE_SPEC = FeatureSpec(backend="fake", model="fake", sha256="fake-16", layer=2, pooling="mean", dim=16)
W = np.random.default_rng(1234).standard_normal(16)  # the fake reward's direction


# ------------------------------------------------------------------ the colour scale (literal numbers)
def test_colour_scale_ends_and_centre() -> None:
    assert colour(0.0, 1.0) == "#ffffff" and rgb(0.0, 3.0) == NEUTRAL
    assert colour(2.0, 2.0) == "#2166ac" and rgb(2.0, 2.0) == POSITIVE
    assert colour(-2.0, 2.0) == "#b2182b" and rgb(-2.0, 2.0) == NEGATIVE
    assert colour(1.0, 2.0) == "#90b3d6"  # halfway: 255 + (33-255)/2 = 144, 178.5 -> 179, 213.5 -> 214
    assert colour(-1.0, 2.0) == "#d98c95"  # 216.5 -> 217, 139.5 -> 140, 149
    assert colour(0.5, 2.0) == "#c8d9ea"  # a quarter: 255 - 222/4 = 199.5 -> 200, 216.75 -> 217, 234.25 -> 234
    assert colour(9.0, 2.0) == colour(2.0, 2.0) and colour(-9.0, 2.0) == colour(-2.0, 2.0)  # clipped
    assert colour(1.0, 0.0) == "#ffffff" and colour(float("nan"), 1.0) == "#ffffff"


def test_only_an_empty_completion_shows_the_empty_sign() -> None:
    cands = (CandidateCredits(0, 1.0, ("",), np.array([0.5])), CandidateCredits(1, 1.0, ("", "\u00e9"), np.array([0.1, 0.2])))
    page = credit_html(CreditMap("p", "q", cands))
    spans = _parse(page).sections
    assert [t for t, _, _ in spans[0]["spans"]] == ["\u2205"] and [t for t, _, _ in spans[1]["spans"]] == ["", "\u00e9"]


def test_sequence_score_is_the_pooled_score_of_a_linear_probe() -> None:
    probe = LinearProbe(standardize=True)
    probe._set_learned({"layers.0.weight": np.array([[1.0, -2.0, 0.5]]), "layers.0.bias": np.array([0.25])},
                       np.array([1.0, 0.0, -1.0]), np.array([2.0, 1.0, 4.0]), {})
    states = np.array([[1.0, 2.0, 3.0], [3.0, 0.0, -1.0], [-1.0, 1.0, 7.0], [5.0, -3.0, 3.0]])  # [t=4, d=3]
    z = probe.score(states)  # [4]
    # By hand: ((x - mean) / scale) . w + b, row by row.
    by_hand = [((np.array(s) - [1, 0, -1]) / [2, 1, 4]) @ [1, -2, 0.5] + 0.25 for s in states]
    np.testing.assert_allclose(z, by_hand, rtol=1e-6)
    c = CandidateCredits(0, 1.0, ("a", "b", "c", "d"), z)
    assert c.score == pytest.approx(float(probe.score(states.mean(axis=0)[None])[0]), rel=1e-6)


def test_ranks_sort_by_score_and_lengths_must_match() -> None:
    cands = (CandidateCredits(0, 0.0, ("x",), np.array([-1.0])), CandidateCredits(1, 1.0, ("y", "z"), np.array([0.5, 1.5])),
             CandidateCredits(2, None, ("w",), np.array([0.0])))
    cmap = CreditMap("p/0", "prompt", cands)
    assert [(r, c.sample_index) for r, c in cmap.ranked()] == [(1, 1), (2, 2), (3, 0)]
    assert cmap.zmax() == 1.5 and cmap.zmax(max_candidates=2) == 1.5
    page = credit_html(cmap, max_candidates=2)
    assert 'id="sample-0"' not in page and "2 shown of 3" in page
    assert page.index('id="sample-1"') < page.index('id="sample-2"')
    from qprobe.errors import DataError

    with pytest.raises(DataError, match="one token string per token score"):
        CandidateCredits(0, 1.0, ("a",), np.array([1.0, 2.0]))


# ------------------------------------------------------------------ the fake back-end's tokens
def test_fake_tokens_align_with_their_states_and_average_to_mean() -> None:
    from qprobe.core.types import Completion
    from qprobe.features.fake import FakeEmbedder, fake_pieces
    from qprobe.features.spec import FeatureRequest
    from qprobe.generation.base import SamplingConfig
    from qprobe.generation.fake import FakeBackend

    assert fake_pieces("    return 1 + 2", 4) == ["    return", " 1", " +", " 2"]
    assert fake_pieces("abcdefg", 3) == ["ab", "cde", "fg"] and fake_pieces("", 1) == [""]
    b = FakeBackend()
    comps = b.generate("p", SamplingConfig(max_new_tokens=300), [1, 2, 3]) + [Completion("", 0, "stop", 9)]
    emb = FakeEmbedder(b)
    feats = emb.embed("p", comps, [FeatureRequest(2, "tokens"), FeatureRequest(2, "mean")])
    for c, pieces, states, mean in zip(comps, emb.token_pieces(comps), feats["L2_tokens"], feats["L2_mean"], strict=True):
        assert "".join(pieces) == c.text and len(pieces) == len(states) == max(c.n_tokens, 1)
        np.testing.assert_allclose(states.mean(axis=0), mean, atol=1e-5)
        if len(states) > 1:
            assert np.ptp(states @ W) > 0  # the tokens differ


# ------------------------------------------------------------------ runs and probes on disk
_cli = run_cli


def _collect(out: Path, capsys: pytest.CaptureFixture[str], *features: str) -> Run:
    args = ["collect", "--task", "fake", "--backend", "fake", "--n", "6", "--limit", "4", "--out", str(out),
            "--task-option", "size=10", "--no-progress"]
    for f in features:
        args += ["--feature", f]
    code, text, err = _cli(args, capsys)
    assert code == 0, err
    return Run.open(out)


def _hand_probe(path: Path, spec: FeatureSpec = FAKE_SPEC, mlp: bool = False) -> Path:
    """A probe with literal weights (no training): Q = W . x on the fake features."""
    return hand_probe(path, W, spec, mlp=mlp)


class _Spans(HTMLParser):
    """Each candidate section's spans (text, style, title), and every element name seen."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: dict[int, dict] = {}
        self.tags: list[str] = []
        self._section: dict | None = None
        self._span: list | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            n = int(a["id"].removeprefix("sample-"))
            self._section = self.sections[n] = {"rank": int(a["data-rank"]), "score": float(a["data-score"]),
                                                "reward": a["data-reward"], "spans": []}
        elif tag == "span" and "tok" in (a.get("class") or "").split():
            self._span = ["", a.get("style", ""), a.get("title", "")]

    def handle_data(self, data):
        if self._span is not None:
            self._span[0] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._span is not None and self._section is not None:
            self._section["spans"].append(tuple(self._span))
            self._span = None


def _parse(dom: str) -> _Spans:
    p = _Spans()
    p.feed(dom)
    return p


def _prompt_samples(run: Run, prompt_id: str) -> list[tuple[int, dict]]:
    rows = [(i, r) for i, r in enumerate(run.table().to_pylist()) if r["prompt_id"] == prompt_id]
    return sorted(rows, key=lambda ir: ir[1]["sample_index"])


# ------------------------------------------------------------------ the page in chromium
@pytest.mark.browser
def test_credit_page_in_chromium(tmp_path: Path, capsys: pytest.CaptureFixture[str], chromium: Chromium) -> None:
    run = _collect(tmp_path / "run", capsys, "2:mean", "2:tokens")
    probe = _hand_probe(tmp_path / "probe")
    page, png = tmp_path / "out" / "page.html", tmp_path / "out" / "page.png"
    code, out, err = _cli(["credits", "--probe", str(probe), "--run", str(run.path), "--prompt", "train/1",
                           "--out", str(page), "--png", str(png)], capsys)
    assert code == 0, err
    assert "6 candidates of train/1" in out
    # What the page must show, from the run's own stored token states and the probe's weights.
    samples = _prompt_samples(run, "train/1")
    states = list(run.token_features("L2_tokens"))
    z = {r["sample_index"]: states[i].astype(np.float64) @ W for i, r in samples}  # sample -> [t]
    zmax = max(np.abs(v).max() for v in z.values())
    assert min(v.min() for v in z.values()) < 0 < max(v.max() for v in z.values())  # both signs to see

    dom = _parse(chromium.dump_dom(page))
    assert sorted(dom.sections) == sorted(z)
    for _, row in samples:
        sec = dom.sections[row["sample_index"]]
        texts = [t for t, _, _ in sec["spans"]]
        assert "".join(texts) == row["completion"] and len(texts) == len(z[row["sample_index"]])
        for (_, style, title), zt in zip(sec["spans"], z[row["sample_index"]], strict=True):
            assert f"background-color:{colour(zt, zmax)}" in style.replace(" ", "")
            assert float(re.search(r"Z = ([-+0-9.]+)", title)[1]) == pytest.approx(zt, abs=1e-4)
        assert sec["score"] == pytest.approx(z[row["sample_index"]].mean(), rel=1e-4, abs=1e-6)
        assert sec["reward"] == f"{row['reward']:g}"
    ranks = sorted(dom.sections, key=lambda s: dom.sections[s]["rank"])
    assert ranks == sorted(z, key=lambda s: -z[s].mean())

    pixels = read_pixels(chromium.screenshot(page, tmp_path / "shot.png", size=(1100, 1000)))
    assert pixels.shape == (1000, 1100, 3) and colour_count(pixels) > 50
    assert (pixels != 255).any(axis=-1).mean() > 0.01  # not blank
    hi = max(z, key=lambda s: z[s].max())
    lo = min(z, key=lambda s: z[s].min())
    pos, neg = rgb(z[hi].max(), zmax), rgb(z[lo].min(), zmax)
    assert pos[2] > pos[0] and neg[0] > neg[2]  # blue and red
    # Token backgrounds fill hundreds of pixels (the legend's gradient has only a sliver of any colour).
    assert has_colour(pixels, pos, tol=2, min_pixels=150) and has_colour(pixels, neg, tol=2, min_pixels=150)
    drawn = read_pixels(png)
    assert colour_count(drawn) > 20
    assert has_colour(drawn, pos, tol=2, min_pixels=50) and has_colour(drawn, neg, tol=2, min_pixels=50)


@pytest.mark.browser
def test_hostile_completion_is_text_in_chromium(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                chromium: Chromium) -> None:
    path = tmp_path / "run"
    manifest = {"backend": {"name": "fake", "options": {}}, "model": {"model": "fake", "sha256": "fake-16", "dim": 16}}
    texts = [HOSTILE, f"ok\n{HOSTILE} two\t$a^{{$ \x07", ""]  # and for the PNG: broken mathtext, a tab, a bell
    with RunWriter.create_or_open(path, manifest) as w:
        w.append({"prompt_id": ["x/<b>"] * 3, "prompt_index": [0] * 3, "sample_index": [0, 1, 2],
                  "prompt": ["<script>alert(3)</script>"] * 3, "completion": texts,
                  "n_tokens": [len(t.split()) for t in texts], "finish_reason": ["stop"] * 3,
                  "reward": [1.0, 0.0, None], "details": ["{}"] * 3, "seed": [1, 2, 3]}, {})
    page = tmp_path / "page.html"
    code, _, err = _cli(["credits", "--probe", str(_hand_probe(tmp_path / "probe")), "--run", str(path),
                         "--prompt", "x/<b>", "--out", str(page), "--png", str(tmp_path / "page.png")], capsys)
    assert code == 0, err
    assert colour_count(read_pixels(tmp_path / "page.png")) > 2
    raw = page.read_text()
    assert "<script" not in raw and "<img" not in raw and "<b>" not in raw
    dom = _parse(chromium.dump_dom(page))
    assert not {"script", "img", "b"} & set(dom.tags)
    for i, text in enumerate(texts):
        joined = "".join(t for t, _, _ in dom.sections[i]["spans"])
        assert joined == (text or "\u2205")
    assert dom.sections[2]["reward"] == "unscored"


# ------------------------------------------------------------------ scores, stored vs computed states
def test_page_scores_are_the_trained_probes_pooled_scores(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stored = _collect(tmp_path / "stored", capsys, "2:mean", "2:tokens")
    bare = _collect(tmp_path / "bare", capsys, "2:mean")
    code, _, err = _cli(["train", "--run", str(bare.path), "--loss", "ce", "--feature", "L2_mean",
                         "--out", str(tmp_path / "probe")], capsys)
    assert code == 0, err
    from qprobe.probes.models import Probe

    probe = Probe.from_pretrained(tmp_path / "probe")
    assert probe.standardized_  # the per-row standardisation is part of Z_t
    pages = {}
    for run in (stored, bare):
        page = tmp_path / f"{run.path.name}.html"
        code, _, err = _cli(["credits", "--probe", str(tmp_path / "probe"), "--run", str(run.path),
                             "--prompt", "train/2", "--out", str(page)], capsys)
        assert code == 0, err
        pages[run.path.name] = _parse(page.read_text()).sections
        samples = _prompt_samples(run, "train/2")
        pooled = probe.score(run.features("L2_mean", np.array([i for i, _ in samples])))
        for (_, row), q in zip(samples, pooled, strict=True):
            assert pages[run.path.name][row["sample_index"]]["score"] == pytest.approx(float(q), rel=1e-4, abs=1e-5)
    assert "stored feature L2_tokens" in (tmp_path / "stored.html").read_text()
    assert "computed by fake" in (tmp_path / "bare.html").read_text()
    assert pages["stored"] == pages["bare"]  # the stored and the computed token states agree


# ------------------------------------------------------------------ bad input: one line, exit 2, nothing written
@pytest.mark.parametrize("case", ["prompt", "mlp", "embedder", "model"])
def test_bad_input_exits_2_and_writes_nothing(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _collect(tmp_path / "run", capsys, "2:mean")
    spec = FAKE_SPEC
    if case == "embedder":
        spec = FeatureSpec(backend="sentence-transformers", model="minilm", sha256="st-1", layer=-1,
                           pooling="mean", dim=16, embedder="minilm")
    elif case == "model":
        spec = FeatureSpec(backend="fake", model="fake", sha256="other-weights", layer=2, pooling="mean", dim=16)
    probe = _hand_probe(tmp_path / "probe", spec, mlp=case == "mlp")
    out = tmp_path / "out"
    code, _, err = _cli(["credits", "--probe", str(probe), "--run", str(run.path), "--out", str(out / "p.html"),
                         "--png", str(out / "p.png"), "--prompt", "nope/7" if case == "prompt" else "train/0"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("qprobe: error: expected")
    word = {"prompt": "prompt id", "mlp": "linear probe", "embedder": "hidden-state layer", "model": "run's model"}[case]
    assert word in err
    assert not out.exists()


def test_page_is_self_contained() -> None:
    cmap = CreditMap("a", "b", (CandidateCredits(0, 1.0, ("t",), np.array([0.5])),), (("run", 'r"<x>'),))
    page = credit_html(cmap)
    assert "http://" not in page and "https://" not in page and "<script" not in page and "src=" not in page
    assert "default-src 'none'" in html.unescape(page) and html.escape('r"<x>') in page


# ------------------------------------------------------------------ the harness itself
def test_missing_browser_skips_here_and_fails_under_ci(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from browser import chromium_or_skip

    monkeypatch.setenv("QPROBE_CHROMIUM", str(tmp_path / "no-such-chromium"))
    monkeypatch.delenv("QPROBE_REQUIRE_BROWSER", raising=False)
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="apt-get install"):
        chromium_or_skip()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI needs the browser tests"):
        chromium_or_skip()


def test_a_hung_browser_is_killed_at_the_timeout(tmp_path: Path) -> None:
    import time

    from browser import BrowserError

    hung = tmp_path / "hung-chromium"
    hung.write_text("#!/bin/sh\nsleep 30 &\nsleep 30\n")  # a child too: the whole session must go
    hung.chmod(0o755)
    page = tmp_path / "p.html"
    page.write_text("<html></html>")
    start = time.monotonic()
    with pytest.raises(BrowserError, match="took over 0.5 s"):
        Chromium(str(hung), timeout=0.5).dump_dom(page)
    assert time.monotonic() - start < 10


# ------------------------------------------------------------------ a real model (slow)
@pytest.mark.slow
def test_credits_on_the_default_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("llama_cpp")
    code, _, err = _cli(["collect", "--task", "fake", "--backend", "llamacpp", "--n", "2", "--limit", "1",
                         "--max-new-tokens", "24", "--feature", "18:mean", "--out", str(tmp_path / "run"),
                         "--no-progress"], capsys)
    if code == 2 and "pip install" in err:
        pytest.skip(err)
    assert code == 0, err
    run = Run.open(tmp_path / "run")
    spec = run.feature_spec("L18_mean")
    w = np.random.default_rng(0).standard_normal(spec.dim) / 30
    probe = LinearProbe()
    probe._set_learned({"layers.0.weight": w[None, :], "layers.0.bias": np.zeros(1)}, None, None, {})
    probe.feature_spec_, probe.source_ = spec, {}
    probe.save_pretrained(tmp_path / "probe")
    page = tmp_path / "page.html"
    code, _, err = _cli(["credits", "--probe", str(tmp_path / "probe"), "--run", str(run.path),
                         "--prompt", "train/0", "--out", str(page)], capsys)
    assert code == 0, err
    sections = _parse(page.read_text()).sections
    samples = _prompt_samples(run, "train/0")
    pooled = run.features("L18_mean", np.array([i for i, _ in samples])) @ w
    for (_, row), q in zip(samples, pooled, strict=True):
        sec = sections[row["sample_index"]]
        assert "".join(t for t, _, _ in sec["spans"]) == (row["completion"] or "\u2205")
        # Stored: captured while generating; shown: the re-tokenised text evaluated again.
        assert sec["score"] == pytest.approx(float(q), rel=0.02, abs=0.02)


def test_default_page_name_and_max_candidates(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    run = _collect(tmp_path / "run", capsys, "2:mean")
    probe = _hand_probe(tmp_path / "probe")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, out, err = _cli(["credits", "--probe", str(probe), "--run", str(run.path), "--prompt", "train/3",
                           "--max-candidates", "2"], capsys)
    assert code == 0, err
    assert [p.name for p in work.iterdir()] == ["credits-train-3.html"]
    sections = _parse((work / "credits-train-3.html").read_text()).sections
    assert sorted(s["rank"] for s in sections.values()) == [1, 2]  # the best two of six
    assert "2 shown of 6" in (work / "credits-train-3.html").read_text()
