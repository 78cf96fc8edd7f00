"""Helpers shared by test files (not a test file): the CLI in-process, and probes with literal weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qprobe.probes.models import LinearProbe, MLPProbe


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`qprobe ARGS` in this process: (exit code, stdout, stderr); a QProbeError exits 2."""
    from qprobe.cli.main import main

    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    got = capsys.readouterr()
    return code, got.out, got.err


def hand_probe(path: Path, w: np.ndarray, spec: Any, bias: float = 0.0, mlp: bool = False) -> Path:
    """A probe with literal weights saved at `path` (no training): Q = w . x + bias, or (mlp) a
    one-hidden-layer net of [w, -w] summed."""
    if mlp:
        probe: LinearProbe | MLPProbe = MLPProbe(depth=1, width=2)
        params = {"layers.0.weight": np.stack([w, -w]), "layers.0.bias": np.zeros(2),
                  "layers.1.weight": np.array([[1.0, 1.0]]), "layers.1.bias": np.zeros(1)}
    else:
        probe = LinearProbe()
        params = {"layers.0.weight": w[None, :], "layers.0.bias": np.array([bias])}
    probe._set_learned(params, None, None, {})
    probe.feature_spec_, probe.source_ = spec, {}
    probe.save_pretrained(path)
    return path
