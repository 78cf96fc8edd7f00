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

    def only(self, prompt_file: Path) -> TrainingData:
        """The rows of the prompt ids listed in a file (one a line); an id the run lacks is an error."""
        from qprobe.errors import DataError

        if not prompt_file.is_file():
            raise DataError(f"expected a file of prompt ids (one a line) for --prompts, got '{prompt_file}' which does not exist")
        wanted = list(dict.fromkeys(x.strip() for x in prompt_file.read_text().splitlines() if x.strip()))
        known = set(self.prompt_hashes or {}) | set(self.groups.tolist())
        missing = [p for p in wanted if p not in known]
        if missing or not wanted:
            raise DataError(f"expected prompt ids of the run in {prompt_file}, got {len(missing)} it lacks (e.g. "
                            f"'{missing[0]}')" if missing else f"expected prompt ids in {prompt_file}, got an empty file")
        rows = np.nonzero(np.isin(self.groups, np.asarray(wanted, dtype=str)))[0]
        if rows.size == 0:
            raise DataError(f"expected scored samples of the prompts in {prompt_file}, got none (all unscored)")
        return TrainingData({k: v[rows] for k, v in self.features.items()}, self.rewards[rows], self.groups[rows],
                            self.specs, {**self.source, "prompts_file": str(prompt_file)}, self.dropped,
                            self.prompt_hashes)


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
                    beta: float, seed: int, pairs_of: Any = None) -> dict[str, float]:
    """Out-of-fold validation: each prompt's numbers come from a probe fitted without it; the means
    are over all prompts (each fold weighted by its prompt count)."""
    from qprobe.probes import rerank_metrics
    from qprobe.probes.data import fold_prompts

    total: dict[str, float] = {}
    for fit, held in fold_prompts(codes, folds, np.random.default_rng(seed)):
        probe = make_probe().fit(x[fit], rewards[fit], codes[fit], pair_rows=None if pairs_of is None else pairs_of(fit))
        m = rerank_metrics(probe, x[held], rewards[held], codes[held], k, beta)
        for name in ("expected_return", "pass@1", "pass@k"):
            total[name] = total.get(name, 0.0) + m[name] * m["prompts"]
        total["prompts"] = total.get("prompts", 0.0) + m["prompts"]
        total["samples"] = total.get("samples", 0.0) + m["samples"]
    return {name: (v / total["prompts"] if name not in ("prompts", "samples") else v) for name, v in total.items()}


def _token_aggregation(data: TrainingData) -> str:
    """A token probe is trained for its features' pooling: mean (Q-RM) or last (the ORM)."""
    from qprobe.probes.token import TRAINED_AGGREGATIONS

    poolings = sorted({spec.pooling for spec in data.specs.values()})
    if len(poolings) != 1 or poolings[0] not in TRAINED_AGGREGATIONS:
        raise ConfigError(f"expected --arch token features of one pooling among {list(TRAINED_AGGREGATIONS)} (pass "
                          f"--feature 18:mean for Q-RM, 18:last for the ORM), got {sorted(data.specs)}")
    return poolings[0]


def _pair_maker(data: TrainingData, per_prompt: int | None, seed: int, run_path: Path) -> Any:
    """rows -> their (chosen, rejected) pairs [P, 2], numbered within `rows` (`ordered_pairs`)."""
    from qprobe.errors import DataError
    from qprobe.store.pairs import ordered_pairs

    ordered_pairs(data.rewards[:0], data.groups[:0], per_prompt, seed)  # a bad --pairs-per-prompt fails first

    def pairs_of(rows: np.ndarray) -> np.ndarray:
        found = ordered_pairs(data.rewards[rows], data.groups[rows], per_prompt, seed)
        if not len(found):
            n = np.unique(data.groups[rows]).size
            raise DataError(f"expected some prompt with samples of different rewards among {n} training prompts of "
                            f"run {run_path}, got none (each passes all or fails all); sample more per prompt or "
                            "train with --run and a pointwise loss")
        return found

    return pairs_of


def _renamed_to_arch(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:
        raise ConfigError(f"expected --arch linear|mlp|token for the probe's architecture, got --model {value}; "
                          "--model names model weights in the other commands, use --arch")


@click.command()
@click.option("--run", "run_path", default=None, type=click.Path(path_type=Path), help="Run directory written by `qprobe collect`.")
@click.option("--pairs", "pairs_path", default=None, type=click.Path(path_type=Path),
              help="Instead of --run: a pairs run (`qprobe pairs embed`); defaults become --loss bt and --k 2, so the printed metric is pairwise accuracy (ties 1/2).")
@click.option("--pairs-from", "pairs_from", default=None, type=click.Path(path_type=Path),
              help="Instead of --run: a scored run whose prompts' (higher, lower reward) sample pairs train the probe; defaults become --loss margin_bt and --arch token (Q-RM). Pairs never cross prompts or the split.")
@click.option("--pairs-per-prompt", type=int, default=None, help="--pairs-from: at most N pairs per prompt, drawn with --pair-seed (default: every pair).")
@click.option("--pair-seed", default=0, show_default=True, help="--pairs-from: seed of the --pairs-per-prompt draw (with a hash of the prompt id: a prompt draws the same pairs in any split).")
@click.option("--prompts", "prompt_file", default=None, type=click.Path(path_type=Path),
              help="Only the prompt ids listed in this file (one a line) train and validate the probe.")
@click.option("--loss", default="pg", show_default=True, help="Loss (see `qprobe ls`): mse, ce, pg, listwise, bt, dpo, margin_bt.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Probe directory to write (config.json, model.safetensors, README.md).")
@click.option("--recipe", type=click.Choice(["fast", "paper"]), default="fast", show_default=True,
              help="fast: standardised features, L-BFGS, L2 chosen on held-out prompts; paper: the authors' AdamW recipe.")
@click.option("--seed", default=0, show_default=True, help="Seed of the splits and the initialisation (same seed, same probe).")
@click.option("--feature", "features", multiple=True, help="Feature key (L-1_last) or LAYER:POOLING; repeat to let held-out prompts pick the best. Default: every pooled feature of the run.")
@click.option("--arch", "arch", type=click.Choice(["linear", "mlp", "token"]), default="linear", show_default=True,
              help="Probe architecture; token: a linear head that also scores each token (Q-RM), trained for the feature's pooling (mean, or last: the ORM).")
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
def train(ctx, run_path, pairs_path, pairs_from, pairs_per_prompt, pair_seed, prompt_file, loss, out, recipe, seed, features, arch, depth, width, k, beta, holdout, cv_folds,
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

    With --pairs-from RUN the probe trains on preference pairs of the run's scored samples: within
    each training prompt, every (higher, lower reward) pair (0/1 rewards: passing vs failing), or
    --pairs-per-prompt of them; all-pass and all-fail prompts give none. Prompts are split first,
    so pairs never cross prompts, the holdout or a fold; validation is still best-of-k expected
    return on the held-out prompts' samples.
    """
    from qprobe.probes import ARCHITECTURES, TrainConfig, rerank_metrics, select_feature
    from qprobe.probes.data import split_prompts
    from qprobe.probes.train import resolve_loss

    given = [name for name, v in (("--run", run_path), ("--pairs", pairs_path), ("--pairs-from", pairs_from)) if v is not None]
    if len(given) != 1:
        raise ConfigError("expected exactly one of --run RUN, --pairs PAIRS_RUN or --pairs-from RUN, got "
                          f"{' and '.join(given) if given else 'none'}")
    default = click.core.ParameterSource.DEFAULT
    if pairs_from is None and (pairs_per_prompt is not None or ctx.get_parameter_source("pair_seed") != default):
        raise ConfigError("expected --pairs-per-prompt and --pair-seed with --pairs-from RUN only; add --pairs-from")
    if pairs_from is not None:
        run_path = pairs_from
        loss = "margin_bt" if ctx.get_parameter_source("loss") == default else loss
        arch = "token" if ctx.get_parameter_source("arch") == default else arch
    if pairs_path is not None:
        from qprobe.store.pairs import read_pairs

        read_pairs(pairs_path)  # a clear error when it is not a pairs run
        run_path = pairs_path
        loss = "bt" if ctx.get_parameter_source("loss") == default else loss
        k = 2 if ctx.get_parameter_source("k") == default else k
    options = parse_kv(loss_option, "--loss-option")
    _, kind = resolve_loss(loss, options)  # fail before reading the run
    if pairs_from is not None and kind != "pairwise":
        raise ConfigError(f"expected a pairwise loss (margin_bt, bt, dpo) with --pairs-from, got '{loss}', a {kind} loss")
    cfg = TrainConfig(recipe=recipe, k=k, beta=beta, select_folds=select_folds)
    arch_options = {"depth": depth, "width": width} if arch == "mlp" else {}

    def make_probe():
        return ARCHITECTURES[arch](loss=loss, loss_options=options, train=cfg, standardize=standardize,
                                   seed=seed, **arch_options)

    if cv_folds < 1:
        raise ConfigError(f"expected --cv-folds >= 1 (1 = no cross-validation), got {cv_folds}")
    data = load_run_data(run_path, tuple(features))
    if prompt_file is not None:
        data = data.only(prompt_file)
    if arch == "token":
        arch_options["aggregation"] = _token_aggregation(data)
    names, codes = np.unique(data.groups, return_inverse=True)
    keep, held = split_prompts(codes, holdout, np.random.default_rng(seed))
    n_prompts = int(codes.max()) + 1
    n_held = int(np.unique(codes[held]).size)
    if data.dropped:
        click.echo(f"run {run_path}: {data.dropped} rows left out: unscored (reward null, e.g. a sandbox error); "
                   "re-run the same `qprobe collect` to score them")
    click.echo(f"run {run_path}: {codes.size} scored samples, {n_prompts} prompts: {n_prompts - n_held} train"
               + (f", {n_held} held out" if n_held else " (all; validation by cross-validation)" if cv_folds > 1 else " (all)"))
    pairs_of, pair_rows = None, None
    if pairs_from is not None:
        pairs_of = _pair_maker(data, pairs_per_prompt, pair_seed, run_path)
        pair_rows = pairs_of(keep)  # the saved probe's pairs: those of its training prompts only
    key = next(iter(data.features))
    if len(data.features) > 1:
        key, table = select_feature({kk: v[keep] for kk, v in data.features.items()}, data.rewards[keep],
                                    codes[keep], make_probe, k=k, beta=beta, seed=seed,
                                    pairs_of=None if pairs_of is None else (lambda r: pairs_of(keep[r])))
        for kk, value in table.items():
            click.echo(f"  feature {kk:<16} selection expected return@{k} {value:.4f}{'  <- chosen' if kk == key else ''}")
    x = data.features[key]
    start = time.perf_counter()
    trained_on = sorted({data.prompt_hashes[p] for p in names[np.unique(codes[keep])]})
    source = {**data.source, "feature": key, "holdout": holdout, "seed": seed,
              "train_prompts": {"n": len(trained_on), "hash": "sha256[:16] of the prompt text", "hashes": trained_on}}
    if pair_rows is not None:
        used = int(np.unique(codes[keep][pair_rows[:, 0]]).size)
        source["pairs"] = {"from": str(Path(run_path).resolve()), "n_pairs": int(len(pair_rows)), "n_prompts": used,
                           "n_prompts_without_pairs": len(trained_on) - used,
                           "per_prompt": "all" if pairs_per_prompt is None else pairs_per_prompt, "seed": pair_seed,
                           "rule": "within a prompt, reward(chosen) > reward(rejected); unscored rows skipped"}
        click.echo(f"pairs from run: {len(pair_rows)} pairs from {used} of {len(trained_on)} training prompts "
                   f"({'every pair' if pairs_per_prompt is None else f'at most {pairs_per_prompt} a prompt, seed {pair_seed}'}; "
                   "all-pass and all-fail prompts give none)")
    probe = make_probe().fit(x[keep], data.rewards[keep], codes[keep], pair_rows=pair_rows, spec=data.specs[key],
                             source=source)
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
        results["cv"] = _cross_validate(make_probe, x, data.rewards, codes, min(cv_folds, n_prompts), k, beta, seed,
                                        pairs_of)
        click.echo(_row(f"{min(cv_folds, n_prompts)}-fold CV ({int(results['cv']['prompts'])} prompts)", results["cv"], k))
    probe.source_["validation"] = {f"{part} {name}": value for part, m in results.items()
                                   for name, value in m.items() if name in ("expected_return", "pass@1", "pass@k")}
    probe.save_pretrained(out)
    click.echo(f"saved {out}")
