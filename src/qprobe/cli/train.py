"""`qprobe train`: fit a probe on a collected run and save it as a probe directory."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from qprobe.cli.options import parse_kv
from qprobe.errors import ConfigError


@dataclass
class TrainingData:
    """What `Probe.fit` needs, plus the provenance written to the probe's config."""

    features: dict[str, np.ndarray]  # feature key -> [N, d]
    rewards: np.ndarray  # [N]
    groups: np.ndarray  # [N] prompt ids
    specs: dict[str, Any]  # feature key -> FeatureSpec
    source: dict[str, Any]
    dropped: int = 0  # unscored rows left out
    prompt_hashes: dict[str, str] | None = None  # prompt id -> hash of its text (qprobe.store.run.prompt_hash)


def _feature_keys(run: Any, wanted: tuple[str, ...]) -> list[str]:
    """Run keys ('L-1_last') or requests ('-1:last'); none given = every key of the run."""
    from qprobe.errors import StoreError
    from qprobe.features.spec import FeatureRequest

    keys = []
    for text in wanted:
        key = text if text in run.feature_keys else FeatureRequest.parse(text).key
        if key not in run.feature_keys:
            raise StoreError(f"expected a feature among {run.feature_keys} in run {run.path}, got '{text}'")
        keys.append(key)
    keys = keys or [k for k in run.feature_keys if run.feature_spec(k).pooling != "tokens"]
    if not keys:
        raise StoreError(f"expected pooled features (last or mean) in run {run.path}, got {run.feature_keys}")
    return keys


def load_run_data(path: Path, wanted: tuple[str, ...]) -> TrainingData:
    """Scored samples of a run, grouped by prompt. (Preference data, e.g. a future --pairs FILE,
    would add a loader beside this one returning `fit(pairs=...)` inputs; the rest is unchanged.)"""
    from qprobe.errors import DataError
    from qprobe.store import Run
    from qprobe.store.run import prompt_hash

    run = Run.open(path)
    keys = _feature_keys(run, wanted)
    table = run.table(["prompt_id", "reward", "prompt"])
    rewards = table.column("reward").to_numpy(zero_copy_only=False).astype(np.float64)
    scored = np.nonzero(np.isfinite(rewards))[0]
    if scored.size == 0:
        raise DataError(f"expected scored samples in run {path}, got none (every reward is null); re-run collect")
    groups = np.asarray(table.column("prompt_id").to_pylist(), dtype=object)[scored].astype(str)
    return TrainingData(
        features={k: run.features(k, rows=scored) for k in keys},
        rewards=rewards[scored], groups=groups, specs={k: run.feature_spec(k) for k in keys},
        source={"run": str(Path(path).resolve()), "task": run.manifest.get("task"),
                "generator": {"backend": run.manifest.get("backend", {}).get("name"),
                              "model": run.manifest.get("model", {}).get("model")}},
        dropped=int(len(rewards) - scored.size),
        prompt_hashes={p: prompt_hash(t) for p, t in zip(table.column("prompt_id").to_pylist(),
                                                         table.column("prompt").to_pylist(), strict=True)},
    )


def _row(name: str, m: dict[str, float], k: int) -> str:
    return (f"  {name:<22} expected return@{k} {m['expected_return']:.4f}   pass@1 {m['pass@1']:.4f}   "
            f"pass@{k} {m['pass@k']:.4f}")


def _cross_validate(make_probe: Any, x: np.ndarray, rewards: np.ndarray, codes: np.ndarray, folds: int, k: int,
                    beta: float, seed: int) -> dict[str, float]:
    """Out-of-fold validation: each prompt's numbers come from a probe fitted without it; the means
    are over all prompts (each fold weighted by its prompt count)."""
    from qprobe.probes import rerank_metrics
    from qprobe.probes.data import fold_prompts

    total: dict[str, float] = {}
    for fit, held in fold_prompts(codes, folds, np.random.default_rng(seed)):
        probe = make_probe().fit(x[fit], rewards[fit], codes[fit])
        m = rerank_metrics(probe, x[held], rewards[held], codes[held], k, beta)
        for name in ("expected_return", "pass@1", "pass@k"):
            total[name] = total.get(name, 0.0) + m[name] * m["prompts"]
        total["prompts"] = total.get("prompts", 0.0) + m["prompts"]
        total["samples"] = total.get("samples", 0.0) + m["samples"]
    return {name: (v / total["prompts"] if name not in ("prompts", "samples") else v) for name, v in total.items()}


def _renamed_to_arch(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:
        raise ConfigError(f"expected --arch linear|mlp for the probe's architecture, got --model {value}; "
                          "--model names model weights in the other commands, use --arch")


@click.command()
@click.option("--run", "run_path", default=None, type=click.Path(path_type=Path), help="Run directory written by `qprobe collect`.")
@click.option("--pairs", "pairs_path", default=None, type=click.Path(path_type=Path),
              help="Instead of --run: a pairs run (`qprobe pairs embed`); defaults become --loss bt and --k 2, so the printed metric is pairwise accuracy (ties 1/2).")
@click.option("--loss", default="pg", show_default=True, help="Loss (see `qprobe ls`): mse, ce, pg, listwise, bt, dpo, margin_bt.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Probe directory to write (config.json, model.safetensors, README.md).")
@click.option("--recipe", type=click.Choice(["fast", "paper"]), default="fast", show_default=True,
              help="fast: standardised features, L-BFGS, L2 chosen on held-out prompts; paper: the authors' AdamW recipe.")
@click.option("--seed", default=0, show_default=True, help="Seed of the splits and the initialisation (same seed, same probe).")
@click.option("--feature", "features", multiple=True, help="Feature key (L-1_last) or LAYER:POOLING; repeat to let held-out prompts pick the best. Default: every pooled feature of the run.")
@click.option("--arch", "arch", type=click.Choice(["linear", "mlp"]), default="linear", show_default=True, help="Probe architecture.")
@click.option("--model", hidden=True, expose_value=False, callback=_renamed_to_arch)
@click.option("--depth", default=2, show_default=True, help="MLP hidden layers.")
@click.option("--width", default=256, show_default=True, help="MLP hidden units.")
@click.option("--k", default=4, show_default=True, help="Candidates per prompt for the expected-return metric (clipped to the samples a prompt has).")
@click.option("--beta", default=0.0, show_default=True, help="Selection temperature of the metric (0 = argmax).")
@click.option("--holdout", default=0.0, show_default=True,
              help="Fraction of prompts kept OUT of the saved probe for validation; 0 (default): the probe trains on every prompt and validation is by --cv-folds.")
@click.option("--cv-folds", default=5, show_default=True,
              help="With --holdout 0: validation numbers by K-fold cross-validation over prompts (K extra fits; 1 = none).")
@click.option("--select-folds", default=1, show_default=True,
              help="fast recipe: choose the L2 penalty by K-fold over training prompts (K > 1) instead of one held-out quarter; steadier across seeds, K-1 times slower.")
@click.option("--loss-option", multiple=True, metavar="KEY=VALUE", help="Loss option, e.g. beta=0.5 or baseline=mean.")
@click.option("--standardize/--no-standardize", default=None, help="Standardise features (default: fast yes, paper no).")
@click.pass_context
def train(ctx, run_path, pairs_path, loss, out, recipe, seed, features, arch, depth, width, k, beta, holdout, cv_folds,
          select_folds, loss_option, standardize):
    """Train a probe on a run's scored samples and save it.

    By default the saved probe is trained on every scored prompt of the run, and the validation
    numbers printed at the end (expected return of best-of-k selection by the probe, against
    picking at random (pass@1) and an oracle (pass@k)) come from --cv-folds cross-validation over
    prompts: each prompt is scored by a probe that did not see it. With --holdout F a fraction F of
    the prompts is kept out of the saved probe instead and validates it. Prompts are split, never
    samples. With several --feature keys, part of the prompts picks the best one first. The probe
    records the hashes of the prompts it was trained on (`qprobe eval` refuses overlapping runs),
    and the range of its scores on them (the bound of `select --rejection`).
    """
    from qprobe.probes import ARCHITECTURES, TrainConfig, rerank_metrics, select_feature
    from qprobe.probes.data import split_prompts
    from qprobe.probes.train import resolve_loss

    if (run_path is None) == (pairs_path is None):
        raise ConfigError("expected exactly one of --run RUN or --pairs PAIRS_RUN, got "
                          f"{'both' if run_path is not None else 'neither'}")
    if pairs_path is not None:
        from qprobe.store.pairs import read_pairs

        read_pairs(pairs_path)  # a clear error when it is not a pairs run
        run_path = pairs_path
        default = click.core.ParameterSource.DEFAULT
        loss = "bt" if ctx.get_parameter_source("loss") == default else loss
        k = 2 if ctx.get_parameter_source("k") == default else k
    options = parse_kv(loss_option, "--loss-option")
    resolve_loss(loss, options)  # fail before reading the run
    cfg = TrainConfig(recipe=recipe, k=k, beta=beta, select_folds=select_folds)
    arch_options = {"depth": depth, "width": width} if arch == "mlp" else {}

    def make_probe():
        return ARCHITECTURES[arch](loss=loss, loss_options=options, train=cfg, standardize=standardize,
                                   seed=seed, **arch_options)

    if cv_folds < 1:
        raise ConfigError(f"expected --cv-folds >= 1 (1 = no cross-validation), got {cv_folds}")
    data = load_run_data(run_path, tuple(features))
    names, codes = np.unique(data.groups, return_inverse=True)
    keep, held = split_prompts(codes, holdout, np.random.default_rng(seed))
    n_prompts = int(codes.max()) + 1
    n_held = int(np.unique(codes[held]).size)
    if data.dropped:
        click.echo(f"run {run_path}: {data.dropped} rows left out: unscored (reward null, e.g. a sandbox error); "
                   "re-run the same `qprobe collect` to score them")
    click.echo(f"run {run_path}: {codes.size} scored samples, {n_prompts} prompts: {n_prompts - n_held} train"
               + (f", {n_held} held out" if n_held else " (all; validation by cross-validation)" if cv_folds > 1 else " (all)"))
    key = next(iter(data.features))
    if len(data.features) > 1:
        key, table = select_feature({kk: v[keep] for kk, v in data.features.items()}, data.rewards[keep],
                                    codes[keep], make_probe, k=k, beta=beta, seed=seed)
        for kk, value in table.items():
            click.echo(f"  feature {kk:<16} selection expected return@{k} {value:.4f}{'  <- chosen' if kk == key else ''}")
    x = data.features[key]
    start = time.perf_counter()
    trained_on = sorted({data.prompt_hashes[p] for p in names[np.unique(codes[keep])]})
    probe = make_probe().fit(x[keep], data.rewards[keep], codes[keep], spec=data.specs[key],
                             source={**data.source, "feature": key, "holdout": holdout, "seed": seed,
                                     "train_prompts": {"n": len(trained_on), "hash": "sha256[:16] of the prompt text",
                                                       "hashes": trained_on}})
    seconds = time.perf_counter() - start
    hist = probe.history_
    detail = f", L2 {hist['l2']:g} chosen on held-out training prompts" if "l2" in hist else ""
    click.echo(f"trained {arch} probe, loss {loss}, recipe {recipe}, feature {key} ({x.shape[1]} dims) in "
               f"{seconds:.2f} s{detail}; final training loss {hist['train_loss']:.4f}")
    results = {"train": rerank_metrics(probe, x[keep], data.rewards[keep], codes[keep], k, beta)}
    click.echo(_row(f"train ({int(results['train']['prompts'])} prompts)", results["train"], k))
    if held.size:
        results["held_out"] = rerank_metrics(probe, x[held], data.rewards[held], codes[held], k, beta)
        click.echo(_row(f"held out ({int(results['held_out']['prompts'])} prompts)", results["held_out"], k))
    elif cv_folds > 1 and n_prompts >= 2:
        results["cv"] = _cross_validate(make_probe, x, data.rewards, codes, min(cv_folds, n_prompts), k, beta, seed)
        click.echo(_row(f"{min(cv_folds, n_prompts)}-fold CV ({int(results['cv']['prompts'])} prompts)", results["cv"], k))
    probe.source_["validation"] = {f"{part} {name}": value for part, m in results.items()
                                   for name, value in m.items() if name in ("expected_return", "pass@1", "pass@k")}
    probe.save_pretrained(out)
    click.echo(f"saved {out}")
