"""`RewardModel`: a reward model with a trainable trunk (EX-RM, IM-RM, Q-RM; arXiv 2507.07981).

Estimator contract: `RewardModel(RMConfig(...))` or `RewardModel(head="ex", lr=...)` stores the
hyper-parameters only; `fit(pairs)` loads the model, trains and returns self; learned values end
in `_` (`trunk_`, `head_`, `losses_`, `provenance_`); `rewards(pairs)` gives (r_chosen [P],
r_rejected [P]). Files: `qprobe.rm.io` (`save_rm` / `load_rm`).

Training (`fit`): AdamW (weight decay 0, constant lr) on the adapters and the head;
`batch_pairs` pairs a step, their mean loss; the frozen-bottom states of every sequence (and
pi_ref's log-probs for `im`) are computed once before the first step (`qprobe.rm.workdir`),
then each step runs only the adapted top blocks. With `workdir` the cache and a checkpoint
after every step live there and `fit` resumes from them.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qprobe.errors import ConfigError, NotFittedError
from qprobe.rm.base import Head, Sequence
from qprobe.rm.trunk import Encoded, Trunk, encode_pair
from qprobe.rm.trunk_config import TrunkConfig
from qprobe.rm.workdir import StateCache, load_checkpoint, open_workdir, restore_optimizer, save_checkpoint
from qprobe.tasks.pairs import Pair

SIDES = ("chosen", "rejected")


@dataclass(frozen=True)
class RMConfig(TrunkConfig):
    """Hyper-parameters of a trainable-trunk reward model (one source for Python, CLI and files)."""

    head: str = "ex"
    lr: float = 1e-4
    epochs: int = 1
    batch_pairs: int = 8
    max_response_tokens: int = 256
    max_prompt_tokens: int = 512

    def __post_init__(self) -> None:
        from qprobe.catalog import RM_HEADS

        RM_HEADS.entry(self.head)  # "did you mean" on a typo
        for name in ("epochs", "batch_pairs", "max_response_tokens", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"expected {name} >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"expected a learning rate lr > 0, got {self.lr}")
        self.lora()  # validates top_blocks, r, alpha


def _seconds() -> float:
    return time.perf_counter()


class RewardModel:
    """A reward model whose trunk trains through LoRA adapters (see the module docstring)."""

    def __init__(self, config: RMConfig | None = None, **overrides: Any) -> None:
        self.config = replace(config or RMConfig(), **overrides) if overrides else (config or RMConfig())

    # ------------------------------------------------------------------------------- build
    def build(self, lm: Any = None) -> RewardModel:
        """Load the base model (or take `lm`, a `LoadedLM`) and initialise adapters and head, untrained."""
        from qprobe.catalog import RM_HEADS
        from qprobe.generation.hf_load import load_causal_lm

        c = self.config
        lm = lm if lm is not None else load_causal_lm(c.model, dtype=c.dtype, device=c.device)
        self.trunk_ = Trunk(lm, c.lora(), seed=c.seed)
        g = torch.Generator().manual_seed(c.seed)
        self.head_: Head = RM_HEADS.create(c.head, self.trunk_.hidden_size, g)
        self.head_.to(lm.device)
        self.loss_fn_ = _loss(self.head_.loss)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "trunk_"):
            raise NotFittedError("expected a fitted reward model, got an unfitted one; call fit(pairs) or load_rm(DIR)")

    def encode(self, pairs: list[Pair]) -> list[Encoded]:
        c = self.config
        return [encode_pair(self.trunk_.lm.tokenizer, p, c.max_prompt_tokens, c.max_response_tokens) for p in pairs]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything trained: "adapter.*" (peft's state dict) and "head.*"."""
        self._check_fitted()
        out = {f"adapter.{k}": v for k, v in self.trunk_.adapter_state().items()}
        out.update({f"head.{k}": v.detach().clone() for k, v in self.head_.state_dict().items()})
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.trunk_.load_adapter_state({k[8:]: v for k, v in tensors.items() if k.startswith("adapter.")})
        self.head_.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})

    # ----------------------------------------------------------------------------- rewards
    def _frozen(self, enc: Encoded, have: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The cache entry of one pair: bottom states (and pi_ref's log-probs when the head needs
        them), computing only what `have` (an existing entry) lacks."""
        out = dict(have or {})
        for side in SIDES:
            ids = enc.sequence(side)
            if side not in out:
                out[side] = self.trunk_.bottom_states(ids)  # [T, d]
            if self.head_.needs_reference and f"{side}_ref" not in out:
                with torch.no_grad(), self.trunk_.reference():
                    top = self.trunk_.top_states(out[side])
                    out[f"{side}_ref"] = self.trunk_.logprobs(top, ids, len(enc.prompt))  # [t]
        return out

    def _missing(self, cache: StateCache, i: int) -> bool:
        if not cache.has(i):
            return True
        return self.head_.needs_reference and "chosen_ref" not in cache.get(i)

    def _fill(self, cache: StateCache, encoded: list[Encoded], progress: bool) -> tuple[int, float]:
        """Compute the missing cache entries -> (how many, seconds)."""
        t0 = _seconds()
        todo = [i for i in range(len(encoded)) if self._missing(cache, i)]
        with _bar(len(todo), progress and bool(todo), "rm cache") as bar:
            for i in todo:
                t1 = _seconds()
                cache.put(i, self._frozen(encoded[i], cache.get(i) if cache.has(i) else None))
                bar.advance(1, len(encoded[i].chosen) + len(encoded[i].rejected), _seconds() - t1)
        return len(todo), _seconds() - t0

    def cache_fingerprint(self, encoded: list[Encoded]) -> dict[str, Any]:
        """What a cache folder depends on: base weights, token ids, the first adapted block, dtype."""
        return {"base_sha256": self.trunk_.lm.sha256, "pairs_sha256": _ids_sha256(encoded),
                "first_block": self.trunk_.start, "dtype": self.config.dtype}

    def _reward(self, enc: Encoded, side: str, frozen: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = enc.sequence(side)
        seq = Sequence(self.trunk_.top_states(frozen[side]), ids, len(enc.prompt), self.trunk_, frozen.get(f"{side}_ref"))
        return self.head_.reward(seq)

    def pair_loss(self, enc: Encoded, frozen: dict[str, torch.Tensor]) -> torch.Tensor:
        """The head's loss on one pair, from its cached entry (differentiable in adapters + head)."""
        r_c, r_r = (self._reward(enc, s, frozen) for s in SIDES)
        return self.loss_fn_(r_c[None], r_r[None])  # type: ignore[no-any-return]

    def rewards(self, pairs: list[Pair], progress: bool = False,
                cache_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(r_chosen [P], r_rejected [P]) as float64. `cache_dir` keeps the frozen-trunk entries of
        these pairs for the next model evaluated on them (any head, seed or learning rate)."""
        self._check_fitted()
        encoded = self.encode(pairs)
        cache = None if cache_dir is None else StateCache(Path(cache_dir), self.cache_fingerprint(encoded))
        if cache is not None:
            self._fill(cache, encoded, progress)
        out = np.zeros((len(encoded), 2))
        with torch.no_grad(), _bar(len(encoded), progress, "rm eval") as bar:
            for i, enc in enumerate(encoded):
                t0 = _seconds()
                frozen = self._frozen(enc) if cache is None else cache.get(i)
                out[i] = [float(self._reward(enc, s, frozen)) for s in SIDES]
                bar.advance(1, len(enc.chosen) + len(enc.rejected), _seconds() - t0)
        return out[:, 0], out[:, 1]

    def base_features(self, pairs: list[Pair], progress: bool = False,
                      cache_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(chosen [P, d], rejected [P, d]): the base model's final-norm state at the last token of
        prompt + response (the EX head's input, adapters off): the features of the frozen-trunk
        linear probe, from the same tokens and cache as the trained heads."""
        self._check_fitted()
        encoded = self.encode(pairs)
        cache = StateCache(None if cache_dir is None else Path(cache_dir), self.cache_fingerprint(encoded))
        if cache_dir is not None:
            self._fill(cache, encoded, progress)
        out = np.zeros((2, len(encoded), self.trunk_.hidden_size), dtype=np.float32)
        with torch.no_grad(), self.trunk_.reference(), _bar(len(encoded), progress, "base states") as bar:
            for i, enc in enumerate(encoded):
                t0 = _seconds()
                frozen = self._frozen(enc) if cache_dir is None else cache.get(i)
                for j, side in enumerate(SIDES):
                    out[j, i] = self.trunk_.top_states(frozen[side])[-1].float().cpu().numpy()
                bar.advance(1, len(enc.chosen) + len(enc.rejected), _seconds() - t0)
        return out[0], out[1]

    # --------------------------------------------------------------------------------- fit
    def fit(self, pairs: list[Pair], *, source: str | None = None, workdir: str | Path | None = None,
            cache_dir: str | Path | None = None, progress: bool = False, max_steps: int | None = None,
            lm: Any = None) -> RewardModel:
        """Train on `pairs` (resuming from `workdir` when it holds a checkpoint); the frozen-trunk
        cache lives in `cache_dir` (default `workdir`/cache; another run's on the same pairs may be
        shared); `max_steps` stops after that many steps in all (counting those of earlier runs);
        `lm` reuses a loaded model."""
        if not pairs:
            raise ConfigError("expected at least one preference pair to train on, got none")
        if max_steps is not None and max_steps < 1:
            raise ConfigError(f"expected max_steps >= 1, got {max_steps}")
        c = self.config
        self.build(lm)
        encoded = self.encode(pairs)
        folder = None if workdir is None else Path(workdir)
        if folder is not None:
            open_workdir(folder, self.fingerprint(encoded))
        if cache_dir is None and folder is not None:
            cache_dir = folder / "cache"
        cache = StateCache(None if cache_dir is None else Path(cache_dir), self.cache_fingerprint(encoded))
        n_cached, cache_seconds = self._fill(cache, encoded, progress)

        params = self.trunk_.parameters() + list(self.head_.parameters())
        opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=0.0)
        per_epoch = math.ceil(len(encoded) / c.batch_pairs)
        total = c.epochs * per_epoch
        step, losses = 0, []
        ck = None if folder is None else load_checkpoint(folder)
        if ck is not None:
            tensors, state = ck
            self.load_tensors(tensors)
            restore_optimizer(opt, tensors, state["param_groups"])
            step, losses = int(state["step"]), list(state["losses"])
        stop = total if max_steps is None else min(total, max_steps)
        t0, cpu0, trained = _seconds(), time.process_time(), 0
        with _bar(stop - step, progress and step < stop, "rm train") as bar, _flush_denormals():
            while step < stop:
                epoch, k = divmod(step, per_epoch)
                order = np.random.default_rng([c.seed, epoch]).permutation(len(encoded))
                batch = order[k * c.batch_pairs : (k + 1) * c.batch_pairs]
                t1 = _seconds()
                opt.zero_grad(set_to_none=True)
                total_loss = 0.0
                for i in batch:
                    loss = self.pair_loss(encoded[i], cache.get(int(i))) / len(batch)
                    loss.backward()
                    total_loss += float(loss.detach())
                opt.step()
                step += 1
                trained += len(batch)
                losses.append(total_loss)
                if folder is not None:
                    save_checkpoint(folder, self.tensors(), opt, {"step": step, "losses": losses})
                bar.advance(len(batch), sum(len(encoded[i].chosen) + len(encoded[i].rejected) for i in batch),
                            _seconds() - t1)
        train_seconds, train_cpu = _seconds() - t0, time.process_time() - cpu0
        self.losses_ = losses
        self.steps_ = step
        self.provenance_ = {
            "pairs_source": source, "pairs": len(encoded), "pair_ids_first": [p.id for p in pairs[:3]],
            "truncated": sum(e.cuts for e in encoded), "steps": step, "steps_planned": total,
            "finished": step >= total, "cache_seconds": round(cache_seconds, 3), "cached_pairs_this_run": n_cached,
            "train_seconds_this_run": round(train_seconds, 3),
            "seconds_per_pair": round(train_seconds / trained, 4) if trained else None,  # wall: counts pauses, others' load
            "cpu_seconds_per_pair": round(train_cpu / trained, 4) if trained else None,  # this process, all its threads
            "final_loss": losses[-1] if losses else None,
        }
        return self

    def fingerprint(self, encoded: list[Encoded]) -> dict[str, Any]:
        """What a training folder must agree on to be resumed (everything but the epochs)."""
        settings = {k: v for k, v in asdict(self.config).items() if k not in ("epochs", "model", "device")}
        return {"base_sha256": self.trunk_.lm.sha256, "pairs_sha256": _ids_sha256(encoded), "settings": settings}


def _ids_sha256(encoded: list[Encoded]) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps([[e.prompt, e.chosen, e.rejected] for e in encoded]).encode()).hexdigest()


def _loss(name: str) -> Any:
    from qprobe.catalog import LOSSES

    return LOSSES.get(name)


@contextlib.contextmanager
def _flush_denormals() -> Iterator[None]:
    """Denormal floats flushed to zero while training, then off again (torch's default; it has no
    getter for the state before). Once the loss is near 0 (an easy pair set at a high learning
    rate), the backward pass fills with denormals, which x86 CPUs compute many times slower
    (benchmarks/RESULTS.md, EX-RM vs IM-RM: the cost). The values flushed are below 1.2e-38."""
    before = torch.set_flush_denormal(True)  # True when the CPU supports it
    try:
        yield
    finally:
        if before:
            torch.set_flush_denormal(False)


def _bar(total: int, enabled: bool, label: str) -> Any:
    from qprobe.collection.progress import CollectProgress

    return CollectProgress(total, 0, enabled=enabled, label=label, unit="pairs")
