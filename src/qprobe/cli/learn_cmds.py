"""`qprobe rl` and `qprobe iterate`: training loops that change the policy (qprobe.learn).

    qprobe rl --reward oracle --task mbpp --task-option data=mbpp.jsonl --allow-code-execution --out rl/oracle
    qprobe rl --reward qrm --probe probes/qrm --task mbpp ... --out rl/qrm     # re-run the same to resume
    qprobe iterate --task mbpp --task-option data=mbpp.jsonl --rounds 2 --k 8 --out it/mbpp --allow-code-execution
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import click

from qprobe.cli.options import parse_kv, set_torch_threads, trunk_options


def _common(f: Any) -> Any:
    options = [
        click.option("--task", default="mbpp", show_default=True, help="Task (see `qprobe ls`)."),
        click.option("--task-option", "task_options", multiple=True, metavar="KEY=VALUE", help="Task option, e.g. data=PATH/mbpp.jsonl."),
        click.option("--split", default="train", show_default=True, help="Split the pool of training problems comes from."),
        click.option("--pool", type=int, default=200, show_default=True, help="The first N problems of --split."),
        click.option("--eval-split", default="test", show_default=True, help="Split of the fixed held-out problems."),
        click.option("--eval-size", type=int, default=100, show_default=True, help="The first N problems of --eval-split."),
        click.option("--max-new-tokens", type=int, default=128, show_default=True, help="Most tokens per completion."),
        click.option("--sampler", type=click.Choice(["transformers", "llamacpp"]), default="transformers", show_default=True, help="Who samples the policy: transformers (the trunk itself) or llama.cpp with the exported LoRA adapter."),
        click.option("--gguf", default=None, help="--sampler llamacpp: the base GGUF (default: the packaged one; the same weights as --model)."),
        click.option("--allow-code-execution", is_flag=True, help="Allow running model-written code in the sandbox (code tasks)."),
        click.option("--out", required=True, type=click.Path(path_type=Path), help="Work folder (created, or resumed)."),
    ]
    for option in reversed(options):
        f = option(f)
    return trunk_options("Seed of the adapters, the data order and the samples.")(f)


def _prepare(threads: int | None, allow_code_execution: bool) -> None:
    if allow_code_execution:
        os.environ["QPROBE_ALLOW_CODE_EXECUTION"] = "1"
    set_torch_threads(threads)


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _interval(d: dict[str, Any]) -> str:
    return f"{d['mean']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"


@click.command("rl")
@click.option("--reward", required=True, help="oracle (the task's reward), orm (last-token probe), qrm (token probe), qprobe (a Q-probe's value).")
@click.option("--probe", default=None, help="The reward model's folder (orm, qrm, qprobe): trained on base-model samples of the training split.")
@_common
@click.option("--steps", type=int, default=150, show_default=True, help="Optimiser steps in all (raise it and re-run to train on).")
@click.option("--batch", type=int, default=8, show_default=True, help="Prompts a step, one sample each at temperature 1.")
@click.option("--lr", type=float, default=5e-5, show_default=True, help="AdamW learning rate (weight decay 0, constant).")
@click.option("--eval-every", type=int, default=25, show_default=True, help="Evaluate the held-out set every N steps (and at 0 and the end).")
@click.option("--eval-samples", type=int, default=1, show_default=True, help="Samples per held-out problem for sampled pass@1.")
@click.option("--hack-quantile", type=float, default=0.75, show_default=True, help="Flag rollouts with a reward at or above this quantile of all so far that fail the oracle.")
@click.option("--max-steps", type=int, default=None, help="Stop after this many steps in all this time (re-run to continue).")
def rl_cmd(reward, probe, task, task_options, split, pool, eval_split, eval_size, max_new_tokens, model, sampler, gguf,
           top_blocks, lora_r, lora_alpha, seed, dtype, threads, allow_code_execution, out, steps, batch, lr,
           eval_every, eval_samples, hack_quantile, max_steps):
    """REINFORCE on LoRA adapters with an oracle, ORM, Q-RM or Q-probe reward (Q-RM's recipe: token
    rewards Z/std(Z), the end token's reward the sequence mean, no KL, no baseline). Checkpointed
    every step: re-run the same command to resume after a kill."""
    from qprobe.learn.rl import RLConfig, run_rl

    cfg = RLConfig(task=task, task_options=parse_kv(task_options, "--task-option"), reward=reward, probe=probe,
                   split=split, pool=pool, eval_split=eval_split, eval_size=eval_size, eval_every=eval_every,
                   eval_samples=eval_samples, steps=steps, batch=batch, max_new_tokens=max_new_tokens, lr=lr,
                   model=model, sampler=sampler, gguf=gguf, top_blocks=top_blocks, lora_r=lora_r,
                   lora_alpha=lora_alpha, hack_quantile=hack_quantile, seed=seed, dtype=dtype)
    if max_steps is not None and max_steps < 1:
        from qprobe.errors import ConfigError

        raise ConfigError(f"expected --max-steps >= 1, got {max_steps}")
    _prepare(threads, allow_code_execution)
    t0 = time.perf_counter()

    def show(ev: dict[str, Any]) -> None:
        if ev["event"] == "eval":
            click.echo(f"eval step {ev['step']}: greedy pass@1 {_interval(ev['greedy'])}  sampled pass@1 "
                       f"{_interval(ev['sampled'])}  ({ev['seconds']:.0f} s)", err=True)
            return
        tps = ev["generated_tokens"] / ev["sample_s"] if ev["sample_s"] else float("nan")
        click.echo(f"step {ev['step']}/{ev['of']}  reward {ev['reward']:+.3f}  oracle {ev['oracle']:.2f}  "
                   f"tokens {ev['tokens']}  {tps:.1f} tok/s  {ev['seconds']:.1f} s/step  eta {_duration(ev['eta_s'])}"
                   + (f"  flagged {ev['flagged']}" if ev["flagged"] else ""), err=True)

    res = run_rl(cfg, out, max_steps=max_steps, callback=show)
    state = "done" if res["step"] >= cfg.steps else f"stopped at step {res['step']} of {cfg.steps} (re-run to continue)"
    click.echo(f"rl --reward {reward}: {res['step']} steps, {len(res['evals'])} evaluations, {res['flagged']} rollouts "
               f"flagged (high reward, oracle fail); {state}; {_duration(time.perf_counter() - t0)}; wrote {out}")


@click.command("iterate")
@click.option("--probe", default=None, help="Round 0's probe (default: one trained on round 0's samples).")
@_common
@click.option("--rounds", type=int, default=2, show_default=True, help="Rounds in all (raise it and re-run to go on).")
@click.option("--k", type=int, default=8, show_default=True, help="Samples per problem each round.")
@click.option("--feature", default="-1:last", show_default=True, help="The probe's feature, LAYER:POOLING.")
@click.option("--probe-loss", default="pg", show_default=True, help="Loss of the probes retrained each round.")
@click.option("--beta", type=float, default=0.0, show_default=True, help="Selection temperature (0: argmax).")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Sampling temperature of the collections.")
@click.option("--sft-epochs", type=int, default=1, show_default=True, help="Supervised passes over the picks each round.")
@click.option("--batch", type=int, default=8, show_default=True, help="Picks per supervised step.")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="AdamW learning rate of the supervised steps.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show the collections' progress bars.")
def iterate_cmd(probe, task, task_options, split, pool, eval_split, eval_size, max_new_tokens, model, sampler, gguf,
                top_blocks, lora_r, lora_alpha, seed, dtype, threads, allow_code_execution, out, rounds, k, feature,
                probe_loss, beta, temperature, sft_epochs, batch, lr, progress):
    """Iterative Q-probing: collect with the policy, pick with the probe, fine-tune the adapters on the
    picks, retrain the probe; per round pass@1, the probe policy's return and pass@k on held-out
    problems. Resumable per round."""
    from qprobe.learn.iterate import IterConfig, run_iterate

    cfg = IterConfig(task=task, task_options=parse_kv(task_options, "--task-option"), split=split, pool=pool,
                     eval_split=eval_split, eval_size=eval_size, k=k, rounds=rounds, feature=feature, probe=probe,
                     probe_loss=probe_loss, beta=beta, temperature=temperature, max_new_tokens=max_new_tokens,
                     sft_epochs=sft_epochs, batch=batch, lr=lr, model=model, sampler=sampler, gguf=gguf,
                     top_blocks=top_blocks, lora_r=lora_r, lora_alpha=lora_alpha, seed=seed, dtype=dtype)
    _prepare(threads, allow_code_execution)

    def show(rep: dict[str, Any]) -> None:
        h = rep["held_out"]
        click.echo(f"round {rep['round']}: " + "  ".join(f"{name} {_interval(v)}" for name, v in h.items())
                   + f"  picked reward {rep['picked_reward']:.3f}  ({_duration(rep['seconds'])})", err=True)

    reports = run_iterate(cfg, out, progress=progress, callback=show)
    click.echo(f"iterate: {len(reports)} rounds done; wrote {out}")
    for rep in reports:
        click.echo(f"  round {rep['round']}: " + "  ".join(f"{n} {_interval(v)}" for n, v in rep["held_out"].items()))
