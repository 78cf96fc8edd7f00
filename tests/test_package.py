from __future__ import annotations

import subprocess
import sys

import qprobe


def test_all_names_resolve() -> None:
    for name in qprobe.__all__:
        assert getattr(qprobe, name) is not None, name


def public_classes(module_name: str) -> list[str]:
    """A sub-package's classes named in its `__all__`, or every public class a module defines."""
    import importlib
    import inspect

    mod = importlib.import_module(module_name)
    if hasattr(mod, "__path__") and hasattr(mod, "__all__"):
        return [n for n in mod.__all__ if inspect.isclass(getattr(mod, n))]
    return [n for n, v in vars(mod).items()
            if inspect.isclass(v) and v.__module__ == module_name and not n.startswith("_")]


def test_all_is_complete_for_the_public_modules() -> None:
    """Derived, not hand-picked: a module (or sub-package) that exports anything at the top exports
    all of its public classes, e.g. `qprobe.policy.select`'s Selection and Candidate beside QProbePolicy."""
    modules = sorted(set(qprobe._EXPORTS.values()))
    assert "qprobe.policy.select" in modules and "qprobe.probes" in modules
    missing = [f"{m}.{n}" for m in modules for n in public_classes(m) if n not in qprobe.__all__]
    assert missing == [], f"missing from qprobe.__all__: {missing}"


def test_the_derivation_sees_a_missing_export() -> None:
    assert {"Selection", "Candidate", "PolicyConfig", "QProbePolicy"} <= set(public_classes("qprobe.policy.select"))
    assert "Shard" not in public_classes("qprobe.store")  # a sub-package: its __all__ decides


def test_import_is_light() -> None:
    code = ("import sys, qprobe, qprobe.metrics, qprobe.probes, qprobe.store; "
            "heavy = [m for m in ('torch', 'llama_cpp', 'transformers', 'openai', 'vllm', 'matplotlib', 'scipy') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_public_equations_live_where_documented() -> None:
    assert qprobe.LOSSES.names() == ["bt", "ce", "dpo", "listwise", "margin_bt", "mse", "pg"]
    assert qprobe.pass_at_k(5, 2, 2) == 1 - 3 / 10
