"""`qprobe pairs embed | eval | curve | judge`: the preference setting (paper section 7).

    qprobe pairs embed --pairs hh.jsonl.gz --backend llamacpp --limit 300 --out runs/hh
    qprobe train --pairs runs/hh --loss bt --out probes/hh-bt      # cross-validated pairwise accuracy
    qprobe pairs eval --run runs/hh-test --probe probes/hh-bt
    qprobe pairs curve --train runs/hh --test runs/hh-test --out fig6.png
    qprobe collect --task pairs --task-option data=hh.jsonl.gz --split all --n 8 --out runs/hh-samples
    qprobe pairs judge --pairs hh.jsonl.gz --samples runs/hh-samples --probe probes/hh-bt --serve
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from qprobe.cli.options import parse_kv


def _pair_options(f: Any) -> Any:
    """The options that say which pairs of a file to read (shared by embed and judge)."""
    options = [
        click.option("--pairs", "pairs_path", required=True, help="Pairs: .jsonl(.gz)/.json/.arrow/.parquet file, save_to_disk folder, or hf:NAME."),
        click.option("--format", "fmt", type=click.Choice(["auto", "hh", "columns", "qrm"]), default="auto", show_default=True, help="Layout of the rows."),
        click.option("--split", default=None, help="Split of a save_to_disk DatasetDict folder or a hub dataset."),
        click.option("--field", "fields", multiple=True, metavar="ROLE=COLUMN", help="Read a role from another column, e.g. chosen=orig_chosen."),
        click.option("--offset", default=0, show_default=True, help="Skip the first N pairs (after filtering)."),
        click.option("--limit", type=int, default=None, help="At most N pairs (after --offset)."),
        click.option("--max-chars", type=int, default=None, help="Keep only pairs whose prompt + responses are at most this long (a cost cap; it selects short pairs)."),
        click.option("--ids", "ids_file", type=click.Path(exists=True, path_type=Path), default=None, help="Keep only the pair ids listed in this file (one a line)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _load(pairs_path: str, fmt: str, split: str | None, fields: tuple[str, ...], offset: int, limit: int | None,
          max_chars: int | None, ids_file: Path | None) -> list[Any]:
    from qprobe.errors import DataError
    from qprobe.tasks.pairs import load_pairs

    ids = None if ids_file is None else {x.strip() for x in ids_file.read_text().splitlines() if x.strip()}
    pairs = load_pairs(pairs_path, fmt, split, None if limit is None else offset + limit, max_chars,
                       fields={k: str(v) for k, v in parse_kv(fields, "--field").items()} or None, ids=ids)
    pairs = pairs[offset:]
    if not pairs:
        raise DataError(f"expected some pairs in '{pairs_path}' after --offset {offset} and the filters, got none")
    return pairs


@click.group("pairs")
def pairs() -> None:
    """Preference pairs (prompt, chosen, rejected), paper section 7: embed, evaluate, judge.

    \b
      qprobe pairs embed --pairs hh.jsonl.gz --limit 300 --out runs/hh      # sample 0 chosen, 1 rejected
      qprobe train --pairs runs/hh --loss bt --out probes/hh-bt             # bt, dpo or margin_bt
      qprobe pairs eval --run runs/hh-test --probe probes/hh-bt             # accuracy, ties 1/2, 95% CI
      qprobe pairs curve --train runs/hh --test runs/hh-test --out fig6.png
      qprobe pairs judge --pairs hh.jsonl.gz --samples RUN --probe probes/hh-bt --serve
    """


@pairs.command("embed")
@_pair_options
@click.option("--backend", default="llamacpp", show_default=True, help="Back-end whose embedder gives the features.")
@click.option("--model", default=None, help="Model path or name (default: the back-end's default).")
@click.option("--feature", "features", multiple=True, help="LAYER:POOLING or embed=NAME:POOLING (default -1:last: last layer, last token).")
@click.option("--backend-option", multiple=True, metavar="KEY=VALUE", help="Back-end option, e.g. n_threads=1.")
@click.option("--feature-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True, help="Stored feature precision.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory (created, or resumed).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar (on stderr).")
def embed_cmd(pairs_path, fmt, split, fields, offset, limit, max_chars, ids_file, backend, model, features, backend_option,
              feature_dtype, out, progress):
    """Embed prompt+chosen and prompt+rejected of each pair into a run (sample 0 chosen, reward 1;
    sample 1 rejected, reward 0). Resumable: re-running skips pairs already stored."""
    from qprobe.collection.pairs import PairsConfig, embed_pairs

    items = _load(pairs_path, fmt, split, fields, offset, limit, max_chars, ids_file)
    source = {"data": str(pairs_path), "format": fmt, "split": split or "all", "fields": list(fields), "offset": offset,
              "limit": limit, "max_chars": max_chars, "ids": str(ids_file) if ids_file else None}
    cfg = PairsConfig(out=out, source=source, backend=backend, model=model, features=tuple(features or ["-1:last"]),
                      backend_options=parse_kv(backend_option, "--backend-option"), feature_dtype=feature_dtype)
    run = embed_pairs(items, cfg, progress=progress)
    click.echo(f"{run.path}: {len(run) // 2} pairs, features {', '.join(run.feature_keys)}")


@pairs.command("eval")
@click.option("--run", "run_path", required=True, type=click.Path(path_type=Path), help="A pairs run (qprobe pairs embed).")
@click.option("--probe", "probes", multiple=True, required=True, help="Probe directory or hf://ORG/NAME[@REVISION] (repeatable).")
@click.option("--allow-overlap", is_flag=True,
              help="Evaluate even when a probe was trained on some of these prompts (compared by prompt-text hash).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the results as JSON.")
def pairs_eval_cmd(run_path, probes, allow_overlap, json_out):
    """Pairwise accuracy of each probe (ties 1/2) with a 95% bootstrap interval over pairs; with
    several probes, the paired difference to the first. A probe trained on some of the run's
    prompts is refused unless --allow-overlap."""
    from qprobe.evaluation.evaluate import check_overlap, run_prompt_hashes
    from qprobe.evaluation.preferences import accuracy, accuracy_difference, run_outcomes
    from qprobe.probes.models import Probe
    from qprobe.store import Run

    hashes = run_prompt_hashes(Run.open(run_path))
    loaded = [(path, Probe.from_pretrained(path)) for path in probes]
    for path, probe in loaded:
        note = check_overlap(probe, hashes, str(path), allow_overlap)
        if note:
            click.echo(note, err=True)

    results: dict[str, Any] = {}
    first = None
    click.echo(f"{'probe':<28} {'accuracy':>8}  {'95% CI':<16} {'pairs':>5} {'ties':>5}")
    for path, probe in loaded:
        _, out = run_outcomes(probe, run_path)
        acc = accuracy(out)
        line = f"{Path(path).name:<28} {acc.mean:8.4f}  [{acc.low:.3f}, {acc.high:.3f}] {acc.n_pairs:5d} {acc.ties:5d}"
        if first is not None:
            d, lo, hi = accuracy_difference(out, first)
            line += f"   vs first {d:+.4f} [{lo:+.3f}, {hi:+.3f}]"
        first = out if first is None else first
        click.echo(line)
        results[str(path)] = acc.to_dict()
    if json_out is not None:
        from qprobe.core.files import write_json_atomic

        write_json_atomic(json_out, {"run": str(run_path), "probes": results})


@pairs.command("curve")
@click.option("--train", "train_path", required=True, type=click.Path(path_type=Path), help="Pairs run to train on.")
@click.option("--test", "test_path", required=True, type=click.Path(path_type=Path), help="Pairs run to measure on.")
@click.option("--feature", default=None, help="Feature key (default: the run's first).")
@click.option("--loss", default="bt", show_default=True, help="Pairwise loss: bt, dpo or margin_bt.")
@click.option("--fractions", default="0.1,0.25,0.5,1.0", show_default=True, help="Fractions of the training pairs.")
@click.option("--seeds", default=3, show_default=True, help="Random orders of the training pairs.")
@click.option("--width", default=256, show_default=True, help="MLP hidden units.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="PNG to write (a .json beside it).")
def curve_cmd(train_path, test_path, feature, loss, fractions, seeds, width, out):
    """Figure 6: test accuracy against the fraction of training pairs, for a linear probe and
    2- and 3-layer MLPs (one and two hidden layers)."""
    from qprobe.evaluation.preferences import learning_curve, plot_learning_curve
    from qprobe.store.pairs import read_pairs

    train, test = read_pairs(train_path), read_pairs(test_path)
    key = feature or train.run.feature_keys[0]
    spec = train.run.feature_spec(key)
    spec.check_compatible(test.run.feature_spec(key))
    result = learning_curve(train.features(key), test.features(key), [float(x) for x in fractions.split(",")],
                            probe_factories(loss, width), seeds=seeds, spec=spec)
    for name, ys in result["curves"].items():
        click.echo(f"{name:<22} " + "  ".join(f"{f:g}: {y:.4f}" for f, y in zip(result["fractions"], ys, strict=True)))
    from qprobe.core.files import write_json_atomic

    plotted = plot_learning_curve(result, out, f"{Path(train_path).name} -> {Path(test_path).name}, loss {loss}")
    write_json_atomic(Path(out).with_suffix(".json"), result)
    click.echo(f"wrote {out if plotted else '(no matplotlib: no figure)'} and {Path(out).with_suffix('.json')}")


def probe_factories(loss: str, width: int = 256) -> dict[str, Any]:
    """Linear, 2-layer and 3-layer (paper's naming: one and two hidden layers) probes of a pairwise loss."""
    from qprobe.probes import LinearProbe, MLPProbe, TrainConfig

    cfg = TrainConfig(k=2)
    return {
        "linear": lambda s: LinearProbe(loss=loss, train=cfg, seed=s),
        "MLP 2-layer": lambda s: MLPProbe(loss=loss, train=cfg, seed=s, depth=1, width=width),
        "MLP 3-layer": lambda s: MLPProbe(loss=loss, train=cfg, seed=s, depth=2, width=width),
    }


@pairs.command("judge")
@_pair_options
@click.option("--samples", "samples_path", type=click.Path(path_type=Path), default=None,
              help="A run of the model's samples for the pairs' prompts (qprobe collect --task pairs); without it the dataset's rejected response is judged (a judge sanity check).")
@click.option("--probe", "probe_path", default=None, help="Probe directory or hf://ORG/NAME[@REVISION]. Pick each prompt's sample by this probe (argmax); without it, sample 0 (a random pick).")
@click.option("-k", "k", type=int, default=None, help="Candidates per prompt (the first k samples; default all).")
@click.option("--judge-model", default="", help="Model name at the judge endpoint.")
@click.option("--base-url", default=None, help="OpenAI-compatible endpoint (default $OPENAI_BASE_URL, then the OpenAI API).")
@click.option("--api-key-env", default="OPENAI_API_KEY", show_default=True, help="Environment variable holding the judge server's API key.")
@click.option("--serve", "serve", is_flag=True, help="Start a local llama.cpp server as the judge (a weak judge).")
@click.option("--serve-model", default=None, help="GGUF for --serve (default: the packaged model).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write every verdict and the summary as JSON.")
def judge_cmd(pairs_path, fmt, split, fields, offset, limit, max_chars, ids_file, samples_path, probe_path, k, judge_model,
              base_url, api_key_env, serve, serve_model, json_out):
    """Win rate against the dataset's chosen responses, judged in both orders (disagreements and
    unparseable answers are ties)."""
    import contextlib

    from qprobe.errors import ConfigError
    from qprobe.evaluation.judge import ChatJudge, rejected_items, sample_items, win_rate

    items_pairs = _load(pairs_path, fmt, split, fields, offset, limit, max_chars, ids_file)
    if samples_path is None:
        if probe_path is not None:
            raise ConfigError("expected --samples RUN with --probe (the probe picks among samples), got no --samples")
        items = rejected_items(items_pairs)
        what = "dataset rejected vs chosen"
    else:
        from qprobe.probes.models import Probe
        from qprobe.store import Run

        probe = Probe.from_pretrained(probe_path) if probe_path is not None else None
        items = sample_items(items_pairs, Run.open(samples_path), probe, k)
        what = f"{'probe ' + Path(probe_path).name if probe_path else 'sample 0'} vs chosen"
    if not serve and not judge_model:
        raise ConfigError("expected --judge-model NAME (with --base-url) or --serve, got neither")
    with contextlib.ExitStack() as stack:
        if serve:
            from qprobe.generation.server import llama_server

            srv = stack.enter_context(llama_server(serve_model, n_ctx=8192))
            base_url, judge_model = srv.base_url, judge_model or srv.model
            click.echo(f"serving the judge on {srv.base_url} (a small local model: a weak judge)")
        judge = ChatJudge(judge_model, base_url=base_url, api_key_env=api_key_env)
        stack.callback(judge.close)
        result = win_rate(judge, items)
    click.echo(f"{what}: win rate {result}")
    if json_out is not None:
        from qprobe.core.files import write_json_atomic

        write_json_atomic(json_out, {
            "what": what, "pairs": str(pairs_path), "samples": str(samples_path) if samples_path else None,
            "probe": str(probe_path) if probe_path else None, "judge": judge_model, "summary": result.summary(),
            "verdicts": [{"id": v.id, "outcome": v.outcome, "kind": v.kind, "first": v.first, "second": v.second,
                          "replies": list(v.replies)} for v in result.verdicts],
        })
