"""The report's HTML page (`report.Report` in, one self-contained page out).

Model-written text is hostile: every string from the run goes through `html.escape`; the page's
Content-Security-Policy allows only its own inline style and script and images of its own folder,
so nothing is fetched from the network. The script only filters: it reads the checkboxes (or the
URL fragment, e.g. `index.html#filter=wrong,mixed&probe=1`) and sets `hidden` on prompt sections.
"""

from __future__ import annotations

import html

from qprobe.evaluation.credits import NEGATIVE, NEUTRAL, POSITIVE, hex_colour, tokens_html
from qprobe.evaluation.report_view import CandidateView, PromptView, Report

# 'self' and file: (a page opened from disk: browsers differ on whether 'self' matches file URLs).
CSP = "default-src 'none'; img-src 'self' file:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #111; background: #fff; max-width: 80em; }
h1 { font-size: 1.35em; margin: 0 0 .4em; } h2 { font-size: 1.1em; margin: 1.2em 0 .4em; }
dl.about { display: grid; grid-template-columns: max-content auto; gap: .1em 1em; font-size: .9em; margin: 0 0 1em; }
dl.about dt { color: #555; } dl.about dd { margin: 0; font-family: monospace; }
ul.notes { font-size: .9em; color: #6a4a00; }
table.methods { border-collapse: collapse; font-size: .92em; }
table.methods th, table.methods td { padding: .25em .7em; border-bottom: 1px solid #ddd; text-align: right; }
table.methods th:first-child, table.methods td:first-child { text-align: left; }
td.up { color: #1a7f37; } td.down { color: #b2182b; }
div.top { display: flex; flex-wrap: wrap; column-gap: 2em; align-items: flex-start; }
div.top > div { flex: 0 1 auto; min-width: 0; } div.top p { max-width: 34em; }
img.figure { width: 34em; max-width: 100%; border: 1px solid #ddd; }
#filters { position: sticky; top: 0; background: #f6f8fa; padding: .5em .8em; border: 1px solid #ddd;
  display: flex; gap: 1.4em; align-items: center; flex-wrap: wrap; z-index: 1; }
section.prompt { border-top: 2px solid #888; margin-top: 1em; padding-top: .3em; }
section.prompt h3 { font-size: 1em; margin: .2em 0; }
details.text pre, pre.completion, pre.tokens { background: #f4f4f4; padding: .5em; max-height: 18em; overflow: auto;
  white-space: pre-wrap; word-break: break-word; font-size: .85em; margin: .2em 0; }
pre.completion, pre.tokens { max-height: 14em; }
div.candidate { border-left: 4px solid #ccc; padding: .2em .6em; margin: .5em 0; }
div.candidate.pass { border-left-color: #1a7f37; } div.candidate.fail { border-left-color: #b2182b; }
div.candidate .head { font-size: .9em; } .verdict { font-size: .85em; color: #555; font-family: monospace; }
strong.pass { color: #1a7f37; } strong.fail { color: #b2182b; } .wrong { color: #b2182b; font-weight: 600; }
pre.tokens span.tok { box-shadow: inset -1px 0 0 rgba(0, 0, 0, .15); }
.legend { display: inline-block; width: 12em; height: .8em; border: 1px solid #999; vertical-align: middle;
  background: linear-gradient(to right, NEG, NEU, POS); }
"""

# Records script errors and blocked loads on <html data-errors>, so a test can read them from the DOM.
_GUARD = """(function () {
  var h = document.documentElement;
  function note(what) { h.dataset.errors = String(Number(h.dataset.errors) + 1); h.dataset.lastError = what; }
  window.addEventListener('error', function (e) { note(String(e.message || 'error loading ' + (e.target && e.target.src))); }, true);
  document.addEventListener('securitypolicyviolation', function (e) { note('blocked ' + e.blockedURI); });
})();"""

_SCRIPT = """(function () {
  var sections = Array.prototype.slice.call(document.querySelectorAll('section.prompt'));
  var wrong = document.getElementById('f-wrong'), mixed = document.getElementById('f-mixed');
  var probe = document.getElementById('f-probe'), count = document.getElementById('f-count');
  function apply() {
    var shown = 0, p = probe ? probe.value : '';
    sections.forEach(function (s) {
      var picked = (' ' + s.dataset.wrong + ' ').indexOf(' ' + p + ' ') >= 0;
      var hide = (wrong && wrong.checked && !picked) || (mixed.checked && s.dataset.mixed !== '1');
      s.hidden = hide;
      if (!hide) { shown += 1; }
    });
    count.textContent = shown + ' of ' + sections.length + ' prompts shown';
  }
  var args = {};
  location.hash.replace(/^#/, '').split('&').forEach(function (kv) {
    var i = kv.indexOf('=');
    if (i > 0) { args[decodeURIComponent(kv.slice(0, i))] = decodeURIComponent(kv.slice(i + 1)); }
  });
  var on = (args.filter || '').split(',');
  if (wrong) { wrong.checked = on.indexOf('wrong') >= 0; }
  mixed.checked = on.indexOf('mixed') >= 0;
  if (probe && args.probe && probe.querySelector('option[value="' + Number(args.probe) + '"]')) {
    probe.value = String(Number(args.probe));
  }
  [wrong, mixed, probe].forEach(function (el) { if (el) { el.addEventListener('change', apply); } });
  apply();
  var h = document.documentElement, fig = document.getElementById('figure');
  window.addEventListener('load', function () { if (fig) { h.dataset.figureWidth = String(fig.naturalWidth); } });
  h.dataset.ready = '1';
})();"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _num(x: float) -> str:
    return f"{x:.12g}"


def _about(report: Report) -> str:
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in report.about)
    notes = "".join(f"<li>{_e(n)}</li>" for n in (*report.notes, *report.credit_notes))
    return f'<dl class="about">{rows}</dl>' + (f'<ul class="notes">{notes}</ul>' if notes else "")


def methods_html(report: Report) -> str:
    """The table `qprobe eval` prints: method, mean, 95% CI, prompts, paired gain over pass@1."""
    base = report.methods[0].name
    head = ("<tr><th>method</th><th>mean</th><th>95% CI</th><th>prompts</th>"
            f"<th>gain vs {_e(base)} [95% CI]</th></tr>")
    rows = []
    for m, g in zip(report.methods, report.gains, strict=True):
        if g is None:
            gain, cls, data = "", "", ""
        else:
            gain = f"{g[0]:+.4f} [{g[1]:+.4f}, {g[2]:+.4f}]"
            cls = "up" if g[1] > 0 else "down" if g[2] < 0 else ""
            data = f' data-gain="{_num(g[0])}" data-gain-low="{_num(g[1])}" data-gain-high="{_num(g[2])}"'
        rows.append(f'<tr class="method" data-method="{_e(m.name)}" data-mean="{_num(m.mean)}" '
                    f'data-low="{_num(m.low)}" data-high="{_num(m.high)}"{data}><td>{_e(m.name)}</td>'
                    f"<td>{m.mean:.4f}</td><td>[{m.low:.4f}, {m.high:.4f}]</td><td>{m.n_prompts}</td>"
                    f'<td class="{cls}">{gain}</td></tr>')
    return f'<table class="methods" id="methods">{head}{"".join(rows)}</table>'


def _figure(report: Report) -> str:
    if report.figure is None:
        return "<p>(no figure)</p>"
    return (f'<img class="figure" id="figure" src="{_e(report.figure)}" '
            f'alt="expected reward against k, k = 1 to {report.ks[-1]}">')


def _filters(report: Report) -> str:
    parts = ['<div id="filters" role="group" aria-label="filters">']
    if report.probes:
        options = "".join(f'<option value="{j}">{_e(n)}</option>' for j, n in enumerate(report.probes))
        parts.append('<label><input type="checkbox" id="f-wrong"> picked wrong by</label>'
                     f'<select id="f-probe" aria-label="probe">{options}</select>')
    parts.append('<label><input type="checkbox" id="f-mixed"> mixed rewards</label>'
                 f'<span id="f-count">{len(report.prompts)} prompts</span></div>')
    return "".join(parts)


def _candidate(c: CandidateView, rank: int, view: PromptView, report: Report) -> str:
    best = c.reward >= view.best
    cls = "fail" if not best else "pass" if view.mixed or c.verdict == "passed" else ""
    scores = "".join(f' &middot; Q<sub>{_e(n)}</sub> {c.q[j]:+.4f}, p {c.p[j]:.3f}' for j, n in enumerate(report.probes))
    data = "".join(f' data-q{j}="{_num(c.q[j])}" data-p{j}="{_num(c.p[j])}"' for j in range(len(report.probes)))
    body = "" if any(x is not None for x in c.credits) else f'<pre class="completion">{_e(c.completion) or "(empty)"}</pre>'
    for j, cred in enumerate(c.credits):
        if cred is not None:
            body += (f'<div class="credits">token credits Z<sub>t</sub> of {_e(report.probes[j])} '
                     f'(<span class="legend"></span> &plusmn;{view.zmax(j):.3g}; hover a token)</div>'
                     f'<pre class="tokens" data-probe="{j}">{tokens_html(cred, view.zmax(j))}</pre>')
    return (f'<div class="candidate {cls}" data-sample="{c.sample_index}" data-rank="{rank}" '
            f'data-reward="{_num(c.reward)}"{data}><div class="head">#{rank} &middot; sample {c.sample_index} '
            f'&middot; reward <strong class="{cls}">{_num(c.reward)}</strong>{scores}</div>'
            f'<div class="verdict">{_e(c.verdict)}</div>{body}</div>')


def prompt_html(view: PromptView, index: int, report: Report) -> str:
    """One prompt's section: its text, then its candidates in the view's order."""
    wrong = [j for j in range(len(report.probes)) if view.wrong(j)]
    picks = "".join(
        f' &middot; {_e(n)} picks reward <span class="{"wrong" if j in wrong else ""}">{view.picked(j):.3g}</span>'
        for j, n in enumerate(report.probes))
    rewards = [c.reward for c in view.candidates]
    head = (f"<h3>{_e(view.prompt_id)} &middot; {len(view.candidates)} candidates &middot; rewards "
            f"{min(rewards):g} to {max(rewards):g}{picks}</h3>")
    cands = "".join(_candidate(c, r, view, report) for r, c in enumerate(view.candidates, start=1))
    return (f'<section class="prompt" id="prompt-{index}" data-prompt-id="{_e(view.prompt_id)}" '
            f'data-mixed="{int(view.mixed)}" data-wrong="{" ".join(map(str, wrong))}">{head}'
            f'<details class="text"><summary>prompt</summary><pre>{_e(view.prompt)}</pre></details>{cands}</section>')


def report_html(report: Report) -> str:
    """The whole page: about, table, figure, filters, then one section per prompt."""
    style = (_STYLE.replace("NEG", hex_colour(NEGATIVE)).replace("NEU", hex_colour(NEUTRAL))
             .replace("POS", hex_colour(POSITIVE)))
    order = f"sorted by Q of {_e(report.probes[0])}, best first" if report.probes else "by sample"
    parts = [
        "<!DOCTYPE html>", '<html lang="en" data-errors="0"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_e(CSP)}">',
        '<meta name="generator" content="qprobe report">',
        f"<script>{_GUARD}</script><title>qprobe report: {_e(dict(report.about).get('run', ''))}</title>"
        f"<style>{style}</style></head><body>",
        "<h1>qprobe report</h1>", _about(report),
        '<div class="top"><div><h2>Methods</h2>', methods_html(report),
        "<p>Probe rows: the exact expected reward of picking by softmax(Q/beta) from a "
        "random k-subset of each prompt's candidates; intervals: 95% bootstrap over prompts; gains paired on the "
        "same prompts.</p></div>",
        "<div><h2>Expected reward against k</h2>", _figure(report), "</div></div>",
        f"<h2>Prompts</h2><p>Candidates {order}; p: the probability of picking the candidate among all of "
        f"the prompt's candidates, softmax(Q/beta) at beta = {report.beta:g}"
        + (" (argmax, ties split)" if report.beta == 0 else "") + ".</p>",
        _filters(report),
        *(prompt_html(v, i, report) for i, v in enumerate(report.prompts)),
        f"<script>{_SCRIPT}</script></body></html>\n",
    ]
    return "\n".join(parts)
