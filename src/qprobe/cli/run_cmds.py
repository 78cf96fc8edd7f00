"""`qprobe collect | embed | copy | export | inspect | ls`: write, read and list runs and components."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from qprobe.cli.options import parse_kv
from qprobe.errors import QProbeError


@click.command()
@click.option("--task", required=True, help="Task name (see `qprobe ls`), e.g. mbpp, humaneval, gsm8k, jsonl, fake.")
@click.option("--split", default="train", show_default=True, help="Split of the task, e.g. train or test.")
@click.option("--n", "n", default=16, show_default=True, help="Samples per prompt.")
@click.option("--backend", default="llamacpp", show_default=True, help="Generation back-end (see `qprobe ls`).")
@click.option("--model", default=None, help="Model: a GGUF path, a Hugging Face id or path, or a server's model name. Default: the back-end's default.")
@click.option("--feature", "features", multiple=True, help="Features to store, LAYER:POOLING (e.g. -1:last, 18:mean) or embed=NAME:POOLING; repeatable. Default -1:last.")
@click.option("--layer", type=int, default=None, help="Shorthand for one --feature LAYER:POOLING.")
@click.option("--pooling", type=click.Choice(["last", "mean", "tokens"]), default=None, help="Pooling for --layer.")
@click.option("--limit", type=int, default=None, help="Only the first N prompts of the split.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory (created, or resumed if it exists).")
@click.option("--resume", is_flag=True, help="Require --out to be an existing run and continue it (re-running the same command does the same).")
@click.option("--temperature", default=0.8, show_default=True)
@click.option("--top-p", default=0.95, show_default=True)
@click.option("--max-new-tokens", default=300, show_default=True)
@click.option("--stop", multiple=True, help="Stop sequence (repeatable). Default: the task's.")
@click.option("--seed", default=0, show_default=True, help="Run seed; each sample's seed derives from it.")
@click.option("--task-option", multiple=True, metavar="KEY=VALUE", help="Task option, e.g. data=path/to/mbpp.jsonl or prompt_format=chat.")
@click.option("--backend-option", multiple=True, metavar="KEY=VALUE", help="Back-end option, e.g. n_ctx=4096.")
@click.option("--shots-from", type=click.Path(path_type=Path), default=None, help="A collected run (e.g. the training split): put --shots of its successful completions in front of every prompt (the paper's few-shot on successes).")
@click.option("--shots", default=5, show_default=True, help="How many solved examples --shots-from puts in context.")
@click.option("--shots-seed", default=0, show_default=True, help="Seed of the random choice of solved examples.")
@click.option("--feature-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--shard-samples", default=64, show_default=True, help="Commit a shard every this many samples.")
@click.option("--allow-code-execution", is_flag=True, help="Allow running model-written code in the sandbox (needed for code tasks).")
@click.option("--allow-unconfined", is_flag=True, help="Also run that code where the sandbox has no net+pid+mount isolation (resource limits only): a second, explicit opt-in.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def collect(task, split, n, backend, model, features, layer, pooling, limit, out, resume, temperature, top_p,
            max_new_tokens, stop, seed, task_option, backend_option, shots_from, shots, shots_seed, feature_dtype,
            shard_samples, allow_code_execution, allow_unconfined, progress):
    """Sample N completions per prompt, embed and reward them, and store them in a run.

    Crash-safe and resumable: rows are committed in shards, and re-running the same command
    (or --resume) continues where it stopped without duplicating or skipping samples.
    """
    from qprobe.errors import StoreError
    from qprobe.generation.base import SamplingConfig
    from qprobe.store.collect import CollectConfig
    from qprobe.store.collect import collect as run_collect

    if allow_code_execution:
        os.environ["QPROBE_ALLOW_CODE_EXECUTION"] = "1"
    if allow_unconfined:
        os.environ["QPROBE_ALLOW_UNCONFINED"] = "1"
    if resume and not (out / "manifest.json").is_file():
        raise StoreError(f"expected an existing run to --resume, got '{out}' with no manifest.json; drop --resume to start it")
    feats = list(features)
    if layer is not None or pooling is not None:
        feats.append(f"{layer if layer is not None else -1}:{pooling or 'last'}")
    cfg = CollectConfig(
        task=task, split=split, out=out, n=n, backend=backend, model=model,
        features=tuple(feats or ["-1:last"]),
        sampling=SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                stop=tuple(stop), seed=seed),
        limit=limit, task_options=parse_kv(task_option, "--task-option"),
        backend_options=parse_kv(backend_option, "--backend-option"),
        shots_from=str(shots_from) if shots_from is not None else None, shots=shots, shots_seed=shots_seed,
        feature_dtype=feature_dtype, shard_samples=shard_samples,
    )
    run = run_collect(cfg, progress=progress)
    click.echo(f"{run.path}: {len(run)} samples, {len(run.shards)} shards, complete={run.manifest.get('complete')}")


@click.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--feature", "features", multiple=True, required=True,
              help="Features to add, LAYER:POOLING (e.g. 12:mean) or embed=NAME:POOLING (e.g. embed=minilm:mean); repeatable.")
@click.option("--model", default=None, help="Path of the weights the run was collected with (default: the manifest's).")
@click.option("--feature-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--backend-option", multiple=True, metavar="KEY=VALUE", help="Back-end option, e.g. n_ctx=4096.")
@click.option("--backend", "backend_name", default=None,
              help="Back-end computing LAYER:POOLING features (default: the run's), e.g. llamacpp for a run collected with --backend openai --backend-option serve=...; the weights' sha256 must match.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def embed(run, features, model, feature_dtype, backend_option, backend_name, progress):
    """Add feature arrays to an existing run without regenerating its samples.

    Each stored prompt+completion is embedded again with the run's own model (another layer or
    pooling) or an external embedder (the paper's API setting). With --backend llamacpp a run
    collected through a served GGUF gets that model's own hidden states (chat prompts re-rendered
    with its chat template). Resumable shard by shard.
    """
    from qprobe.store.embed import add_features

    r = add_features(str(run), list(features), model=model, dtype=feature_dtype, progress=progress,
                     backend_options=parse_kv(backend_option, "--backend-option"), backend_name=backend_name)
    click.echo(f"{r.path}: features {', '.join(r.feature_keys)}")


@click.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output JSONL file (default: stdout).")
def export(run, out):
    """Write a run's sample rows as JSONL (no features), in prompt and sample order."""
    from qprobe.store import Run
    from qprobe.store.files import write_atomic

    r = Run.open(run)
    table = r.table().take(r.sorted_order())
    lines = []
    for row in table.to_pylist():
        row["details"] = json.loads(row["details"]) if row["details"] else {}
        lines.append(json.dumps(row, ensure_ascii=False))
    text = "".join(line + "\n" for line in lines)
    if out is None:
        sys.stdout.write(text)
    else:
        write_atomic(out, lambda f: f.write(text.encode()))
        click.echo(f"wrote {len(lines)} rows to {out}", err=True)


@click.command("copy")
@click.argument("run", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--feature", "features", multiple=True,
              help="Feature key to keep (e.g. L18_mean, see `qprobe inspect`); repeatable. None: rows only.")
@click.option("--replace", is_flag=True, help="OUT is an older copy: swap it for the new one once complete.")
def copy_cmd(run, out, features, replace):
    """Copy a run with its rows (texts, rewards) and only the named features, e.g. to share or commit it."""
    from qprobe.store.copy import copy_run

    r = copy_run(run, out, features, replace=replace)
    size = sum(f.stat().st_size for f in r.path.rglob("*") if f.is_file())
    click.echo(f"wrote {len(r)} rows, features {r.feature_keys or 'none'} to {r.path} ({size / 1e6:.1f} MB)", err=True)


@click.command("inspect")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect_run(run, as_json):
    """What a stored run holds: task, model, samples, reward rate, features, provenance."""
    from qprobe.store.summary import summarize

    info = summarize(run)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if isinstance(value, dict):
            click.echo(f"{key}:")
            for k, v in value.items():
                click.echo(f"  {k}: {v}")
        else:
            click.echo(f"{key}: {value}")


@click.command()
def ls():
    """List the registered tasks, back-ends, embedders, rewards and losses, one line each."""
    from qprobe.catalog import LOSS_NAMES
    from qprobe.registry import BACKENDS, EXTERNAL_EMBEDDERS, REWARDS, TASKS

    for title, reg in (("tasks", TASKS), ("back-ends", BACKENDS), ("external embedders", EXTERNAL_EMBEDDERS),
                       ("rewards", REWARDS), ("losses", LOSS_NAMES)):
        click.echo(f"{title}:")
        for e in reg:
            click.echo(f"  {e.name:<14} {e.summary}")
    try:
        from qprobe import sandbox

        level = sandbox.isolation_level()
    except (ImportError, QProbeError) as exc:
        level = f"unavailable ({exc})"
    click.echo(f"sandbox isolation: {level}")
