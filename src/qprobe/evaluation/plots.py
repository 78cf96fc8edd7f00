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
