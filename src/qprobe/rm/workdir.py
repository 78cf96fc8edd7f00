"""A training folder: the frozen-trunk cache and the last checkpoint, so a killed run resumes.

    WORK/work.json                  what the folder is for (fingerprint of model, pairs, settings)
    WORK/cache/cache.json           what the cache is for (base weights, token ids, first adapted block)
    WORK/cache/000123.safetensors   pair 123: "chosen", "rejected" = states entering the first
                                    adapted block [T, d]; "chosen_ref", "rejected_ref" = pi_ref's
                                    log-probs of the response tokens [t] (added when a head needs them)
    WORK/checkpoint/state.safetensors   adapters ("adapter.*"), head ("head.*"), AdamW moments
                                        ("optim.<i>.<key>")
    WORK/checkpoint/state.json          step, the per-step losses, AdamW's param_groups

Every file is written atomically (a temp name renamed into place; the checkpoint folder is
swapped whole), and a checkpoint is written after each optimiser step, so a run killed at any
moment resumes after the last completed step: no step is lost and none is applied twice. The
pair order of epoch e is `np.random.default_rng([seed, e]).permutation(P)`, a pure function of
(seed, epoch), so the step number is all the random state a checkpoint needs (the trunk has no
dropout). The fingerprint leaves out the number of epochs: re-running with more epochs continues.

The cache depends only on the base weights, the token ids and the first adapted block, never on
the head or the adapters (pi_ref is the model with adapters off), so one cache folder can serve
every head, seed and learning rate trained or evaluated on the same pairs (`cache_dir=`,
`qprobe rm train|eval --cache DIR`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qprobe.core.files import replace_dir, write_bytes_atomic, write_json_atomic
from qprobe.errors import ConfigError, DataError

WORK_VERSION = 1


def open_workdir(folder: Path, fingerprint: dict[str, Any], name: str = "work.json") -> None:
    """Create `folder` for this fingerprint, or check that it was made for the same one."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = folder / name
    want = {"version": WORK_VERSION, **fingerprint}
    if meta.is_file():
        have = json.loads(meta.read_text())
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        if diff:
            raise ConfigError(f"expected the folder '{folder}' to hold this run's {name[:-5]}, got one made with "
                              f"other {', '.join(diff)}; pass another folder or delete that one")
    else:
        write_json_atomic(meta, want)


class StateCache:
    """Per-pair cached tensors in `folder` (or in memory when `folder` is None), for `fingerprint`."""

    def __init__(self, folder: Path | None, fingerprint: dict[str, Any]) -> None:
        self.folder = folder
        self._mem: dict[int, dict[str, torch.Tensor]] = {}
        if folder is not None:
            open_workdir(folder, fingerprint, "cache.json")

    def _path(self, i: int) -> Path:
        assert self.folder is not None
        return self.folder / f"{i:06d}.safetensors"

    def has(self, i: int) -> bool:
        return i in self._mem if self.folder is None else self._path(i).is_file()

    def put(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        if self.folder is None:
            self._mem[i] = tensors
            return
        from safetensors.torch import save

        write_bytes_atomic(self._path(i), save({k: v.contiguous() for k, v in tensors.items()}))

    def get(self, i: int) -> dict[str, torch.Tensor]:
        if self.folder is None:
            return self._mem[i]
        from safetensors.torch import load_file

        return load_file(str(self._path(i)))  # type: ignore[no-any-return]


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    sd = opt.state_dict()
    tensors = {f"optim.{i}.{k}": torch.as_tensor(v).clone() for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, sd["param_groups"]


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
                    state: dict[str, Any]) -> None:
    """Write folder/checkpoint (adapters + head in `tensors`, the optimiser, `state`) atomically."""
    from safetensors.torch import save_file

    moments, groups = _flatten_optimizer(opt)
    everything = {**{k: v.detach().contiguous() for k, v in tensors.items()}, **moments}

    def build(tmp: Path) -> None:
        save_file(everything, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"version": WORK_VERSION, **state, "param_groups": groups}))

    replace_dir(folder / "checkpoint", build)


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(tensors, state) of folder/checkpoint, or None when there is none yet."""
    ck = folder / "checkpoint"
    if not (ck / "state.json").is_file():
        return None
    from safetensors.torch import load_file

    try:
        state = json.loads((ck / "state.json").read_text())
        tensors = load_file(str(ck / "state.safetensors"))
    except (OSError, ValueError) as exc:
        raise DataError(f"expected a readable checkpoint in '{ck}', got: {exc}; delete it to start over") from exc
    return tensors, state


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": groups})
