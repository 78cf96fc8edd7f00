"""Figures: matplotlib is optional (the `plot` extra); without it no figure is drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qprobe.core.files import write_atomic


def new_axes() -> tuple[Any, Any] | None:
    """(figure, axes) on the non-interactive Agg back-end, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt.subplots(figsize=(6, 4))


def save(fig: Any, ax: Any, title: str, path: str | Path) -> None:
    """Title, grid and legend, then write the PNG and free the figure."""
    import matplotlib.pyplot as plt

    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, dpi=120, format=Path(path).suffix.lstrip(".") or "png"))
    plt.close(fig)


def _literal(text: str) -> str:
    """Text matplotlib shows as written: a '$' would start mathtext (and a lone one fails to parse)."""
    return text.replace("$", r"\$")


def plot_return_vs_k(ks: list[int], curves: dict[str, list[float]], path: str | Path, title: str,
                flat: tuple[str, ...] = ("pass@1", "greedy")) -> bool:
    """Expected reward against k, one line per method (dashed: the `flat` baselines and the skyline,
    a name starting with "pass@" or "oracle"); False when matplotlib is missing."""
    axes = new_axes()
    if axes is None:
        return False
    fig, ax = axes
    for name, ys in curves.items():
        dashed = name in flat or name.startswith(("pass@", "oracle"))
        ax.plot(ks, ys, marker="o", ms=3, label=_literal(name), linestyle="--" if dashed else "-")
    ax.set_xlabel("k (candidates)")
    ax.set_ylabel("expected reward")
    save(fig, ax, _literal(title), path)
    return True


Cell = tuple[str, float | None, int]  # (character, Z or None for no colour, token number or -1)


def _grid_lines(cmap: Any, max_candidates: int | None, width: int, max_lines: int) -> list[list[Cell]]:
    """The credit map as rows of character cells, wrapped at `width`."""
    from qprobe.evaluation.credits import format_reward, label

    zmax = cmap.zmax(max_candidates)
    rows: list[list[Cell]] = []

    def plain(text: str) -> None:
        rows.append([(ch, None, -1) for ch in text[:width]])

    plain(f"Credit map: prompt {cmap.prompt_id}   ({len(cmap.shown(max_candidates))} of {len(cmap.candidates)} candidates)")
    bar: list[Cell] = [(" ", -zmax + 2 * zmax * i / 39, -1) for i in range(40)]
    rows.append([(ch, None, -1) for ch in f"Z {-zmax:+.3g} "] + bar + [(ch, None, -1) for ch in f" {zmax:+.3g}"])
    for rank, c in cmap.shown(max_candidates):
        plain("")
        plain(f"#{rank}  score {c.score:+.4f}  reward {format_reward(c.reward)}  sample {c.sample_index}")
        lines: list[list[Cell]] = [[]]
        for t, (tok, z) in enumerate(zip(c.tokens, c.z, strict=True)):
            for ch in label(tok, len(c.tokens)).replace("\t", "    "):
                if ch == "\n":
                    lines[-1].append((" ", float(z), t))  # the newline's own cell keeps its colour
                    lines.append([])
                    continue
                if len(lines[-1]) >= width:
                    lines.append([])
                lines[-1].append((ch if ch.isprintable() else "\u00b7", float(z), t))
        if len(lines) > max_lines:
            more = len(lines) - max_lines
            lines = lines[:max_lines] + [[(ch, None, -1) for ch in f"... ({more} more lines)"]]
        rows.extend(lines)
    return rows


def credit_map_png(cmap: Any, max_candidates: int | None = None, width: int = 100, max_lines: int = 40) -> bytes:
    """The credit map (`qprobe.evaluation.credits.CreditMap`) drawn as a PNG: one monospace cell per
    character, coloured by its token's Z on the page's scale (needs matplotlib, the `demo` extra)."""
    import io

    import numpy as np

    from qprobe.errors import require

    require("matplotlib", "demo").use("Agg")
    import matplotlib.pyplot as plt

    from qprobe.evaluation.credits import ink, rgb

    zmax = cmap.zmax(max_candidates)
    rows = _grid_lines(cmap, max_candidates, width, max_lines)
    dpi, cell_px, cell_h = 100, 8, 0.16  # a whole number of pixels per character: no drift from rounding
    grid = np.full((len(rows), width, 3), 255, dtype=np.uint8)  # [rows, width, rgb]
    for r, cells in enumerate(rows):
        for col, (_, z, _) in enumerate(cells):
            if z is not None:
                grid[r, col] = rgb(z, zmax)
    fig = plt.figure(figsize=(width * cell_px / dpi, len(rows) * cell_h))
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.imshow(grid, extent=(0, width, len(rows), 0), interpolation="nearest", aspect="auto")
    ax.set_xlim(0, width)
    ax.set_ylim(len(rows), 0)
    ax.axis("off")
    size = cell_px / dpi * 72 / 0.602  # points; DejaVu Sans Mono advances 0.602 em

    def ink_of(z: float | None) -> str:
        return "#111111" if z is None else ink(z, zmax)

    for r, cells in enumerate(rows):
        start = 0
        while start < len(cells):  # one text per token (placed at its own cell) or run of plain text
            colour, token = ink_of(cells[start][1]), cells[start][2]
            end = start + 1
            while end < len(cells) and cells[end][2] == token and (token >= 0 or ink_of(cells[end][1]) == colour):
                end += 1
            text = "".join(ch for ch, _, _ in cells[start:end])
            if text.strip():
                ax.text(start, r + 0.5, text, family="DejaVu Sans Mono", fontsize=size, color=colour,
                        va="center", ha="left", parse_math=False)
            start = end
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    plt.close(fig)
    return buf.getvalue()
