"""Iterative Q-probing (the Q-probe paper's "self-improving spiral", expert-iteration style).

Round t (0-based), in WORK/round{t}/:
  1. collect `k` samples of every pool problem (train split) and of every held-out problem with the
     current policy (round 0: the base model), features from the frozen base model: `train/`, `test/`
     are ordinary runs (`qprobe.collection.collect`, resumable);
  2. the probe of this round: the one trained on round t-1's samples (round 0: `probe`, or one
     trained on round 0's samples when none is given);
  3. report on the held-out run: pass@1 (a random sample of the policy), the probe policy's return
     (the exact expected reward of best-of-k by the probe, softmax(Q/beta)) and pass@k, with 95%
     intervals over problems;
  4. pick one completion per pool problem with that probe (argmax, beta 0: the Q-probe policy's
     choice among the k collected), fine-tune the adapters on the picks, supervised: the REINFORCE
     loss with r_t = 1, i.e. -mean log pi over the picks' action tokens (`sft_epochs` passes, batches
     of `batch`, AdamW);
  5. retrain the probe on this round's training samples (`probe/`), the next round's probe.
A round is done once `round{t}/done.json` is written (adapters + optimiser in `round{t}/checkpoint`);
a restart resumes at the first round not done (the collections resume inside it).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qprobe.core.files import write_json_atomic
from qprobe.errors import ConfigError
from qprobe.rm.trunk_config import TrunkConfig


@dataclass(frozen=True)
class IterConfig(TrunkConfig):
    """Iterative Q-probing (one source for Python, the CLI and work.json)."""

    task: str = "mbpp"
    task_options: dict[str, Any] = field(default_factory=dict)
    split: str = "train"
    pool: int = 200
    eval_split: str = "test"
    eval_size: int = 100
    k: int = 8
    rounds: int = 2
    feature: str = "-1:last"
    probe: str | None = None  # round 0's probe (default: trained on round 0's samples)
    probe_loss: str = "pg"
    beta: float = 0.0
    temperature: float = 1.0
    max_new_tokens: int = 128
    sft_epochs: int = 1
    batch: int = 8
    lr: float = 1e-4
    sampler: str = "transformers"
    gguf: str | None = None

    def __post_init__(self) -> None:
        from qprobe.features.spec import FeatureRequest
        from qprobe.learn.policy import SAMPLERS

        for name in ("pool", "eval_size", "k", "rounds", "max_new_tokens", "sft_epochs", "batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"expected {name.replace('_', '-')} >= 1, got {getattr(self, name)}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"expected --sampler in {list(SAMPLERS)}, got '{self.sampler}'")
        if not (self.lr > 0 and math.isfinite(self.lr)) or self.beta < 0 or self.temperature <= 0:
            raise ConfigError(f"expected lr > 0, beta >= 0 and temperature > 0, got {self.lr}, {self.beta}, "
                              f"{self.temperature}")
        if FeatureRequest.parse(self.feature).embedder:
            raise ConfigError(f"expected a hidden-state feature LAYER:POOLING, got '{self.feature}'")

    def fingerprint(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("rounds", "device")}


def _collect(cfg: IterConfig, policy: Any, out: Path, split: str, limit: int, adapter: str,
             progress: bool) -> Any:
    from qprobe.collection.collect import CollectConfig, collect
    from qprobe.generation.base import SamplingConfig

    sampling = SamplingConfig(temperature=cfg.temperature, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
                              seed=cfg.seed)
    if cfg.sampler == "llamacpp":  # the lora branch's back-end option; its features stay the base model's
        opts: dict[str, Any] = {} if adapter == "base" else {"lora": adapter}
        cc = CollectConfig(task=cfg.task, split=split, out=out, n=cfg.k, backend="llamacpp", model=cfg.gguf,
                           features=(cfg.feature,), sampling=sampling, limit=limit, task_options=cfg.task_options,
                           backend_options=opts)
        return collect(cc, progress=progress)
    cc = CollectConfig(task=cfg.task, split=split, out=out, n=cfg.k, backend="transformers", features=(cfg.feature,),
                       sampling=sampling, limit=limit, task_options=cfg.task_options,
                       backend_options={"adapter": adapter})
    with policy.base():
        return collect(cc, progress=progress, backend=policy.collect_backend())


def train_probe(cfg: IterConfig, run: Any) -> Any:
    """A linear probe (loss `probe_loss`) on the run's feature, recording its training prompts."""
    from qprobe.evaluation.evaluate import RunData
    from qprobe.probes.models import LinearProbe

    data = RunData.load(run)
    key = data.run.feature_keys[0]
    names, codes = np.unique(data.prompt_ids.astype(str), return_inverse=True)
    hashes = sorted(set(data.prompt_hashes().values()))
    source = {"run": str(data.run.path), "feature": key,
              "train_prompts": {"n": len(hashes), "hash": "sha256[:16] of the prompt text", "hashes": hashes}}
    return LinearProbe(loss=cfg.probe_loss, seed=cfg.seed).fit(data.features(key), data.rewards, codes,
                                                               spec=data.run.feature_spec(key), source=source)


def held_out_report(run: Any, probe: Any, k: int, beta: float) -> dict[str, Any]:
    """pass@1, the probe policy's return at k and pass@k on a run, each with a 95% interval over problems
    and its per-problem values (for paired comparisons of rounds)."""
    from qprobe.evaluation.evaluate import (
        RunData,
        mean_reward_values,
        method_result,
        pass_at_k_values,
        probe_scores,
        probe_values,
    )

    data = RunData.load(run)
    out = {}
    for name, per in (("pass@1", mean_reward_values(data)),
                      (f"probe@{k}", probe_values(data, probe_scores(data, probe), k, beta)),
                      (f"pass@{k}", pass_at_k_values(data, k))):
        m = method_result(name, per, rng=np.random.default_rng(0))
        out[name] = m.to_json()
    return out


def picks(run: Any, probe: Any, beta: float, rng: np.random.Generator) -> list[dict[str, Any]]:
    """One row of the run per prompt, drawn by softmax(Q/beta) of the probe (argmax at beta 0)."""
    from qprobe.evaluation.evaluate import RunData, probe_scores
    from qprobe.metrics import selection_probs

    data = RunData.load(run)
    q = probe_scores(data, probe)  # [N]
    table = data.run.table().to_pylist()
    out = []
    for pid in data.prompts():
        idx = np.nonzero(data.prompt_ids == pid)[0]
        j = idx[int(rng.choice(len(idx), p=selection_probs(q[idx], beta)))]
        out.append(table[int(data.rows[j])])
    return out


def fine_tune(cfg: IterConfig, policy: Any, optimizer: Any, rows: list[dict[str, Any]], prompts: dict[str, Any],
              round_index: int) -> dict[str, Any]:
    """Supervised steps on the picked rows: the REINFORCE loss with r_t = 1 (-mean log pi)."""
    from qprobe.core.types import Completion
    from qprobe.learn.reinforce import reinforce_loss

    rollouts = [policy.rollout(prompts[r["prompt_id"]], r["prompt"],
                               Completion(r["completion"], int(r["n_tokens"]), r["finish_reason"], int(r["seed"])))
                for r in rows]
    losses = []
    for epoch in range(cfg.sft_epochs):
        order = np.random.default_rng([cfg.seed, round_index, epoch]).permutation(len(rollouts))
        for start in range(0, len(order), cfg.batch):
            batch = [rollouts[int(i)] for i in order[start : start + cfg.batch]]
            n_tokens = sum(b.n_actions for b in batch)
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for b in batch:
                part = reinforce_loss([policy.logprobs(b)], [np.ones(b.n_actions)], n_tokens)
                part.backward()
                total += float(part.detach())
            optimizer.step()
            losses.append(total)
    return {"steps": len(losses), "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def run_iterate(cfg: IterConfig, workdir: str | Path, *, lm: Any = None, progress: bool = False,
                callback: Any = None) -> list[dict[str, Any]]:
    """Run or resume the rounds in `workdir`; -> one report per round done."""
    import torch

    from qprobe.catalog import TASKS
    from qprobe.generation.hf_load import load_causal_lm
    from qprobe.learn.policy import Policy
    from qprobe.probes.models import Probe
    from qprobe.rm.trunk import Trunk
    from qprobe.rm.workdir import load_checkpoint, open_workdir, restore_optimizer, save_checkpoint

    folder = Path(workdir)
    open_workdir(folder, {"iterate": json.loads(json.dumps(cfg.fingerprint(), default=str))})
    task = TASKS.create(cfg.task, **cfg.task_options)
    prompts = {p.id: p for p in task.prompts(cfg.split)[: cfg.pool]}
    lm = lm if lm is not None else load_causal_lm(cfg.model, dtype=cfg.dtype, device=cfg.device)
    trunk = Trunk(lm, cfg.lora(), seed=cfg.seed)
    policy = Policy(trunk, cfg.sampler, gguf=cfg.gguf, workdir=folder)
    optimizer = torch.optim.AdamW(trunk.parameters(), lr=cfg.lr, weight_decay=0.0)
    reports: list[dict[str, Any]] = []
    probe = None if cfg.probe is None else Probe.from_pretrained(cfg.probe)
    try:
        for t in range(cfg.rounds):
            here = folder / f"round{t}"
            if (here / "done.json").is_file():
                reports.append(json.loads((here / "done.json").read_text()))
                probe = Probe.from_pretrained(here / "probe")
                ck = load_checkpoint(here)
                assert ck is not None  # written before done.json
                trunk.load_adapter_state({k[8:]: v for k, v in ck[0].items() if k.startswith("adapter.")})
                restore_optimizer(optimizer, ck[0], ck[1]["param_groups"])
                continue
            t0 = time.perf_counter()
            adapter = "base" if t == 0 else str(folder / f"round{t - 1}" / "checkpoint")
            if cfg.sampler == "llamacpp" and t > 0:
                from qprobe.rm.gguf_adapter import export_gguf_lora

                adapter = str(export_gguf_lora(trunk, here / "adapter.gguf", base_gguf=cfg.gguf))
            train_run = _collect(cfg, policy, here / "train", cfg.split, cfg.pool, adapter, progress)
            test_run = _collect(cfg, policy, here / "test", cfg.eval_split, cfg.eval_size, adapter, progress)
            if probe is None:  # round 0 without a given probe: one trained on the base model's samples
                probe = train_probe(cfg, train_run)
            report: dict[str, Any] = {"round": t, "held_out": held_out_report(test_run, probe, cfg.k, cfg.beta)}
            chosen = picks(train_run, probe, cfg.beta, np.random.default_rng([cfg.seed, t]))
            report["picked_reward"] = float(np.mean([r["reward"] or 0.0 for r in chosen]))
            report["sft"] = fine_tune(cfg, policy, optimizer, chosen, prompts, t)
            probe = train_probe(cfg, train_run)
            probe.save_pretrained(here / "probe")
            save_checkpoint(here, {f"adapter.{k}": v for k, v in trunk.adapter_state().items()}, optimizer,
                            {"step": t + 1})
            report["seconds"] = round(time.perf_counter() - t0, 3)
            write_json_atomic(here / "done.json", report)
            reports.append(report)
            if callback is not None:
                callback(report)
    finally:
        policy.close()
    return reports
