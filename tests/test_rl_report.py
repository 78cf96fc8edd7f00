"""benchmarks/rl/report.py on fake run folders laid out like runs/rl: steps to reach, paired differences."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "rl" / "report.py"
PROBLEMS = [f"p{i}" for i in range(10)]


def load_report():
    spec = importlib.util.spec_from_file_location("rl_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def metric(values: list[float] | None, mean: float | None = None) -> dict:
    m = float(np.mean(values)) if values is not None else mean
    out = {"mean": m, "low": m - 0.1, "high": m + 0.1, "n_prompts": len(PROBLEMS), "samples_per_prompt": 1}
    if values is not None:
        out["per_prompt"] = dict(zip(PROBLEMS, values, strict=True))
    return out


def write_run(folder: Path, evals: dict[int, list[float] | None], steps: int) -> None:
    (folder / "evals").mkdir(parents=True)
    rows = [{"step": t, "generated_tokens": 100, "seconds": 2.0, "reward": 0.5, "oracle": 0.5} for t in range(1, steps + 1)]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for t, v in evals.items():
        m = metric(v) if v is not None else metric(None, 0.3)
        (folder / "evals" / f"step{t:06d}.json").write_text(json.dumps({"step": t, "greedy": m, "sampled": m}))


def test_report_pairs_runs_and_steps_on_the_same_problems(tmp_path: Path, capsys) -> None:
    report = load_report()
    base = [1.0, 0, 0, 1, 0, 0, 0, 1, 0, 0]  # 0.3
    orm_last = [1.0, 0, 0, 1, 0, 0, 0, 1, 1, 0]  # 0.4: one problem more
    qrm_last = [1.0, 1, 1, 1, 0, 0, 0, 1, 1, 0]  # 0.6
    runs = tmp_path / "runs"
    write_run(runs / "orm", {0: base, 2: base, 4: orm_last}, 4)
    write_run(runs / "qrm", {0: base, 2: qrm_last, 4: qrm_last}, 4)
    write_run(runs / "oracle", {0: None, 2: None}, 2)  # made before per-problem values were recorded
    assert report.main(["--runs", str(runs), "--out", str(tmp_path / "rl.json"), "--plot", str(tmp_path / "c.png")]) == 0
    out = json.loads((tmp_path / "rl.json").read_text())
    assert out["target"] == pytest.approx(0.35)
    assert out["runs"]["orm"]["steps_to_reach"] == 4 and out["runs"]["qrm"]["steps_to_reach"] == 2
    assert out["ratio_orm_over_qrm"] == 2.0
    diff = out["paired"]["qrm - orm at step 4"]["greedy"]
    assert diff["mean"] == pytest.approx(0.2) and diff["n_prompts"] == 10 and diff["low"] <= 0.2 <= diff["high"]
    gain = out["paired"]["qrm step 4 - step 0"]["sampled"]
    assert gain["mean"] == pytest.approx(0.3) and gain["low"] > 0  # three problems gained, none lost
    assert out["paired"]["oracle step 2 - step 0"]["greedy"] is None
    printed = capsys.readouterr().out
    assert "paired oracle step 2 - step 0: greedy n/a (no per-problem values)" in printed
    assert "qprobe   not run" in printed and "iterative Q-probing: not run" in printed


def test_report_pairs_iterate_rounds_with_round_zero(tmp_path: Path, capsys) -> None:
    report = load_report()
    runs = tmp_path / "runs"
    r0 = {"pass@1": metric([0.5] * 10), "pass@8": metric([1.0] * 5 + [0.0] * 5)}
    r1 = {"pass@1": metric([0.75] * 10), "pass@8": metric([1.0] * 5 + [0.0] * 5)}
    for t, held in enumerate((r0, r1)):
        (runs / "iterate" / f"round{t}").mkdir(parents=True)
        (runs / "iterate" / f"round{t}" / "done.json").write_text(json.dumps({"round": t, "held_out": held,
                                                                              "picked_reward": 0.5}))
    assert report.main(["--runs", str(runs), "--out", str(tmp_path / "rl.json"), "--plot", str(tmp_path / "c.png")]) == 0
    out = json.loads((tmp_path / "rl.json").read_text())
    cells = out["iterate"][1]["paired_vs_round0"]
    assert cells["pass@1"]["mean"] == pytest.approx(0.25) and cells["pass@1"]["low"] == cells["pass@1"]["high"]
    assert cells["pass@8"]["mean"] == 0.0
    assert "round 1 - round 0: pass@1 +0.250" in capsys.readouterr().out
