"""`qprobe eval` and `qprobe select`: measure probes on a stored run, and use them on new prompts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


@click.command("eval")
@click.option("--run", "run_path", required=True, type=click.Path(path_type=Path), help="Test run (collected with the probes' features).")
@click.option("--probe", "probes", multiple=True, help="Probe directory, hf://ORG/NAME[@REVISION] from the Hub, or a shipped probe (default-code) (repeatable).")
@click.option("--greedy-run", type=click.Path(path_type=Path), default=None, help="A run of the same prompts decoded at temperature 0.")
@click.option("-k", "k", default=4, show_default=True, help="Candidates per selection.")
@click.option("--beta", default=0.0, show_default=True, help="Selection temperature (0 = argmax).")
@click.option("--prompts", "prompt_file", type=click.Path(path_type=Path), default=None, help="Only the prompt ids listed in this file (one a line).")
@click.option("--consensus", default=0.0, show_default=True,
              help="Also each probe with this weight x the candidates' agreement added to Q (as select --consensus), "
                   "and agreement alone.")
@click.option("--allow-overlap", is_flag=True,
              help="Evaluate even when a probe was trained on some of the evaluated prompts (compared by prompt-text hash).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the results as JSON.")
def eval_cmd(run_path, probes, greedy_run, k, beta, prompt_file, consensus, allow_overlap, json_out):
    """Compare probes on a run: pass@1, greedy, best-of-k by each probe, pass@k.

    Each probe method is the EXACT expected reward of picking by softmax(Q/beta) from a uniformly
    random k-subset of each prompt's stored samples; intervals are 95% bootstrap over prompts, and
    gains are paired against pass@1 on the same prompts. With --consensus W the score depends on the
    candidate set, and the expectation enumerates every k-subset (sampled past 200,000 subsets).
    Every figure of the table uses the same prompts (--prompts: exactly those; an id the run lacks
    is an error). A probe trained on some of the evaluated prompts is refused unless --allow-overlap.
    The skyline is pass@k for 0/1 rewards and the exact oracle best-of-k for other rewards.
    """
    from qprobe.evaluation.consensus_return import consensus_values
    from qprobe.evaluation.evaluate import (
        RunData,
        check_overlap,
        format_table,
        mean_reward_values,
        method_result,
        pass_at_k_values,
        probe_scores,
        probe_values,
        skyline_name,
    )
    from qprobe.policy.select import PolicyConfig
    from qprobe.probes.models import Probe

    PolicyConfig(consensus=consensus)  # the policy's own check of the weight
    data = RunData.load(run_path)
    if prompt_file is not None:
        from qprobe.cli.options import read_ids

        data = data.only(read_ids(prompt_file))
    prompts = data.prompts()
    _say_dropped(run_path, data)
    loaded = [(path, Probe.from_pretrained(path)) for path in probes]
    for path, probe in loaded:
        note = check_overlap(probe, data, str(path), allow_overlap)
        if note:
            click.echo(note, err=True)
    results = [method_result("pass@1", mean_reward_values(data), prompts)]
    if greedy_run is not None:
        greedy = RunData.load(greedy_run)
        _say_dropped(greedy_run, greedy)
        results.append(method_result("greedy", mean_reward_values(greedy), prompts))
    texts = None
    if consensus:
        import numpy as np

        texts = data.completions()
        rng = np.random.default_rng(0)
    for path, probe in loaded:
        scores = probe_scores(data, probe)
        results.append(method_result(f"{Path(path).name} (k={k})", probe_values(data, scores, k, beta), prompts))
        if texts is not None:
            values = consensus_values(data.prompt_ids, texts, scores, data.rewards, k, beta, consensus, rng)
            results.append(method_result(f"{Path(path).name} + {consensus:g} x consensus (k={k})", values, prompts))
    if texts is not None:
        values = consensus_values(data.prompt_ids, texts, np.zeros(len(texts)), data.rewards, k, beta, consensus, rng)
        results.append(method_result(f"consensus alone (k={k})", values, prompts))
    results.append(method_result(skyline_name(data, k), pass_at_k_values(data, k), prompts))
    click.echo(format_table(results, baseline=results[0]))
    if json_out is not None:
        from qprobe.core.files import write_json_atomic

        write_json_atomic(json_out, {"run": str(run_path), "k": k, "beta": beta, "consensus": consensus,
                                     "prompts": len(prompts), "unscored_rows_left_out": data.unscored,
                                     "methods": {r.name: [r.mean, r.low, r.high] for r in results}})


def _say_dropped(path, data) -> None:
    if data.unscored:
        click.echo(f"{path}: {data.unscored} of {len(data.run)} rows left out: unscored (reward null, e.g. a sandbox "
                   "error); re-run the same `qprobe collect` to score them", err=True)


@click.command("select")
@click.option("--probe", "probe_path", required=True, help="A trained probe directory, hf://ORG/NAME[@REVISION] from the Hub, or a shipped probe (default-code).")
@click.option("--prompt", "prompt_text", default=None, help="One prompt (sent as a user chat message).")
@click.option("--prompts", "prompt_file", type=click.Path(path_type=Path), default=None, help="JSONL of {\"id\", \"prompt\"} or a text file, one prompt a line.")
@click.option("-k", "k", default=8, show_default=True, help="Candidates sampled per prompt.")
@click.option("--beta", default=0.0, show_default=True, help="Selection temperature (0 = argmax).")
@click.option("--rejection", is_flag=True,
              help="Rejection-sampling variant (section 4.2) instead of best-of-k: accept a sample with probability "
                   "exp((Q - M) / beta); needs --beta > 0.")
@click.option("--q-max", type=float, default=None,
              help="--rejection: the bound M (default: the probe's largest score on its training rows). A sample "
                   "with Q > M is accepted outright (Q capped at M).")
@click.option("--max-rounds", default=8, show_default=True,
              help="--rejection: batches of k drawn before falling back to an importance-weighted pick among the rejected ones.")
@click.option("--consensus", default=0.0, show_default=True,
              help="Add this weight x the candidate's mean token-set similarity to the other candidates to Q (0 = off).")
@click.option("--backend", default=None,
              help="Back-end that generates (default: the one the probe's features came from; for a probe on an "
                   "external embedder, the generator of its training run).")
@click.option("--model", default=None, help="Model (default: the back-end's default; must match the probe's weights).")
@click.option("--raw", is_flag=True, help="Send the prompt as plain text to continue, not as a chat message.")
@click.option("--temperature", default=0.8, show_default=True, help="Sampling temperature of the k candidates.")
@click.option("--top-p", default=0.95, show_default=True, help="Nucleus sampling mass of the k candidates.")
@click.option("--max-new-tokens", default=300, show_default=True, help="Most tokens per candidate.")
@click.option("--seed", default=0, show_default=True, help="Seed of the samples and of the pick (same seed, same answer).")
@click.option("--json", "as_json", is_flag=True, help="Print every candidate with its score and probability, as JSON lines.")
def select_cmd(probe_path, prompt_text, prompt_file, k, beta, rejection, q_max, max_rounds, consensus, backend, model, raw,
               temperature, top_p, max_new_tokens, seed, as_json):
    """Answer prompts with the Q-probe policy: sample k, score each with the probe, pick one."""
    import numpy as np

    from qprobe.catalog import BACKENDS
    from qprobe.cli.options import generator_name
    from qprobe.errors import ConfigError
    from qprobe.generation.base import SamplingConfig
    from qprobe.policy.select import PolicyConfig, QProbePolicy
    from qprobe.probes.models import Probe

    if (prompt_text is None) == (prompt_file is None):
        raise ConfigError("expected exactly one of --prompt TEXT or --prompts FILE, got " + ("both" if prompt_text else "neither"))
    prompts = _read_prompts(prompt_text, prompt_file, raw)
    probe = Probe.from_pretrained(probe_path)
    if getattr(probe, "feature_spec_", None) is None:
        raise ConfigError(f"expected a probe with a feature spec in {probe_path}, got none; train it with `qprobe train --run`")
    name = generator_name(probe, probe_path, backend)
    if name not in BACKENDS:
        BACKENDS.entry(name)  # "did you mean" error for a mistyped --backend
    options = {} if model is None else {"model": model}
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    config = PolicyConfig(k=k, beta=beta, mode="rejection" if rejection else "softmax", consensus=consensus,
                          q_max=q_max, max_rounds=max_rounds)
    with BACKENDS.create(name, **options) as be:
        policy = QProbePolicy(be, probe, config, sampling, rng=np.random.default_rng(seed))
        for p in prompts:
            sel = policy(p)
            if as_json:
                sys.stdout.write(json.dumps(sel.to_dict(with_candidates=True), ensure_ascii=False) + "\n")
            else:
                note = " (fallback: none accepted within --max-rounds)" if sel.fallback else ""
                note += f" ({sel.above_bound} above the bound --q-max)" if sel.above_bound else ""
                click.echo(f"# {sel.prompt_id}: candidate {sel.index} of {sel.draws}{note}")
                click.echo(sel.text)


def _read_prompts(text: str | None, path: Path | None, raw: bool) -> list:
    from qprobe.core.types import Prompt
    from qprobe.errors import DataError

    def make(pid: str, t: str) -> Prompt:
        return Prompt(id=pid, text=t, messages=None if raw else ({"role": "user", "content": t},))

    if text is not None:
        return [make("prompt", text)]
    assert path is not None
    if not path.is_file():
        raise DataError(f"expected a prompts file, got '{path}' which does not exist")
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
                out.append(make(str(row.get("id", i)), row["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"expected JSON objects with a 'prompt' field in {path}, got line {i + 1}: {line[:60]!r}") from None
        else:
            out.append(make(str(i), line))
    return out
