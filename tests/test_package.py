from __future__ import annotations

import subprocess
import sys

import qprobe


def test_all_names_resolve() -> None:
    for name in qprobe.__all__:
        assert getattr(qprobe, name) is not None, name


def test_all_is_complete_for_the_public_modules() -> None:
    """Every public class or function of the modules users touch is exported at the top."""
    import qprobe.policy.select as policy
    import qprobe.probes as probes
    import qprobe.store as store

    for mod, names in ((probes, ["LinearProbe", "MLPProbe", "Probe", "TrainConfig"]),
                       (store, store.__all__), (policy, ["QProbePolicy", "PolicyConfig"])):
        for name in names:
            assert name in qprobe.__all__, f"{mod.__name__}.{name} is missing from qprobe.__all__"


def test_import_is_light() -> None:
    code = ("import sys, qprobe, qprobe.metrics, qprobe.probes, qprobe.store; "
            "heavy = [m for m in ('torch', 'llama_cpp', 'transformers', 'openai', 'vllm', 'matplotlib', 'scipy') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_public_equations_live_where_documented() -> None:
    assert qprobe.LOSSES.names() == ["bt", "ce", "dpo", "listwise", "margin_bt", "mse", "pg"]
    assert qprobe.pass_at_k(5, 2, 2) == 1 - 3 / 10
