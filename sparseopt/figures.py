"""Matplotlib (headless) and atomic writes of figures and tables."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from .files import atomic_write, write_bytes


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def epoch_axis(ax) -> None:
    """Integer ticks on an epoch axis (no 2.5 epochs)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    plt = pyplot()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    plt.close(fig)
    return Path(path)


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    """Rows of dicts as CSV (columns: every key seen, in first-seen order; missing cells empty)."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)
    return atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode())
