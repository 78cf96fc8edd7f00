"""One REINFORCE step's parts on the default model, transformers sampler: wall and CPU seconds (benchmarks/results/rl.md).

torch on 1 thread, so CPU seconds are what one unloaded core needs (the machine is shared: wall
seconds under load say little)."""
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from qprobe.features.spec import FeatureSpec
from qprobe.generation.base import sample_seed
from qprobe.learn.reinforce import reinforce_loss, token_rewards
from qprobe.learn.rewards import TokenReward, oracle_rewards
from qprobe.learn.rl import RLConfig, batch_indices, setup
from qprobe.probes import TokenProbe

torch.set_num_threads(1)
os.environ["QPROBE_ALLOW_CODE_EXECUTION"] = "1"

parts = {}
def timed(name, fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    parts[name] = {"wall_s": round(time.perf_counter() - w, 2), "cpu_s": round(time.process_time() - c, 2)}
    print(name, parts[name], flush=True)
    return out
cfg = RLConfig(task="mbpp", task_options={"data": os.environ.get("MBPP", "../shared/data/mbpp/mbpp.jsonl"), "prompt_format": "chat"},
               reward="oracle", pool=200, eval_size=100, batch=1, max_new_tokens=24, sampler="transformers")
s = timed("load", lambda: setup(cfg, Path(os.environ.get("WORK", "runs/rl/step-cost"))))
prompts = [s.pool[int(i)] for i in batch_indices(cfg.seed, len(s.pool), cfg.batch, 0)]
rolls = timed("sample", lambda: s.policy.sample(prompts, s.sampling, [sample_seed(0, p.id, 0) for p in prompts]))
verdicts = timed("oracle", lambda: oracle_rewards(s.task_reward, rolls))
lm = s.policy.trunk.lm
rng = np.random.default_rng(0)
spec = FeatureSpec("transformers", lm.name, lm.sha256, 18, "mean", lm.model.config.hidden_size)
probe = TokenProbe(loss="bt").fit(rng.normal(size=(40, spec.dim)), rng.integers(0, 2, 40).astype(float),
                                  np.repeat(np.arange(10), 4), spec=spec)  # random head: timing only
z = timed("qrm_reward", lambda: TokenReward(None, probe).values(s.policy, rolls))
r = token_rewards(z)
n = sum(x.n_actions for x in rolls)
def train():
    s.optimizer.zero_grad(set_to_none=True)
    for x, r_i in zip(rolls, r, strict=False):
        reinforce_loss([s.policy.logprobs(x)], [r_i], n).backward()
    s.optimizer.step()
timed("train", train)
out = {"parts": parts, "actions": n, "generated_tokens": sum(x.completion.n_tokens for x in rolls),
       "prompt_tokens": sum(len(x.prompt_ids) for x in rolls), "oracle_pass": float(np.mean([v or 0 for v in verdicts])),
       "torch_threads": 1, "load_avg": os.getloadavg()}
print(json.dumps(out), flush=True)
