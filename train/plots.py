"""PNG plots of a run (matplotlib, Agg backend; imported only when plotting).

- :func:`plot_learning_curves` — loss and accuracy per epoch from the epochs.csv rows;
- :func:`plot_confusion` — confusion matrix (rows = true class), coloured per row, counts in the cells;
- :func:`plot_timelines` — per-second predicted vs true class for a few videos.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _numeric(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if value in (None, ""):
            continue
        xs.append(float(row["epoch"]))
        ys.append(float(value))
    return np.asarray(xs), np.asarray(ys)


def plot_learning_curves(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "", best_epoch: int | None = None) -> Path:
    """Left: every ``*_loss`` column; right: every ``*_accuracy`` column; both against epoch."""
    plt = _pyplot()
    keys = list(dict.fromkeys(k for row in rows for k in row))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, suffix in zip(axes, ("_loss", "_accuracy")):
        for key in (k for k in keys if k.endswith(suffix)):
            x, y = _numeric(rows, key)
            ax.plot(x, y, marker="." if len(x) < 30 else None, label=key)
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"selected epoch {best_epoch}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(suffix.strip("_"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path, plt)


def confusion_cell_texts(confusion: np.ndarray) -> np.ndarray:
    """The text of each confusion-matrix cell: the segment count, empty for 0 (a 29-class
    matrix is mostly zeros; blanks keep the counts readable). [C, C] array of str."""
    cm = np.asarray(confusion)
    texts = np.full(cm.shape, "", dtype=object)
    for (i, j), value in np.ndenumerate(cm):
        if value:
            texts[i, j] = f"{int(value)}" if float(value).is_integer() else f"{value:.2g}"
    return texts


def confusion_figure(confusion: np.ndarray, class_names: Sequence[str], title: str = ""):
    """Confusion matrix coloured by the fraction of each true class (row), every non-zero cell
    labelled with its segment count (:func:`confusion_cell_texts`), counts per row in the tick
    labels; a colour bar. Returns the matplotlib figure."""
    plt = _pyplot()
    cm = np.asarray(confusion, dtype=float)
    support = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, support, out=np.zeros_like(cm), where=support > 0)
    n = len(class_names)
    size = max(6.0, 0.42 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    fontsize = 8 if n <= 12 else 6 if n <= 30 else 4
    for (i, j), text in np.ndenumerate(confusion_cell_texts(cm)):
        if text:
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(class_names, rotation=90, fontsize=8)
    ax.set_yticklabels([f"{c} ({int(s)})" for c, s in zip(class_names, support[:, 0])], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (segments)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """confusion_test.png: :func:`confusion_figure` saved."""
    return _save(confusion_figure(confusion, class_names, title), path, _pyplot())


def choose_timeline_samples(labels: np.ndarray, background: int, count: int, seed: int = 0) -> list[int]:
    """``count`` sample indices, preferring samples with both event and background segments
    (the interesting ones), drawn reproducibly."""
    labels = np.asarray(labels)
    if count <= 0 or len(labels) == 0:
        return []
    has_bg = (labels == background).any(axis=1)
    has_event = (labels != background).any(axis=1)
    mixed = np.flatnonzero(has_bg & has_event)
    rest = np.flatnonzero(~(has_bg & has_event))
    rng = np.random.default_rng(seed)
    picked = list(rng.permutation(mixed)[:count]) + list(rng.permutation(rest)[: max(0, count - len(mixed))])
    return sorted(int(i) for i in picked[:count])


def plot_timelines(
    predictions: np.ndarray,
    labels: np.ndarray,
    sample_names: Sequence[str],
    class_names: Sequence[str],
    path: str | Path,
    indices: Sequence[int],
    title: str = "",
) -> Path:
    """One row per chosen sample: true (top strip) and predicted (bottom strip) class per second,
    each cell annotated with its class; wrong seconds outlined in red."""
    plt = _pyplot()
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    indices = list(indices)
    T = labels.shape[1] if labels.ndim == 2 else 0
    cmap = plt.get_cmap("tab20", max(len(class_names), 2))
    fig, axes = plt.subplots(max(len(indices), 1), 1, figsize=(max(8, T * 0.9), 1.4 * max(len(indices), 1) + 0.6), squeeze=False)
    for ax, i in zip(axes[:, 0], indices):
        for lane, (name, seq) in enumerate((("true", labels[i]), ("pred", predictions[i]))):
            y = 1 - lane
            for t, c in enumerate(seq):
                wrong = lane == 1 and c != labels[i, t]
                ax.add_patch(plt.Rectangle((t, y), 1, 0.9, color=cmap(int(c) % cmap.N), ec="red" if wrong else "white", lw=2 if wrong else 0.5))
                ax.text(t + 0.5, y + 0.45, _short(class_names[int(c)]), ha="center", va="center", fontsize=6)
        ax.set_xlim(0, T)
        ax.set_ylim(0, 2)
        ax.set_yticks([0.45, 1.45])
        ax.set_yticklabels(["pred", "true"])
        ax.set_xticks(range(T + 1))
        acc = float((predictions[i] == labels[i]).mean()) if T else 0.0
        ax.set_title(f"{sample_names[i]}  (accuracy {acc:.2f})", fontsize=8, loc="left")
    axes[-1, 0].set_xlabel("second")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path, plt)


#: public names for other tasks' plots
pyplot = _pyplot


def _short(name: str, width: int = 10) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def _save(fig, path: str | Path, plt) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_figure(fig, path: str | Path) -> Path:
    """Save ``fig`` as PNG at ``path`` (folders created) and close it."""
    return _save(fig, path, _pyplot())
