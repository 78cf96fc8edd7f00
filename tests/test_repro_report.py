"""benchmarks/repro/report.py end to end on tiny fake runs laid out like runs/repro."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from qprobe.collection.collect import CollectConfig, collect  # noqa: E402
from qprobe.generation.base import SamplingConfig  # noqa: E402
from qprobe.store import Run  # noqa: E402

REPRO = Path(__file__).resolve().parents[1] / "benchmarks" / "repro"


def load_module(name: str):
    """benchmarks/repro/NAME.py (its folder on sys.path, as when it runs as a script)."""
    sys.path.insert(0, str(REPRO))
    spec = importlib.util.spec_from_file_location(f"repro_{name}", REPRO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_report():
    return load_module("report")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repro")
    feats = ("-1:last", "-2:mean")
    common = dict(task="fake", backend="fake", features=feats, shard_samples=32)
    collect(CollectConfig(split="train", out=root / "mbpp-train", n=8, task_options={"size": 12}, **common),
            progress=False)
    collect(CollectConfig(split="test", out=root / "mbpp-test", n=8, task_options={"size": 10}, **common),
            progress=False)
    collect(CollectConfig(split="test", out=root / "mbpp-test-greedy", n=1, task_options={"size": 6},
                          sampling=SamplingConfig(temperature=0.0), **common), progress=False)
    return root  # no humaneval runs: that part must be skipped with a note


def per_prompt_rewards(path: Path) -> dict[str, list[float]]:
    t = Run.open(path).table(["prompt_id", "reward"])
    out: dict[str, list[float]] = {}
    for p, r in zip(t.column("prompt_id").to_pylist(), t.column("reward").to_pylist(), strict=True):
        out.setdefault(p, []).append(r)
    return out


def test_report_end_to_end(runs: Path, tmp_path: Path) -> None:
    report = load_report()
    lines: list[str] = []
    out, results = tmp_path / "out", tmp_path / "results" / "mbpp.json"
    r = report.main(["--runs", str(runs), "--out", str(out), "--results", str(results), "--k", "4",
                     "--seeds", "2", "--sweep-seeds", "1", "--cv-folds", "2", "--cv-seeds", "1"], say=lines.append)
    text = "\n".join(lines)
    assert "humaneval not collected" in text and "mbpp-test-5shot not collected" in text

    summary = json.loads(results.read_text())
    assert (summary["n"], summary["k"], summary["beta"]) == (8, 4, 0.1)
    methods = summary["methods"]
    assert {"pass@1", "greedy", "mse", "ce", "pg", "pass@k"} <= set(methods)
    assert any(name.startswith("best by MBPP-train CV: ") for name in methods)
    for name, per in methods.items():
        assert set(per) == {"mbpp_test"}, name
        mean, low, high = per["mbpp_test"]
        assert low <= mean + 1e-12 and mean <= high + 1e-12, name

    # exact values from the stored rewards
    rewards = per_prompt_rewards(runs / "mbpp-test")
    p1 = np.mean([np.mean(v) for v in rewards.values()])
    pk = np.mean([1 - math.comb(8 - int(sum(v)), 4) / math.comb(8, 4) for v in rewards.values()])
    assert methods["pass@1"]["mbpp_test"][0] == pytest.approx(p1, abs=1e-12)
    assert methods["pass@k"]["mbpp_test"][0] == pytest.approx(pk, abs=1e-12)
    greedy = per_prompt_rewards(runs / "mbpp-test-greedy")
    assert methods["greedy"]["mbpp_test"][0] == pytest.approx(np.mean([v[0] for v in greedy.values()]), abs=1e-12)
    row = r["table1"]["rows"]["4"]["greedy"]["mbpp_test"]
    assert row["n_prompts"] == 6 and row["gain"][0] == pytest.approx(
        np.mean([greedy[p][0] - np.mean(rewards[p]) for p in greedy]), abs=1e-12)
    assert r["table1"]["rows"]["4"]["pass@4"]["mbpp_test"]["gap_closed"][0] == pytest.approx(1.0)
    k16 = r["table1"]["rows"]["8"]["pass@8"]["mbpp_test"]["mean"]
    assert k16 == pytest.approx(np.mean([float(max(v)) for v in rewards.values()]))
    # probes beat a random pick on the learnable fake task
    assert methods["mse"]["mbpp_test"][0] > p1

    # the figures' data and the sweeps
    assert r["figure2"]["sizes"] == [5, 10, 12]
    assert r["figure3"]["k"] == list(range(1, 9))
    curves = r["figure3"]["curves"]["mbpp_test"]
    assert curves["pass@k"][0] == pytest.approx(p1) and curves["pass@k"][-1] == pytest.approx(k16)
    assert set(r["figure4"]["mse"]) == {"mbpp_train", "mbpp_test"}
    assert set(r["feature_sweep"]["keys"]) == {"L-1_last", "L-2_mean"}
    assert set(r["beta_sweep"]["pg (fast)"]) == {"0.0", "0.01", "0.1", "1.0"}
    assert r["push_past"]["best"] in r["push_past"]["rows"]
    train = per_prompt_rewards(runs / "mbpp-train")
    assert r["push_past"]["cv_baselines"]["pass@1"] == pytest.approx(np.mean([np.mean(v) for v in train.values()]))
    assert "pg, concat" in " ".join(r["push_past"]["rows"])
    cons = r["consensus"]
    assert cons["best"] in cons["cv"] and cons["kinds"] == ["text", *r["feature"]]
    assert all(row["mbpp_test"] is not None for row in cons["rows"].values())
    md = (out / "REPORT.md").read_text()
    assert "## Table 1 at k=4 (headline)" in md and "L_PG > L_CE > L_Q" in md and "not collected" in md
    assert json.loads((out / "report.json").read_text())["k"] == 4
    assert sorted(p.name for p in out.glob("fig*.png")) == ["fig2_train_size.png", "fig3_mbpp_test.png",
                                                            "fig4_difficulty.png"]

    # RESULTS.md's section and summary row are written from report.json
    section = load_module("results_section")
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# top\n| Table 1 at k=9 stale |\nkept\n<!-- repro:begin -->\nstale\n<!-- repro:end -->\ntail\n")
    sys_argv, sys.argv = sys.argv, ["results_section.py", "--report", str(out / "report.json"), "--results", str(doc)]
    try:
        section.main()
    finally:
        sys.argv = sys_argv
    text = doc.read_text()
    assert text.startswith("# top\n| Table 1 at k=4 (12 MBPP-train problems; MBPP-test 10) | pg ")
    assert "stale" not in text and text.endswith("<!-- repro:end -->\ntail\n") and "\nkept\n" in text
    assert f"| pass@1 | {p1:.3f} [" in text and "**L_PG > L_CE > L_Q** (MBPP-test)" in text
    doc.write_text("no markers\n")
    sys.argv = ["results_section.py", "--report", str(out / "report.json"), "--results", str(doc)]
    try:
        with pytest.raises(SystemExit, match="expected the markers"):
            section.main()
    finally:
        sys.argv = sys_argv
    assert doc.read_text() == "no markers\n"


def test_report_fewshot_and_api_rows(runs: Path, tmp_path: Path) -> None:
    """The 5-shot rows and the API-setting table, on fake runs standing in for those folders."""
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(runs, root)
    feats = ("-1:last", "-2:mean")
    common = dict(task="fake", backend="fake", features=feats, shard_samples=32, split="test")
    # the 5-shot runs cover the first 6 of the 10 test problems (as the real ones cover 64 of 500)
    collect(CollectConfig(out=root / "mbpp-test-5shot", n=8, task_options={"size": 6}, **common),
            progress=False)
    collect(CollectConfig(out=root / "mbpp-test-5shot-greedy", n=1, task_options={"size": 6},
                          sampling=SamplingConfig(temperature=0.0), **common), progress=False)
    collect(CollectConfig(out=root / "humaneval-api", n=4, task_options={"size": 10}, **common), progress=False)
    report = load_report()
    out = tmp_path / "out"
    r = report.main(["--runs", str(root), "--out", str(out), "--results", str(tmp_path / "mbpp.json"), "--k", "4",
                     "--seeds", "2", "--sweep-seeds", "1", "--cv-folds", "2", "--cv-seeds", "1",
                     "--feature", "L-1_last", "--external", "L-2_mean", "--no-figures"], say=lambda *_: None)
    assert not [name for name in r["table1"]["rows"]["4"] if name.startswith("5-shot")]  # never beside full-set rows
    block = r["table1"]["fewshot"]["4"]
    assert block["problems"] == {"mbpp_test": 6}
    rows = block["rows"]
    assert all(row["mbpp_test"]["n_prompts"] == 6 for row in rows.values())  # every row on the same problems
    zero = per_prompt_rewards(root / "mbpp-test")
    shot_ids = set(per_prompt_rewards(root / "mbpp-test-5shot"))
    assert rows["zero-shot pass@1"]["mbpp_test"]["mean"] == pytest.approx(np.mean([np.mean(zero[p]) for p in shot_ids]))
    full = r["table1"]["rows"]["4"]["pass@1"]["mbpp_test"]
    assert full["n_prompts"] == 10 and full["mean"] != pytest.approx(rows["zero-shot pass@1"]["mbpp_test"]["mean"])
    gain = rows["5-shot pass@1"]["mbpp_test"]["gain"][0]
    assert gain == pytest.approx(rows["5-shot pass@1"]["mbpp_test"]["mean"] - rows["zero-shot pass@1"]["mbpp_test"]["mean"])
    shot = per_prompt_rewards(root / "mbpp-test-5shot")
    greedy = per_prompt_rewards(root / "mbpp-test-5shot-greedy")
    assert rows["5-shot pass@1"]["mbpp_test"]["mean"] == pytest.approx(np.mean([np.mean(v) for v in shot.values()]))
    assert rows["5-shot greedy"]["mbpp_test"]["mean"] == pytest.approx(np.mean([v[0] for v in greedy.values()]))
    pk = np.mean([1 - math.comb(8 - int(sum(v)), 4) / math.comb(8, 4) for v in shot.values()])
    assert rows["5-shot pass@4"]["mbpp_test"]["mean"] == pytest.approx(pk)
    assert rows["5-shot + pg"]["mbpp_test"] is not None and rows["5-shot + pg"].get("humaneval") is None
    assert r["table1"]["fewshot"]["8"]["rows"]["5-shot + pg"]["mbpp_test"]["n_prompts"] == 6  # k = n = 8 of the 5-shot run
    comp = r["table1"]["comparisons"]
    assert comp["5shot+pg-5shot"]["mbpp_test"] is not None and comp["5shot+pg-5shot"].get("humaneval") is None

    api = r["api_setting"]
    assert set(api["splits"]) == {"mbpp_test", "humaneval_api"}
    he = api["splits"]["humaneval_api"]
    assert (he["n"], he["k"], he["problems"]) == (4, 4, 10)
    apirew = per_prompt_rewards(root / "humaneval-api")
    assert he["rows"]["pass@1"]["mean"] == pytest.approx(np.mean([np.mean(v) for v in apirew.values()]))
    assert he["rows"]["pass@4"]["mean"] == pytest.approx(np.mean([max(v) for v in apirew.values()]))
    for loss in ("mse", "ce", "pg"):
        own, ext = he["rows"][f"{loss}, own states (L-1_last)"], he["rows"][f"{loss}, external (L-2_mean)"]
        # the paired difference is the difference of the means over the same problems
        assert he["own_minus_external"][loss][0] == pytest.approx(own["mean"] - ext["mean"])
    md = (out / "REPORT.md").read_text()
    assert "## API setting" in md and "HumanEval through the API server" in md
    assert f"| pg, own states (L-1_last) | {he['rows']['pg, own states (L-1_last)']['mean']:.3f} [" in md
    assert "Few-shot and Q-probe add up** (MBPP-test, on the 6 problems of the 5-shot runs)" in md
    assert "### 5-shot on successes at k=4: on the first 6 MBPP-test problems only" in md
    main_table = md.split("## Table 1 at k=4")[1].split("### 5-shot")[0]
    assert "5-shot" not in main_table
    summary = json.loads((tmp_path / "mbpp.json").read_text())
    assert not [name for name in summary["methods"] if name.startswith("5-shot")]
    assert summary["fewshot_subset"]["problems"] == {"mbpp_test": 6}
    assert {"zero-shot pass@1", "5-shot greedy", "5-shot pass@1", "5-shot + pg"} <= set(summary["fewshot_subset"]["methods"])
    # --fewshot-into: the block alone, into a report.json of the older layout (5-shot rows among the
    # full-set rows, no zero-shot rows on the subset), gives the block the whole report computes
    old = json.loads((out / "report.json").read_text())
    for kk, b in old["table1"].pop("fewshot").items():
        old["table1"]["rows"][kk].update({n: row for n, row in b["rows"].items() if n.startswith("5-shot")})
    (out / "report.json").write_text(json.dumps(old))
    notes: list[str] = []
    again = report.main(["--runs", str(root), "--fewshot-into", str(out / "report.json"), "--results",
                         str(tmp_path / "mbpp2.json"), "--seeds", "2"], say=notes.append)
    assert again["table1"]["fewshot"] == json.loads(json.dumps(r["table1"]["fewshot"]))
    assert not [n for n in notes if n.startswith("note: recomputed")]  # the 5-shot rows came out as before
    assert not [n for n in again["table1"]["rows"]["4"] if n.startswith("5-shot")]
    assert "### 5-shot on successes at k=4" in (out / "REPORT.md").read_text()
    # RESULTS.md's section: the 5-shot rows in their own table, labelled with the subset
    section = load_module("results_section")
    text = section.section(r)
    head = text.split("5-shot on successes (the paper's few-shot rows)")[0]
    assert "| 5-shot" not in head and "on the first 6 MBPP-test problems only" in text
    assert "| zero-shot pass@1 |" in text


def test_visible_test_pass_is_read_from_the_failing_assertion(shared_data: Path) -> None:
    """visible.passed_visible on literal rows of MBPP problem 11, whose prompt shows its first test."""
    from types import SimpleNamespace

    import pyarrow as pa

    visible = load_module("visible")
    row = next(json.loads(line) for line in (shared_data / "mbpp" / "mbpp.jsonl").open() if '"task_id": 11,' in line)
    shown, hidden = row["test_list"][0], row["test_list"][1]
    cases = [  # (reward, details) -> passed the shown test?
        (1.0, {"status": "passed", "failing_test": ""}, 1.0),
        (0.0, {"status": "failed", "failing_test": shown}, 0.0),
        (0.0, {"status": "failed", "failing_test": "  " + hidden}, 1.0),  # got past the shown test
        (0.0, {"status": "failed", "failing_test": "assert remove_Occ('x', 'x') == ''"}, 0.0),  # its own assert
        (0.0, {"status": "error", "failing_test": ""}, 0.0),
        (0.0, {"status": "timeout"}, 0.0),
    ]
    table = pa.table({"prompt_id": ["mbpp/11"] * len(cases), "details": [json.dumps(d) for _, d, _ in cases]})
    manifest = {"task": {"name": "mbpp", "split": "test",
                         "options": {"data": str(shared_data / "mbpp" / "mbpp.jsonl"), "prompt_format": "chat"}}}
    run = SimpleNamespace(manifest=manifest, table=lambda columns: table.select(columns))
    order = np.arange(len(cases))[::-1]  # the split's rows in another order than storage
    split = SimpleNamespace(cache=SimpleNamespace(run=run, rows=order), index=np.arange(len(cases)),
                            rewards=np.array([cases[i][0] for i in order]),
                            prompt_ids=np.array(["mbpp/11"] * len(cases), dtype=object))
    methods = importlib.import_module("methods")  # benchmarks/repro is on sys.path: this test runs alone too
    split.column = lambda name: methods.Split.column(split, name)
    np.testing.assert_array_equal(visible.passed_visible(split), [cases[i][2] for i in order])
    fake = SimpleNamespace(cache=SimpleNamespace(run=SimpleNamespace(manifest={"task": {"name": "fake"}})))
    assert visible.passed_visible(fake) is None
