"""`qprobe rm train | eval`: reward models with a trainable trunk (EX-RM, IM-RM, Q-RM; arXiv 2507.07981).

    qprobe rm train --head ex --pairs uf/train --format columns --lr 1e-4 --epochs 2 --out rms/ex
    qprobe rm train --head im --pairs agreeableness.jsonl --format persona --out rms/im-persona
    qprobe rm eval --rm rms/ex --pairs uf/test --json ex-uf.json
    qprobe rm eval --rm rms/im-persona --pairs agreeableness.jsonl --format persona --split test --words unseen
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from qprobe.cli.options import set_torch_threads, trunk_options

FORMATS = ["auto", "hh", "columns", "qrm", "persona"]


def _pair_options(f: Any) -> Any:
    options = [
        click.option("--pairs", "pairs_path", required=True, help="Pairs: .jsonl(.gz)/.json/.arrow/.parquet file, save_to_disk folder, hf:NAME, or a persona .jsonl with --format persona."),
        click.option("--format", "fmt", type=click.Choice(FORMATS), default="auto", show_default=True, help="Layout of the rows; 'persona' builds the controlled persona pairs (qprobe.tasks.persona)."),
        click.option("--split", default=None, help="Split of a save_to_disk DatasetDict folder; for --format persona: train (default) or test."),
        click.option("--field", "fields", multiple=True, metavar="ROLE=COLUMN", help="Read a role from another column, e.g. chosen=orig_chosen."),
        click.option("--limit", type=int, default=None, help="At most N pairs."),
        click.option("--max-chars", type=int, default=None, help="Keep only pairs whose prompt + responses are at most this long."),
        click.option("--words", type=click.Choice(["train", "unseen"]), default="train", show_default=True, help="--format persona: the training answer words or the unseen ones (all yes x no word pairs)."),
        click.option("--data-seed", type=int, default=0, show_default=True, help="--format persona: seed of the train/test split of prompts and of the prefix draws."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _load(pairs_path: str, fmt: str, split: str | None, fields: tuple[str, ...], limit: int | None,
          max_chars: int | None, words: str, data_seed: int) -> list[Any]:
    if fmt == "persona":
        from qprobe.tasks.persona import persona_pairs

        got = persona_pairs(pairs_path, split or "train", words, seed=data_seed)
        return got if limit is None else got[:limit]
    from qprobe.cli.pairs_cmds import _load as load_pairs_cli

    return load_pairs_cli(pairs_path, fmt, split, fields, 0, limit, max_chars, None)


def _source(pairs_path: str, fmt: str, split: str | None, words: str, data_seed: int) -> str:
    extra = f" words={words} data_seed={data_seed}" if fmt == "persona" else ""
    return f"{pairs_path} (format {fmt}{'' if split is None else f', split {split}'}{extra})"


@click.group("rm")
def rm() -> None:
    """Reward models with a trainable trunk: LoRA on the top blocks + an EX / IM / Q-RM head.

    \b
      qprobe rm train --head ex|im|qrm --pairs FILE --out DIR      # resumable: re-run to continue
      qprobe rm eval --rm DIR --pairs FILE [--json OUT]            # accuracy (ties 1/2), 95% CI, margin
    """


@rm.command("train")
@click.option("--head", required=True, help="Head: ex, im or qrm (see `qprobe ls`).")
@_pair_options
@trunk_options("Seed of the adapters, the head and the pair order.")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="AdamW learning rate (weight decay 0, constant).")
@click.option("--epochs", type=int, default=1, show_default=True, help="Passes over the pairs (raise it and re-run to train on).")
@click.option("--batch-pairs", type=int, default=8, show_default=True, help="Pairs per optimiser step.")
@click.option("--max-response-tokens", type=int, default=256, show_default=True, help="Responses cut to this many tokens (recorded).")
@click.option("--max-prompt-tokens", type=int, default=512, show_default=True, help="Prompts cut to their last N tokens (recorded).")
@click.option("--max-steps", type=int, default=None, help="Stop after this many optimiser steps in all (re-run to continue).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder: the reward model, and work/ (cache + checkpoint).")
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path), default=None, help="Frozen-trunk cache folder to share between runs on the same pairs and base model (any head, seed, lr); default OUT/work/cache.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")
def rm_train_cmd(head, pairs_path, fmt, split, fields, limit, max_chars, words, data_seed, model, top_blocks, lora_r,
              lora_alpha, lr, epochs, batch_pairs, max_response_tokens, max_prompt_tokens, seed, dtype, threads,
              max_steps, out, cache_dir, progress):
    """Train a reward model on preference pairs. Re-running with the same --out resumes from the last
    step (the cached trunk states are reused); with more --epochs it trains on."""
    from qprobe.rm import RewardModel, RMConfig, save_rm
    from qprobe.rm.workdir import load_checkpoint

    config = RMConfig(head=head, model=model, top_blocks=top_blocks, lora_r=lora_r, lora_alpha=lora_alpha, lr=lr,
                      epochs=epochs, batch_pairs=batch_pairs, max_response_tokens=max_response_tokens,
                      max_prompt_tokens=max_prompt_tokens, seed=seed, dtype=dtype)
    items = _load(pairs_path, fmt, split, fields, limit, max_chars, words, data_seed)
    set_torch_threads(threads)
    work = out / "work"
    ck = load_checkpoint(work) if work.is_dir() else None
    if ck is not None:
        click.echo(f"resumed at step {ck[1]['step']} from {work}")
    model_ = RewardModel(config).fit(items, source=_source(pairs_path, fmt, split, words, data_seed), workdir=work,
                                     cache_dir=cache_dir, progress=progress, max_steps=max_steps)
    save_rm(model_, out)
    p = model_.provenance_
    state = "done" if p["finished"] else f"stopped at step {p['steps']} of {p['steps_planned']} (re-run to continue)"
    spp = "-" if p["seconds_per_pair"] is None else f"{p['seconds_per_pair']:.2f}"
    click.echo(f"{head}: {p['pairs']} pairs, {p['steps']} steps, final loss {p['final_loss']}, {spp} s/pair, "
               f"cache {p['cache_seconds']:.1f} s ({p['cached_pairs_this_run']} pairs), {p['truncated']} cut; "
               f"{state}; wrote {out}")


@rm.command("eval")
@click.option("--rm", "rm_path", required=True, type=click.Path(path_type=Path), help="A folder written by `qprobe rm train`.")
@_pair_options
@click.option("--model", default=None, help="Base model path, when it moved (its weights must be the ones trained on).")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path), default=None, help="Frozen-trunk cache folder to share between runs on the same pairs and base model (any head, seed, lr); default none.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the figures and per-pair rewards here.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def rm_eval_cmd(rm_path, pairs_path, fmt, split, fields, limit, max_chars, words, data_seed, model, threads, cache_dir,
                json_out, progress):
    """Pairwise accuracy (ties 1/2) with a 95% bootstrap interval over pairs, and the normalised
    margin mean|r_c - r_r| / std(all rewards)."""
    from qprobe.core.files import write_json_atomic
    from qprobe.evaluation.preferences import accuracy, normalised_margin, pairwise_outcomes
    from qprobe.rm import load_rm

    items = _load(pairs_path, fmt, split, fields, limit, max_chars, words, data_seed)
    set_torch_threads(threads)
    reward_model = load_rm(rm_path, model=model)
    chosen, rejected = reward_model.rewards(items, progress=progress, cache_dir=cache_dir)
    acc = accuracy(pairwise_outcomes(chosen, rejected))
    margin = normalised_margin(chosen, rejected)
    click.echo(f"{reward_model.config.head} on {len(items)} pairs: accuracy {acc}  normalised margin {margin:.3f}")
    if json_out is not None:
        write_json_atomic(json_out, {
            "rm": str(rm_path), "head": reward_model.config.head,
            "pairs": _source(pairs_path, fmt, split, words, data_seed), "accuracy": acc.to_dict(),
            "normalised_margin": margin,
            "rewards": [{"id": p.id, "chosen": float(c), "rejected": float(r)}
                        for p, c, r in zip(items, chosen, rejected, strict=True)],
        })
        click.echo(f"wrote {json_out}")
