"""`qprobe report`: a static folder a person can browse, built from a stored run and its probes.

Everything shown is computed by the evaluation functions `qprobe eval` uses (`evaluate.py`): the
table of methods with 95% bootstrap intervals and paired gains over pass@1, the expected return
against k, and per prompt each candidate's reward, Q under each probe and selection probability
softmax(Q/beta) among the prompt's scored candidates (`metrics.selection_probs`: argmax with ties
split at beta = 0). Token credits come from the run's stored per-token states only
(`token_credits.stored_states`, `L<layer>_tokens`); the report never runs a model on states.

This module gathers the numbers (`build_report`) and writes the folder (`write_report`, what
`qprobe report` and the demo call); `report_view` holds them per prompt, `report_page` makes the HTML.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from qprobe.errors import ConfigError, DataError, QProbeError
from qprobe.evaluation.credits import CandidateCredits
from qprobe.evaluation.evaluate import (
    MethodResult,
    RunData,
    check_overlap,
    mean_reward_values,
    method_result,
    paired_difference,
    pass_at_k_values,
    probe_scores,
    probe_values,
    skyline_name,
)
from qprobe.evaluation.report_view import Report, prompt_views

FIGURE = "return_vs_k.png"
PAGE = "index.html"
META = "report.json"  # marks a folder as a report: only such a folder is ever replaced


def method_table(data: RunData, names: Sequence[str], scores: Sequence[np.ndarray], k: int, beta: float,
                 greedy: RunData | None = None) -> list[MethodResult]:
    """The rows `qprobe eval` prints: pass@1, greedy, best-of-k by each probe, the skyline."""
    prompts = data.prompts()
    results = [method_result("pass@1", mean_reward_values(data), prompts)]
    if greedy is not None:
        results.append(method_result("greedy", mean_reward_values(greedy), prompts))
    for name, s in zip(names, scores, strict=True):
        results.append(method_result(f"{name} (k={k})", probe_values(data, s, k, beta), prompts))
    results.append(method_result(skyline_name(data, k), pass_at_k_values(data, k), prompts))
    return results


def return_curves(data: RunData, names: Sequence[str], scores: Sequence[np.ndarray], beta: float,
                  greedy: RunData | None = None) -> tuple[list[int], dict[str, list[float]]]:
    """Mean over prompts of each method's expected return at k = 1 .. the most samples of a prompt."""
    n = max(int(c) for c in np.unique(data.prompt_ids, return_counts=True)[1])
    ks = list(range(1, n + 1))
    prompts = data.prompts()

    def mean(values: dict[str, float]) -> float:
        return float(np.mean([values[p] for p in prompts]))

    curves = {"pass@1": [mean(mean_reward_values(data))] * n}
    if greedy is not None:
        curves["greedy"] = [mean(mean_reward_values(greedy))] * n
    for name, s in zip(names, scores, strict=True):
        curves[name] = [mean(probe_values(data, s, k, beta)) for k in ks]
    curves["pass@k" if skyline_name(data, 1) == "pass@1" else "oracle best-of-k"] = [
        mean(pass_at_k_values(data, k)) for k in ks]
    return ks, curves


def stored_credits(data: RunData, probe: Any, name: str, tokenizer: Callable[[], Any]) -> tuple[dict[int, CandidateCredits], str]:
    """The probe's token credits of every kept row, from the run's stored per-token states of its
    layer (row number -> credits), and a line saying where they come from or why there are none.
    `tokenizer()`: the embedder that names the tokens (built only when states are stored)."""
    from qprobe.core.types import Completion
    from qprobe.evaluation.token_credits import is_linear, stored_states
    from qprobe.features.spec import FeatureRequest

    spec = getattr(probe, "feature_spec_", None)
    if not is_linear(probe) or spec is None or spec.embedder:
        return {}, f"{name}: no token credits (they need a linear probe on a hidden-state layer of the run's model)"
    key = FeatureRequest(spec.layer, "tokens").key
    rows = [int(r) for r in data.rows]
    states = stored_states(data.run, key, spec, rows)
    if states is None:
        return {}, (f"{name}: no token credits: the run stores no per-token states {key} of the probe's layer "
                    f"(collect or `qprobe embed` it with --feature {spec.layer}:tokens)")
    table = data.run.table(["completion", "n_tokens", "finish_reason", "seed", "sample_index"]).to_pydict()
    comps = [Completion(table["completion"][r], int(table["n_tokens"][r]), table["finish_reason"][r],
                        int(table["seed"][r])) for r in rows]
    try:
        pieces = tokenizer().token_pieces(comps)
    except QProbeError as exc:
        return {}, f"{name}: no token credits: {key} is stored, but its tokenizer could not be loaded ({exc})"
    per_token = getattr(probe, "score_tokens", None) or probe.score  # a linear head scores each row
    out, skipped = {}, 0
    for r, h, toks, reward in zip(rows, states, pieces, data.rewards, strict=True):
        if len(h) != len(toks):
            skipped += 1
            continue
        z = per_token(np.asarray(h, dtype=np.float32))  # [t]
        out[r] = CandidateCredits(int(table["sample_index"][r]), float(reward), tuple(toks), z)
    note = f"{name}: token credits Z_t from the stored feature {key}"
    if skipped:
        note += f" ({skipped} candidates without: their stored states and the tokenizer's tokens disagree)"
    return out, note


class _Tokenizer:
    """The run's embedder, built on first use and closed by `close` (one model load per report)."""

    def __init__(self, data: RunData) -> None:
        self.data = data
        self.backend: Any = None
        self.embedder: Any = None

    def __call__(self) -> Any:
        if self.embedder is None:
            from qprobe.collection.embed import backend_for
            from qprobe.features import make_embedder

            self.backend = backend_for(self.data.run)
            self.embedder = make_embedder(self.backend, "")
        return self.embedder

    def close(self) -> None:
        for part in (self.embedder, self.backend):
            if part is not None:
                part.close()


def load_probes(probes: Mapping[str, Any] | Sequence[Any]) -> dict[str, Any]:
    """{name: probe}: probe objects kept, paths and hf:// names loaded (named after their last part)."""
    from qprobe.probes.models import Probe

    items = list(probes.items()) if isinstance(probes, Mapping) else [
        ((Path(str(p)).name or str(p)) if isinstance(p, (str, os.PathLike)) else type(p).__name__, p) for p in probes]
    out: dict[str, Any] = {}
    for name, p in items:
        label, n = str(name), 2
        while label in out:  # two probes of the same name: number them
            label, n = f"{name} ({n})", n + 1
        out[label] = Probe.from_pretrained(p) if isinstance(p, (str, os.PathLike)) else p
    return out


def build_report(run: Any, probes: Mapping[str, Any] | Sequence[Any] = (), k: int = 4, beta: float = 0.0, *,
                 greedy_run: Any = None, prompt_ids: Sequence[str] | None = None,
                 allow_overlap: bool = False) -> Report:
    """The numbers of a report on `run` (a path or `RunData`); errors (QProbeError) before anything is written."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"expected k to be an integer >= 1 (candidates per selection), got {k!r}")
    if not (math.isfinite(float(beta)) and beta >= 0):
        raise ConfigError(f"expected beta >= 0 (0 means argmax), got {beta!r}")
    data = run if isinstance(run, RunData) else RunData.load(run)
    if prompt_ids is not None:
        data = data.only(list(prompt_ids))
    loaded = load_probes(probes)
    notes = [note for name, p in loaded.items() if (note := check_overlap(p, data, name, allow_overlap))]
    if data.unscored:
        notes.append(f"{data.unscored} of {len(data.run)} rows left out: unscored (reward null)")
    names = list(loaded)
    scores = [probe_scores(data, p) for p in loaded.values()]  # SpecMismatchError for another model's probe
    greedy = None if greedy_run is None else (greedy_run if isinstance(greedy_run, RunData) else RunData.load(greedy_run))
    methods = method_table(data, names, scores, k, beta, greedy)
    gains = tuple(None if i == 0 else paired_difference(m, methods[0]) for i, m in enumerate(methods))
    ks, curves = return_curves(data, names, scores, beta, greedy)
    tokenizer = _Tokenizer(data)
    try:
        made = [stored_credits(data, p, name, tokenizer) for name, p in loaded.items()]
    finally:
        tokenizer.close()
    m = data.run.manifest
    task = m.get("task", {})
    about = (("run", str(data.run.path)), ("task", f"{task.get('name', '?')} ({task.get('split', '?')})"),
             ("model", str(m.get("model", {}).get("model", "?"))), ("prompts", str(len(data.prompts()))),
             ("candidates", str(len(data.rows))), ("selection", f"k = {k}, beta = {beta:g}"
                                                    + (" (argmax, ties split)" if beta == 0 else "")))
    return Report(about=about, probes=tuple(names), k=k, beta=beta, methods=tuple(methods), gains=gains,
                  ks=tuple(ks), curves=curves, prompts=tuple(prompt_views(data, scores, beta, [c for c, _ in made])),
                  credit_notes=tuple(n for _, n in made), notes=tuple(notes))


def _readable(folder: Path) -> None:
    """Temp files are private (0600); a report is for reading, by a browser or a web server: the umask's modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~umask)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / META).is_file())):
        raise DataError(f"expected --out to be a new or empty folder or an earlier report, got '{out}' which holds "
                        f"other files (no {META}); choose another --out")


def write_report(run: Any, probes: Mapping[str, Any] | Sequence[Any], out: str | os.PathLike[str], k: int = 4,
                 beta: float = 0.0, *, greedy_run: Any = None, prompt_ids: Sequence[str] | None = None,
                 allow_overlap: bool = False, say: Callable[[str], None] | None = None) -> Path:
    """Write the report folder `out` (index.html, the figure, report.json) and return its index.html.

    `probes`: {name: probe object or path} or a list of paths / probe objects. The folder appears
    whole or not at all (`replace_dir`); bad input raises QProbeError before anything is written.
    `say`: called with each note (a probe trained on reported prompts, rows left out unscored)."""
    from qprobe.core.files import replace_dir, write_json_atomic, write_text_atomic
    from qprobe.evaluation.plots import plot_return_vs_k
    from qprobe.evaluation.report_page import report_html

    out = Path(out)
    _check_out(out)
    report = build_report(run, probes, k, beta, greedy_run=greedy_run, prompt_ids=prompt_ids,
                          allow_overlap=allow_overlap)
    for note in report.notes:
        if say is not None:
            say(note)

    def build(tmp: Path) -> None:
        title = f"{dict(report.about)['task']}: expected reward against k ({len(report.prompts)} prompts)"
        if plot_return_vs_k(list(report.ks), report.curves, tmp / FIGURE, title):
            final = replace(report, figure=FIGURE)
        else:
            final = replace(report, notes=(*report.notes, "no figure: matplotlib is not installed "
                                                          "(pip install 'qprobe[plot]')"))
        write_text_atomic(tmp / PAGE, report_html(final))
        write_json_atomic(tmp / META, {"qprobe_report": 1, **dict(report.about), "k": report.k, "beta": report.beta,
                                       "methods": {m.name: [m.mean, m.low, m.high] for m in report.methods}})
        _readable(tmp)

    replace_dir(out, build)
    return out / PAGE

