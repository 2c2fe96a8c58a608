"""Plots people would rather see than read: heat maps of patching grids, attention patterns and
attribution tables, and line charts. matplotlib is imported only when a plot is drawn."""

from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'lens[plot]'") from e
    return plt


def heatmap(values: Union[Tensor, Sequence], row_labels: Optional[Sequence[str]] = None,
            col_labels: Optional[Sequence[str]] = None, title: str = "", xlabel: str = "",
            ylabel: str = "", path: Union[None, str, Path] = None, centered: bool = True,
            annotate: Optional[bool] = None, ax=None):
    """A 2-D heat map; diverging colours centred on zero unless centered=False. Saves to `path`
    when given and returns the matplotlib Figure."""
    plt = _plt()
    v = torch.as_tensor(values).detach().float().cpu()
    if v.ndim != 2:
        raise ValueError(f"heatmap needs a 2-D array, got shape {tuple(v.shape)}")
    rows, cols = v.shape
    if ax is None:
        fig, ax = plt.subplots(figsize=(min(2 + 0.5 * cols, 16), min(1.5 + 0.4 * rows, 14)))
    else:
        fig = ax.figure
    if centered:
        lim = float(v.abs().max()) or 1.0
        im = ax.imshow(v.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    else:
        im = ax.imshow(v.numpy(), cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax, shrink=0.8)
    if col_labels is not None:
        ax.set_xticks(range(cols), [str(c) for c in col_labels], rotation=90 if cols > 8 else 0)
    if row_labels is not None:
        ax.set_yticks(range(rows), [str(r) for r in row_labels])
    if annotate if annotate is not None else rows * cols <= 144:
        for i in range(rows):
            for j in range(cols):
                ax.text(j, i, f"{v[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def lines(series: dict[str, Union[Tensor, Sequence]], x: Optional[Sequence] = None, title: str = "",
          xlabel: str = "", ylabel: str = "", path: Union[None, str, Path] = None):
    """One line per named series; saves to `path` when given and returns the Figure."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in series.items():
        ys = torch.as_tensor(ys).detach().float().cpu()
        ax.plot(range(len(ys)) if x is None else x, ys.numpy(), label=name, marker="." if len(ys) < 40 else None)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig
