from __future__ import annotations

import numpy as np
import pytest

from qprobe.core.types import Prompt
from qprobe.errors import ConfigError, SpecMismatchError
from qprobe.features.spec import FeatureSpec
from qprobe.generation.base import SamplingConfig
from qprobe.generation.fake import FakeBackend
from qprobe.metrics import selection_probs
from qprobe.policy.select import PolicyConfig, QProbePolicy


class DotProbe:
    """A probe that scores the first feature: enough to check what the policy picks."""

    def __init__(self, spec: FeatureSpec) -> None:
        self.feature_spec_ = spec

    def score(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)[:, 0]


def spec(**kw) -> FeatureSpec:
    base = dict(backend="fake", model="fake", sha256="fake-16", layer=-1, pooling="last", dim=16)
    base.update(kw)
    return FeatureSpec(**base)


def test_selection_probs_literal() -> None:
    np.testing.assert_allclose(selection_probs(np.array([1.0, 3.0, 3.0]), 0.0), [0, 0.5, 0.5])
    p = selection_probs(np.array([0.0, np.log(3.0)]), 1.0)
    np.testing.assert_allclose(p, [0.25, 0.75])
    np.testing.assert_allclose(selection_probs(np.array([0.0, 1000.0]), 0.01), [0.0, 1.0])


def test_argmax_policy_picks_the_highest_scored_candidate() -> None:
    be = FakeBackend()
    policy = QProbePolicy(be, DotProbe(spec()), PolicyConfig(k=6), SamplingConfig(), rng=np.random.default_rng(0))
    sel = policy(Prompt(id="p", text="def f():\n"))
    scores = [c.score for c in sel.candidates]
    assert len(scores) == 6 and sel.index == int(np.argmax(scores))
    assert sel.text == sel.candidates[sel.index].text
    assert sum(c.prob for c in sel.candidates) == pytest.approx(1.0)


def test_softmax_policy_frequencies_match_probabilities() -> None:
    """The reported probabilities are softmax(Q/beta), and the picks follow them (chi-square over draws)."""
    from scipy.stats import chisquare

    be, probe, texts, p0, q = _rejection_world()
    policy = QProbePolicy(be, probe, PolicyConfig(k=4, beta=float(np.ptp(q))), SamplingConfig(seed=3),
                          rng=np.random.default_rng(1))
    sel = policy(Prompt(id="p", text="x"))
    probs = np.array([c.prob for c in sel.candidates])
    np.testing.assert_allclose(probs, selection_probs(np.array([c.score for c in sel.candidates]), policy.config.beta))
    # many calls: the picked texts follow the exact law of softmax(Q/beta) over k draws from p0,
    # enumerated over all 4^4 candidate tuples
    from itertools import product

    exact = np.zeros(len(texts))
    for tup in product(range(len(texts)), repeat=4):
        w = selection_probs(q[list(tup)], policy.config.beta)
        for j, t in enumerate(tup):
            exact[t] += np.prod(p0[list(tup)]) * w[j]
    counts = np.zeros(len(texts))
    for _ in range(2000):
        counts[texts.index(policy(Prompt(id="p", text="x")).text)] += 1
    assert chisquare(counts, exact * 2000).pvalue > 1e-3


class CategoricalBackend(FakeBackend):
    """p0 known exactly: each sample is one of `texts`, drawn with probabilities `p0` from its seed."""

    def __init__(self, texts: list[str], p0: list[float]) -> None:
        super().__init__()
        self.texts, self.p0 = texts, np.asarray(p0)

    def generate(self, text, sampling, seeds):
        from qprobe.generation.base import Completion

        return [Completion(self.texts[int(np.random.default_rng(s).choice(len(self.texts), p=self.p0))], 1, "stop", s)
                for s in seeds]


def _rejection_world():
    texts, p0 = ["    return 1", "    return 2", "    return 3", "    return 4"], [0.4, 0.3, 0.2, 0.1]
    be = CategoricalBackend(texts, p0)
    probe = DotProbe(spec())
    from qprobe.features.fake import FakeEmbedder
    from qprobe.features.spec import FeatureRequest

    req = FeatureRequest()
    from qprobe.generation.base import Completion

    q = FakeEmbedder(be).embed("x", [Completion(t, 1, "stop", 0) for t in texts], [req])[req.key][:, 0].astype(float)
    return be, probe, texts, np.asarray(p0), q


def test_rejection_samples_p0_times_exp_q_over_beta_chi_square() -> None:
    """Sec. 4.2: the accepted samples follow p0 x exp(Q/beta) (Corollary 4.2's optimum); a bound M that
    grows with the draws (the largest Q seen) accepts the first round's argmax outright and fails this."""
    from scipy.stats import chisquare

    be, probe, texts, p0, q = _rejection_world()
    beta = float(np.ptp(q)) / 2  # exp(-2) ... 1: every candidate has a fair chance
    target = p0 * np.exp(q / beta)
    target /= target.sum()
    policy = QProbePolicy(be, probe, PolicyConfig(k=4, beta=beta, mode="rejection", q_max=float(q.max()), max_rounds=3),
                          SamplingConfig(), rng=np.random.default_rng(0))
    draws, fallbacks = 3000, 0
    counts = np.zeros(len(texts))
    for _ in range(draws):
        sel = policy(Prompt(id="p", text="x"))
        counts[texts.index(sel.text)] += 1
        fallbacks += sel.fallback
        assert sel.above_bound == 0
    assert 0 < fallbacks < 0.05 * draws  # the fallback ran, and is part of these counts
    assert chisquare(counts, target * draws).pvalue > 1e-3, (counts / draws, target)


def test_rejection_needs_a_bound_and_reads_the_probe_s() -> None:
    be, probe, texts, p0, q = _rejection_world()
    cfg = PolicyConfig(k=2, beta=0.5, mode="rejection")
    with pytest.raises(ConfigError, match="bound M"):
        QProbePolicy(be, probe, cfg, SamplingConfig())
    probe.history_ = {"q_max": 123.0}
    assert QProbePolicy(be, probe, cfg, SamplingConfig()).bound == 123.0
    assert QProbePolicy(be, probe, PolicyConfig(k=2, beta=0.5, mode="rejection", q_max=7.0), SamplingConfig()).bound == 7.0


def test_rejection_fallback_and_candidates_above_the_bound() -> None:
    be, probe, texts, p0, q = _rejection_world()
    # M far above every Q: nothing is accepted, the fallback picks among the 2 x 3 rejected draws
    far = QProbePolicy(be, probe, PolicyConfig(k=2, beta=0.01, mode="rejection", q_max=float(q.max()) + 100, max_rounds=3),
                       SamplingConfig(), rng=np.random.default_rng(0))
    sel = far(Prompt(id="p", text="x"))
    assert sel.fallback and sel.draws == 6 and sel.text == sel.candidates[sel.index].text
    assert sum(c.prob for c in sel.candidates) == pytest.approx(1.0)
    # M below every Q: each candidate is above it and accepted outright, the first draw wins
    low = QProbePolicy(be, probe, PolicyConfig(k=3, beta=0.5, mode="rejection", q_max=float(q.min()) - 1),
                       SamplingConfig(), rng=np.random.default_rng(0))
    sel = low(Prompt(id="p", text="x"))
    assert not sel.fallback and sel.draws == 1 and sel.index == 0 and sel.above_bound == 1


def test_mismatched_probe_is_refused() -> None:
    policy = QProbePolicy(FakeBackend(), DotProbe(spec(sha256="other", model="other")), PolicyConfig(k=2),
                          SamplingConfig())
    with pytest.raises(SpecMismatchError, match="expected features"):
        policy(Prompt(id="p", text="x"))


def test_bad_policy_config() -> None:
    with pytest.raises(ConfigError):
        PolicyConfig(k=0)
    with pytest.raises(ConfigError, match="rejection"):
        PolicyConfig(beta=0.0, mode="rejection")


def test_jaccard_and_agreement_literal() -> None:
    from qprobe.policy.agreement import agreement, jaccard_matrix

    s = jaccard_matrix(["a = b + 1", "a = b", "x", ""])
    assert s[0, 1] == pytest.approx(3 / 5) and s[0, 2] == 0.0 and s[3, 3] == 0.0
    np.testing.assert_allclose(np.diag(s)[:3], 1.0)
    np.testing.assert_allclose(agreement(s[:3, :3]), [(0.6 + 0) / 2, (0.6 + 0) / 2, 0.0])
    np.testing.assert_allclose(agreement(np.ones((1, 1))), [0.0])  # one candidate: nothing to agree with
    batch = np.stack([s[:3, :3], np.eye(3)])  # [2, 3, 3]
    np.testing.assert_allclose(agreement(batch)[1], 0.0)


def test_consensus_policy_adds_agreement_to_the_probe_value() -> None:
    from qprobe.policy.agreement import agreement, jaccard_matrix

    be = FakeBackend()
    plain = QProbePolicy(be, DotProbe(spec()), PolicyConfig(k=5), SamplingConfig(), rng=np.random.default_rng(0))
    both = QProbePolicy(be, DotProbe(spec()), PolicyConfig(k=5, consensus=2.0), SamplingConfig(),
                        rng=np.random.default_rng(0))
    a, b = plain(Prompt(id="p", text="x")), both(Prompt(id="p", text="x"))
    texts = [c.text for c in a.candidates]
    assert texts == [c.text for c in b.candidates]  # same draws
    want = np.array([c.score for c in a.candidates]) + 2.0 * agreement(jaccard_matrix(texts))
    np.testing.assert_allclose([c.score for c in b.candidates], want)
    assert b.index == int(np.argmax(want))


@pytest.mark.parametrize("kw", [dict(consensus=-1.0), dict(consensus=float("nan")),
                                dict(consensus=1.0, mode="rejection", beta=0.5)])
def test_bad_consensus_config(kw: dict) -> None:
    with pytest.raises(ConfigError):
        PolicyConfig(**kw)


@pytest.mark.parametrize("beta", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_consensus_return_against_brute_force(k: int, beta: float) -> None:
    """Exact enumeration of every k-subset, written out the slow way; lam = 0 is the plain probe."""
    from itertools import combinations

    from qprobe.evaluation.consensus_return import consensus_return
    from qprobe.metrics import expected_return

    rng = np.random.default_rng(k)
    n = 6
    q, r = np.round(rng.normal(size=n), 1), rng.integers(0, 2, size=n).astype(float)  # rounded: ties happen
    sim = rng.uniform(size=(n, n))
    sim = (sim + sim.T) / 2
    for lam in (0.0, 0.5, 100.0):
        total = []
        for subset in combinations(range(n), k):
            score = [q[i] + (lam * sum(sim[i, j] for j in subset if j != i) / (k - 1) if k > 1 else 0.0)
                     for i in subset]
            if beta == 0:
                top = [i for i, s in zip(subset, score, strict=True) if s == max(score)]
                total.append(sum(r[i] for i in top) / len(top))
            else:
                w = np.exp((np.array(score) - max(score)) / beta)
                total.append(float(w @ r[list(subset)] / w.sum()))
        assert consensus_return(q, sim, r, k, beta, lam) == pytest.approx(np.mean(total), abs=1e-12)
    assert consensus_return(q, sim, r, k, beta, 0.0) == pytest.approx(expected_return(q, r, k, beta), abs=1e-9)


def test_consensus_sampled_subsets_estimate_the_exact_value() -> None:
    """Past max_subsets the subsets are drawn at random: an unbiased estimate of the exact value."""
    from qprobe.evaluation.consensus_return import candidate_sets, consensus_return

    rng = np.random.default_rng(0)
    n, k = 10, 4
    q, r, sim = rng.normal(size=n), rng.integers(0, 2, size=n).astype(float), rng.uniform(size=(n, n))
    exact = consensus_return(q, sim, r, k, 0.5, 1.0)
    est = consensus_return(q, sim, r, k, 0.5, 1.0, rng=np.random.default_rng(1), max_subsets=50)
    sets, is_exact = candidate_sets(n, k, np.random.default_rng(1), max_subsets=50)
    assert not is_exact and sets.shape == (50, k) and all(len(set(row)) == k for row in sets.tolist())
    many = consensus_return(q, sim, r, k, 0.5, 1.0, rng=np.random.default_rng(2), max_subsets=100)
    assert abs(many - exact) < 0.1 and est != exact
    with pytest.raises(ConfigError):
        candidate_sets(n, k, None, max_subsets=50)
