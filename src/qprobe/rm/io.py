"""Reward-model folders: config.json + model.safetensors (format version 1, no pickle).

config.json: the kind ("qprobe-reward-model"), the head and its loss, the hyper-parameters
(`RMConfig`), the base model (what was named, the sha256 of its weights, dtype), the adapter
configuration (peft LoRA: r, alpha, the adapted blocks and modules) and the provenance (pairs
source and counts, truncations, steps, timings), and the per-step losses. model.safetensors: "adapter.*" (peft's
adapter state dict) and "head.*". `load_rm` rebuilds the trunk on the base model and refuses,
in one line, a model whose weights hash differs from the one trained on.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from qprobe.core.files import write_bytes_atomic, write_text_atomic
from qprobe.errors import ConfigError, DataError, SpecMismatchError
from qprobe.rm.model import RewardModel, RMConfig

FORMAT_VERSION = 1
KIND = "qprobe-reward-model"
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def rm_config(rm: RewardModel) -> dict[str, Any]:
    rm._check_fitted()
    lm = rm.trunk_.lm
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("qprobe")
    except PackageNotFoundError:
        ours = "unknown"
    return {
        "format_version": FORMAT_VERSION, "kind": KIND, "qprobe_version": ours,
        "head": rm.config.head, "loss": rm.head_.loss, "config": asdict(rm.config),
        "base_model": {"name": lm.name, "sha256": lm.sha256, "dtype": lm.dtype},
        "adapter": rm.trunk_.adapter_config(),
        "provenance": getattr(rm, "provenance_", {}),
        "losses": getattr(rm, "losses_", []),
    }


def save_rm(rm: RewardModel, path: str | os.PathLike[str]) -> None:
    """Write model.safetensors, then config.json, into the folder `path`, each file atomically; other
    entries of the folder (the training folder `work/` of `qprobe rm train`) stay."""
    from safetensors.torch import save

    config = rm_config(rm)
    tensors = {k: v.contiguous() for k, v in rm.tensors().items()}
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(folder / WEIGHTS_NAME, save(tensors, metadata={"format": "pt", "kind": KIND}))
    write_text_atomic(folder / CONFIG_NAME, json.dumps(config, indent=2))


def read_rm_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    folder = Path(path)
    f = folder / CONFIG_NAME
    if not f.is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise DataError(f"expected a reward-model folder with {CONFIG_NAME} and {WEIGHTS_NAME} at '{folder}', "
                        "got none; train one with `qprobe rm train --out DIR`")
    config = json.loads(f.read_text())
    if config.get("kind") != KIND or config.get("format_version") != FORMAT_VERSION:
        raise DataError(f"expected a {KIND} folder of format version {FORMAT_VERSION} at '{folder}', got "
                        f"kind {config.get('kind')!r} version {config.get('format_version')!r}")
    return config  # type: ignore[no-any-return]


def load_rm(path: str | os.PathLike[str], model: str | None = None, device: str | None = None) -> RewardModel:
    """The reward model saved at `path`, on its base model (or `model`, which must be the same weights)."""
    from safetensors.torch import load_file

    from qprobe.generation.hf_load import load_causal_lm

    config = read_rm_config(path)
    try:
        cfg = RMConfig(**{**config["config"], **({"device": device} if device else {})})
    except TypeError as exc:
        raise DataError(f"expected reward-model settings of this qprobe version in '{path}', got: {exc}") from exc
    base = config["base_model"]
    lm = load_causal_lm(model if model is not None else base["name"], dtype=cfg.dtype, device=cfg.device)
    if lm.sha256 != base["sha256"]:
        raise SpecMismatchError(
            f"expected the base model this reward model was trained on (sha256 {base['sha256'][:12]}, "
            f"'{base['name']}'), got '{lm.name}' (sha256 {lm.sha256[:12]}); pass --model with the original weights")
    rm = RewardModel(cfg)
    rm.build(lm)
    if rm.trunk_.adapter_config()["target_modules"] != config["adapter"]["target_modules"]:
        raise ConfigError(f"expected the adapted modules {config['adapter']['target_modules'][:2]}..., got "
                          f"{rm.trunk_.adapter_config()['target_modules'][:2]}...")
    rm.load_tensors(load_file(str(Path(path) / WEIGHTS_NAME)))
    rm.losses_ = list(config.get("losses", []))
    rm.provenance_ = dict(config.get("provenance", {}))
    rm.steps_ = int(rm.provenance_.get("steps", 0))
    return rm
