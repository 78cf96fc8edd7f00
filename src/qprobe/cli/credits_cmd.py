"""`qprobe credits`: a credit map of one prompt's candidates (tokens coloured by a linear probe's Z_t)."""

from __future__ import annotations

import re
from pathlib import Path

import click

from qprobe.cli.options import parse_kv


@click.command("credits")
@click.option("--probe", "probe_path", required=True, help="A linear probe directory (or hf://ORG/NAME[@REVISION]) trained on a hidden-state layer of the run's model.")
@click.option("--run", "run_path", required=True, type=click.Path(path_type=Path), help="The run whose candidates to show.")
@click.option("--prompt", "prompt_id", required=True, help="The prompt id (as `qprobe export` lists them, e.g. test/11).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="HTML page to write (default: credits-<prompt id>.html here).")
@click.option("--png", type=click.Path(path_type=Path), default=None, help="Also draw the map as a PNG with matplotlib (the demo extra).")
@click.option("--max-candidates", type=click.IntRange(min=1), default=16, show_default=True, help="Show the best N candidates by score (ranks count them all).")
@click.option("--model", default=None, help="The run's weights file, when its stored path moved (token states are computed with it).")
@click.option("--backend-option", multiple=True, metavar="KEY=VALUE", help="Option of the back-end computing the token states, e.g. n_ctx=4096.")
def credits_cmd(probe_path, run_path, prompt_id, out, png, max_candidates, model, backend_option):
    """Colour each candidate's completion tokens by the probe's per-token score Z_t = v.h_t + b.

    For one prompt of a run, every candidate is shown with its reward, its sequence score (the mean
    of Z_t, which for a linear probe is the probe's score of the mean-pooled state), and its rank by
    that score, best first; red tokens pull the score down, blue ones up, and hovering a token
    shows its Z_t. The token states are the run's stored `L<layer>_tokens` feature, or computed for
    this prompt with the run's back-end. The page is one self-contained HTML file (no script, no
    network); both files are written atomically, and nothing is written on an error.
    """
    from qprobe.core.files import write_bytes_atomic, write_text_atomic
    from qprobe.evaluation.credits import credit_html
    from qprobe.evaluation.token_credits import credit_map
    from qprobe.probes.models import Probe

    options = parse_kv(backend_option, "--backend-option")
    probe = Probe.from_pretrained(probe_path)
    cmap = credit_map(probe, run_path, prompt_id, model=model, backend_options=options, probe_name=str(probe_path))
    page = credit_html(cmap, max_candidates)
    image = None
    if png is not None:
        from qprobe.evaluation.plots import credit_map_png

        image = credit_map_png(cmap, max_candidates)
    if out is None:
        out = Path(f"credits-{re.sub(r'[^A-Za-z0-9._-]+', '-', prompt_id)}.html")
    for path in (out, png):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, page)
    if image is not None:
        write_bytes_atomic(png, image)
    best = cmap.ranked()[0][1]
    click.echo(f"{out}: {len(cmap.candidates)} candidates of {prompt_id}; best score {best.score:+.4f} "
               f"(sample {best.sample_index})" + (f"; {png}" if png is not None else ""))
