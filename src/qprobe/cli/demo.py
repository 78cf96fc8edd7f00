"""`qprobe demo`: the main job."""

from __future__ import annotations

import os
from pathlib import Path

import click

from qprobe.cli.options import parse_kv


@click.command()
@click.option("--limit", type=int, default=None,
              help="N: the first N problems of the split, in order (0 = all). Default: 30, the design's N.")
@click.option("--seed", type=int, default=1, show_default=True,
              help="Sampling seed of the run (the demo's design was checked with 1, 2 and 3).")
@click.option("--greedy/--no-greedy", default=False, show_default=True,
              help="Also decode every problem greedily (one more pass: about a quarter more generation time).")
@click.option("--probe", default="default-code", show_default=True,
              help="The probe that picks: a folder, hf://ORG/NAME, or a shipped name.")
@click.option("--task", default="humaneval", show_default=True, help="Task to run on (humaneval, mbpp, jsonl, ...).")
@click.option("--split", default="test", show_default=True, help="Split the problems come from.")
@click.option("--task-option", multiple=True, metavar="KEY=VALUE", help="Task option, e.g. data=my_tasks.jsonl.")
@click.option("--backend", default="llamacpp", show_default=True, help="Generation back-end (see `qprobe ls`).")
@click.option("--model", default=None, help="Model (default: the packaged Qwen2.5-Coder-0.5B-Instruct, the probe's).")
@click.option("--n", "n", default=8, show_default=True, help="Samples per problem.")
@click.option("-k", "k", default=2, show_default=True, help="Candidates the probe picks from (2: the design's).")
@click.option("--beta", default=0.0, show_default=True, help="Selection temperature (0 = argmax).")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("qprobe-demo"), show_default=True,
              help="Where runs, results.json and the report go; a re-run reuses the collected runs.")
@click.option("--allow-code-execution", is_flag=True, help="Allow model-written code to run in the sandbox (code tasks need it).")
@click.option("--allow-unconfined", is_flag=True, help="Also run that code where the sandbox has no net+pid+mount isolation (resource limits only): a second, explicit opt-in.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars and status (on stderr).")
def demo(limit, seed, greedy, probe, task, split, task_option, backend, model, n, k, beta, workdir,
         allow_code_execution, allow_unconfined, progress):
    """Show what the method does on problems it never saw: print the table, write a report.

    Samples 8 candidates for each of the first N HumanEval problems with the packaged default
    model, lets the shipped probe `default-code` (trained on MBPP-train; nothing is trained here)
    pick the best of 2 by its Q (argmax), and prints pass@1 (one random sample), the probe's
    best-of-2, the pass@2 skyline, and the probe's gain over pass@1, with 95% bootstrap
    intervals over problems. Writes WORKDIR/results.json and a report to browse
    (WORKDIR/report/index.html). `qprobe --verbose demo` also shows llama.cpp's own log.
    """
    from qprobe.evaluation.demo import DEFAULT_LIMIT, DemoConfig, run_demo

    if allow_code_execution:
        os.environ["QPROBE_ALLOW_CODE_EXECUTION"] = "1"
    if allow_unconfined:
        os.environ["QPROBE_ALLOW_UNCONFINED"] = "1"
    cfg = DemoConfig(task=task, split=split, task_options=parse_kv(task_option, "--task-option"), backend=backend,
                     model=model, probe=probe, limit=DEFAULT_LIMIT if limit is None else limit, n=n, k=k,
                     beta=beta, seed=seed, greedy=greedy, workdir=workdir)
    run_demo(cfg, say=click.echo, progress=progress)
