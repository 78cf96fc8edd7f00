"""`qprobe report`: a static HTML folder to browse a run's candidates, probes and methods."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("report")
@click.argument("run_path", metavar="RUN", type=click.Path(path_type=Path))
@click.option("--probe", "probes", multiple=True, help="Probe directory, or hf://ORG/NAME[@REVISION] (repeatable; the first one sorts the candidates).")
@click.option("--greedy-run", type=click.Path(path_type=Path), default=None, help="A run of the same prompts decoded at temperature 0.")
@click.option("-k", "k", default=4, show_default=True, help="Candidates per selection in the table.")
@click.option("--beta", default=0.0, show_default=True,
              help="Selection temperature of the table and of each candidate's probability (0 = argmax, ties split).")
@click.option("--prompts", "prompt_file", type=click.Path(path_type=Path), default=None, help="Only the prompt ids listed in this file (one a line).")
@click.option("--allow-overlap", is_flag=True, help="Report even when a probe was trained on some of the prompts (noted on the page).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder to write (index.html, return_vs_k.png, report.json).")
def report_cmd(run_path, probes, greedy_run, k, beta, prompt_file, allow_overlap, out):
    """Write a static report of RUN that a browser opens from disk (no server, no network).

    The page holds the table `qprobe eval` prints (pass@1, greedy, best-of-k by each probe, the
    skyline, with 95% intervals and paired gains over pass@1), the expected reward against k for
    k = 1 .. the samples per prompt, and every prompt with its candidates: completion, reward, the
    failing test or error, Q under each probe and the probability of picking it, softmax(Q/beta)
    among the prompt's candidates, sorted by the first probe's Q; and the token credits of a linear
    probe when the run stores per-token states of its layer (L<layer>_tokens). Filters show the
    prompts where a probe picked wrong (its argmax candidate's reward is below the prompt's best)
    or whose rewards are mixed; `index.html#filter=wrong,mixed&probe=0` opens them filtered.
    The folder is written whole or not at all; a folder other than an earlier report is refused.
    """
    from qprobe.evaluation.report import write_report

    prompt_ids = None
    if prompt_file is not None:
        from qprobe.cli.options import read_ids

        prompt_ids = read_ids(prompt_file)
    page = write_report(run_path, list(probes), out, k, beta, greedy_run=greedy_run, prompt_ids=prompt_ids,
                        allow_overlap=allow_overlap, say=lambda line: click.echo(line, err=True))
    click.echo(f"{page}")
