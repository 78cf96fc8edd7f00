"""Kill a real `qprobe collect` with SIGKILL at random moments; resumes must lose nothing."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import numpy as np

from qprobe.store import Run

ARGS = ["collect", "--task", "fake", "--backend", "fake", "--split", "train", "--n", "4",
        "--task-option", "size=24", "--backend-option", "delay=0.04", "--feature", "-1:last",
        "--feature", "3:mean", "--shard-samples", "6", "--no-progress"]


def run_cli(cmd: list[str], out: Path, kill_after: float | None) -> int | None:
    proc = subprocess.Popen([*cmd, *ARGS, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kill_after is None:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        return 0
    try:
        proc.wait(timeout=kill_after)
        return proc.returncode  # finished before the kill
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def rows_in_order(run: Run) -> list[dict]:
    t = run.table().take(run.sorted_order())
    return t.to_pylist()


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path: Path, qprobe_cmd: list[str]) -> None:
    reference = tmp_path / "reference"
    run_cli(qprobe_cmd, reference, None)
    ref = Run.open(reference)
    assert len(ref) == 96

    rng = np.random.default_rng(7)
    crashed = tmp_path / "crashed"
    kills = 0
    for _ in range(40):
        rc = run_cli(qprobe_cmd, crashed, kill_after=float(rng.uniform(0.15, 1.5)))
        if (crashed / "manifest.json").exists():
            # Whatever the moment of the kill, the run opens and its shards are whole.
            partial = Run.open(crashed)
            t = partial.table(["prompt_id", "sample_index"])
            pairs = list(zip(t.column("prompt_id").to_pylist(), t.column("sample_index").to_pylist(), strict=False))
            assert len(pairs) == len(set(pairs))
            for key in partial.feature_keys:
                assert partial.features(key).shape[0] == len(partial)
        if rc == 0:
            break
        kills += 1
    else:
        run_cli(qprobe_cmd, crashed, None)
    assert kills >= 5, "the kills should land mid-collection"
    run_cli(qprobe_cmd, crashed, None)  # a finished run: re-running adds nothing

    got = Run.open(crashed)
    assert rows_in_order(got) == rows_in_order(ref)
    for key in ref.feature_keys:
        np.testing.assert_array_equal(got.features(key, got.sorted_order()), ref.features(key, ref.sorted_order()))
    assert got.manifest["complete"] is True
