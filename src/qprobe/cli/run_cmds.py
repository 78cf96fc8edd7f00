"""`qprobe collect | embed | copy | export | inspect | ls`: write, read and list runs and components."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from qprobe.cli.config_options import config_options
from qprobe.cli.options import parse_kv
from qprobe.collection.collect import CollectConfig
from qprobe.errors import QProbeError


@click.command("collect")
@config_options(CollectConfig)
@click.option("--layer", type=int, default=None, help="Shorthand for one more --feature LAYER:POOLING.")
@click.option("--pooling", type=click.Choice(["last", "mean", "tokens"]), default=None, help="Pooling for --layer.")
@click.option("--resume", is_flag=True, help="Require --out to be an existing run and continue it (re-running the same command does the same).")
@click.option("--allow-code-execution", is_flag=True, help="Allow running model-written code in the sandbox (needed for code tasks).")
@click.option("--allow-unconfined", is_flag=True, help="Also run that code where the sandbox has no net+pid+mount isolation (resource limits only): a second, explicit opt-in.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar (on stderr).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Spread the prompts over Ray actors (one back-end each) writing this one run: alone, a local Ray "
                   "(or RAY_ADDRESS); with ADDRESS (HOST:PORT, ray://HOST:PORT, auto) that cluster. OUT must be on "
                   "a filesystem every node sees. Needs qprobe[ray].")
@click.option("--ray-workers", type=int, default=None,
              help="With --ray: how many actors. Default: as many as the cluster's CPUs hold (n_threads each; GPUs for vllm).")
@click.pass_context
def collect_cmd(ctx: click.Context, config_file: Path | None, dump_config: bool, layer: int | None, pooling: str | None,
                resume: bool, allow_code_execution: bool, allow_unconfined: bool, progress: bool,
                ray_address: str | None, ray_workers: int | None) -> None:
    """Sample N completions per prompt, embed and reward them, and store them in a run.

    Crash-safe and resumable: rows are committed in shards, and re-running the same command
    (or --resume) continues where it stopped without duplicating or skipping samples. The
    options from --task to --shard-seconds are the fields of `qprobe.CollectConfig`: --dump-config
    prints them as JSON, --config reads such a file back (options given with it win), and the run's
    manifest keeps them under "config".
    """
    from qprobe.cli import config_options as co
    from qprobe.collection.collect import collect as run_collect
    from qprobe.errors import ConfigError, StoreError

    base = co.read_config_file(config_file) if config_file is not None else {}
    if layer is not None or pooling is not None:
        shorthand = f"{layer if layer is not None else -1}:{pooling or 'last'}"
        given = co.given_values(ctx)
        given["features"] = (*given.get("features", ()), shorthand)
        ctx.meta[co.META] = {**ctx.meta[co.META], "features": given["features"]}
        ctx.set_parameter_source("features", click.core.ParameterSource.COMMANDLINE)
    cfg = co.config_from_cli(CollectConfig, ctx, base)
    manifest = Path(cfg.out) / "manifest.json"
    if "features" not in co.given_values(ctx) and "features" not in base and manifest.is_file():
        # a resume without --feature: every feature the run holds, those `qprobe embed` added included
        import dataclasses

        stored = json.loads(manifest.read_text()).get("features", {}).values()
        feats = tuple(f"embed={s['embedder']}:{s['pooling']}" if s.get("embedder") else f"{s['layer']}:{s['pooling']}"
                      for s in stored)
        cfg = dataclasses.replace(cfg, features=feats or cfg.features)
    if dump_config:
        click.echo(co.dump_config(cfg), nl=False)
        return
    if allow_code_execution:
        os.environ["QPROBE_ALLOW_CODE_EXECUTION"] = "1"
    if allow_unconfined:
        os.environ["QPROBE_ALLOW_UNCONFINED"] = "1"
    if resume and not (Path(cfg.out) / "manifest.json").is_file():
        raise StoreError(f"expected an existing run to --resume, got '{cfg.out}' with no manifest.json; drop --resume to start it")
    if ray_address is not None:
        from qprobe.collection.distributed import RayConfig, collect_ray

        done = collect_ray(cfg, RayConfig(address=ray_address or None, workers=ray_workers), progress=progress)
        run, s = done.run, done.stats
        click.echo(f"ray: {s.workers} workers, {s.chunks} chunks, {s.lost_actors} lost and replaced, "
                   f"{s.merged} samples merged; ray.init {s.init_seconds:.1f} s, first worker ready "
                   f"{s.start_seconds:.1f} s", err=True)
    elif ray_workers is not None:
        raise ConfigError(f"expected --ray-workers with --ray, got --ray-workers {ray_workers} alone; add --ray")
    else:
        run = run_collect(cfg, progress=progress)
    click.echo(f"{run.path}: {len(run)} samples, {len(run.shards)} shards, complete={run.manifest.get('complete')}")


@click.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--feature", "features", multiple=True, required=True,
              help="Features to add, LAYER:POOLING (e.g. 12:mean) or embed=NAME:POOLING (e.g. embed=minilm:mean); repeatable.")
@click.option("--model", default=None, help="Path of the weights the run was collected with (default: the manifest's).")
@click.option("--feature-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True, help="Stored feature precision.")
@click.option("--backend-option", multiple=True, metavar="KEY=VALUE", help="Back-end option, e.g. n_ctx=4096.")
@click.option("--backend", "backend_name", default=None,
              help="Back-end computing LAYER:POOLING features (default: the run's), e.g. llamacpp for a run collected with --backend openai --backend-option serve=...; the weights' sha256 must match.")
@click.option("--prompts", "prompt_file", type=click.Path(path_type=Path), default=None,
              help="Only the rows of the prompt ids listed in this file (one a line): copied with their features into --out, which is then embedded.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="With --prompts: the subset run to write (resumable: an existing one is embedded further).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar (on stderr).")
def embed(run, features, model, feature_dtype, backend_option, backend_name, prompt_file, out, progress):
    """Add feature arrays to an existing run without regenerating its samples.

    Each stored prompt+completion is embedded again with the run's own model (another layer or
    pooling, `tokens` for every completion token's state, e.g. 18:tokens) or an external embedder
    (the paper's API setting). With --backend llamacpp a run collected through a served GGUF gets
    that model's own hidden states (chat prompts re-rendered with its chat template). Resumable
    shard by shard. Per-token states are large (about t x d x 2 bytes a sample in float16):
    `qprobe inspect` says their size; regenerate them rather than commit them.
    """
    from qprobe.collection.embed import add_features
    from qprobe.errors import ConfigError

    if (prompt_file is None) != (out is None):
        raise ConfigError("expected --prompts FILE and --out NEW_RUN together (the subset is embedded in a copy), "
                          f"got only {'--prompts' if out is None else '--out'}")
    if prompt_file is not None:
        from qprobe.cli.options import read_ids
        from qprobe.store import Run
        from qprobe.store.copy import copy_run

        ids = read_ids(prompt_file)
        if not (out / "manifest.json").is_file():
            copy_run(run, out, Run.open(run).feature_keys, prompts=ids)
        elif set(Run.open(out).table(["prompt_id"]).column("prompt_id").to_pylist()) != set(ids):
            raise ConfigError(f"expected --out to be the subset of the listed prompts, got '{out}' which holds "
                              "other prompts; choose a new --out")
        run = out
    r = add_features(str(run), list(features), model=model, dtype=feature_dtype, progress=progress,
                     backend_options=parse_kv(backend_option, "--backend-option"), backend_name=backend_name)
    click.echo(f"{r.path}: features {', '.join(r.feature_keys)}")


@click.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output JSONL file (default: stdout).")
def export(run, out):
    """Write a run's sample rows as JSONL (no features), in prompt and sample order."""
    from qprobe.core.files import write_atomic
    from qprobe.store import Run

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
@click.option("--prompts", "prompt_file", type=click.Path(path_type=Path), default=None,
              help="Only the rows of the prompt ids listed in this file (one a line); every id must be in the run.")
def copy_cmd(run, out, features, replace, prompt_file):
    """Copy a run with its rows (texts, rewards) and only the named features, e.g. to share or commit it."""
    from qprobe.cli.options import read_ids
    from qprobe.store.copy import copy_run

    r = copy_run(run, out, features, replace=replace, prompts=None if prompt_file is None else read_ids(prompt_file))
    size = sum(f.stat().st_size for f in r.path.rglob("*") if f.is_file())
    click.echo(f"wrote {len(r)} rows, features {r.feature_keys or 'none'} to {r.path} ({size / 1e6:.1f} MB)", err=True)


@click.command("inspect")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect_run(run, as_json):
    """What a stored run holds: task, model, samples, reward rate, features, provenance."""
    from qprobe.store.summary import run_summary

    info = run_summary(run)
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
    from qprobe.catalog import BACKENDS, EMBEDDERS, EXTERNAL_EMBEDDERS, LOSSES, REWARDS, RM_HEADS, TASKS

    for title, reg in (("tasks", TASKS), ("back-ends", BACKENDS),
                       ("embedders (the generator's own hidden states, by back-end; --feature LAYER:POOLING)", EMBEDDERS),
                       ("external embedders (--feature embed=NAME:POOLING)", EXTERNAL_EMBEDDERS),
                       ("rewards", REWARDS), ("losses", LOSSES),
                       ("reward-model heads (qprobe rm train --head NAME)", RM_HEADS)):
        click.echo(f"{title}:")
        for e in reg:
            click.echo(f"  {e.name:<14} {e.summary}")
    from qprobe.probes.pretrained import PRETRAINED

    click.echo("shipped probes (--probe NAME; a local path of that name wins):")
    for name, summary in PRETRAINED.items():
        click.echo(f"  {name:<14} {summary}")
    try:
        from qprobe import sandbox

        level = sandbox.isolation_level()
    except (ImportError, QProbeError) as exc:
        level = f"unavailable ({exc})"
    click.echo(f"sandbox isolation: {level}")
