"""`qprobe demo` on the fake back-end and task: its table against brute force on the literal run,
its design in results.json and the run's manifest, resuming, and refusing another model's probe."""

from __future__ import annotations

import dataclasses
import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from helpers import hand_probe, run_cli

from qprobe.errors import ConfigError, DataError, SpecMismatchError
from qprobe.evaluation.demo import DEFAULT_LIMIT, DEMO_SEEDS, DemoConfig, run_demo
from qprobe.features.fake import FakeEmbedder
from qprobe.features.spec import FeatureRequest
from qprobe.generation.fake import FakeBackend
from qprobe.intervals import paired_bootstrap_ci
from qprobe.store.run import Run

W = np.random.default_rng(1234).standard_normal(16)  # the fake reward's own direction: a good probe


def fake_probe(tmp_path: Path, sha256: str = "") -> Path:
    spec = FakeEmbedder(FakeBackend()).spec(FeatureRequest(18, "mean"), 16)
    spec = dataclasses.replace(spec, model="other", sha256=sha256) if sha256 else spec
    return hand_probe(tmp_path / f"probe{sha256}", W, spec)


def config(tmp_path: Path, **kw) -> DemoConfig:
    base = {"task": "fake", "task_options": {"size": 20}, "backend": "fake", "probe": str(fake_probe(tmp_path)),
            "limit": 12, "n": 8, "k": 4, "beta": 0.0, "seed": 2, "workdir": tmp_path / "demo"}
    return DemoConfig(**{**base, **kw})


def brute_best_of_k(q: list[float], r: list[float], k: int) -> float:
    """Mean over every k-subset of the reward of its highest-Q candidate (ties: their mean)."""
    values = []
    for sub in combinations(range(len(q)), k):
        top = max(q[i] for i in sub)
        tied = [r[i] for i in sub if q[i] == top]
        values.append(sum(tied) / len(tied))
    return float(np.mean(values))


def brute_pass_at_k(r: list[float], k: int) -> float:
    return float(np.mean([max(r[i] for i in sub) for sub in combinations(range(len(r)), k)]))


def literal_groups(run_path: Path) -> dict[str, tuple[list[float], list[float]]]:
    """prompt id -> (Q = w . x of each stored sample, its reward), read from the run's files."""
    run = Run.open(run_path)
    t = run.table(["prompt_id", "reward"]).to_pydict()
    x = run.features("L18_mean", np.arange(len(run)))  # [N, 16]
    out: dict[str, tuple[list[float], list[float]]] = {}
    for p, r, q in zip(t["prompt_id"], t["reward"], x.astype(np.float64) @ W, strict=True):
        out.setdefault(p, ([], []))
        out[p][0].append(float(q))
        out[p][1].append(float(r))
    return out


def test_table_is_brute_force_on_the_literal_run(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    out = run_demo(cfg, say=lambda _: None, progress=False)
    groups = literal_groups(Path(out["run"]))
    problems = [f"test/{i}" for i in range(12)]
    assert list(groups) == problems and all(len(r) == 8 for _, r in groups.values())
    pass1 = {p: float(np.mean(r)) for p, (_, r) in groups.items()}
    best = {p: brute_best_of_k(q, r, 4) for p, (q, r) in groups.items()}
    sky = {p: brute_pass_at_k(r, 4) for p, (_, r) in groups.items()}
    name = f"Q-probe {Path(cfg.probe).name} (k=4)"
    assert list(out["methods"]) == ["pass@1", name, "pass@4"]  # no greedy by default, nothing trained
    for row, values in (("pass@1", pass1), (name, best), ("pass@4", sky)):
        mean, low, high = out["methods"][row]
        assert mean == pytest.approx(np.mean(list(values.values())), abs=1e-12) and low <= mean <= high
    a, b = np.array([best[p] for p in problems]), np.array([pass1[p] for p in problems])
    d, lo, hi = paired_bootstrap_ci(a, b, rng=np.random.default_rng(0))
    assert (out["gain"]["method"], out["gain"]["vs"]) == (name, "pass@1")
    assert out["gain"]["mean"] == pytest.approx(a.mean() - b.mean(), abs=1e-12) == pytest.approx(d, abs=1e-12)
    # BCa counts resampled means equal to the observed one, so last-bit differences between the brute
    # force and the library's exact values move the bounds by a resample or so; an unpaired interval
    # would be several times wider
    assert (out["gain"]["low"], out["gain"]["high"]) == pytest.approx((lo, hi), abs=2e-3)
    assert out["gain"]["low"] > 0  # the fake reward is linear in the features: the true direction gains
    page = Path(out["report"]).read_text()
    assert all(f'data-prompt-id="{p}"' in page for p in problems) and 'data-prompt-id="test/12"' not in page


def test_design_lands_in_results_and_manifest(tmp_path: Path) -> None:
    cfg = config(tmp_path, seed=3)
    lines: list[str] = []
    out = run_demo(cfg, say=lines.append, progress=False)
    saved = json.loads((cfg.workdir / "results.json").read_text())
    design = saved["design"]
    assert design["problems"] == [f"test/{i}" for i in range(12)] and design["limit"] == 12
    assert (design["n"], design["k"], design["beta"], design["seed"]) == (8, 4, 0.0, 3)
    assert design["fixed_seeds"] == list(DEMO_SEEDS) == [1, 2, 3]
    assert design["feature"] == "L18_mean" and design["probe"] == cfg.probe and not design["training_at_demo_time"]
    assert design["sampling"]["temperature"] == 0.8 and design["sampling"]["top_p"] == 0.95
    assert design["sampling"]["max_new_tokens"] == 300 and design["sampling"]["seed"] == 3
    manifest = Run.open(out["run"]).manifest
    assert manifest["sampling"]["seed"] == 3 and manifest["config"]["limit"] == 12 and manifest["config"]["n"] == 8
    assert list(manifest["features"]) == ["L18_mean"]  # the probe's feature, nothing else
    assert saved["sampled_now"]["samples"] == 96 and saved["sampled_now"]["tokens_per_s"] > 0
    assert any("interval is above 0" in line for line in lines)
    assert lines[-1].endswith(str(cfg.workdir / "report" / "index.html"))
    # another seed is another run, of other samples
    other = run_demo(dataclasses.replace(cfg, seed=1), say=lambda _: None, progress=False)
    assert other["run"] != out["run"]
    texts = [Run.open(o["run"]).table(["completion"]).column("completion").to_pylist() for o in (out, other)]
    assert texts[0] != texts[1]


def test_rerun_reuses_the_collection(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    first = run_demo(cfg, say=lambda _: None, progress=False)
    before = {p: p.stat().st_mtime_ns for p in Path(first["run"]).rglob("*") if p.is_file() and p.suffix != ".json"}
    lines: list[str] = []
    again = run_demo(cfg, say=lines.append, progress=False)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert again["methods"] == first["methods"] and again["sampled_now"]["samples"] == 0
    assert any("all reused from the run" in line for line in lines)
    # fewer problems: the first 5 of the same run, nothing sampled
    fewer = run_demo(dataclasses.replace(cfg, limit=5), say=lambda _: None, progress=False)
    assert fewer["design"]["problems"] == [f"test/{i}" for i in range(5)] and fewer["sampled_now"]["samples"] == 0
    assert next(iter(fewer["methods"].values()))[0] == pytest.approx(
        np.mean([np.mean(r) for p, (_, r) in literal_groups(Path(first["run"])).items() if int(p[5:]) < 5]))


def test_greedy_row_when_asked(tmp_path: Path) -> None:
    out = run_demo(config(tmp_path, greedy=True, limit=6), say=lambda _: None, progress=True)  # bars and spinners too
    greedy = Run.open(out["greedy_run"])
    t = greedy.table(["prompt_id", "reward"]).to_pydict()
    assert t["prompt_id"] == [f"test/{i}" for i in range(6)] and greedy.manifest["sampling"]["temperature"] == 0.0
    assert list(out["methods"])[:2] == ["pass@1", "greedy"]
    assert out["methods"]["greedy"][0] == pytest.approx(np.mean(t["reward"]))


def test_probe_of_another_model_stops_at_the_first_shard(tmp_path: Path) -> None:
    cfg = config(tmp_path, probe=str(fake_probe(tmp_path, sha256="other-model")))
    with pytest.raises(SpecMismatchError, match="expected features .* run the demo with the probe's model"):
        run_demo(cfg, say=lambda _: None, progress=False)
    run = Run.open(cfg.workdir / "fake-test-seed2")
    assert 0 < len(run) < 12 * 8  # stopped early, not after the whole collection


def test_probe_trained_on_the_problems_stops_at_the_first_shard(tmp_path: Path) -> None:
    from qprobe.probes.models import Probe
    from qprobe.store.run import prompt_hash
    from qprobe.tasks.fake import FakeTask

    probe = Probe.from_pretrained(fake_probe(tmp_path))
    texts = [FakeBackend().render(p) for p in FakeTask(size=20).prompts("test")[3:5]]
    probe.source_ = {"train_prompts": {"n": 2, "hashes": [prompt_hash(t) for t in texts]}}
    probe.save_pretrained(tmp_path / "trained-on-test")
    cfg = config(tmp_path, probe=str(tmp_path / "trained-on-test"))
    with pytest.raises(DataError, match=r"trained on 1 of the 4 collected so far \(e.g. \['test/3'\]\); run the demo on"):
        run_demo(cfg, say=lambda _: None, progress=False)
    assert 0 < len(Run.open(cfg.workdir / "fake-test-seed2")) < 12 * 8


def test_bad_design_is_refused() -> None:
    with pytest.raises(ConfigError, match="k <= n"):
        DemoConfig(n=4, k=8)
    with pytest.raises(ConfigError, match="--limit >= 2"):
        DemoConfig(limit=1)
    with pytest.raises(ConfigError, match="beta"):
        DemoConfig(beta=-1.0)
    assert DemoConfig(limit=0).limit is None


def test_cli_prints_the_table_and_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    probe = fake_probe(tmp_path)
    args = ["demo", "--task", "fake", "--task-option", "size=20", "--backend", "fake", "--probe", str(probe),
            "--limit", "4", "--seed", "1", "--workdir", str(tmp_path / "w"), "--no-progress"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    k = DemoConfig().k  # the CLI's default is the design's
    assert "pass@1" in out and f"Q-probe {probe.name} (k={k})" in out and f"pass@{k}" in out and "greedy" not in out
    assert out.strip().endswith(str(tmp_path / "w" / "report" / "index.html"))
    code, out, _ = run_cli(["demo", "--help"], capsys)
    assert code == 0 and f"Default: {DEFAULT_LIMIT}, the design's N" in " ".join(out.split())
    code, out, err = run_cli(["demo", "--backend", "fake", "--task", "fake", "--n", "2", "-k", "3"], capsys)
    assert code == 2 and err.count("\n") == 1 and "expected 1 <= k <= n" in err
