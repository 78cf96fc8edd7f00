"""`qprobe demo`: the main job."""

from __future__ import annotations

import os
from pathlib import Path

import click

from qprobe.cli.options import parse_kv


@click.command()
@click.option("--task", default="humaneval", show_default=True, help="Task to run on (mbpp, humaneval, jsonl, ...).")
@click.option("--split", default="test", show_default=True, help="Split whose problems are divided into train and test.")
@click.option("--task-option", multiple=True, metavar="KEY=VALUE", help="Task option, e.g. data=my_tasks.jsonl.")
@click.option("--backend", default="llamacpp", show_default=True, help="Generation back-end (see `qprobe ls`).")
@click.option("--model", default=None, help="Model (default: the packaged Qwen2.5-Coder-0.5B-Instruct).")
@click.option("--feature", default="-1:last", show_default=True, help="LAYER:POOLING of the probe's features.")
@click.option("--n", "n", default=8, show_default=True, help="Samples per problem.")
@click.option("-k", "k", default=4, show_default=True, help="Candidates the policy picks from.")
@click.option("--beta", default=0.0, show_default=True, help="Selection temperature (0 = argmax).")
@click.option("--limit", type=int, default=50, show_default=True,
              help="Only the first N problems (0 = all; all 164 HumanEval problems take about 50 minutes on 2 cores).")
@click.option("--seeds", default=5, show_default=True, help="Probe seeds averaged per method.")
@click.option("--train-frac", default=0.5, show_default=True, help="Fraction of problems used to train the probes.")
@click.option("--max-new-tokens", default=256, show_default=True, help="Most tokens per sample.")
@click.option("--greedy/--no-greedy", default=True, show_default=True, help="Also decode the test problems greedily.")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("qprobe-demo"), show_default=True,
              help="Where runs and results go; a re-run reuses what is there.")
@click.option("--allow-code-execution", is_flag=True, help="Allow model-written code to run in the sandbox (code tasks need it).")
@click.option("--allow-unconfined", is_flag=True, help="Also run that code where the sandbox has no net+pid+mount isolation (resource limits only): a second, explicit opt-in.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars (on stderr).")
def demo(task, split, task_option, backend, model, feature, n, k, beta, limit, seeds, train_frac, max_new_tokens,
         greedy, workdir, allow_code_execution, allow_unconfined, progress):
    """Run Q-probing end to end on one task and print the comparison table.

    Collects N samples per problem with the packaged default model, splits the problems into train
    and test, trains linear probes with L_Q (mse), L_CE (ce) and L_PG (pg), and reports on the test
    problems: pass@1, greedy, best-of-k by each probe, and pass@k, with 95% confidence intervals,
    plus a PNG of return against k. About 15 minutes on 2 CPU cores with the defaults
    (50 HumanEval problems x 8 samples, 25 to train and 25 to test; about 30 samples a minute).
    """
    from qprobe.evaluation.demo import DemoConfig, run_demo

    if allow_code_execution:
        os.environ["QPROBE_ALLOW_CODE_EXECUTION"] = "1"
    if allow_unconfined:
        os.environ["QPROBE_ALLOW_UNCONFINED"] = "1"
    cfg = DemoConfig(task=task, split=split, task_options=parse_kv(task_option, "--task-option"), backend=backend,
                     model=model, feature=feature, n=n, k=k, beta=beta, limit=limit, seeds=seeds,
                     train_frac=train_frac, max_new_tokens=max_new_tokens, greedy=greedy, workdir=workdir)
    run_demo(cfg, say=click.echo, progress=progress)
