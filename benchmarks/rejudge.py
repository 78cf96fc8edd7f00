"""Re-judge every stored sample of committed runs with the current sandbox; list each changed verdict.

    python benchmarks/rejudge.py [--runs runs/repro] [--only humaneval-greedy] [--shared ../shared] [--workers 4]

For each run whose reward ran code (unit-tests), the run's task is rebuilt from its manifest
(`TASKS.create(name, **options)`; few-shot runs use their inner task: the shots change the prompt,
never what is judged), each row's program is rebuilt as the reward does (`build_program` with the
task's prompt) and checked with the task's trusted tests (`trusted_tests`), at the run's timeout.
A row whose reward differs is checked once more (a timeout on a loaded machine is not a verdict
change of the sandbox); what still differs is listed with its prompt id, the old and new status
and error, and the new message. Runs already in the output file are skipped (resumable; --force
redoes them). Writes benchmarks/results/rejudge.json after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _task(manifest: dict, shared: Path):
    from qprobe.catalog import TASKS

    t = manifest["task"]
    opts = dict(t.get("options", {}))
    if isinstance(opts.get("data"), str) and opts["data"].startswith("../shared/"):
        opts["data"] = str(shared / opts["data"][len("../shared/"):])
    return TASKS.create(t["name"], **opts), t["split"]


def rejudge_run(path: Path, shared: Path, workers: int) -> dict | None:
    from qprobe import sandbox
    from qprobe.rewards.code import build_program, trusted_tests
    from qprobe.store import Run

    run = Run.open(path)
    reward_m = run.manifest.get("reward", {})
    if reward_m.get("reward") != "unit-tests":
        return {"run": path.name, "skipped": f"reward '{reward_m.get('reward')}' runs no code"}
    timeout = float(reward_m.get("timeout", 3.0))
    task, split = _task(run.manifest, shared)
    prompts = {p.id: p for p in task.prompts(split)}
    rows = run.table(columns=["prompt_id", "sample_index", "completion", "reward", "details"]).to_pylist()
    jobs = [(build_program(prompts[r["prompt_id"]], r["completion"]), trusted_tests(prompts[r["prompt_id"]]))
            for r in rows]
    t0 = time.perf_counter()
    results = sandbox.check_many(jobs, timeout=timeout, workers=workers)
    seconds = time.perf_counter() - t0

    def reward_of(res) -> float | None:
        return None if res.error_type == "SandboxError" else float(res.passed)

    changed = [i for i, (r, res) in enumerate(zip(rows, results, strict=True)) if reward_of(res) != r["reward"]]
    if changed:  # once more, fresh (the cache would answer the same)
        sandbox.clear_cache()
        again = sandbox.check_many([jobs[i] for i in changed], timeout=timeout, workers=workers)
        for i, res in zip(changed, again, strict=True):
            results[i] = res
    changes = []
    status_changes, kinds, status_list = 0, {}, []
    for r, res in zip(rows, results, strict=True):
        old = json.loads(r["details"]) if r["details"] else {}
        if old.get("status") != res.status:
            status_changes += 1
            if len(status_list) < 100:
                status_list.append({"prompt_id": r["prompt_id"], "sample_index": r["sample_index"],
                                    "old": f"{old.get('status')}/{old.get('error_type')}: {old.get('failing_test')}"[:200],
                                    "new": f"{res.status}/{res.error_type}: {res.failing_test}"[:200]})
            kinds[f"{old.get('status')}/{old.get('error_type')} -> {res.status}/{res.error_type}"] = \
                kinds.get(f"{old.get('status')}/{old.get('error_type')} -> {res.status}/{res.error_type}", 0) + 1
        if reward_of(res) == r["reward"]:
            continue
        changes.append({"prompt_id": r["prompt_id"], "sample_index": r["sample_index"],
                        "old": {"reward": r["reward"], "status": old.get("status"), "error_type": old.get("error_type"),
                                "failing_test": old.get("failing_test")},
                        "new": {"reward": reward_of(res), "status": res.status, "error_type": res.error_type,
                                "failing_test": res.failing_test, "message": res.message[:300]}})
    return {"run": path.name, "samples": len(rows), "timeout_s": timeout, "seconds": round(seconds, 1),
            "passed_before": sum(1 for r in rows if r["reward"] == 1.0),
            "passed_now": sum(1 for res in results if res.passed),
            "reward_changes": len(changes), "status_changes": status_changes,
            "status_change_kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])), "changes": changes,
            "status_changed": status_list}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default=str(ROOT / "runs" / "repro"))
    ap.add_argument("--only", nargs="*", default=None, help="run folder names (default: all)")
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"), help="where the manifests' ../shared/ is")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rejudge.json"))
    ap.add_argument("--force", action="store_true", help="redo runs already in --out")
    args = ap.parse_args()
    os.environ["QPROBE_ALLOW_CODE_EXECUTION"] = "1"
    from qprobe import sandbox

    out = Path(args.out)
    done = json.loads(out.read_text()) if out.exists() and not args.force else {"runs": {}}
    done.update({"isolation": sandbox.isolation_level(), "python": sys.version.split()[0],
                 "command": "python benchmarks/rejudge.py " + " ".join(sys.argv[1:])})
    paths = sorted(p for p in Path(args.runs).iterdir() if (p / "manifest.json").exists())
    if args.only:
        paths = [p for p in paths if p.name in args.only]
    for p in paths:
        if p.name in done["runs"] and not args.force:
            continue
        res = rejudge_run(p, Path(args.shared), args.workers)
        done["runs"][p.name] = res
        ran = [r for r in done["runs"].values() if "samples" in r]
        done["total"] = {"samples": sum(r["samples"] for r in ran), "reward_changes": sum(r["reward_changes"] for r in ran),
                         "status_changes": sum(r["status_changes"] for r in ran)}
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(done, indent=1) + "\n")
        os.replace(tmp, out)
        if "skipped" in res:
            print(f"{p.name:<24} skipped: {res['skipped']}")
            continue
        print(f"{p.name:<24} {res['samples']:>6} samples {res['seconds']:>7}s  passed {res['passed_before']} -> "
              f"{res['passed_now']}  reward changes {res['reward_changes']}  status changes {res['status_changes']}")
        for kind, n in list(res["status_change_kinds"].items())[:8]:
            print(f"    status {kind}: {n}")
        for c in res["changes"][:20]:
            print(f"    {c['prompt_id']} #{c['sample_index']}: {c['old']['status']}/{c['old']['error_type']} -> "
                  f"{c['new']['status']}/{c['new']['error_type']} {c['new']['message'][:120]!r}")
    print(json.dumps(done.get("total", {})))


if __name__ == "__main__":
    main()
