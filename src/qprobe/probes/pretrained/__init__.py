"""Probes shipped inside the package, loaded by name: `Probe.from_pretrained("default-code")`,
`qprobe select --probe default-code`, `qprobe eval --probe default-code`.

A name resolves in this order: an existing local path of that name (a folder the user made wins),
then `hf://ORG/NAME[@REVISION]` (the Hub), then a name below; anything else is an error that lists
these names. Each probe is a few kB: config.json + model.safetensors + README.md (its card).

- `default-code`: the default model's (Qwen2.5-Coder-0.5B-Instruct GGUF, sha256 1d9614638d18...)
  layer-18 mean-pooled states; a Q-RM token probe (linear, margin BT beta 0.2, gamma 2.0) on the
  9,884 within-problem (pass, fail) pairs of the 464 MBPP-train problems of runs/repro/mbpp-train.
  Chosen by 5-fold CV over those training problems (expected return of best-of-4): token/margin_bt
  0.376, ce 0.365, mse 0.364, pg 0.360 (pass@1 0.335, pass@4 0.502); layer 18 mean pooling is the
  feature the reproduction chose by CV (benchmarks/repro/REPORT.md). Made with
  `qprobe train --pairs-from runs/repro/mbpp-train --feature L18_mean --out src/qprobe/probes/pretrained/default-code`.
"""

from __future__ import annotations

from pathlib import Path

PRETRAINED = {
    "default-code": "Q-RM token probe for the default model (layer 18, mean), trained on 464 MBPP-train problems",
}


def pretrained_path(name: str) -> Path | None:
    """The folder of a shipped probe, or None when `name` is not one."""
    if name not in PRETRAINED:
        return None
    return Path(__file__).resolve().parent / name
