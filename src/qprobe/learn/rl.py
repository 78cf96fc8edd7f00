"""The REINFORCE loop: sample, reward, one LoRA step, checkpoint; evaluate every E steps.

    WORK/work.json                   the run's fingerprint (the config without steps and device)
    WORK/checkpoint/                 adapters + AdamW moments (state.safetensors), and state.json:
                                     step, the data order, the log rows, every rollout's raw reward
    WORK/log.jsonl                   one row a step: step, reward, oracle, tokens, seconds (parts)
    WORK/samples/step000007.jsonl    the rollouts of step 7 with their probe reward and oracle verdict
    WORK/evals/step000025.json       greedy and sampled pass@1 on the fixed held-out set
    WORK/hacking.json                rollouts whose reward is high while the oracle says fail

A step is: a batch of `batch` prompts of the pool (epoch e's order is
`np.random.default_rng([seed, e]).permutation(pool)`, dropping the last incomplete batch), one
sample each at temperature 1 (seed `sample_seed(seed, prompt_id, step)`), the oracle's verdict of
every rollout (for the log and the hacking report, whatever the reward), the reward's raw values
Z, `token_rewards(Z)`, the loss of `reinforce_loss` backpropagated one rollout at a time, one AdamW
step. Every random choice is a pure function of (seed, step) (the trunk has no dropout), so the
step is all the random state a checkpoint needs: a run killed at any moment resumes after its last
completed step, and ends with the same adapters as an uninterrupted run (on the transformers
sampler; llama.cpp's batched decoding may round differently across restarts). The samples file and
the log are written before the checkpoint that counts the step, so a resumed step rewrites them.

"High" reward (hacking report): a rollout's sequence value at or above the `hack_quantile` of every
rollout's value so far, while the oracle says fail. For a terminal oracle reward nothing is flagged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qprobe.core.files import write_json_atomic, write_text_atomic
from qprobe.errors import ConfigError, DataError
from qprobe.generation.base import SamplingConfig, sample_seed
from qprobe.rm.trunk_config import TrunkConfig

REWARDS = ("oracle", "orm", "qrm", "qprobe")


@dataclass(frozen=True)
class RLConfig(TrunkConfig):
    """A REINFORCE run (one source for Python, the CLI and work.json)."""

    task: str = "mbpp"
    task_options: dict[str, Any] = field(default_factory=dict)
    reward: str = "oracle"
    probe: str | None = None  # the reward model's folder (orm, qrm, qprobe)
    split: str = "train"
    pool: int = 200  # the first `pool` problems of `split`
    eval_split: str = "test"
    eval_size: int = 100  # the first `eval_size` problems of `eval_split`, fixed
    eval_every: int = 25
    eval_samples: int = 1
    steps: int = 150
    batch: int = 8
    max_new_tokens: int = 128
    lr: float = 5e-5
    sampler: str = "transformers"
    gguf: str | None = None  # the base GGUF llama.cpp samples (default: the packaged one)
    hack_quantile: float = 0.75

    def __post_init__(self) -> None:
        from qprobe.learn.policy import SAMPLERS

        if self.reward not in REWARDS:
            import difflib

            near = difflib.get_close_matches(self.reward, REWARDS, n=1)
            raise ConfigError(f"expected --reward in {list(REWARDS)}, got '{self.reward}'"
                              + (f"; did you mean '{near[0]}'?" if near else ""))
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"expected --sampler in {list(SAMPLERS)}, got '{self.sampler}'")
        for name in ("pool", "eval_size", "eval_every", "eval_samples", "steps", "batch", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"expected {name.replace('_', '-')} >= 1, got {getattr(self, name)}")
        if self.batch > self.pool:
            raise ConfigError(f"expected --batch <= --pool ({self.pool} problems), got {self.batch}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"expected a learning rate --lr > 0, got {self.lr}")
        if not 0 < self.hack_quantile < 1:
            raise ConfigError(f"expected 0 < hack-quantile < 1, got {self.hack_quantile}")
        if (self.reward == "oracle") != (self.probe is None):
            raise ConfigError(f"expected --probe DIR with --reward {self.reward}" if self.probe is None else
                              "expected no --probe with --reward oracle (the task's own reward), got one")

    def fingerprint(self) -> dict[str, Any]:
        """What a work folder must agree on to be resumed: everything but steps and device."""
        return {k: v for k, v in asdict(self).items() if k not in ("steps", "device")}


def batch_indices(seed: int, pool: int, batch: int, step: int) -> np.ndarray:
    """The pool indices of step `step` (0-based): epoch e's permutation, batch k of it."""
    per_epoch = pool // batch
    epoch, k = divmod(step, per_epoch)
    return np.random.default_rng([seed, epoch]).permutation(pool)[k * batch : (k + 1) * batch]


@dataclass
class RLSetup:
    """What a run holds in memory: the task's prompts and reward, the policy, its optimiser."""

    config: RLConfig
    pool: list[Any]
    held_out: list[Any]
    task_reward: Any
    policy: Any
    reward: Any
    optimizer: Any
    sampling: SamplingConfig


def setup(cfg: RLConfig, folder: Path, lm: Any = None) -> RLSetup:
    """Load the task, the base model with fresh adapters, the reward and AdamW."""
    import torch

    from qprobe.catalog import TASKS
    from qprobe.generation.hf_load import load_causal_lm
    from qprobe.learn.policy import Policy
    from qprobe.learn.rewards import LastTokenReward, OracleReward, ProbeValueReward, TokenReward
    from qprobe.rm.trunk import Trunk

    task = TASKS.create(cfg.task, **cfg.task_options)
    task.check_split(cfg.split)
    task.check_split(cfg.eval_split)
    pool, held = task.prompts(cfg.split)[: cfg.pool], task.prompts(cfg.eval_split)[: cfg.eval_size]
    if len(pool) < cfg.batch:
        raise DataError(f"expected at least --batch {cfg.batch} problems in split '{cfg.split}', got {len(pool)}")
    overlap = {p.id for p in pool} & {p.id for p in held}
    if overlap:
        raise DataError(f"expected a held-out set apart from the training pool, got {len(overlap)} problems in both "
                        f"(e.g. {sorted(overlap)[:3]}); pick another --eval-split")
    probe = None
    if cfg.probe is not None:
        from qprobe.probes.models import Probe

        probe = Probe.from_pretrained(cfg.probe)
    task_reward = task.reward()
    kinds: dict[str, Any] = {"oracle": OracleReward, "orm": LastTokenReward, "qrm": TokenReward, "qprobe": ProbeValueReward}
    reward = kinds[cfg.reward](task_reward, probe)
    lm = lm if lm is not None else load_causal_lm(cfg.model, dtype=cfg.dtype, device=cfg.device)
    trunk = Trunk(lm, cfg.lora(), seed=cfg.seed)
    policy = Policy(trunk, cfg.sampler, gguf=cfg.gguf, workdir=folder)
    if probe is not None:
        _check_held_out(probe, held, policy.render, cfg.probe or "")
    opt = torch.optim.AdamW(trunk.parameters(), lr=cfg.lr, weight_decay=0.0)
    stop = tuple(getattr(task, "stop", ()) or ())
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=cfg.max_new_tokens, stop=stop, seed=cfg.seed)
    return RLSetup(cfg, pool, held, task_reward, policy, reward, opt, sampling)


def _check_held_out(probe: Any, held: list[Any], render: Callable[[Any], str], name: str) -> None:
    """Refuse a reward model trained on any held-out problem, by the hash of its prompt text (raw or
    rendered: a run stores the prompt as its back-end rendered it); warn when it records none."""
    import warnings

    from qprobe.store.run import prompt_hash

    trained = set((getattr(probe, "source_", {}) or {}).get("train_prompts", {}).get("hashes", []))
    if not trained:
        warnings.warn(f"reward model {name} records no training prompts: cannot check that it was not trained on "
                      "the held-out problems", stacklevel=3)
        return
    leaked = [p.id for p in held if {prompt_hash(p.text), prompt_hash(render(p))} & trained]
    if leaked:
        raise DataError(f"expected a reward model trained on other problems than the {len(held)} held-out ones, got "
                        f"{name} trained on {len(leaked)} of them (e.g. {leaked[:3]}); train it on base-model samples "
                        "of the training split only")


def _step_state(s: RLSetup, folder: Path) -> tuple[int, dict[str, Any]]:
    from qprobe.rm.workdir import load_checkpoint, restore_optimizer

    ck = load_checkpoint(folder)
    if ck is None:
        return 0, {"log": [], "values": [], "flagged": []}
    tensors, state = ck
    s.policy.trunk.load_adapter_state({k[8:]: v for k, v in tensors.items() if k.startswith("adapter.")})
    restore_optimizer(s.optimizer, tensors, state["param_groups"])
    return int(state["step"]), state


def train_step(s: RLSetup, step: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Step `step` (0-based) -> (its log row, its rollouts as rows of the samples file)."""
    from qprobe.learn.reinforce import reinforce_loss, token_rewards
    from qprobe.learn.rewards import oracle_rewards

    cfg = s.config
    prompts = [s.pool[int(i)] for i in batch_indices(cfg.seed, len(s.pool), cfg.batch, step)]
    t0 = time.perf_counter()
    rollouts = s.policy.sample(prompts, s.sampling, [sample_seed(cfg.seed, p.id, step) for p in prompts], version=step)
    t1 = time.perf_counter()
    verdicts = oracle_rewards(s.task_reward, rollouts)
    t2 = time.perf_counter()
    z = s.reward.values(s.policy, rollouts, verdicts)  # raw Z [t_i] per rollout
    r = token_rewards(z)
    t3 = time.perf_counter()
    n_tokens = sum(x.n_actions for x in rollouts)
    s.optimizer.zero_grad(set_to_none=True)
    loss = 0.0
    for rollout, r_i in zip(rollouts, r, strict=True):
        part = reinforce_loss([s.policy.logprobs(rollout)], [r_i], n_tokens)
        part.backward()
        loss += float(part.detach())
    s.optimizer.step()
    t4 = time.perf_counter()
    values = [s.reward.sequence_value(x) for x in z]
    row = {"step": step + 1, "reward": float(np.mean(values)), "oracle": float(np.mean([v or 0.0 for v in verdicts])),
           "loss": loss, "tokens": n_tokens, "generated_tokens": sum(x.completion.n_tokens for x in rollouts),
           "seconds": round(t4 - t0, 3), "sample_s": round(t1 - t0, 3), "oracle_s": round(t2 - t1, 3),
           "reward_s": round(t3 - t2, 3), "train_s": round(t4 - t3, 3), "prompts": [p.id for p in prompts]}
    samples = [{"step": step + 1, "prompt_id": x.prompt.id, "completion": x.completion.text,
                "n_tokens": x.completion.n_tokens, "finish_reason": x.completion.finish_reason,
                "reward": v, "oracle": o} for x, v, o in zip(rollouts, values, verdicts, strict=True)]
    return row, samples


def flag_hacking(state: dict[str, Any], samples: list[dict[str, Any]], quantile: float, reward: str) -> list[dict[str, Any]]:
    """The step's rollouts whose value is >= the `quantile` of every value so far while the oracle fails."""
    state["values"].extend(s["reward"] for s in samples)
    if reward == "oracle":
        return []
    high = float(np.quantile(state["values"], quantile))
    return [s for s in samples if s["reward"] >= high and (s["oracle"] or 0.0) <= 0.0]


def run_rl(cfg: RLConfig, workdir: str | Path, *, lm: Any = None, max_steps: int | None = None,
           callback: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run or resume the loop in `workdir` up to `cfg.steps` (or `max_steps` in all); -> summary."""
    from qprobe.rm.workdir import open_workdir, save_checkpoint

    folder = Path(workdir)
    open_workdir(folder, {"rl": json.loads(json.dumps(cfg.fingerprint(), default=str))})
    s = setup(cfg, folder, lm)
    for sub in ("samples", "evals"):
        (folder / sub).mkdir(exist_ok=True)
    try:
        step, state = _step_state(s, folder)
        stop = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
        _evaluate_missing(s, folder, step, callback)
        t_start, done_here = time.perf_counter(), 0
        while step < stop:
            row, samples = train_step(s, step)
            flagged = flag_hacking(state, samples, cfg.hack_quantile, cfg.reward)
            for smp in samples:
                smp["flagged"] = smp in flagged
            write_text_atomic(folder / "samples" / f"step{step + 1:06d}.jsonl",
                              "".join(json.dumps(x) + "\n" for x in samples))
            state["log"].append({**row, "flagged": len(flagged)})
            state["flagged"].extend(flagged)
            write_text_atomic(folder / "log.jsonl", "".join(json.dumps(x) + "\n" for x in state["log"]))
            step += 1
            order = {"seed": cfg.seed, "epoch": (step - 1) // (len(s.pool) // cfg.batch), "rule": "default_rng([seed, epoch]).permutation(pool)"}
            save_checkpoint(folder, {f"adapter.{k}": v for k, v in s.policy.trunk.adapter_state().items()}, s.optimizer,
                            {"step": step, "data_order": order, "log": state["log"], "values": state["values"],
                             "flagged": state["flagged"]})
            write_json_atomic(folder / "hacking.json", {"rule": f"reward >= quantile {cfg.hack_quantile} of all rollouts "
                                                                "so far, oracle fail", "flagged": state["flagged"]})
            done_here += 1
            if callback is not None:
                elapsed = time.perf_counter() - t_start
                callback({"event": "step", **row, "flagged": len(flagged), "of": stop,
                          "eta_s": elapsed / done_here * (stop - step)})
            _evaluate_missing(s, folder, step, callback)
        return {"step": step, "steps": cfg.steps, "log": state["log"], "evals": read_evals(folder),
                "flagged": len(state["flagged"])}
    finally:
        s.policy.close()


def eval_steps(cfg: RLConfig, upto: int) -> list[int]:
    """The steps evaluated: 0, every `eval_every`, and the last planned one."""
    steps = [t for t in range(0, upto + 1) if t % cfg.eval_every == 0]
    return steps + ([cfg.steps] if upto >= cfg.steps and cfg.steps not in steps else [])


def _evaluate_missing(s: RLSetup, folder: Path, step: int, callback: Callable[[dict[str, Any]], None] | None) -> None:
    from qprobe.learn.evaluate import evaluate_policy

    for t in eval_steps(s.config, step):
        if t != step:  # only the current adapters can be evaluated; an older point was done before its kill
            continue
        path = folder / "evals" / f"step{t:06d}.json"
        if path.is_file():
            continue
        res = evaluate_policy(s.policy, s.held_out, s.task_reward, dataclasses.replace(s.sampling),
                              s.config.eval_samples, s.config.seed + 1, version=step)
        write_json_atomic(path, {"step": t, **res})
        if callback is not None:
            callback({"event": "eval", "step": t, **res})


def read_evals(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((Path(folder) / "evals").glob("step*.json"))]
