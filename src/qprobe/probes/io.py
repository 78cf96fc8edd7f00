"""Probe directories: config.json + model.safetensors + README.md (the Hugging Face Hub mixin layout).

Format version 1. config.json holds the architecture and its hyper-parameters, the loss and its
options, the training config, whether features are standardised, the feature spec the probe
expects and where it was trained; model.safetensors holds the weights ("layers.{i}.weight",
"layers.{i}.bias") and the standardisation statistics ("standardize.mean", "standardize.scale").
No pickle. Writes go to a temporary directory beside the target, which is swapped into place
(`qprobe.core.files.replace_dir`).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qprobe.core.files import replace_dir
from qprobe.errors import ConfigError, DataError, require
from qprobe.features.spec import FeatureSpec

FORMAT_VERSION = 1
CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qprobe")
    except PackageNotFoundError:
        return "unknown"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


def probe_config(probe: Any) -> dict[str, Any]:
    from qprobe.probes.train import TrainConfig

    probe._check_fitted()
    train = probe.train if probe.train is not None else TrainConfig()
    spec = probe.feature_spec_
    return _jsonable({
        "format_version": FORMAT_VERSION,
        "qprobe_version": _version(),
        "architecture": probe.architecture,
        "hyper_parameters": probe.hyper_parameters(),
        "n_features_in": probe.n_features_in_,
        "standardize": probe.standardized_,
        "loss": probe.loss,
        "loss_options": probe.loss_options,
        "recipe": train.recipe,
        "train": train.to_dict(),
        "seed": probe.seed,
        "feature_spec": None if spec is None else spec.to_dict(),
        "source": probe.source_,
        "history": {k: v for k, v in probe.history_.items() if k != "epoch_loss"},
    })


def model_card(config: dict[str, Any]) -> str:
    spec = config.get("feature_spec")
    feats = FeatureSpec.from_dict(spec).describe() if spec else "unspecified features"
    source = config.get("source") or {}
    lines = [
        "---", "library_name: qprobe", "tags:", "- q-probe", "- reward-model", "---", "",
        f"# Q-probe ({config['architecture']}, loss `{config['loss']}`)", "",
        "A probe that scores a language model's completions from its hidden states; sample k "
        "completions and keep the best by softmax(Q/beta) (Li et al. 2024, arXiv:2402.14688).", "",
        f"- features: {feats}",
        f"- architecture: {config['architecture']} {config['hyper_parameters'] or ''}".rstrip(),
        f"- loss: {config['loss']} {config['loss_options'] or ''}".rstrip(),
        f"- recipe: {config['recipe']}; standardised features: {config['standardize']}; seed {config['seed']}",
    ]
    if source.get("run"):
        lines.append(f"- trained on run: `{source['run']}` (feature `{source.get('feature', '?')}`)")
    for name, value in (source.get("validation") or {}).items():
        lines.append(f"- validation {name}: {value:.4f}" if isinstance(value, float) else f"- validation {name}: {value}")
    usage = ["q = probe.score(features)  # [N, d] -> [N]"]
    if config["architecture"] == "token":
        usage += ["z = probe.score_tokens(states)  # one completion's token states [t, d] -> [t]",
                  "q = probe.sequence_scores([states, ...], aggregation='mean')  # or 'min', 'last'"]
    if (source.get("pairs") or {}).get("n_pairs"):
        p = source["pairs"]
        lines.append(f"- trained on {p['n_pairs']} within-prompt pairs of {p['n_prompts']} prompts "
                     f"(per prompt: {p['per_prompt']}, seed {p['seed']})")
    lines += ["", "```python", "from qprobe.probes import Probe", "probe = Probe.from_pretrained(PATH)", *usage, "```", ""]
    return "\n".join(lines)


def save_probe(probe: Any, path: str | os.PathLike[str]) -> None:
    """Write the probe directory atomically: a complete new directory replaces any old one."""
    from safetensors.numpy import save

    config = probe_config(probe)
    tensors = dict(probe.params_)
    if probe.mean_ is not None:
        tensors["standardize.mean"], tensors["standardize.scale"] = probe.mean_, probe.scale_
    path = Path(path)
    if path.exists() and not (path / CONFIG_NAME).is_file() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"expected a new directory or an existing probe for --out, got '{path}' which holds other files")
    weights = save(tensors, metadata={"format": "np"})

    def build(tmp: Path) -> None:
        (tmp / WEIGHTS_NAME).write_bytes(weights)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / CARD_NAME).write_text(model_card(config), encoding="utf-8")

    replace_dir(path, build)


HUB_PREFIX = "hf://"


def parse_hub(name: str) -> tuple[str, str | None]:
    """'hf://org/name@revision' -> ('org/name', 'revision'); the revision is optional (a branch, tag or commit)."""
    rest = name[len(HUB_PREFIX):]
    repo, _, revision = rest.partition("@")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo) or (_ and not revision):
        raise ConfigError(f"expected a Hub probe as hf://ORG/NAME or hf://ORG/NAME@REVISION, got '{name}'")
    return repo, revision or None


def _resolve(path: str | os.PathLike[str], local_files_only: bool = False) -> tuple[Path, dict[str, Any]]:
    """A local probe directory as given, or `hf://org/name[@revision]` downloaded through
    huggingface_hub's own cache (`snapshot_download`), or a probe shipped in the package by name
    (`qprobe.probes.pretrained`; an existing local path of that name wins); returns the folder and
    where it came from (for the Hub: repo, revision asked, commit got)."""
    from qprobe.probes.pretrained import PRETRAINED, pretrained_path

    text = str(path)
    if not text.startswith(HUB_PREFIX):
        p = Path(path)
        if not p.exists():
            shipped = pretrained_path(text)
            if shipped is not None:  # a local path of that name would have won
                return shipped, {"pretrained": text}
            raise DataError(f"expected a probe directory, got '{text}' which does not exist; pass the --out of "
                            f"`qprobe train`, a Hub probe as {HUB_PREFIX}ORG/NAME[@REVISION], or a shipped probe "
                            f"({', '.join(PRETRAINED)})")
        return p, {}
    repo, revision = parse_hub(text)
    hub = require("huggingface_hub", "hub")
    try:
        folder = Path(hub.snapshot_download(repo_id=repo, revision=revision, local_files_only=local_files_only,
                                            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME]))
    except Exception as exc:  # network, auth, missing repo or revision, not cached offline: one clear line
        where = "in the local cache (local_files_only)" if local_files_only else "on the Hub"
        raise DataError(f"expected the probe {repo} at revision {revision or 'main'} {where}, got "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    return folder, {"repo": repo, "revision": revision, "commit": folder.name}


def load_probe(path: str | os.PathLike[str], architectures: Mapping[str, Callable[..., Any]],
               local_files_only: bool = False) -> Any:
    """Rebuild a probe from its directory or `hf://org/name[@revision]` (`local_files_only`: the Hub
    cache only, no network) with the class its config names among `architectures` (name -> probe
    class, `qprobe.probes.models.architectures`); corrupt files raise DataError."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from qprobe.probes.train import TrainConfig

    root, hub_source = _resolve(path, local_files_only)
    cpath, wpath = root / CONFIG_NAME, root / WEIGHTS_NAME
    if not (cpath.is_file() and wpath.is_file()):
        raise DataError(
            f"expected a probe directory with {CONFIG_NAME} and {WEIGHTS_NAME}, got '{path}'; "
            "pass the --out directory of `qprobe train`"
        )
    try:
        config = json.loads(cpath.read_text())
        if config.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"expected probe format version {FORMAT_VERSION}, got {config.get('format_version')!r} in "
                f"{cpath}; upgrade qprobe or retrain the probe"
            )
        arch = config["architecture"]
        if arch not in architectures:
            raise DataError(f"expected an architecture in {sorted(architectures)}, got {arch!r} in {cpath}")
        probe = architectures[arch](
            loss=config["loss"], loss_options=config["loss_options"], train=TrainConfig.from_dict(config["train"]),
            standardize=config["standardize"], seed=config["seed"], **config["hyper_parameters"],
        )
        spec = FeatureSpec.from_dict(config["feature_spec"]) if config["feature_spec"] else None
        d, standardized = int(config["n_features_in"]), bool(config["standardize"])
        tensors = load_file(str(wpath))
    except DataError:
        raise
    except (ValueError, KeyError, TypeError, OSError, SafetensorError, ConfigError) as exc:
        raise DataError(f"expected a valid probe in '{path}', got a corrupt or incompatible file ({exc}); retrain or re-download it") from None
    expected: dict[str, tuple[int, ...]] = {}
    for i, (out, fan_in) in enumerate(probe.layer_shapes(d)):
        expected[f"layers.{i}.weight"], expected[f"layers.{i}.bias"] = (out, fan_in), (out,)
    if standardized:
        expected["standardize.mean"] = expected["standardize.scale"] = (d,)
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        raise DataError(f"expected tensors {expected} in {wpath}, got {got}; the probe files do not match its config")
    params = {k: v for k, v in tensors.items() if k.startswith("layers.")}
    probe._set_learned(params, tensors.get("standardize.mean"), tensors.get("standardize.scale"),
                       config.get("history") or {})
    probe.feature_spec_ = spec
    probe.source_ = config.get("source") or {}
    if hub_source.get("pretrained"):
        probe.source_ = {**probe.source_, "pretrained": hub_source["pretrained"]}
    elif hub_source:
        probe.source_ = {**probe.source_, "hub": hub_source}
    return probe


def push_probe(probe: Any, repo_id: str, *, private: bool = False, token: str | None = None,
               commit_message: str = "Upload Q-probe") -> str:
    """Save to a temporary directory and upload it as a Hub model repo (`org/name` or
    `hf://org/name`) with `HfApi.upload_folder`; returns `hf://org/name@COMMIT`, the pinned name
    that loads exactly this upload."""
    if repo_id.startswith(HUB_PREFIX):
        repo_id, revision = parse_hub(repo_id)
        if revision:
            raise ConfigError(f"expected hf://ORG/NAME to push to (the revision is the new commit), got '@{revision}'")
    hub = require("huggingface_hub", "hub")
    with tempfile.TemporaryDirectory() as tmp:
        save_probe(probe, Path(tmp) / "probe")
        api = hub.HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(Path(tmp) / "probe"), repo_id=repo_id, repo_type="model",
                                 commit_message=commit_message)
    commit = getattr(info, "oid", None)
    return f"{HUB_PREFIX}{repo_id}" + (f"@{commit}" if commit else "")
