"""Credit maps: each candidate's completion tokens coloured by a linear probe's per-token score.

`Z_t = v . h_t + b` for each completion-token state `h_t` (Q-RM's token credit, arXiv 2505.23363);
for a linear head the mean of `Z_t` over the tokens is the probe's score of the mean-pooled
feature, so the sequence score and the rank shown are those of mean pooling. The colour scale is
diverging and symmetric: white at 0, `NEGATIVE` and `POSITIVE` at -/+ the largest |Z| of the page,
so colours compare across candidates.

This module is pure (tokens, Z and rewards in, HTML text out); `token_credits` gathers them from a
run and a probe, `plots.credit_map_png` draws the same map with matplotlib. Model-written text is
hostile: every string goes through `html.escape`, and the page's Content-Security-Policy allows no
script, no network and no other file.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import numpy as np

from qprobe.errors import DataError

NEUTRAL = (255, 255, 255)
NEGATIVE = (178, 24, 43)  # RdBu's red end: tokens the probe blames
POSITIVE = (33, 102, 172)  # RdBu's blue end: tokens the probe credits
EMPTY_TOKEN = "\u2205"  # shown for an empty completion (its one state is the last prompt token)
CSP = "default-src 'none'; style-src 'unsafe-inline'"


def rgb(z: float, zmax: float) -> tuple[int, int, int]:
    """The scale's colour of `z` when +/-`zmax` are its ends: linear from white to the end of z's sign,
    clipped beyond `zmax`; zmax <= 0 (every Z is 0) gives white."""
    if not zmax > 0 or not np.isfinite(z) or z == 0:
        return NEUTRAL
    t = min(abs(float(z)) / zmax, 1.0)
    end = POSITIVE if z > 0 else NEGATIVE
    r, g, b = (int(n + t * (e - n) + 0.5) for n, e in zip(NEUTRAL, end, strict=True))  # halves round up
    return r, g, b


def hex_colour(c: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*c)


def colour(z: float, zmax: float) -> str:
    """`rgb` as '#rrggbb'."""
    return hex_colour(rgb(z, zmax))


def ink(z: float, zmax: float) -> str:
    """Text colour readable on `colour(z, zmax)`: white on the dark ends, near-black elsewhere."""
    return "#ffffff" if zmax > 0 and abs(z) / zmax > 0.6 else "#111111"


@dataclass(frozen=True)
class CandidateCredits:
    """One candidate: its tokens' text and Z (one per completion-token state), its reward."""

    sample_index: int
    reward: float | None
    tokens: tuple[str, ...]
    z: np.ndarray = field(repr=False)  # [t]

    def __post_init__(self) -> None:
        z = np.asarray(self.z, dtype=np.float64).reshape(-1)
        if len(z) != len(self.tokens) or not len(z):
            raise DataError(
                f"expected one token string per token score, got {len(self.tokens)} tokens and {len(z)} "
                f"scores for sample {self.sample_index}; the states and the tokenizer disagree"
            )
        object.__setattr__(self, "z", z)

    @property
    def score(self) -> float:
        """The sequence score: mean Z over the tokens (= the linear probe's mean-pooled score)."""
        return float(self.z.mean())


@dataclass(frozen=True)
class CreditMap:
    """The candidates of one prompt with their token credits, plus lines that say where they come from."""

    prompt_id: str
    prompt: str
    candidates: tuple[CandidateCredits, ...]
    about: tuple[tuple[str, str], ...] = ()  # (label, value) lines: probe, run, feature, ...

    def ranked(self) -> list[tuple[int, CandidateCredits]]:
        """(rank, candidate), best score first; rank 1 is the best, ties broken by sample index."""
        order = sorted(self.candidates, key=lambda c: (-c.score, c.sample_index))
        return list(enumerate(order, start=1))

    def shown(self, max_candidates: int | None = None) -> list[tuple[int, CandidateCredits]]:
        ranked = self.ranked()
        return ranked if max_candidates is None else ranked[:max_candidates]

    def zmax(self, max_candidates: int | None = None) -> float:
        """The scale's end: the largest |Z| among the candidates shown."""
        return max((float(np.abs(c.z).max()) for _, c in self.shown(max_candidates)), default=0.0)


def label(token: str, n_tokens: int) -> str:
    """What a token shows: its text; the one state of an empty completion shows EMPTY_TOKEN (an empty
    piece of a longer completion, such as the first half of a split character, shows nothing)."""
    return EMPTY_TOKEN if not token and n_tokens == 1 else token


def format_reward(r: float | None) -> str:
    return "unscored" if r is None else f"{r:g}"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #111; background: #fff; }
h1 { font-size: 1.3em; margin: 0 0 .4em; }
dl.about { display: grid; grid-template-columns: max-content auto; gap: .1em 1em; font-size: .9em; margin: 0 0 1em; }
dl.about dt { color: #555; } dl.about dd { margin: 0; font-family: monospace; }
.legend { display: flex; align-items: center; gap: .6em; font-size: .85em; margin: .5em 0 1.2em; }
.legend .bar { width: 18em; height: 1em; border: 1px solid #999;
  background: linear-gradient(to right, NEG, NEU, POS); }
details.prompt pre { background: #f4f4f4; padding: .6em; max-height: 20em; overflow: auto; }
section.candidate { border-top: 1px solid #ccc; padding: .6em 0; }
section.candidate h2 { font-size: 1em; margin: 0 0 .3em; font-weight: 600; }
.pass { color: #1a7f37; } .fail { color: #b2182b; } .unscored { color: #777; }
pre.tokens { white-space: pre-wrap; word-break: break-all; font-size: .9em; line-height: 1.5; margin: 0; }
pre.tokens span.tok { box-shadow: inset -1px 0 0 rgba(0, 0, 0, .15); }  /* token boundaries */
"""


def _legend(zmax: float) -> str:
    return (f'<div class="legend" id="legend"><span>Z<sub>t</sub> = {-zmax:+.3g}</span>'
            f'<span class="bar" role="img" aria-label="diverging colour scale"></span>'
            f'<span>{zmax:+.3g}</span><span>(red: blamed, white: 0, blue: credited; '
            f'hover a token for its Z<sub>t</sub>)</span></div>')


def tokens_html(c: CandidateCredits, zmax: float) -> str:
    """The candidate's tokens as escaped `<span class="tok">` elements coloured on the scale +/-`zmax`."""
    spans = []
    for i, (tok, z) in enumerate(zip(c.tokens, c.z, strict=True)):
        text = label(tok, len(c.tokens))
        spans.append(
            f'<span class="tok" style="background-color:{colour(z, zmax)};color:{ink(z, zmax)}" '
            f'title="Z = {z:+.4f} (token {i})" data-z="{z:.6g}">{_e(text)}</span>'
        )
    return "".join(spans)


def _reward_class(r: float | None) -> str:
    return "unscored" if r is None else ("pass" if r > 0 else "fail")


def credit_html(cmap: CreditMap, max_candidates: int | None = None) -> str:
    """The credit map as one self-contained HTML page (inline CSS, no script, no network)."""
    shown = cmap.shown(max_candidates)
    zmax = cmap.zmax(max_candidates)
    n = len(cmap.candidates)
    style = (_STYLE.replace("NEG", hex_colour(NEGATIVE)).replace("NEU", hex_colour(NEUTRAL))
             .replace("POS", hex_colour(POSITIVE)))
    about = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in cmap.about)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_e(CSP)}">',
        f"<title>Credit map: {_e(cmap.prompt_id)}</title><style>{style}</style></head><body>",
        f"<h1>Credit map: prompt {_e(cmap.prompt_id)}</h1>",
        f'<dl class="about">{about}<dt>candidates</dt><dd>{len(shown)} shown of {n}, best score first</dd>'
        "<dt>score</dt><dd>mean of Z<sub>t</sub> over the completion's tokens</dd></dl>",
        _legend(zmax),
        f'<details class="prompt"><summary>Prompt</summary><pre>{_e(cmap.prompt)}</pre></details>',
    ]
    for rank, c in shown:
        rc = _reward_class(c.reward)
        parts.append(
            f'<section class="candidate" id="sample-{c.sample_index}" data-rank="{rank}" '
            f'data-score="{c.score:.6g}" data-reward="{_e(format_reward(c.reward))}">'
            f'<h2>#{rank} &middot; score {c.score:+.4f} &middot; reward <span class="{rc}">'
            f"{_e(format_reward(c.reward))}</span> &middot; sample {c.sample_index} &middot; "
            f"{len(c.tokens)} tokens</h2>"
            f'<pre class="tokens">{tokens_html(c, zmax)}</pre></section>'
        )
    parts.append("</body></html>\n")
    return "\n".join(parts)
